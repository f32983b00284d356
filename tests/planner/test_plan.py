"""The planner's memory figures against what megatron-core really allocates (CPU, gloo ranks), its
activation estimate against a measured CPU peak, and its verdicts for the example configs."""

from __future__ import annotations

import re

import pytest

from megatron_prime.models.hf_config import arch_from_dict
from tests.helpers import run_distributed

pytestmark = [pytest.mark.multi_rank, pytest.mark.slow]

# Shapes that exercise every rule of the buffer layout: a vocabulary that is not a multiple of
# the padding unit, QKV biases (qwen2), q/k norms and tied embeddings (qwen3, whose PP=2 stage
# copies get their own bucket), GQA that TP=2 splits.
SHAPES = {
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=96,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=250,
                  max_position_embeddings=256, tie_word_embeddings=False),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], hidden_size=48, intermediate_size=80, head_dim=24,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                  max_position_embeddings=256, tie_word_embeddings=True),
    "llama": dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=160,
                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                  max_position_embeddings=256, tie_word_embeddings=False),
    # mixture of experts: the experts' own buffer, split over EP and sharded over DP / EP
    "qwen3_moe": dict(architectures=["Qwen3MoeForCausalLM"], hidden_size=64, intermediate_size=96, head_dim=16,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                      max_position_embeddings=256, tie_word_embeddings=False, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=40, norm_topk_prob=True),
}
MOE_CASES = [("qwen3_moe", 1, 1, "bf16", True, 2), ("qwen3_moe", 1, 1, "bf16", True, 1),
             ("qwen3_moe", 2, 1, "fp32", False, 1), ("qwen3_moe", 1, 2, "bf16", True, 1)]  # (..., ep)
LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (tp, pp) on 2 ranks: DP=2, TP=2, PP=2


def _state_checks(rank, world_size, cases):
    from megatron.core import parallel_state

    from megatron_prime.config import OptimizerConfig
    from megatron_prime.models.gpt import ModelOptions
    from megatron_prime.planner.measured import trainable_bytes
    from megatron_prime.planner.state_memory import frozen_state_bytes, stage_parameters, trainable_state_bytes
    from megatron_prime.platform import distributed
    from megatron_prime.passes.trainable import build_frozen, build_trainable

    results = []
    for family, tp, pp, dtype, dist_opt, *ep in cases:
        ep = ep[0] if ep else 1
        arch = arch_from_dict(SHAPES[family])
        distributed.init_model_parallel(tp=tp, pp=pp, ep=ep)
        opts = ModelOptions(dtype=dtype, tp=tp, pp=pp, ep=ep)
        trainable = build_trainable(arch, opts, OptimizerConfig(lr=1e-3), total_steps=1,
                                    distributed_optimizer=dist_opt)
        trainable.zero_grad()
        trainable.step()  # Adam allocates its moments on the first step
        measured = trainable_bytes(trainable)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        dp = parallel_state.get_data_parallel_world_size()
        params = stage_parameters(arch, tp=tp, pp=pp, pp_rank=pp_rank, vocab_pad_multiple=128, ep=ep)
        names = [n for n, _ in trainable.model.module.named_parameters()]
        planned = trainable_state_bytes(params, dtype=dtype, dp=dp, dp_rank=parallel_state.get_data_parallel_rank(),
                                        distributed_optimizer=dist_opt, ep=ep)
        frozen = build_frozen(arch, opts)
        frozen_bytes = sum(p.numel() * p.element_size() for p in frozen.parameters())
        results.append({
            "case": (family, tp, pp, dtype, dist_opt, ep), "measured": measured,
            "planned": {"params": planned.params, "grads": planned.grads, "optimizer": planned.optimizer},
            "names_match": [n.removeprefix("module.") for n in names] == [p.name for p in params],
            "frozen": (frozen_bytes, frozen_state_bytes(params, dtype=dtype).params),
        })
        del trainable, frozen
    activations = [_activation_check(*case) for case in ACTIVATION_CASES[world_size]]
    lora = [_lora_check(*case) for case in LORA_CASES]
    return distributed.all_gather_object({"state": results, "activations": activations, "lora": lora})


LORA_CASES = [("qwen2", 2, 1, "bf16", ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")),
              ("qwen3", 1, 2, "fp32", ("linear_fc1", "linear_fc2"))]


def _lora_check(family, tp, pp, dtype, targets):
    """Shared-base LoRA: each adapter's parameters, gradient buffer and optimizer state, and the one
    base, against the planner's ``lora_parameters``."""
    from megatron_prime.config import OptimizerConfig
    from megatron_prime.models.gpt import ModelOptions
    from megatron_prime.models.lora import LoRASettings
    from megatron_prime.passes.trainable import build_shared_base
    from megatron_prime.planner.measured import trainable_bytes
    from megatron_prime.planner.state_memory import lora_parameters, stage_parameters, trainable_state_bytes
    from megatron_prime.platform import distributed

    from megatron.core import parallel_state

    arch = arch_from_dict(SHAPES[family])
    distributed.init_model_parallel(tp=tp, pp=pp)
    ranks = {"policy": 8, "prm": 4}
    settings = LoRASettings(ranks=ranks, alpha=16.0, targets=targets)
    trainables, base = build_shared_base(arch, ModelOptions(dtype=dtype, tp=tp, pp=pp), settings,
                                         {n: (OptimizerConfig(lr=1e-3), 1) for n in ranks},
                                         distributed_optimizer=False, seed=0)
    out = {"case": (family, tp, pp, dtype, targets)}
    for name, tm in trainables.items():
        tm.zero_grad()
        tm.step()
        adapter = [p for p in base.parameters() if getattr(p, "is_lora", False) and p in set(tm.model.buffers[0].params)]
        measured = trainable_bytes(tm, adapter)
        planned = trainable_state_bytes(lora_parameters(arch, rank=ranks[name], targets=targets, tp=tp, pp=pp),
                                        dtype=dtype, dp=parallel_state.get_data_parallel_world_size(), dp_rank=0,
                                        distributed_optimizer=False)
        out[name] = (measured, {"params": planned.params, "grads": planned.grads, "optimizer": planned.optimizer})
    base_params = [p for p in base.parameters() if not getattr(p, "is_lora", False)]
    stage = stage_parameters(arch, tp=tp, pp=pp, pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                             vocab_pad_multiple=128)
    out["base"] = (sum(p.numel() for p in base_params), sum(p.numel for p in stage))
    return out


# The activation model: a 4-layer GQA model, 2 sequences of 128 tokens.
ACTIVATION_SHAPE = dict(architectures=["Qwen2ForCausalLM"], hidden_size=256, intermediate_size=704,
                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                        max_position_embeddings=512, tie_word_embeddings=False)
ACTIVATION_CASES = {2: [("fp32", 1, False), ("bf16", 1, False), ("bf16", 2, True), ("fp32", 2, False)]}


def _activation_check(dtype, tp, sp, sequences=2, seq_len=128):
    """Bytes the forward keeps for backward (saved-tensor hooks: unique storages that are not
    parameters) and the peak of live CPU memory during the forward (the profiler's allocation
    events), against the planner's figures for megatron-core's local layer spec."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from megatron_prime.config import OptimizerConfig
    from megatron_prime.models.forward import attention_mask_4d, position_ids_for
    from megatron_prime.models.gpt import ModelOptions
    from megatron_prime.planner.activations import (
        MicroBatch,
        layer_activation_bytes,
        model_activation_bytes,
    )
    from megatron_prime.platform import distributed
    from megatron_prime.passes.trainable import build_trainable

    distributed.init_model_parallel(tp=tp)
    arch = arch_from_dict(ACTIVATION_SHAPE)
    trainable = build_trainable(arch, ModelOptions(dtype=dtype, tp=tp, sequence_parallel=sp), OptimizerConfig(),
                                total_steps=1, distributed_optimizer=True)
    model = trainable.model
    model.train()
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    torch.manual_seed(0)
    ids = torch.randint(0, arch.vocab_size, (sequences, seq_len))
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logits = model(ids, position_ids_for(ids), attention_mask_4d(torch.ones_like(ids)))
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    mb = MicroBatch(sequences, seq_len)
    planned = model_activation_bytes(arch, mb, dtype=dtype, tp=tp, sequence_parallel=sp, layers=arch.num_layers,
                                     first_stage=True, last_stage=True, spec="local")
    one_layer = layer_activation_bytes(arch, mb, dtype=dtype, tp=tp, sequence_parallel=sp, spec="local")
    return {"case": (dtype, tp, sp), "saved": sum(saved.values()), "planned": planned, "peak": peak,
            "one_layer": one_layer,
            "logits": logits.numel() * logits.element_size()}


@pytest.fixture(scope="module")
def measured():
    """One 2-rank gloo launch for all measurements (starting processes costs more than measuring)."""
    cases = [(family, tp, pp, dtype, True) for family in SHAPES if family != "qwen3_moe" for tp, pp in LAYOUTS
             for dtype in ("bf16", "fp32")]
    cases += [("qwen2", 1, 1, "bf16", False), ("qwen3", 1, 2, "fp32", False), *MOE_CASES]
    return run_distributed(_state_checks, cases, world_size=2)


def test_state_bytes_equal_megatron_allocations(measured):
    per_rank = measured
    for rank, results in enumerate(per_rank):
        for r in results["state"]:
            assert r["names_match"], r["case"]
            assert r["planned"] == r["measured"], (rank, r["case"])
            assert r["frozen"][0] == r["frozen"][1], (rank, r["case"])
    # DP=2 really splits the optimizer unevenly here, so the per-rank arithmetic is exercised
    dp_case = [r for r in per_rank[0]["state"] if r["case"] == ("qwen2", 1, 1, "bf16", True, 1)][0]
    dp_case_1 = [r for r in per_rank[1]["state"] if r["case"] == ("qwen2", 1, 1, "bf16", True, 1)][0]
    assert dp_case["measured"]["optimizer"] != dp_case_1["measured"]["optimizer"]


def test_lora_state_bytes_equal_megatron_allocations(measured):
    for rank, results in enumerate(measured):
        for r in results["lora"]:
            for name in ("policy", "prm"):
                got, planned = r[name]
                assert got == planned, (rank, r["case"], name)
            assert r["base"][0] == r["base"][1], (rank, r["case"])  # one base, as the frozen reference


def test_activation_estimate_against_measured_cpu_memory(measured):
    for r in measured[0]["activations"] + measured[1]["activations"]:
        # what the forward keeps for backward: exact on the local spec
        assert r["saved"] == r["planned"], r
        # The measured peak holds the kept activations and the logits, plus the temporaries of the
        # op running at the peak: never less, and at most one layer's activations more.
        planned_peak = r["planned"] + r["logits"]
        assert planned_peak <= r["peak"] <= planned_peak + r["one_layer"], r


# --- the verdicts for the example configs (no process group: arithmetic on the shipped shapes)


def _plan(capsys, *argv):
    from megatron_prime.algorithm import OUTCOME_ONLY_ESTIMATORS
    from megatron_prime.planner.command import plan_command
    from megatron_prime.training.validation import validate_run

    code = plan_command(list(argv), validate_run=validate_run, outcome_only=OUTCOME_ONLY_ESTIMATORS)
    return code, capsys.readouterr().out


def test_7b_config_fits_one_node_of_80gb(capsys):
    code, out = _plan(capsys, "examples/configs/prime_7b.yaml", "--gpus", "8", "--gpu-mem", "80")
    assert code == 0 and "\nFITS: peak" in out, out
    assert "7.62B parameters" in out and "shape from examples/models/Qwen2.5-Math-7B/config.json" in out
    # a layout that does not fit says so and names one that does on the same node
    code, out = _plan(capsys, "examples/configs/prime_7b.yaml", "--gpus", "8", "parallel.tp=2",
                      "parallel.sequence_parallel=false")
    assert code == 1 and "DOES NOT FIT on 80.0 GiB GPUs" in out
    assert "fits: TP=4 PP=1 DP=2 on 8 GPUs (1 node)" in out


def test_70b_config_needs_more_than_one_node(capsys):
    code, out = _plan(capsys, "examples/configs/prime_70b.yaml", "--gpus", "8", "--gpu-mem", "80")
    assert code == 1 and "no TP/PP/micro-batch layout fits on 8 GPUs; the fewest that fit: 40 (5 nodes of 8)" in out
    code, out = _plan(capsys, "examples/configs/prime_70b.yaml", "--gpus", "64", "--gpu-mem", "80")
    assert code == 0 and "FITS" in out and "TP=8 PP=4 DP=2 on 64 GPUs (8 nodes)" in out


def test_70b_lora_config_fits_one_node_of_80gb(capsys):
    code, out = _plan(capsys, "examples/configs/prime_70b_lora.yaml", "--gpus", "8", "--gpu-mem", "80")
    assert code == 0 and "\nFITS: peak" in out and "TP=8 PP=1 DP=1 on 8 GPUs (1 node)" in out, out
    assert "one frozen base (the reference) + LoRA adapters: policy + PRM" in out
    # one base copy (16.4 GiB: 70.55B bf16 parameters over TP=8), not three
    assert re.search(r"parameters \(bf16\)\s+16\.4\s+0\.2\s+0\.2\n", out), out


def test_qwen3_moe_example_needs_two_nodes_and_one_with_lora(capsys):
    code, out = _plan(capsys, "examples/configs/prime_qwen3_30b_a3b.yaml", "--gpus", "8", "--gpu-mem", "80")
    assert code == 1 and "30.53B parameters" in out
    assert "no TP/PP/micro-batch layout fits on 8 GPUs; the fewest that fit: 16 (2 nodes of 8)" in out
    code, out = _plan(capsys, "examples/configs/prime_qwen3_30b_a3b.yaml", "--gpus", "16", "--gpu-mem", "80")
    assert code == 0 and "FITS" in out and "TP=4 PP=1 DP=4 EP=4 on 16 GPUs (2 nodes)" in out, out
    # one frozen base with attention adapters (the experts take none): one node
    code, out = _plan(capsys, "examples/configs/prime_qwen3_30b_a3b.yaml", "--gpus", "8", "--gpu-mem", "80",
                      "model.lora.rank=32", "model.lora.targets=[linear_qkv,linear_proj]", "parallel.tp=1",
                      "parallel.ep=8", "parallel.sequence_parallel=false")
    assert code == 0 and "FITS" in out and "EP=8 on 8 GPUs (1 node)" in out, out


def test_plan_figures_by_hand():
    """The 7B figures against arithmetic done by hand from the shipped config.json."""
    from megatron_prime.config import load_config
    from megatron_prime.planner.plan import GIB, Layout, plan_layout
    from megatron_prime.planner.shapes import model_shape

    cfg = load_config("examples/configs/prime_7b.yaml")
    arch, _ = model_shape(cfg)
    plan = plan_layout(cfg, arch, Layout(8, 8, 4, 1, 16384), gpu_mem_gib=80, uses_prm=True, uses_reference=True)
    policy = plan.models["policy"].state
    n = 7_615_616_512  # Qwen2.5-Math-7B parameters (untied embeddings, QKV biases)
    # TP=4 shards all but the norms (and QKV biases are sharded too): within 0.1% of n / 4
    assert abs(policy.params / 2 - n / 4) / (n / 4) < 1e-3
    assert policy.grads == 2 * policy.params  # fp32 gradients of bf16 parameters
    assert abs(policy.optimizer - 12 * policy.params / 2 / 2) <= 12 * 2 * 128  # 12 bytes/param over DP=2
    engine = plan.engine
    assert engine.weights == n * 2 // 2 and engine.share == int(0.6 * 80 * GIB)
    assert engine.kv_bytes_per_token == 2 * 28 * 2 * 128 * 2  # K and V, 28 layers, 4/2 KV heads, bf16


def test_planner_needs_neither_torch_nor_megatron():
    """The planner is arithmetic on shapes and config: it must run on a laptop before installs."""
    import subprocess
    import sys

    code = ("import sys, megatron_prime.planner.command, megatron_prime.planner.plan; "
            "print(sorted(m for m in ('torch', 'megatron', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("dp,ep", [(4, 2), (8, 2), (8, 4), (2, 2)])
def test_expert_data_parallel_rank_is_megatrons(dp, ep):
    """Each rank's dense shard is counted with its own expert shard: the expert-data-parallel rank of
    every data-parallel rank as megatron-core's rank generator assigns it."""
    from megatron.core.parallel_state import RankGenerator

    from megatron_prime.planner.state_memory import expert_data_parallel_rank

    order = "tp-cp-ep-dp-pp"
    dense = RankGenerator(tp=2, ep=1, dp=dp, pp=1, cp=1, order=order).get_ranks("dp")
    expert = RankGenerator(tp=2, ep=ep, dp=dp // ep, pp=1, cp=1, order=order).get_ranks("dp")
    dp_rank = {rank: group.index(rank) for group in dense for rank in group}
    edp_rank = {rank: group.index(rank) for group in expert for rank in group}
    assert all(expert_data_parallel_rank(dp_rank[r], ep) == edp_rank[r] for r in dp_rank)
