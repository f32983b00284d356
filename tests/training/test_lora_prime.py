"""Shared-base LoRA PRIME (model.lora.rank > 0) in the trainer, on one rank:

* one base: the policy, the implicit PRM and the reference are one module whose base tensors each
  exist once; each optimizer holds its own adapter's parameters and nothing else;
* at step 0 the three models' log-probs are identical and every implicit reward is exactly 0
  (B = 0: every adapter starts as the base, which is the reference);
* after PRIME steps the base is bit-for-bit unchanged (it is the reference) and both adapters moved;
  an optimizer step of the policy leaves the PRM's adapter as it was, Adam state and all;
* a checkpoint holds the adapters alone with a fingerprint of the base: it reloads exactly, a run on
  another base is refused with a one-line error naming both, and converting a step's adapter as if
  it were a model says what it is.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.helpers import make_trainer_fixture, overrides, register_test_verifier, run_distributed

pytestmark = pytest.mark.multi_rank

LORA = ("model.lora.rank=4", "model.lora.alpha=8", "optim.policy.lr=1e-3", "optim.prm.lr=1e-3",
        "train.mini_batch_responses=32")
PROMPTS = [[5, 17, 3], [9, 1, 4, 2, 8, 6, 11], [7, 3, 3, 19, 2]]
RESPONSES = [[12, 9, 4, 4, 3, 0], [5, 7], [1, 2, 3, 8, 5, 6, 7, 8, 9]]


def _adapter_state(tm) -> dict:
    from megatron_prime.models.lora import lora_pairs
    from megatron_prime.models.wrappers import unwrap

    settings = unwrap(tm.model).lora_settings
    return {f"{m.lora_name}.{k}": v.detach().clone() for m, pair in lora_pairs(settings, tm.adapter)
            for k, v in pair.state_dict().items()}


def _optimizer_state(tm) -> list[torch.Tensor]:
    inner = tm.optimizer.optimizer  # Adam's state per parameter, in the parameter groups' order
    states = [inner.state[p] for g in inner.param_groups for p in g["params"]]
    return [torch.as_tensor(state[k]).detach().clone() for state in states for k in sorted(state)]


def _run(rank, world_size, fixture, root):
    from megatron_prime.algorithm import implicit_process_rewards
    from megatron_prime.bridge.convert import mcore_to_hf
    from megatron_prime.bridge.hf_io import CheckpointError
    from megatron_prime.config import load_config
    from megatron_prime.models.wrappers import unwrap
    from megatron_prime.passes.batch import build_rollout_batch
    from megatron_prime.passes.forward_backward import run_pass
    from megatron_prime.platform import distributed
    from megatron_prime.training import checkpoint
    from megatron_prime.training.initial_weights import weight_sources
    from megatron_prime.training.prime_step import prime_step
    from megatron_prime.training.trainer import build_context, build_models

    register_test_verifier()
    cfg = load_config(None, overrides(fixture, root, *LORA))
    distributed.init_model_parallel(seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    ctx = build_context(cfg)
    out = {}
    policy, prm, reference = ctx.policy, ctx.prm, ctx.reference
    modules = [unwrap(policy.model), unwrap(prm.model), unwrap(reference)]
    out["one_module"] = modules[0] is modules[1] is modules[2]
    base = {n: p for n, p in modules[2].named_parameters() if not getattr(p, "is_lora", False)}
    out["base_storages"] = len({p.untyped_storage().data_ptr() for p in base.values()})
    out["base_params"] = len(base)
    out["all_storages"] = len({p.untyped_storage().data_ptr() for m in modules for p in m.parameters()})
    out["all_params"] = len(list(modules[0].parameters()))
    for tm in (policy, prm):
        in_optimizer = {id(p) for g in tm.optimizer.param_groups for p in g["params"]}
        adapter_params = {id(p) for n, p in modules[0].named_parameters() if f".lora.{tm.adapter}." in n}
        out[f"{tm.adapter}_optimizer_holds_its_adapter"] = in_optimizer == adapter_params and len(in_optimizer) > 0

    batch = build_rollout_batch(PROMPTS, RESPONSES, [1.0, 0.0, 1.0], None, [False] * 3, group_size=3)
    pass_args = dict(temperature=1.0, token_budget=cfg.train.micro_batch_tokens)
    logprobs = {name: run_pass(model, batch, **pass_args).logprobs
                for name, model in (("policy", policy.model), ("prm", prm.model), ("reference", reference))}
    out["step0_equal"] = torch.equal(logprobs["policy"], logprobs["reference"]) and torch.equal(
        logprobs["prm"], logprobs["reference"])
    rewards = implicit_process_rewards(logprobs["prm"], logprobs["reference"], batch.response_mask, cfg.algorithm.beta)
    out["step0_rewards_nonzero"] = int(torch.count_nonzero(rewards))

    base_before = {n: p.detach().clone() for n, p in base.items()}
    adapters_before = {tm.adapter: _adapter_state(tm) for tm in (policy, prm)}
    out["metrics"] = [prime_step(ctx, step)[0] for step in range(3)]
    out["base_unchanged"] = all(torch.equal(base[n], v) for n, v in base_before.items())
    for tm in (policy, prm):
        after = _adapter_state(tm)
        out[f"{tm.adapter}_moved"] = any(not torch.equal(after[k], v) for k, v in adapters_before[tm.adapter].items())

    # a policy optimizer step (Adam has momentum by now) does not move the PRM's adapter
    prm_adapter, prm_adam = _adapter_state(prm), _optimizer_state(prm)
    policy_adapter = _adapter_state(policy)
    policy.zero_grad()
    run_pass(policy.model, batch, loss_fn=lambda mb, lp, _e: (-(lp * mb.response_mask).sum(), 1, {}), **pass_args)
    policy.step()
    now = _adapter_state(prm)
    out["prm_untouched_by_policy_step"] = all(torch.equal(now[k], v) for k, v in prm_adapter.items()) and all(
        torch.equal(a, b) for a, b in zip(_optimizer_state(prm), prm_adam))
    out["policy_stepped"] = any(not torch.equal(_adapter_state(policy)[k], v) for k, v in policy_adapter.items())

    # checkpoint: the adapters and their optimizers, exactly; refused on another base
    trainables = {"policy": policy, "prm": prm}
    saved = {name: (_adapter_state(tm), _optimizer_state(tm)) for name, tm in trainables.items()}
    path = checkpoint.save_checkpoint(cfg.checkpoint.dir, 7, trainables, {"note": "x"}, cfg.model.hf_path, 2, "fp32",
                                      reference=cfg.model.hf_path)
    try:  # a step's policy/ is an adapter, not a model: converting it says so
        mcore_to_hf(os.path.join(path, "policy"), os.path.join(root, "converted"))
        out["convert_error"] = None
    except CheckpointError as e:
        out["convert_error"] = str(e)
    ctx.fleet.shutdown()
    fresh_policy, fresh_prm, _ = build_models(cfg, ctx.arch, weight_sources(cfg))
    fresh = {"policy": fresh_policy, "prm": fresh_prm}
    state = checkpoint.resume(cfg.checkpoint.dir, "latest", fresh, cfg.model.hf_path)
    out["resumed_step"] = state["step"]
    out["resumed_exact"] = all(
        all(torch.equal(_adapter_state(tm)[k], v) for k, v in saved[name][0].items())
        and len(_optimizer_state(tm)) == len(saved[name][1])
        and all(torch.equal(a, b) for a, b in zip(_optimizer_state(tm), saved[name][1]))
        for name, tm in fresh.items())
    other = os.path.join(root, "other_base")
    out["other_base"] = other
    try:
        checkpoint.resume(cfg.checkpoint.dir, "latest", fresh, other)
        out["other_base_error"] = None
    except CheckpointError as e:
        out["other_base_error"] = str(e)
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lora_prime"))
    fixture = make_trainer_fixture(root)
    other = os.path.join(root, "other_base")  # the same model with one weight changed
    shutil.copytree(fixture["hf"], other)
    from safetensors.torch import load_file, save_file

    weights = load_file(os.path.join(other, "model.safetensors"))
    name = sorted(weights)[-1]
    weights[name] = weights[name] + 1e-3
    save_file(weights, os.path.join(other, "model.safetensors"), metadata={"format": "pt"})
    return run_distributed(_run, fixture, root, world_size=1, timeout_s=600)


def test_one_base_shared_and_each_optimizer_holds_only_its_adapter(lora_run):
    assert lora_run["one_module"]
    assert lora_run["base_storages"] == lora_run["base_params"]  # each base tensor exists once
    assert lora_run["all_storages"] == lora_run["all_params"]  # and nothing is a copy of another
    assert lora_run["policy_optimizer_holds_its_adapter"] and lora_run["prm_optimizer_holds_its_adapter"]


def test_step_zero_the_three_models_agree_and_every_implicit_reward_is_zero(lora_run):
    assert lora_run["step0_equal"]
    assert lora_run["step0_rewards_nonzero"] == 0


def test_steps_leave_the_base_and_move_both_adapters(lora_run):
    assert lora_run["base_unchanged"]
    assert lora_run["policy_moved"] and lora_run["prm_moved"]
    for metrics in lora_run["metrics"]:
        assert metrics["rollout/logprob_diff_max"] <= 1e-4  # the hf engine got the merged policy each step
        assert metrics["prm/updates"] >= 1 and metrics["policy/updates"] >= 1


def test_the_inactive_adapter_does_not_move(lora_run):
    assert lora_run["policy_stepped"]
    assert lora_run["prm_untouched_by_policy_step"]


def test_checkpoint_holds_the_adapters_and_refuses_another_base(lora_run):
    assert lora_run["resumed_step"] == 7 and lora_run["resumed_exact"]
    error = lora_run["other_base_error"]
    assert error is not None and "\n" not in error
    assert "trained on the base" in error and lora_run["other_base"] in error
    assert "holds only the LoRA adapter 'policy'" in lora_run["convert_error"]
