"""One-step-off rollouts (``rollout.max_staleness=1``) in remote mode on two processes: the trainer
and a rollout server (the hf engine behind SGLang's protocol, ``rollout.protocol_server``).

* Every batch comes from one policy version, recorded per group: step 0's from policy 0, step k's
  from policy k-1 (one step old, never more); the metrics say so.
* The engine that sampled a batch is deliberately one step behind the trainer: the rollout
  correction's weights differ from 1 exactly where its log-probs differ from the trainer's.
* A run stopped after its first step (the next batch already collected, and checkpointed) resumes
  to exactly the uninterrupted run's steps.
* Step 0 (nothing to overlap yet) equals the synchronous loop's step 0 on the same server.
* The stopped run's checkpoint resumed with ``rollout.max_staleness=0`` is refused (its collected
  batch would be skipped).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT, make_trainer_fixture, overrides

LAUNCHER = """
import json, os, sys
sys.path.insert(0, {root!r})
import megatron_prime.training.prime_step as prime_step
from megatron_prime.config import load_config
from megatron_prime.training.trainer import train
from tests.helpers import register_test_verifier

def record(entry):
    with open(os.environ["RECORD"], "a") as f:
        f.write(json.dumps(entry) + "\\n")

rollout, correct = prime_step.rollout, prime_step.correct_for_the_engine

def recording_rollout(ctx, step, timer, metrics):
    groups, stats = rollout(ctx, step, timer, metrics)
    record({{"step": step, "versions": [g.policy_version for g in groups]}})
    return groups, stats

def recording_correction(cfg, share, old_logprobs, metrics):
    correct(cfg, share, old_logprobs, metrics)
    mask = share.batch.response_mask.bool()
    record({{"old": old_logprobs[mask].tolist(), "rollout": share.batch.rollout_logprobs[mask].tolist(),
            "weights": share.local.extras["correction_weights"][mask].tolist()}})

prime_step.rollout, prime_step.correct_for_the_engine = recording_rollout, recording_correction

if __name__ == "__main__":
    register_test_verifier()
    train(load_config(None, sys.argv[1:]))
"""
SAME_STEP = ("prm/loss", "prm/accuracy", "policy/loss", "policy/pg_loss", "advantage/mean", "advantage/std",
             "outcome/accuracy_sampled", "rollout_correction/weight_mean", "rollout_correction/kl_k3",
             "response/length_mean", "policy/grad_norm")


def train(fixture, run_dir: str, *extra: str, exit_early: bool = False, refused: bool = False):
    """A 4-step run against a rollout server of its own; the hooks' records (``refused``: a run
    expected to stop with an error, its output)."""
    from megatron_prime.platform.distributed import free_port
    from megatron_prime.rollout.protocol_server import local_server

    script = os.path.join(run_dir, "launch.py")
    os.makedirs(run_dir, exist_ok=True)
    with open(script, "w") as f:
        f.write(LAUNCHER.format(root=ROOT))
    record = os.path.join(run_dir, f"record-{len([n for n in os.listdir(run_dir) if n.startswith('record')])}.jsonl")
    with local_server(fixture["hf"]) as url:
        args = overrides(fixture, run_dir, "train.steps=4", "checkpoint.interval=1", "checkpoint.export_hf=false",
                         f"model.prm_hf_path={fixture['prm_hf']}", "optim.policy.lr=1e-3", "rollout.mode=remote",
                         "rollout.engine=sglang", f"rollout.remote_urls=[{url}]", "rollout.weight_sync_address=127.0.0.1",
                         f"rollout.weight_sync_port={free_port()}", "algorithm.rollout_correction=token_tis", *extra)
        if exit_early:
            args.append("train.exit_after_minutes=0.0001")  # stops at the first step boundary
        proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, RECORD=record, OMP_NUM_THREADS="1"))
    if refused:
        assert proc.returncode != 0, proc.stdout[-3000:]
        return proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in open(record)]


def scalars(run_dir: str) -> dict[int, dict]:
    rows = {}
    for line in open(os.path.join(run_dir, "logs", "scalars.jsonl")):
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("one_step_off"))
    fixture = make_trainer_fixture(root)
    dirs = {name: os.path.join(root, name) for name in ("whole", "parts", "sync")}
    records = {"whole": train(fixture, dirs["whole"], "rollout.max_staleness=1")}
    records["stopped"] = train(fixture, dirs["parts"], "rollout.max_staleness=1", exit_early=True)
    # the same checkpoint resumed synchronously would skip the batch it holds: refused
    shutil.copytree(os.path.join(dirs["parts"], "ckpt"), os.path.join(root, "sync_resume", "ckpt"))
    refusal = train(fixture, os.path.join(root, "sync_resume"), "rollout.max_staleness=0", refused=True)
    records["resumed"] = train(fixture, dirs["parts"], "rollout.max_staleness=1")
    records["sync"] = train(fixture, dirs["sync"], "rollout.max_staleness=0", "train.steps=1")
    return {"records": records, "dirs": dirs, "refusal": refusal}


def test_every_batch_comes_from_one_policy_version_at_most_one_step_old(runs):
    versions = [r for r in runs["records"]["whole"] if "versions" in r]
    assert [r["step"] for r in versions] == [0, 1, 2, 3]
    for r in versions:
        assert set(r["versions"]) == {max(0, r["step"] - 1)}, r  # one version per batch, every group
    rows = scalars(runs["dirs"]["whole"])
    assert rows[1]["rollout/staleness_max"] == 0 and rows[1]["rollout/dropped_groups"] == 0
    for step in (2, 3, 4):
        assert rows[step]["rollout/staleness_mean"] == rows[step]["rollout/staleness_max"] == 1


def test_correction_weights_differ_from_one_exactly_where_the_engine_is_stale(runs):
    corrections = [r for r in runs["records"]["whole"] if "weights" in r]
    assert len(corrections) == 4
    for step, r in enumerate(corrections):
        differs = 0
        for old, rollout, weight in zip(r["old"], r["rollout"], r["weights"]):
            if old == rollout:
                assert weight == 1.0
            elif abs(old - rollout) > 1e-5:
                assert weight != 1.0
                differs += 1
        if step == 0:  # the engine holds the trained policy: fp32 agreement
            assert max(abs(a - b) for a, b in zip(r["old"], r["rollout"])) < 1e-4
        else:  # one step behind (lr 1e-3): most tokens differ
            assert differs > len(r["weights"]) // 2, (step, differs, len(r["weights"]))


def test_stopped_run_resumes_to_the_uninterrupted_steps(runs):
    stopped = [r["step"] for r in runs["records"]["stopped"] if "versions" in r]
    resumed = [r for r in runs["records"]["resumed"] if "versions" in r]
    assert stopped == [0] and [r["step"] for r in resumed] == [1, 2, 3]
    assert resumed[0]["versions"] == [0] * len(resumed[0]["versions"])  # the checkpointed batch, policy 0's
    whole, parts = scalars(runs["dirs"]["whole"]), scalars(runs["dirs"]["parts"])
    for step in (1, 2, 3, 4):
        for key in SAME_STEP:
            assert parts[step][key] == pytest.approx(whole[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_a_one_step_off_checkpoint_is_not_resumed_synchronously(runs):
    assert "CheckpointError" in runs["refusal"]
    assert "saved by a one-step-off run (rollout.max_staleness=1) with the next step's batch already collected" \
        in runs["refusal"] and "Resume with rollout.max_staleness=1" in runs["refusal"]


def test_first_step_is_the_synchronous_loops(runs):
    whole, sync = scalars(runs["dirs"]["whole"])[1], scalars(runs["dirs"]["sync"])[1]
    for key in SAME_STEP:
        assert whole[key] == pytest.approx(sync[key], rel=1e-5, abs=1e-7), key
    assert sync["rollout/staleness_max"] == 0
