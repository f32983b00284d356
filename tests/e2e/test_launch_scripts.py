"""The sbatch scripts: their headers, their dry runs (no SLURM), and their signal forwarding and
requeue chain run for real by bash with real signals. Only the SLURM commands (srun, scontrol)
and the trainer process behind srun are stand-ins: a CPU machine has neither SLURM nor GPUs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT

SCRIPTS = ["examples/prime_7b.sh", "examples/prime_70b.sh", "examples/prime_70b_disagg.sh"]
SHARED = "examples/slurm_job.sh"  # sourced by each of them


def _run(script, *args, env=None, timeout=300):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # no SLURM here
    full_env.update(PYTHON=sys.executable, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run(["bash", script, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_headers_work_as_written(script):
    text = open(os.path.join(ROOT, script)).read()
    assert subprocess.run(["bash", "-n", script], cwd=ROOT).returncode == 0
    headers = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))
    # The signal forwarding and the requeue live in the file every script sources.
    assert "source examples/slurm_job.sh" in text
    text += open(os.path.join(ROOT, SHARED)).read()
    assert headers["signal"] == "B:USR1@600" and "requeue" in headers
    assert "/" not in headers["output"], "Slurm does not create --output directories"
    assert headers["ntasks-per-node"] == headers["gpus-per-node"]  # one rank per GPU
    assert "CHAIN OF REQUEUED JOBS" in text and "scontrol requeue" in text


def test_dry_runs_print_command_layout_config_and_plan():
    out = _run("examples/prime_7b.sh", "--dry-run")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "1 node(s) x 8 GPUs = 8 ranks" in text
    assert "megatron_prime.cli train examples/configs/prime_7b.yaml model.hf_path=" in text
    assert "TP=4 PP=1 DP=2" in text and "4 colocated sglang engine(s) x TP=2 (0: ranks 0-1" in text
    assert "validated config:" in text and "prompts_per_step: 256" in text
    assert re.search(r"^FITS: peak [\d.]+ of 80.0 GiB", text, flags=re.M)

    out = _run("examples/prime_70b.sh", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "8 node(s) x 8 GPUs = 64 ranks" in out.stdout and "TP=8 PP=4 DP=2" in out.stdout
    assert "pipeline stage 3: layers 60-79, ranks 48-63" in out.stdout
    assert "8 colocated sglang engine(s) x TP=8" in out.stdout and "FITS" in out.stdout

    out = _run("examples/prime_70b_disagg.sh", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("sglang.launch_server") == 4 and "sglang_router.launch_router" in out.stdout
    assert "rollout.mode=remote" in out.stdout and "4 remote SGLang server(s)" in out.stdout
    assert "health wait" in out.stdout and "FITS" in out.stdout


def test_dry_run_refuses_layouts_that_cannot_work():
    out = _run("examples/prime_70b.sh", "--dry-run", "parallel.tp=3")
    assert out.returncode == 2
    assert "parallel.tp' = 3" in out.stderr and "try one of 1, 2, 4, 8" in out.stderr
    one_node = _run("examples/prime_70b.sh", "--dry-run", env={"SLURM_JOB_NUM_NODES": "1"})
    assert one_node.returncode == 1
    assert "CANNOT RUN on 8 GPUs" in one_node.stdout
    assert "no TP/PP/micro-batch layout fits on 8 GPUs" in one_node.stdout
    assert re.search(r"fits: TP=\d PP=\d+ DP=\d on \d+ GPUs", one_node.stdout)


FAKE_SRUN = """#!/bin/bash
# srun stand-in: drop srun's options, run the command in its place (same PID, so the signals the
# batch script sends reach it as srun would pass them on).
while [ "${1#--}" != "$1" ]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then echo node001; else echo "$@" >> "$LOG/scontrol"; fi
"""
FAKE_RANK = """#!/bin/bash
# the trainer's side of the contract: stop at a step boundary on USR1/TERM and exit 0
echo "$@" > "$LOG/args"
trap 'echo USR1 >> "$LOG/signals"; exit 0' USR1
trap 'echo TERM >> "$LOG/signals"; exit 0' TERM
touch "$LOG/ready"
if [ -n "$FINISH_AFTER" ]; then sleep "$FINISH_AFTER"; exit 0; fi
while true; do sleep 0.1; done
"""


def _batch_job(tmp_path, send=None, finish_after=""):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("rank", FAKE_RANK)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    log.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "PYTHON": str(bin_dir / "rank"),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node001", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_SUBMIT_DIR": ROOT, "OUT_DIR": str(tmp_path / "out"), "FINISH_AFTER": finish_after}
    job = subprocess.Popen(["bash", "examples/prime_7b.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (log / "ready").exists():
        assert time.time() < deadline and job.poll() is None, job.stdout.read() if job.poll() is not None else ""
        time.sleep(0.05)
    if send is not None:
        time.sleep(0.3)  # the traps are set right after the ranks start
        job.send_signal(send)
    output, _ = job.communicate(timeout=30)
    read = lambda name: (log / name).read_text() if (log / name).exists() else ""  # noqa: E731
    return job.returncode, output, read("signals"), read("scontrol"), read("args")


def test_usr1_before_the_time_limit_stops_the_ranks_and_requeues(tmp_path):
    code, output, signals, scontrol, args = _batch_job(tmp_path, send=signal.SIGUSR1)
    assert code == 0, output
    assert signals == "USR1\n"
    assert scontrol == "requeue 4242\n"
    assert "-m megatron_prime.cli train examples/configs/prime_7b.yaml" in args
    assert f"checkpoint.dir={tmp_path / 'out'}/checkpoints" in args


def test_term_is_forwarded_without_requeue(tmp_path):
    code, output, signals, scontrol, _ = _batch_job(tmp_path, send=signal.SIGTERM)
    assert code == 0, output
    assert signals == "TERM\n" and scontrol == ""


def test_finished_training_ends_the_chain(tmp_path):
    code, output, signals, scontrol, _ = _batch_job(tmp_path, finish_after="0.5")
    assert code == 0, output
    assert signals == "" and scontrol == ""
