"""Megatron on CUDA (skipped without a GPU): the CPU backend stays off, HF -> Megatron logits
agree in bf16, and PRIME steps run end to end on the GPU (Megatron passes, hf rollout engine,
weight sync, checkpoint)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.helpers import make_tiny_hf, make_trainer_fixture, overrides, register_test_verifier, run_distributed, VOCAB

pytestmark = [pytest.mark.multi_rank, pytest.mark.gpu]

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Megatron GPU path)")


def _bf16_logits(rank, world_size, hf_dirs):
    import transformers

    from megatron_prime.bridge.convert import build_from_hf
    from megatron_prime.models.forward import full_logits
    from megatron_prime.platform import cpu_backend, distributed

    distributed.init_model_parallel(tp=1, pp=1)
    out = {"cpu_backend_active": cpu_backend.is_active()}
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0)).cuda()
    for family, hf_dir in hf_dirs.items():
        model, arch = build_from_hf(hf_dir, dtype="bf16")
        logits = full_logits(model, ids, vocab_size=arch.vocab_size)
        # The reference is transformers in fp32; transformers in bf16 shows how far bf16
        # rounding alone moves the logits of this model.
        with torch.no_grad():
            hf32 = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).cuda()
            ref = hf32(input_ids=ids).logits.float()
            hf16 = hf32.to(torch.bfloat16)
            hf_bf16 = hf16(input_ids=ids).logits.float()
        out[family] = {
            "device": str(next(model.parameters()).device),
            "megatron_bf16_max_err": (logits - ref).abs().max().item(),
            "hf_bf16_max_err": (hf_bf16 - ref).abs().max().item(),
            "megatron_bf16_mean_err": (logits - ref).abs().mean().item(),
            "hf_bf16_mean_err": (hf_bf16 - ref).abs().mean().item(),
            "mean_abs_logit": ref.abs().mean().item(),
            "megatron_top1": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "hf_bf16_top1": (hf_bf16.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        }
    return out


@cuda
def test_bf16_logits_on_cuda_match_transformers(tmp_path):
    hf_dirs = {f: str(tmp_path / f) for f in ("llama", "qwen2", "qwen3")}
    for i, (family, path) in enumerate(hf_dirs.items()):
        make_tiny_hf(family, path, seed=i, dtype=torch.bfloat16)
    result = run_distributed(_bf16_logits, hf_dirs, world_size=1, backend="nccl")
    assert result["cpu_backend_active"] is False
    for family in hf_dirs:
        r = result[family]
        print(family, r)
        assert r["device"].startswith("cuda")
        # Megatron in bf16 is as close to the fp32 reference as transformers in bf16 is.
        assert r["megatron_bf16_mean_err"] <= 1.5 * r["hf_bf16_mean_err"] + 1e-3, r
        assert r["megatron_bf16_max_err"] <= 2.0 * r["hf_bf16_max_err"] + 1e-2, r
        # top-1 over 96 positions of a random model: near-ties flip under any bf16 rounding
        assert r["megatron_top1"] >= 0.9, r


def _prime_steps(rank, world_size, fixture, root):
    from megatron_prime.config import load_config
    from megatron_prime.training.trainer import train

    register_test_verifier()
    cfg = load_config(None, overrides(fixture, root, "model.dtype=bf16", "train.steps=3", "checkpoint.interval=2",
                                      "optim.policy.lr=1e-4",
                                      f"data.eval_files=[{fixture['eval']}]"))
    return train(cfg)


@cuda
def test_prime_steps_on_cuda(tmp_path):
    fixture = make_trainer_fixture(str(tmp_path))
    summary = run_distributed(_prime_steps, fixture, str(tmp_path), world_size=1, backend="nccl")
    metrics = summary["last_metrics"]
    print({k: v for k, v in metrics.items() if k.startswith(("time/", "prm/", "policy/", "rollout/"))})
    import math

    for key in ("prm/loss", "policy/loss", "policy/entropy", "rollout/abs_logprob_diff", "policy/grad_norm"):
        assert math.isfinite(metrics[key]), key
    assert metrics["policy/grad_norm"] > 0 and metrics["policy/updates"] >= 1 and metrics["policy/skipped_updates"] == 0
    assert metrics["rollout/abs_logprob_diff"] < 0.05  # bf16 engine vs bf16 Megatron
    assert (tmp_path / "export" / "policy" / "config.json").exists()
    # Three Adam steps at lr 1e-4 move each weight by at most ~3e-4: the policy is still near the
    # checkpoint (the optimizer's fp32 main copies were refreshed after loading;
    # tests/training/test_initial_weights.py), and bf16 can resolve the move.
    import transformers

    start = transformers.AutoModelForCausalLM.from_pretrained(fixture["hf"], dtype=torch.float32)
    end = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export" / "policy"), dtype=torch.float32)
    end_params = dict(end.named_parameters())
    moved = 0
    for name, p in start.named_parameters():
        assert (end_params[name] - p).abs().mean().item() < 1e-3, name
        moved += not torch.equal(end_params[name], p)
    assert moved > 0  # ... but the updates did land


def _lora_prime_steps(rank, world_size, fixture, root):
    from megatron_prime.config import load_config
    from megatron_prime.models.specs import transformer_engine_available
    from megatron_prime.training.trainer import train

    register_test_verifier()
    cfg = load_config(None, overrides(fixture, root, "model.dtype=bf16", "train.steps=3", "checkpoint.interval=2",
                                      "model.lora.rank=8", "model.lora.alpha=16", "optim.policy.lr=1e-3",
                                      "optim.prm.lr=1e-3"))
    return {"summary": train(cfg), "te": transformer_engine_available()}


@cuda
def test_lora_prime_steps_on_cuda(tmp_path):
    """Shared-base LoRA PRIME on CUDA, with the Transformer Engine spec where TE is installed (its
    LoRA linears, the norms unfused) and the local spec otherwise."""
    import math

    fixture = make_trainer_fixture(str(tmp_path))
    result = run_distributed(_lora_prime_steps, fixture, str(tmp_path), world_size=1, backend="nccl")
    metrics = result["summary"]["last_metrics"]
    print("transformer engine:", result["te"], {k: v for k, v in metrics.items() if k.startswith(("time/", "prm/", "policy/", "rollout/"))})
    for key in ("prm/loss", "policy/loss", "rollout/abs_logprob_diff", "policy/grad_norm", "prm/grad_norm"):
        assert math.isfinite(metrics[key]), key
    assert metrics["policy/grad_norm"] > 0 and metrics["prm/grad_norm"] > 0
    assert metrics["rollout/abs_logprob_diff"] < 0.05  # the hf engine got the merged bf16 policy
    assert (tmp_path / "export" / "policy_adapter" / "adapter_model.safetensors").exists()


def _moe_steps_with_engine_routes(rank, world_size, fixture, root):
    from megatron_prime.config import load_config
    from megatron_prime.training.trainer import train

    register_test_verifier()
    cfg = load_config(None, overrides(fixture, root, "model.dtype=bf16", "train.steps=2", "checkpoint.interval=2",
                                      "rollout.engine=sglang", "rollout.mem_fraction=0.3",
                                      "algorithm.replay_engine_routes=true"))
    return train(cfg)


@cuda
@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs sglang (the engine that returns routes)")
def test_moe_prime_steps_replay_the_engines_routes_on_cuda(tmp_path):
    """R3 on CUDA: a tiny Qwen3-MoE sampled by a colocated SGLang engine that returns its routed
    experts; the old-log-prob pass and the update replay them. The engine's routes agree with most
    of the trainer's own choices, and the train/rollout mismatch stays at the bf16 level."""
    import math

    fixture = make_trainer_fixture(str(tmp_path), moe=True)
    summary = run_distributed(_moe_steps_with_engine_routes, fixture, str(tmp_path), world_size=1, backend="nccl")
    metrics = summary["last_metrics"]
    print({k: v for k, v in metrics.items() if k.startswith(("routing/", "rollout/", "policy/"))})
    for key in ("policy/loss", "prm/loss", "policy/grad_norm", "routing/engine_flipped_frac"):
        assert math.isfinite(metrics[key]), key
    assert metrics["routing/engine_flipped_frac"] < 0.5
    assert metrics["rollout/abs_logprob_diff"] < 0.05
