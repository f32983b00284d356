"""PRIME on a mixture-of-experts base (a tiny Qwen3-MoE, 4 experts, top-2) on 2 gloo ranks:

* three PRIME steps with the experts split over both ranks (EP=2) equal the same steps with every
  expert on each rank (EP=1, plain data parallelism): the same samples, losses and gradient norms,
  and the exported weights within 1e-5 after the steps moved them by far more;
* a run stopped after step 1 at EP=2 resumes exactly: step 2's numbers and the final weights are
  those of the run that did not stop;
* the policy update replays the old pass's routes (``routing/flipped_frac`` counts the routes the
  updated policy would have changed in the second mini-batch);
* shared-base LoRA on the attention of the MoE base trains (adapters only, the experts frozen), and
  with ``algorithm.routing_replay=false`` the update routes freely and counts the flips it made;
* resuming at another expert-parallel size is refused up front, naming both layouts.

Adam's epsilon is raised to 1e-6 here: gradients that are zero in exact arithmetic come out as
rounding noise, differently per layout, and Adam with eps 1e-8 turns that noise into lr-sized steps.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.helpers import (make_trainer_fixture, overrides, register_test_verifier, run_distributed, run_samples,
                           run_scalars)

pytestmark = [pytest.mark.multi_rank, pytest.mark.slow]

COMMON = ("train.steps=3", "checkpoint.interval=1", "checkpoint.keep_last=3", "logging.sample_every=1",
          "optim.policy.lr=1e-3", "optim.prm.lr=1e-3", "optim.policy.adam_eps=1e-6", "optim.prm.adam_eps=1e-6")
SAME = ("prm/loss", "prm/accuracy", "policy/loss", "policy/grad_norm", "prm/grad_norm", "advantage/mean",
        "outcome/accuracy_sampled", "rollout/logprob_diff_max", "routing/flipped_frac")


def _train(rank, world_size, fixture, root):
    from megatron_prime.config import load_config
    from megatron_prime.training.trainer import train

    register_test_verifier()
    runs = {"ep1": ("parallel.ep=1",), "ep2": ("parallel.ep=2",)}
    for name, extra in runs.items():
        train(load_config(None, overrides(fixture, os.path.join(root, name), f"model.prm_hf_path={fixture['prm_hf']}",
                                          *COMMON, *extra)))
    resumed = os.path.join(root, "ep2_resumed")
    if rank == 0:
        os.makedirs(os.path.join(resumed, "ckpt"))
        for step in ("step_00000000", "step_00000001"):
            shutil.copytree(os.path.join(root, "ep2", "ckpt", step), os.path.join(resumed, "ckpt", step))
    torch.distributed.barrier()
    train(load_config(None, overrides(fixture, resumed, f"model.prm_hf_path={fixture['prm_hf']}", *COMMON,
                                      "parallel.ep=2")))
    train(load_config(None, overrides(fixture, os.path.join(root, "lora_observe"), *COMMON, "train.steps=2",
                                      "parallel.ep=2", "model.lora.rank=4", "model.lora.alpha=8",
                                      "model.lora.targets=[linear_qkv,linear_proj]", "algorithm.routing_replay=false")))
    # last: the refused run leaves no state the runs above need
    other = os.path.join(root, "ep1_from_ep2")
    if rank == 0:
        shutil.copytree(os.path.join(root, "ep2", "ckpt", "step_00000001"),
                        os.path.join(other, "ckpt", "step_00000001"))
    torch.distributed.barrier()
    try:
        train(load_config(None, overrides(fixture, other, f"model.prm_hf_path={fixture['prm_hf']}", *COMMON,
                                          "parallel.ep=1")))
    except Exception as e:  # noqa: BLE001 - what it says is the test's subject
        if rank == 0:
            with open(os.path.join(other, "refused.txt"), "w") as f:
                f.write(f"{type(e).__name__}: {e}")


def _weights(run_dir: str, model: str = "policy") -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "export", model, "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("prime_moe"))
    fixture = make_trainer_fixture(root, moe=True)
    run_distributed(_train, fixture, root, world_size=2, timeout_s=900)
    return root, fixture


def test_three_steps_at_ep2_equal_ep1(runs):
    root, fixture = runs
    ep1, ep2 = run_scalars(os.path.join(root, "ep1")), run_scalars(os.path.join(root, "ep2"))
    for step in (1, 2, 3):
        assert run_samples(os.path.join(root, "ep2"), step - 1) == run_samples(os.path.join(root, "ep1"), step - 1)
        for key in SAME:
            if key != "rollout/logprob_diff_max":  # rounding noise itself (both <= 1e-4 below)
                assert ep2[step][key] == pytest.approx(ep1[step][key], rel=1e-5, abs=1e-6), (step, key)
        assert max(ep1[step]["rollout/logprob_diff_max"], ep2[step]["rollout/logprob_diff_max"]) <= 1e-4
    from safetensors.torch import load_file

    start = load_file(os.path.join(fixture["hf"], "model.safetensors"))
    for model in ("policy", "prm"):
        a, b = _weights(os.path.join(root, "ep1"), model), _weights(os.path.join(root, "ep2"), model)
        assert set(a) == set(b)
        if model == "policy":  # the steps moved it (the PRM starts from another checkpoint)
            assert max((a[n] - start[n]).abs().max().item() for n in a) > 1e-3
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=lambda m: f"{model} {name}: {m}")
    experts = [n for n in a if ".mlp.experts." in n]
    assert len(experts) == 2 * 4 * 3  # 2 layers x 4 experts x gate, up, down


def test_a_stopped_ep2_run_resumes_exactly(runs):
    root, _ = runs
    whole, resumed = run_scalars(os.path.join(root, "ep2")), run_scalars(os.path.join(root, "ep2_resumed"))
    assert 2 not in resumed and 3 in resumed  # steps 0 and 1 came from the checkpoint
    assert run_samples(os.path.join(root, "ep2_resumed"), 2) == run_samples(os.path.join(root, "ep2"), 2)
    for key in SAME:
        assert resumed[3][key] == whole[3][key], key
    for model in ("policy", "prm"):
        a, b = _weights(os.path.join(root, "ep2"), model), _weights(os.path.join(root, "ep2_resumed"), model)
        for name in a:
            assert torch.equal(a[name], b[name]), (model, name)


def test_the_policy_update_replays_the_old_routes(runs):
    root, _ = runs
    rows = run_scalars(os.path.join(root, "ep2"))
    # the second mini-batch runs after an optimizer step: the router's own choice drifts there,
    # and replay keeps the recorded experts
    assert any(rows[step]["routing/flipped_frac"] > 0 for step in (1, 2, 3))


def test_lora_on_the_moe_attention_trains_and_observes_route_flips(runs):
    from safetensors.torch import load_file

    root, fixture = runs
    rows = run_scalars(os.path.join(root, "lora_observe"))
    assert all(0 <= rows[step]["routing/flipped_frac"] <= 1 for step in (1, 2))  # counted without replay
    assert any(rows[step]["routing/flipped_frac"] > 0 for step in (1, 2))  # and the routes did move
    adapter = load_file(os.path.join(root, "lora_observe", "export", "policy_adapter", "adapter_model.safetensors"))
    modules = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapter}
    assert modules == {"q_proj", "k_proj", "v_proj", "o_proj"}, modules
    # the experts are the base's, the attention moved
    start, merged = load_file(os.path.join(fixture["hf"], "model.safetensors")), _weights(os.path.join(root, "lora_observe"))
    assert all(torch.equal(merged[n], start[n]) for n in start if ".mlp." in n)
    assert max((merged[n] - start[n]).abs().max().item() for n in start if ".self_attn." in n) > 0


def test_resuming_at_another_expert_parallel_size_is_refused(runs):
    root, _ = runs
    said = open(os.path.join(root, "ep1_from_ep2", "refused.txt")).read()
    assert said.startswith("CheckpointError: ") and "written at tp=1 pp=1 ep=2, this run has tp=1 pp=1 ep=1" in said
    assert "parallel.ep=2" in said
