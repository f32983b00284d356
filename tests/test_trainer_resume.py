"""Checkpoints and exact resume: a run stopped after step k and resumed gives the same step k+1
metrics as the uninterrupted run; a run killed with SIGKILL mid-step resumes from the last
complete checkpoint; a corrupt newest checkpoint is skipped for the previous one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.trainer_fixtures import make_trainer_fixture, overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = """
import sys
sys.path.insert(0, {root!r})
from tests.trainer_fixtures import register_test_verifier
from megatron_prime.config import load_config
from megatron_prime.training.trainer import train
if __name__ == "__main__":
    register_test_verifier()
    train(load_config(None, sys.argv[1:]))
"""


def start(args: list[str], launcher: tuple[str, ...] = ("-c", TRAIN.format(root=ROOT)), **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *launcher, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def run(args: list[str], launcher: tuple[str, ...] = ("-c", TRAIN.format(root=ROOT))) -> str:
    proc = start(args, launcher)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def run_failing(args: list[str]) -> str:
    proc = start(args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, out[-3000:]
    return out


def truncate_tensors(checkpoint_dir: str) -> None:
    """Cut every tensor file of the policy in ``checkpoint_dir`` to 16 bytes."""
    policy = os.path.join(checkpoint_dir, "policy")
    for name in os.listdir(policy):
        if name.endswith(".distcp"):
            with open(os.path.join(policy, name), "r+b") as f:
                f.truncate(16)


def scalars(run_dir: str) -> dict[int, dict]:
    rows = {}
    with open(os.path.join(run_dir, "logs", "scalars.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            rows[row["step"]] = row  # a resumed run appends; the last record of a step wins
    return rows


DETERMINISTIC = ("prm/loss", "prm/accuracy", "policy/loss", "policy/pg_loss", "policy/entropy",
                 "outcome/accuracy_sampled", "advantage/mean", "advantage/std", "response/length_mean",
                 "process_reward/sequence_mean", "prm/grad_norm", "policy/grad_norm")


def assert_same_step(a: dict, b: dict) -> None:
    for key in DETERMINISTIC:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume"))
    return make_trainer_fixture(root)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: the optimizer's fp32 main params resume too
def test_stop_and_resume_matches_uninterrupted(fixture, tmp_path, dtype):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    common = ["checkpoint.interval=1", "checkpoint.export_hf=false", f"model.dtype={dtype}", "optim.policy.lr=1e-4"]
    run(overrides(fixture, full, "train.steps=3", *common))
    run(overrides(fixture, part, "train.steps=2", "checkpoint.keep_last=2", *common))
    out = run(overrides(fixture, part, "train.steps=3", "checkpoint.keep_last=2", *common))
    assert "resumed from step 1" in out
    a, b = scalars(full), scalars(part)
    for step in (1, 2, 3):
        assert_same_step(a[step], b[step])
    assert sorted(os.listdir(os.path.join(part, "ckpt"))) == ["step_00000001", "step_00000002"]  # keep_last=2


def test_sigkill_mid_step_resumes_from_last_complete_checkpoint(fixture, tmp_path):
    run_dir = str(tmp_path / "killed")
    args = overrides(fixture, run_dir, "train.steps=4", "checkpoint.interval=1", "checkpoint.keep_last=5",
                     "checkpoint.export_hf=false")
    proc = start(args, start_new_session=True)
    first = os.path.join(run_dir, "ckpt", "step_00000000")
    deadline = time.time() + 300
    while not os.path.exists(first) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert os.path.exists(first), "no checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)  # mid-way through step 1 (or its checkpoint write)
    proc.wait()
    complete = sorted(n for n in os.listdir(os.path.join(run_dir, "ckpt")) if n.startswith("step_"))
    out = run(args)
    last = int(complete[-1].split("_")[1])
    assert f"resumed from step {last}" in out
    final = scalars(run_dir)
    assert set(range(1, 5)) <= set(final)

    # The uninterrupted run gives the same final step.
    ref_dir = str(tmp_path / "reference")
    run(overrides(fixture, ref_dir, "train.steps=4", "checkpoint.interval=10", "checkpoint.export_hf=false"))
    assert_same_step(final[4], scalars(ref_dir)[4])


def test_corrupt_newest_checkpoint_falls_back_to_previous(fixture, tmp_path):
    run_dir = str(tmp_path / "corrupt")
    run(overrides(fixture, run_dir, "train.steps=2", "checkpoint.interval=1", "checkpoint.export_hf=false"))
    truncate_tensors(os.path.join(run_dir, "ckpt", "step_00000001"))
    out = run(overrides(fixture, run_dir, "train.steps=3", "checkpoint.interval=1", "checkpoint.export_hf=false"))
    assert "step_00000001 could not be loaded" in out
    assert "resumed from step 0" in out


def test_torchrun_two_ranks_two_engines(fixture, tmp_path):
    """The whole ``train`` under torchrun: TP=2 over 2 ranks, one hf engine per rank, evaluation
    before and after, a checkpoint and the HF export."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN.format(root=ROOT))
    run_dir = str(tmp_path / "torchrun")
    out = run(overrides(fixture, run_dir, "train.steps=2", "checkpoint.interval=2", "parallel.tp=2",
                        f"data.eval_files=[{fixture['eval']}]"),
              launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)))
    rows = scalars(run_dir)
    assert 0.0 <= rows[0]["eval/accuracy"] <= 1.0 and 0.0 <= rows[3]["eval/accuracy"] <= 1.0
    assert rows[2]["policy/grad_norm"] > 0
    assert os.path.exists(os.path.join(run_dir, "ckpt", "step_00000001", "trainer_state.pt"))
    assert os.path.exists(os.path.join(run_dir, "export", "policy", "model.safetensors")), out[-2000:]

    # Resuming that TP=2 checkpoint at TP=1 stops with what to do, instead of starting over.
    out = run_failing(overrides(fixture, run_dir, "train.steps=3", "checkpoint.interval=2"))
    assert "written at tp=2 pp=1, this run has tp=1 pp=1" in out, out[-3000:]
    assert "model.mcore_path=" in out
    assert sorted(os.listdir(os.path.join(run_dir, "ckpt"))) == ["step_00000001"]  # untouched


def test_unloadable_checkpoints_stop_the_run(fixture, tmp_path):
    run_dir = str(tmp_path / "all_corrupt")
    run(overrides(fixture, run_dir, "train.steps=1", "checkpoint.interval=1", "checkpoint.export_hf=false"))
    truncate_tensors(os.path.join(run_dir, "ckpt", "step_00000000"))
    out = run_failing(overrides(fixture, run_dir, "train.steps=2", "checkpoint.interval=1", "checkpoint.export_hf=false"))
    assert "no checkpoint could be loaded: step_00000000" in out, out[-3000:]
