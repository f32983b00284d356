"""Where PRIME's three models start (``training.initial_weights.weight_sources``): continuing a PRIME
trainer checkpoint keeps that run's reference and trained PRM; an SFT run's checkpoint is a
starting point for all three, like an HF model."""

from __future__ import annotations

import json
import os

import pytest

from megatron_prime.bridge.mcore_io import META_FILE
from megatron_prime.config import Config, ConfigError
from megatron_prime.training.initial_weights import weight_sources


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
