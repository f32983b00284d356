"""Offloading around rollout: gradient buffers are really released and come back as valid, zeroed
views, so training after an offload computes the same gradients. (The optimizer-state half is
CUDA-only and runs in tests/e2e/test_gpu.py's PRIME steps.)"""

from __future__ import annotations

import pytest
from tests.helpers import make_trainer_fixture, overrides, register_test_verifier, run_distributed

pytestmark = pytest.mark.multi_rank


def _offload_round_trip(rank, world_size, fixture, root):
    from megatron_prime.algorithm import policy_loss
    from megatron_prime.config import load_config
    from megatron_prime.platform import distributed
    from megatron_prime.training import prime_step as ps
    from megatron_prime.passes.offload import offloaded
    from megatron_prime.passes.forward_backward import run_pass
    from megatron_prime.fleet.collect import collect_groups
    from megatron_prime.training.trainer import build_context

    register_test_verifier()
    cfg = load_config(None, overrides(fixture, root))
    distributed.init_model_parallel(seed=cfg.train.seed)
    ctx = build_context(cfg)
    groups, _ = collect_groups(ctx.fleet, ctx.sampler, ctx.buffer, ctx.tokenizer, cfg, 0, ctx.render)
    batch = ps.to_batch(groups, cfg.rollout.n, ctx.tokenizer)
    args = dict(temperature=1.0, token_budget=cfg.train.micro_batch_tokens)
    batch.extras["old_logprobs"] = run_pass(ctx.policy.model, batch, **args).logprobs
    batch.extras["advantages"] = batch.response_mask * (batch.outcome[:, None] - 0.5)

    def loss_fn(mb, logprobs, _entropy):
        loss, m = policy_loss(logprobs, mb.extras["old_logprobs"], mb.extras["advantages"], mb.response_mask,
                              loss_normalizer=1.0)
        return loss, int(mb.response_mask.sum()), m

    def grads():
        ctx.policy.zero_grad()
        run_pass(ctx.policy.model, batch, loss_fn=loss_fn, **args)
        return {n: p.main_grad.clone() for n, p in ctx.policy.model.module.named_parameters()}

    before = grads()
    buffers = ctx.policy.model.buffers
    with offloaded(ctx.policy, ctx.prm, enabled=True):
        released = [b.grad_data.untyped_storage().size() for b in buffers]
    restored_zero = all(bool((p.main_grad == 0).all()) for p in ctx.policy.model.module.parameters())
    after = grads()
    return {
        "released": released,
        "restored_zero": restored_zero,
        "max_diff": max((before[n] - after[n]).abs().max().item() for n in before),
        "grad_norm": sum(g.norm() ** 2 for g in before.values()).sqrt().item(),
    }


def test_grad_buffers_released_and_restored(tmp_path):
    fixture = make_trainer_fixture(str(tmp_path))
    result = run_distributed(_offload_round_trip, fixture, str(tmp_path), world_size=1)
    assert result["released"] and all(size == 0 for size in result["released"])
    assert result["restored_zero"]
    assert result["grad_norm"] > 0
    assert result["max_diff"] == 0.0
