"""``megatron-prime train`` on a mixture-of-experts base (a tiny Qwen3-MoE) with vLLM's CPU build as
the rollout engine: three PRIME steps, and after every weight sync the train/rollout log-prob
mismatch is at most 1e-4 (the engine restarts from each new policy there: its in-place reload is not
exact for MoE models, ``tests/rollout/test_vllm_moe.py``)."""

from __future__ import annotations

import pytest

from tests.helpers import make_trainer_fixture, overrides, run_scalars, train_in_subprocess

pytestmark = pytest.mark.multi_rank

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup.sh installs its CPU build)")


def test_moe_policy_reaches_vllm_exactly_every_step(tmp_path):
    root = str(tmp_path)
    fixture = make_trainer_fixture(root, moe=True)
    out = train_in_subprocess(overrides(fixture, f"{root}/run", "rollout.engine=vllm", "train.steps=3",
                                        "checkpoint.export_hf=false", f"model.prm_hf_path={fixture['prm_hf']}",
                                        "optim.policy.lr=1e-3", "optim.prm.lr=1e-3"), root)
    rows = run_scalars(f"{root}/run")
    for step in (1, 2, 3):
        assert rows[step]["rollout/logprob_diff_max"] <= 1e-4, (step, rows[step]["rollout/logprob_diff_max"])
        assert rows[step]["policy/grad_norm"] > 0
    assert "routing/flipped_frac" in rows[1]
    assert "Traceback" not in out
