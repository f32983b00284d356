"""Trainer branches, each checked by a property rather than by having run: the PRM update modes
(single / double / none), the KL penalty at a sampling temperature, truncated importance sampling,
several policy mini-batches, PPO epochs, PRM mini-batches, and the outcome-only RLOO baseline.

Everything runs in one process (one import of Megatron); each variant builds its own models and
takes one PRIME step from the same checkpoint, so the rollouts of all variants are identical."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import make_trainer_fixture, overrides, register_test_verifier, run_distributed

pytestmark = [pytest.mark.multi_rank, pytest.mark.slow]

BASE = ("train.mini_batch_responses=32", "optim.policy.grad_clip=1e9", "optim.prm.grad_clip=1e9",
        "optim.policy.lr=1e-4", "optim.prm.lr=1e-3")
VARIANTS = {
    "single": (),
    "double": ("algorithm.prm_update=double",),
    "none": ("algorithm.prm_update=none",),
    "prm_mini_batches": ("train.prm_mini_batch_responses=8",),
    "kl_tempered": ("algorithm.kl_coef=0.1", "rollout.temperature=0.7"),
    "tis": ("algorithm.rollout_correction=token_tis", "algorithm.rollout_correction_bounds=[0,0.5]"),
    "seq_mask": ("algorithm.rollout_correction=seq_mask", "algorithm.rollout_correction_bounds=[1.5,2]"),
    "mini_batches": ("train.mini_batch_responses=16",),
    "epochs": ("algorithm.ppo_epochs=2",),
    "rloo": ("algorithm.estimator=rloo",),
}


def _state(model) -> dict:
    from megatron_prime.models.wrappers import unwrap

    return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items() if torch.is_tensor(v)}


def _rewards_of(ctx, prm_state: dict, groups) -> torch.Tensor:
    """Implicit rewards of the step's responses from a fresh forward of a PRM holding ``prm_state``."""
    from megatron_prime.algorithm import implicit_process_rewards
    from megatron_prime.models.wrappers import unwrap
    from megatron_prime.passes.trainable import build_frozen
    from megatron_prime.passes.forward_backward import run_pass
    from megatron_prime.training.prime_step import to_batch
    from megatron_prime.passes.trainable import model_options

    prm = build_frozen(ctx.arch, model_options(ctx.cfg))
    unwrap(prm).load_state_dict(prm_state, strict=False)
    batch = to_batch(groups, ctx.cfg.rollout.n, ctx.tokenizer)
    args = dict(temperature=1.0, token_budget=ctx.cfg.train.micro_batch_tokens)
    prm_lp = run_pass(prm, batch, **args).logprobs
    ref_lp = run_pass(ctx.reference, batch, **args).logprobs
    return implicit_process_rewards(prm_lp, ref_lp, batch.response_mask, ctx.cfg.algorithm.beta)


def _recorded(groups, key: str) -> list[list[float]]:
    return [values for g in groups for values in getattr(g, key)]


def _variants(rank, world_size, fixture, root):
    from megatron_prime.config import load_config
    from megatron_prime.platform import distributed
    from megatron_prime.training.prime_step import prime_step
    from megatron_prime.training.trainer import build_context

    register_test_verifier()
    out = {}
    for name, extra in VARIANTS.items():
        cfg = load_config(None, overrides(fixture, root, f"model.prm_hf_path={fixture['prm_hf']}", *BASE, *extra))
        distributed.init_model_parallel(seed=cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        ctx = build_context(cfg)
        before = {"policy": _state(ctx.policy.model), "prm": _state(ctx.prm.model) if ctx.prm else None}
        metrics, groups = prime_step(ctx, step=0)
        after = {"policy": _state(ctx.policy.model), "prm": _state(ctx.prm.model) if ctx.prm else None}
        result = {"metrics": metrics, "groups": copy.deepcopy(groups), "has_prm": ctx.prm is not None,
                  "policy_moved": any(not torch.equal(before["policy"][k], after["policy"][k]) for k in before["policy"])}
        if ctx.prm is not None:
            result["prm_moved"] = any(not torch.equal(before["prm"][k], after["prm"][k]) for k in before["prm"])
            result["rewards_before_update"] = _rewards_of(ctx, before["prm"], groups)
            result["rewards_after_update"] = _rewards_of(ctx, after["prm"], groups)
        result["policy_after"] = after["policy"]
        result["policy_schedule_steps"] = ctx.policy.scheduler.num_steps
        ctx.fleet.shutdown()
        out[name] = result
    return out


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("trainer_branches"))
    return run_distributed(_variants, make_trainer_fixture(root), root, world_size=1)


def _close(recorded_groups, rewards: torch.Tensor) -> bool:
    recorded = _recorded(recorded_groups, "process_rewards")
    return all(torch.allclose(torch.tensor(r), rewards[i, :len(r)], atol=1e-6) for i, r in enumerate(recorded))


def test_same_rollouts_in_every_variant(variants):
    texts = {name: [t for g in v["groups"] for t in g.texts] for name, v in variants.items() if name != "kl_tempered"}
    assert len({tuple(t) for t in texts.values()}) == 1
    for name, v in variants.items():
        assert v["metrics"]["rollout/logprob_diff_max"] <= 1e-4, name  # fp32: engine and Megatron agree


def test_single_forward_rewards_come_from_the_prm_before_its_update(variants):
    v = variants["single"]
    assert v["prm_moved"] and v["metrics"]["prm/updates"] == 1
    assert _close(v["groups"], v["rewards_before_update"])
    assert not _close(v["groups"], v["rewards_after_update"])


def test_double_forward_rewards_come_from_the_updated_prm(variants):
    v = variants["double"]
    assert v["prm_moved"]
    assert _close(v["groups"], v["rewards_after_update"])
    assert not _close(v["groups"], v["rewards_before_update"])
    assert "prm/accuracy_after_update" in v["metrics"]
    # The update itself is the single-forward one: the same PRM loss before it.
    assert v["metrics"]["prm/loss"] == pytest.approx(variants["single"]["metrics"]["prm/loss"], rel=1e-6)


def test_prm_update_none_leaves_the_prm_and_uses_it(variants):
    v = variants["none"]
    assert not v["prm_moved"] and "prm/loss" not in v["metrics"]
    assert _close(v["groups"], v["rewards_before_update"])


def test_prm_mini_batches_take_one_step_each(variants):
    v, single = variants["prm_mini_batches"], variants["single"]
    assert v["metrics"]["prm/updates"] == 4  # 32 responses / 8
    # The first mini-batch sees the PRM before any update; the later ones an updated PRM.
    assert not _close(v["groups"], single["rewards_before_update"])
    first = [r for g in v["groups"][:2] for r in g.process_rewards]  # 8 responses = 2 groups of 4
    assert all(torch.allclose(torch.tensor(r), single["rewards_before_update"][i, :len(r)], atol=1e-6)
               for i, r in enumerate(first))


def test_kl_penalty_compares_the_tempered_policy_with_the_tempered_reference(variants):
    m = variants["kl_tempered"]["metrics"]
    # One mini-batch: the policy is still the reference when its loss is computed, so the KL
    # between them at the same temperature is 0; against the reference at T = 1 it would not be.
    assert m["policy/ref_kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["rollout/logprob_diff_max"] <= 1e-4


def test_truncated_importance_sampling_scales_the_gradient(variants):
    tis, base = variants["tis"]["metrics"], variants["single"]["metrics"]
    # fp32: pi_old / pi_rollout ~ 1, so a cap of 0.5 weights every token by 0.5
    assert tis["rollout_correction/corrected_frac"] == pytest.approx(1.0)
    assert base["rollout_correction/corrected_frac"] == 0.0  # none: reported, nothing corrected
    assert tis["rollout_correction/weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert tis["policy/grad_norm"] == pytest.approx(0.5 * base["policy/grad_norm"], rel=1e-3)
    # The weights touch the policy gradient only: the PRM's update and the advantages are the same.
    for key in ("prm/loss", "prm/grad_norm", "advantage/mean", "advantage/std"):
        assert tis[key] == pytest.approx(base[key], rel=1e-6, abs=1e-9), key


def test_seq_mask_drops_every_response_outside_its_bounds(variants):
    masked, base = variants["seq_mask"]["metrics"], variants["single"]["metrics"]
    # fp32: every response's geometric-mean weight is ~1, outside [1.5, 2]: all leave the policy
    # loss (no gradient), their groups' advantages unchanged
    assert masked["rollout_correction/masked_frac"] == 1.0
    assert masked["policy/updates"] == 0 and masked["policy/skipped_updates"] == 1 and base["policy/updates"] == 1
    assert masked["advantage/mean"] == pytest.approx(base["advantage/mean"], rel=1e-6, abs=1e-9)
    # the skipped mini-batch still takes its step of the lr schedule (sized in mini-batches)
    assert variants["seq_mask"]["policy_schedule_steps"] == variants["single"]["policy_schedule_steps"] > 0


def test_several_mini_batches_and_epochs_take_more_updates(variants):
    assert variants["single"]["metrics"]["policy/updates"] == 1
    assert variants["mini_batches"]["metrics"]["policy/updates"] == 2
    assert variants["epochs"]["metrics"]["policy/updates"] == 2
    one, two = variants["single"]["policy_after"], variants["epochs"]["policy_after"]
    assert any(not torch.equal(one[k], two[k]) for k in one)  # the second epoch moved the policy further
    for name in ("mini_batches", "epochs"):
        assert variants[name]["metrics"]["policy/skipped_updates"] == 0


def test_outcome_only_rloo_has_no_prm_and_plain_rloo_advantages(variants):
    v = variants["rloo"]
    assert not v["has_prm"] and v["policy_moved"]
    assert "prm/loss" not in v["metrics"] and "process_reward/token/mean" not in v["metrics"]
    for g in v["groups"]:
        assert g.process_rewards is None
        k = len(g.outcomes)
        for i, advantages in enumerate(g.advantages):
            expected = g.outcomes[i] - (sum(g.outcomes) - g.outcomes[i]) / (k - 1)
            assert advantages == pytest.approx([expected] * len(advantages), abs=1e-6)


def test_implicit_rewards_use_the_models_own_distributions_at_any_sampling_temperature(variants):
    # Sampled at T = 0.7, the rewards are still beta * (log pi_prm - log pi_ref) at T = 1 (Eq. 3).
    v = variants["kl_tempered"]
    assert _close(v["groups"], v["rewards_before_update"])
