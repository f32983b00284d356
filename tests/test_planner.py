"""The planner's memory figures against what megatron-core really allocates (CPU, gloo ranks), its
activation estimate against a measured CPU peak, and its verdicts for the example configs."""

from __future__ import annotations

import pytest

from megatron_prime.models.hf_config import arch_from_dict
from tests.dist_utils import run_distributed

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
}
LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (tp, pp) on 2 ranks: DP=2, TP=2, PP=2


def _storage_bytes(tensors, exclude=()) -> int:
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def _allocated(trainable) -> dict:
    """Bytes the DDP buffers (or the parameters themselves) and the optimizer hold on this rank."""
    ddp = trainable.model
    params = list(ddp.module.parameters())
    buffers = ddp.buffers
    if buffers and buffers[0].param_data is not None:
        param_bytes = sum(b.param_data.untyped_storage().nbytes() for b in buffers)
        param_tensors = [b.param_data for b in buffers]
    else:
        param_bytes = _storage_bytes(params)
        param_tensors = params
    grad_bytes = sum(b.grad_data.untyped_storage().nbytes() for b in buffers)
    optimizers = getattr(trainable.optimizer, "chained_optimizers", [trainable.optimizer])
    state = []
    for opt in optimizers:
        inner = opt.optimizer
        for group in inner.param_groups:
            state += list(group["params"])  # main params: fp32 copies, or views of the model's
        for s in inner.state.values():
            state += [v for v in s.values() if hasattr(v, "untyped_storage") and v.dim() > 0]
    opt_bytes = _storage_bytes(state, exclude=param_tensors + params + [b.grad_data for b in buffers])
    return {"params": param_bytes, "grads": grad_bytes, "optimizer": opt_bytes}


def _state_checks(rank, world_size, cases):
    import torch
    from megatron.core import parallel_state

    from megatron_prime.config import OptimizerConfig
    from megatron_prime.models.gpt import ModelOptions
    from megatron_prime.platform import distributed
    from megatron_prime.planner.state_memory import stage_parameters, trainable_state_bytes
    from megatron_prime.training.models import build_frozen, build_trainable

    results = []
    for family, tp, pp, dtype, dist_opt in cases:
        arch = arch_from_dict(SHAPES[family])
        distributed.init_model_parallel(tp=tp, pp=pp)
        opts = ModelOptions(dtype=dtype, tp=tp, pp=pp)
        trainable = build_trainable(arch, opts, OptimizerConfig(lr=1e-3), total_steps=1,
                                    distributed_optimizer=dist_opt)
        trainable.zero_grad()
        trainable.step()  # Adam allocates its moments on the first step
        measured = _allocated(trainable)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        dp = parallel_state.get_data_parallel_world_size()
        params = stage_parameters(arch, tp=tp, pp=pp, pp_rank=pp_rank, vocab_pad_multiple=128)
        names = [n for n, _ in trainable.model.module.named_parameters()]
        planned = trainable_state_bytes(params, dtype=dtype, dp=dp, dp_rank=parallel_state.get_data_parallel_rank(),
                                        distributed_optimizer=dist_opt)
        frozen = build_frozen(arch, opts)
        frozen_bytes = sum(p.numel() * p.element_size() for p in frozen.parameters())
        results.append({
            "case": (family, tp, pp, dtype, dist_opt), "measured": measured,
            "planned": {"params": planned.params, "grads": planned.grads, "optimizer": planned.optimizer},
            "names_match": [n.removeprefix("module.") for n in names] == [p.name for p in params],
            "frozen": (frozen_bytes, sum(p.numel for p in params) * planned.params // max(1, planned.params) and
                       sum(p.numel for p in params) * {"fp32": 4, "bf16": 2}[dtype]),
        })
        del trainable, frozen
    gathered = distributed.all_gather_object(results)
    return gathered


def test_state_bytes_equal_megatron_allocations():
    cases = [(family, tp, pp, dtype, True) for family in SHAPES for tp, pp in LAYOUTS for dtype in ("bf16", "fp32")]
    cases += [("qwen2", 1, 1, "bf16", False), ("qwen3", 1, 2, "fp32", False)]
    per_rank = run_distributed(_state_checks, cases, world_size=2)
    for rank, results in enumerate(per_rank):
        for r in results:
            assert r["names_match"], r["case"]
            assert r["planned"] == r["measured"], (rank, r["case"])
            assert r["frozen"][0] == r["frozen"][1], (rank, r["case"])
