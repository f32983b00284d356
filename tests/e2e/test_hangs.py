"""``train`` under torchrun on 2 ranks with the demo's own model (tied embeddings) at PP=2, and what
happens when a rank hangs.

* The run finishes (at PP >= 2 a tied model once deadlocked in its first update).
* A rank that stalls (a fault hook in this test's launcher, not in the package) ends the run
  within ``train.hang_timeout_minutes``: both ranks write the phase and the stacks of their
  threads, and the job exits non-zero.
* SIGTERM while a rank is stuck: after ``train.stop_grace_minutes`` both ranks dump their stacks
  and exit non-zero instead of waiting for SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.multi_rank

# Runs `megatron-prime train`; with STALL_IN=<function of prime_step> rank 1 sleeps forever inside it.
LAUNCHER = """
import os, sys, time
sys.path.insert(0, {root!r})
import megatron_prime.training.prime_step as prime_step
from megatron_prime.cli import main

def stall_on_rank1(name):
    original = getattr(prime_step, name)

    def stalled_by_the_test(*args, **kwargs):
        if os.environ["RANK"] == "1":
            print(f"TEST: rank 1 stalls in {{name}}", flush=True)
            time.sleep(3600)
        return original(*args, **kwargs)

    setattr(prime_step, name, stalled_by_the_test)

if __name__ == "__main__":
    if os.environ.get("STALL_IN"):
        stall_on_rank1(os.environ["STALL_IN"])
    sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    from megatron_prime.data import build_toy_task
    from megatron_prime.training.demo import make_tiny_model

    root = tmp_path_factory.mktemp("demo_model")
    task = build_toy_task(str(root / "data"), seed=1, num_sft=8, num_rl=64, num_eval=8)
    hf = make_tiny_model(str(task.tokenizer), str(root / "hf"), seed=1)
    return {"hf": hf, "rl": str(task.rl), "root": root}


def start(demo_model, run_dir, *extra, stall_in=None) -> subprocess.Popen:
    script = demo_model["root"] / "launch.py"
    script.write_text(LAUNCHER.format(root=ROOT))
    config = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")
    args = [f"model.hf_path={demo_model['hf']}", f"data.train_files=[{demo_model['rl']}]", "parallel.pp=2",
            "train.steps=2", "train.prompts_per_step=8", "train.mini_batch_responses=32",
            "train.prm_mini_batch_responses=16", f"checkpoint.dir={run_dir}/ckpt",
            f"checkpoint.export_dir={run_dir}/hf", f"logging.dir={run_dir}/logs", "logging.progress=false", *extra]
    env = dict(os.environ, STALL_IN=stall_in or "")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), config, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)


def test_demo_model_trains_at_pp2(demo_model, tmp_path):
    proc = start(demo_model, tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert os.path.exists(tmp_path / "hf" / "policy" / "model.safetensors")


def assert_both_ranks_dumped(out: str, phase: str) -> None:
    for rank in (0, 1):
        assert f"[rank {rank}] megatron-prime watchdog: " in out, out[-6000:]
        assert f"[rank {rank}] megatron-prime watchdog: exit 124 (hung in phase '{phase}' of step 0)" in out, out[-6000:]
    assert "stalled_by_the_test" in out  # rank 1's stack shows where it stalls
    assert "Thread 0x" in out or "Current thread 0x" in out  # faulthandler's per-thread stacks


def test_a_stalled_rank_ends_the_run_with_every_ranks_stack(demo_model, tmp_path):
    started = time.monotonic()
    proc = start(demo_model, tmp_path, "train.hang_timeout_minutes=0.25", stall_in="update_prm")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, out[-4000:]
    assert "TEST: rank 1 stalls in update_prm" in out
    assert_both_ranks_dumped(out, "prm_update")
    assert time.monotonic() - started < 300


def test_sigterm_while_a_rank_is_stuck_dumps_and_exits_after_the_grace_period(demo_model, tmp_path):
    proc = start(demo_model, tmp_path, "train.hang_timeout_minutes=30", "train.stop_grace_minutes=0.1",
                 stall_in="update_policy")
    lines = []
    for line in proc.stdout:  # wait until rank 1 is stuck (and rank 0 with it, in a collective)
        lines.append(line)
        if "TEST: rank 1 stalls in update_policy" in line:
            break
    time.sleep(2)
    import psutil

    workers = psutil.Process(proc.pid).children()  # the two ranks (their own children are the graders)
    assert len(workers) == 2
    signalled = time.monotonic()
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    out = "".join(lines) + out
    assert proc.returncode != 0, out[-4000:]
    assert "SIGTERM received and no progress" in out, out[-6000:]
    assert_both_ranks_dumped(out, "policy_update")
    assert time.monotonic() - signalled < 120  # not the 30-minute hang timeout
