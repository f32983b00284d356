"""Shared-base LoRA against an independent reference: transformers' model whose weights are
``W0 + (alpha / r) B A``, with A and B nonzero.

On 2 gloo ranks at TP=2, TP=2 with sequence parallelism and PP=2 (a tied-embedding Qwen3), a
Megatron model carrying two adapters gives, with the policy adapter active, the merged model's
logits and the gradients of the adapter that the merged model's weight gradients imply
(dL/dB_p = s dL/dW_p A^T, dL/dA = s sum_p B_p^T dL/dW_p over the projections p sharing A) and their
norm, which the optimizer clips by (each TP shard counted once, each replicated tensor once); with no
adapter active it gives the base's logits. The PEFT adapter and the merged HF checkpoint it exports
at that layout, loaded with the ``peft`` package on the HF base and with transformers, give the
reference's logits."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_tiny_hf, right_padded, run_distributed

pytestmark = pytest.mark.multi_rank

PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 8, 60, 11], [70, 3, 3, 19, 2]]
RESPONSES = [[12, 99, 4, 4, 31, 0], [50, 7], [1, 2, 3, 98, 5, 6, 7, 8, 9]]
RANK, ALPHA = 4, 8.0
LAYOUTS = {"tp2": dict(tp=2), "tp2_sp": dict(tp=2, sequence_parallel=True), "pp2": dict(pp=2)}


def random_adapter(arch, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF module -> (A, B), nonzero, in PEFT's layout (the fused projections share one A)."""
    from megatron_prime.bridge.lora_export import hf_modules
    from megatron_prime.bridge.mapping import expected_hf_shape
    from megatron_prime.models.lora import LORA_TARGETS

    generator = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(arch.num_layers):
        for target in LORA_TARGETS:
            modules = hf_modules(arch, target, layer)
            rows_cols = [expected_hf_shape(arch, m + ".weight") for m in modules]
            a = 0.3 * torch.randn(RANK, rows_cols[0][1], generator=generator)
            for module, (rows, _) in zip(modules, rows_cols):
                out[module] = (a, 0.3 * torch.randn(rows, RANK, generator=generator))
    return out


def _set_adapter(model, arch, adapter: str, pairs: dict) -> None:
    """This rank's shards of ``pairs`` into the model's ``adapter``."""
    from megatron.core import parallel_state

    from megatron_prime.bridge.mapping import load_shard, param_spec
    from megatron_prime.bridge.transfer import lora_modules_by_name
    from megatron_prime.models.wrappers import unwrap

    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()

    class Source:  # B's rows, read like an HF checkpoint's
        def read(self, name, dim=None, start=0, stop=None):
            b = pairs[name.removesuffix(".weight")][1]
            return b if dim is None else b.narrow(dim, start, (stop or b.shape[dim]) - start)

    for name, module in lora_modules_by_name(unwrap(model), adapter).items():
        pair, spec = module.lora[adapter], param_spec(arch, name)
        first = spec.hf_names[0].removesuffix(".weight")
        with torch.no_grad():
            if module.parallel == "column":
                pair.a.copy_(pairs[first][0])
                load_shard(arch, spec, Source(), tp_rank, tp, 0, pair.b)
            else:
                a, b = pairs[first]
                width = a.shape[1] // tp
                pair.a.copy_(a[:, tp_rank * width:(tp_rank + 1) * width])
                pair.b.copy_(b)


def _run(rank, world_size, hf_dir, out_dir):
    from megatron_prime.bridge.convert import write_hf
    from megatron_prime.bridge.hf_io import SafetensorsSource
    from megatron_prime.bridge.lora_export import adapter_hf_tensors, write_peft_adapter
    from megatron_prime.bridge.transfer import load_hf_weights
    from megatron_prime.config import OptimizerConfig
    from megatron_prime.models.forward import full_logits
    from megatron_prime.models.gpt import ModelOptions
    from megatron_prime.models.hf_config import read_hf_config
    from megatron_prime.models.lora import LoRASettings, active_adapter, lora_pairs
    from megatron_prime.models.wrappers import unwrap
    from megatron_prime.passes.batch import build_rollout_batch
    from megatron_prime.passes.forward_backward import run_pass
    from megatron_prime.passes.trainable import build_shared_base
    from megatron_prime.platform import distributed

    arch = read_hf_config(hf_dir)
    batch = build_rollout_batch(PROMPTS, RESPONSES, [1.0, 0.0, 1.0], None, [False] * 3, group_size=3)
    ids, mask = right_padded([p + r for p, r in zip(PROMPTS, RESPONSES)])

    def loss_fn(mb, logprobs, _entropy):
        return -(logprobs * mb.response_mask).sum(), int(mb.response_mask.sum()), {}

    results = {}
    for name, layout in LAYOUTS.items():
        distributed.init_model_parallel(tp=layout.get("tp", 1), pp=layout.get("pp", 1))
        settings = LoRASettings(ranks={"policy": RANK, "prm": RANK}, alpha=ALPHA)
        opts = ModelOptions(dtype="fp32", **layout)
        trainables, base = build_shared_base(arch, opts, settings, {"policy": (OptimizerConfig(), 1),
                                                                     "prm": (OptimizerConfig(), 1)},
                                             distributed_optimizer=False, seed=0)
        load_hf_weights(base, arch, SafetensorsSource(hf_dir, arch))
        _set_adapter(base, arch, "policy", random_adapter(arch, seed=1))
        _set_adapter(base, arch, "prm", random_adapter(arch, seed=2))
        inner = unwrap(base)
        with active_adapter(inner, "policy"):
            policy_logits = full_logits(base, ids, mask, arch.vocab_size)
        base_logits = full_logits(base, ids, mask, arch.vocab_size)
        policy = trainables["policy"]
        write_peft_adapter(policy.model, arch, settings, "policy", f"{out_dir}/{name}/peft", base_model_dir=hf_dir)
        write_hf(inner, arch, f"{out_dir}/{name}/merged", hf_dir, adapter="policy")
        policy.zero_grad()
        run_pass(policy.model, batch, temperature=1.0, token_budget=16, loss_fn=loss_fn)  # 3 micro-batches
        prm_grads = [p.main_grad.abs().max().item() for _, pair in lora_pairs(settings, "prm") for p in pair.parameters()]
        params = [p for _, pair in lora_pairs(settings, "policy") for p in pair.parameters()]
        main_grads = [p.main_grad.clone() for p in params]
        grad_norm = policy.step()["grad_norm"]  # megatron-core's, over the TP shards
        with torch.no_grad():  # the gradients, gathered like the adapter itself
            for p, g in zip(params, main_grads):
                p.copy_(g)
        grads = adapter_hf_tensors(policy.model, arch, settings, "policy")
        results[name] = {"policy_logits": policy_logits, "base_logits": base_logits, "grads": grads,
                         "prm_grad_max": max(prm_grads), "grad_norm": grad_norm}
    return results if rank == 0 else None


def _reference(hf_dir, pairs):
    """transformers with the merged weights: logits, and the adapter gradients its weight gradients
    imply for the loss the run used (mean negative log-prob of the response tokens)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    scale = ALPHA / RANK
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            model.get_submodule(module).weight.add_(scale * b @ a)
    ids, mask = right_padded([p + r for p, r in zip(PROMPTS, RESPONSES)])
    logits = model(input_ids=ids, attention_mask=mask).logits
    logprobs = torch.log_softmax(logits, dim=-1)
    total, count = 0.0, 0
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        for t in range(len(p), len(p) + len(r)):
            total = total - logprobs[i, t - 1, ids[i, t]]
            count += 1
    (total / count).backward()
    grads = {}
    shared_a: dict[int, list] = {}
    for module, (a, b) in pairs.items():
        weight_grad = model.get_submodule(module).weight.grad
        grads[f"base_model.model.{module}.lora_B.weight"] = scale * weight_grad @ a.T
        shared_a.setdefault(id(a), []).append((module, scale * b.T @ weight_grad))
    for contributions in shared_a.values():
        total_a = sum(c for _, c in contributions)
        for module, _ in contributions:
            grads[f"base_model.model.{module}.lora_A.weight"] = total_a
    return logits.detach(), grads


def _valid(logits, mask):
    return logits[mask.bool()]


def test_lora_layers_match_the_merged_model_at_tp_sp_and_pp(tmp_path):
    import peft
    import transformers

    from megatron_prime.models.hf_config import read_hf_config

    hf_dir = str(tmp_path / "qwen3")
    base_model = make_tiny_hf("qwen3", hf_dir)
    arch = read_hf_config(hf_dir)
    pairs = random_adapter(arch, seed=1)
    ref_logits, ref_grads = _reference(hf_dir, pairs)
    ids, mask = right_padded([p + r for p, r in zip(PROMPTS, RESPONSES)])
    with torch.no_grad():
        base_logits = base_model(input_ids=ids, attention_mask=mask).logits
    assert (_valid(ref_logits, mask) - _valid(base_logits, mask)).abs().max() > 0.1  # the adapter matters
    results = run_distributed(_run, hf_dir, str(tmp_path / "out"), timeout_s=600)
    for name, got in results.items():
        torch.testing.assert_close(_valid(got["policy_logits"], mask), _valid(ref_logits, mask), rtol=0, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(_valid(got["base_logits"], mask), _valid(base_logits, mask), rtol=0, atol=1e-5,
                                   msg=lambda m: f"{name} (no adapter): {m}")
        assert set(got["grads"]) == set(ref_grads)
        for key, expected in ref_grads.items():
            assert expected.abs().max() > 1e-4, key
            torch.testing.assert_close(got["grads"][key], expected, rtol=0, atol=1e-5, msg=lambda m: f"{name} {key}: {m}")
        assert got["prm_grad_max"] == 0.0  # the inactive adapter took no gradient
        # the gradient norm the optimizer clips by: every B once, each shared A once
        unique = {id(g): g for k, g in ref_grads.items() if "lora_B" in k or not k.endswith(("k_proj.lora_A.weight",
                  "v_proj.lora_A.weight", "up_proj.lora_A.weight"))}
        expected_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in unique.values())).item()
        assert got["grad_norm"] == pytest.approx(expected_norm, rel=1e-5), name
        # the exports at this layout, loaded by peft and by transformers
        with torch.no_grad():
            with_peft = peft.PeftModel.from_pretrained(
                transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                str(tmp_path / "out" / name / "peft"))(input_ids=ids, attention_mask=mask).logits
            merged = transformers.AutoModelForCausalLM.from_pretrained(
                str(tmp_path / "out" / name / "merged"), dtype=torch.float32)(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(_valid(with_peft, mask), _valid(merged, mask), rtol=0, atol=1e-5)
        torch.testing.assert_close(_valid(merged, mask), _valid(ref_logits, mask), rtol=0, atol=1e-5)
