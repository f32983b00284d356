"""Where PRIME's three models start (``weight_sources``) and that they start from it
(``load_initial_weights``).

Continuing a PRIME trainer checkpoint keeps that run's reference and trained PRM; an SFT run's
checkpoint is a starting point for all three, like an HF model.

The trainable models start from the checkpoint in every precision. In bf16/fp16 megatron-core's optimizer keeps fp32 main copies of the parameters, taken when the
optimizer is built. The trainer loads the HF weights after that, so it must refresh those copies:
otherwise the first optimizer step writes the random initialisation back over the checkpoint. An
optimizer step with zero gradients (Adam moves nothing) must leave every parameter equal to the
checkpoint it was loaded from."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_prime.bridge.mcore_io import META_FILE
from megatron_prime.config import Config, ConfigError
from megatron_prime.training.initial_weights import weight_sources
from tests.helpers import make_trainer_fixture, overrides, register_test_verifier, run_distributed


def _step_with_zero_grads(rank, world_size, fixture, root, dtype):
    from megatron_prime.bridge.transfer import iter_hf_tensors
    from megatron_prime.config import load_config
    from megatron_prime.platform import distributed
    from megatron_prime.training.trainer import build_context

    register_test_verifier()
    cfg = load_config(None, overrides(fixture, root, f"model.dtype={dtype}",
                                      f"model.prm_hf_path={fixture['prm_hf']}", "optim.policy.lr=1e-3",
                                      "optim.prm.lr=1e-3"))
    distributed.init_model_parallel(seed=cfg.train.seed)
    ctx = build_context(cfg)
    out = {}
    for name, trainable in (("policy", ctx.policy), ("prm", ctx.prm)):
        loaded = dict(iter_hf_tensors(trainable.model, ctx.arch))
        trainable.zero_grad()
        trainable.step()
        after = dict(iter_hf_tensors(trainable.model, ctx.arch))
        out[name] = {"loaded": loaded, "changed": [n for n in loaded if not torch.equal(loaded[n], after[n])]}
    ctx.fleet.shutdown()
    return out


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("initial_weights"))
    return make_trainer_fixture(root), root


@pytest.mark.multi_rank
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_zero_grad_step_keeps_the_checkpoint(fixture_dirs, dtype):
    import transformers

    fixture, root = fixture_dirs
    out = run_distributed(_step_with_zero_grads, fixture, root, dtype, world_size=1)
    for name, hf_dir in (("policy", fixture["hf"]), ("prm", fixture["prm_hf"])):
        reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        loaded = out[name]["loaded"]
        for n, p in reference.named_parameters():
            expected = p.detach().to(loaded[n].dtype)
            assert torch.equal(loaded[n], expected), (name, n)  # loaded as written
        assert out[name]["changed"] == [], (name, dtype)  # and still there after the step


def _model_dir(path, **meta) -> str:
    os.makedirs(path)
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump({"format": "megatron-prime/torch_dist", "version": 1, **meta}, f)
    return str(path)


def _cfg(**model) -> Config:
    cfg = Config()
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def test_prime_checkpoint_keeps_its_reference_and_trained_prm(tmp_path):
    sft = str(tmp_path / "sft_hf")
    os.makedirs(sft)
    policy = _model_dir(tmp_path / "step_00000009" / "policy", role="policy", reference=sft)
    prm = _model_dir(tmp_path / "step_00000009" / "prm", role="prm", reference=sft)
    sources = weight_sources(_cfg(hf_path=sft, mcore_path=policy))
    assert (sources.policy, sources.prm, sources.reference) == (policy, prm, sft)
    # An explicit model.ref_path still wins.
    other = str(tmp_path / "other_ref")
    os.makedirs(other)
    assert weight_sources(_cfg(mcore_path=policy, ref_path=other)).reference == other


def test_prime_checkpoint_whose_reference_is_gone_is_refused(tmp_path):
    policy = _model_dir(tmp_path / "step_00000009" / "policy", role="policy", reference=str(tmp_path / "gone"))
    with pytest.raises(ConfigError, match="model.ref_path"):
        weight_sources(_cfg(mcore_path=policy))


def test_sft_checkpoint_is_the_start_of_all_three(tmp_path):
    policy = _model_dir(tmp_path / "sft" / "checkpoints" / "step_00000399" / "policy", role="policy", reference=None)
    sources = weight_sources(_cfg(mcore_path=policy))
    assert (sources.policy, sources.prm, sources.reference) == (policy, policy, policy)
