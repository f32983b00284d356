"""The trainer's first PRIME step at TP=2 and at PP=2 equals TP=1 (data-parallel over the same
2 gloo ranks): same rollouts, PRM loss, policy loss and advantages within fp32 tolerance.

The PRM starts from a perturbed copy of the policy, so process rewards are non-zero from the
first step. With the paper's single forward and one policy mini-batch per step, every compared
number is computed before any optimizer step; the updates themselves are compared through the
gradient norms (Adam's first step amplifies fp32 rounding noise in near-zero gradients, so
post-update values are not a fair fp32 comparison)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_trainer_fixture, overrides, register_test_verifier, run_distributed

pytestmark = [pytest.mark.multi_rank, pytest.mark.slow]

LAYOUTS = [(1, 1, False), (2, 1, False), (1, 2, False), (2, 1, True)]  # (tp, pp, sequence_parallel)


def _first_step(rank, world_size, fixture, root):
    from megatron_prime.config import load_config
    from megatron_prime.platform import distributed
    from megatron_prime.training import prime_step as ps
    from megatron_prime.training.trainer import build_context

    register_test_verifier()
    captured = {}
    original = ps.compute_advantages

    def capture(*args, **kwargs):  # record the advantages the step computes
        captured["advantages"] = original(*args, **kwargs)
        return captured["advantages"]

    ps.compute_advantages = capture
    results = {}
    for tp, pp, sp in LAYOUTS:
        cfg = load_config(None, overrides(fixture, root, f"parallel.tp={tp}", f"parallel.pp={pp}",
                                          f"parallel.sequence_parallel={sp}",
                                          f"model.prm_hf_path={fixture['prm_hf']}",
                                          "train.mini_batch_responses=32"))
        distributed.init_model_parallel(tp=tp, pp=pp, seed=cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        ctx = build_context(cfg)
        metrics, _ = ps.prime_step(ctx, step=0)
        results[(tp, pp, sp)] = {"metrics": metrics, "advantages": captured["advantages"].clone()}
    return results


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("trainer_parallel"))
    fixture = make_trainer_fixture(root)
    return run_distributed(_first_step, fixture, root, world_size=2)


def test_first_step_is_not_trivial(layouts):
    base = layouts[(1, 1, False)]
    assert base["advantages"].abs().max() > 1e-3
    assert 0.0 < base["metrics"]["outcome/accuracy_sampled"] < 1.0
    assert base["metrics"]["process_reward/token/std"] > 0  # PRM moved away from the reference


@pytest.mark.parametrize("layout", LAYOUTS)
def test_megatron_log_probs_match_the_engines(layouts, layout):
    # fp32: the hf engine's sampling log-probs are an independent reference for Megatron's
    assert layouts[layout]["metrics"]["rollout/logprob_diff_max"] <= 1e-4


@pytest.mark.parametrize("tp,pp,sp", LAYOUTS[1:])
def test_first_step_matches_tp1(layouts, tp, pp, sp):
    base, other = layouts[(1, 1, False)], layouts[(tp, pp, sp)]
    torch.testing.assert_close(other["advantages"], base["advantages"], rtol=1e-4, atol=1e-5)
    for key in ("prm/loss", "prm/accuracy", "prm/grad_norm", "policy/loss", "policy/pg_loss",
                "policy/grad_norm", "policy/entropy", "process_reward/sequence_mean",
                "outcome/accuracy_sampled", "rollout/abs_logprob_diff"):
        assert other["metrics"][key] == pytest.approx(base["metrics"][key], rel=1e-4, abs=1e-5), key
