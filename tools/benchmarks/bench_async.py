"""Benchmark one-step-off rollouts: the step time of the same demo-sized PRIME run with
``rollout.max_staleness=0`` (generate, then train) and ``1`` (the next batch generated while this one
trains), both in remote mode against a rollout server of their own (the hf engine behind SGLang's
protocol, ``megatron_prime.rollout.protocol_server``), the trainer pinned to one CPU core and the
server to the other, one thread each. The trainer's answer-grading worker processes are moved to the
server's core (``--grading-core server``, the default): the trainer's core stands for the training
devices, and on a cluster grading runs on the hosts' CPUs beside them, not on the devices;
``--grading-core trainer`` leaves them where they start, on the trainer's core.

Builds the demo's toy task and tiny Qwen2 (or takes ``--hf``), then for each of ``--repeats``
repeats runs both settings (sync first, then async) for ``--steps`` steps and takes the mean
``time/step`` over steps 2..N (step 1 of the async run has nothing to overlap yet). The accuracy
filter keeps every group (one rollout round per step) so both settings do the same work. Prints
min / median / max per setting and, last, ``async/sync step time: R``, R the median over repeats of
the async/sync ratio (target: at most 0.75).

    python tools/benchmarks/bench_async.py [--steps 8] [--repeats 3] [--hf HF_DIR] [--workdir DIR]
                                           [--grading-core server|trainer]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import print_table, quiet  # noqa: E402

TRAINER_CPU, SERVER_CPU = 0, 1
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def _descendants(pid: int) -> list[int]:
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:  # gone
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def pin_grading_workers(trainer: subprocess.Popen, cpu: int, done: threading.Event) -> None:
    """Move the trainer's math-grading workers (started lazily, replaced when killed) to ``cpu``."""
    pinned = set()
    while not done.wait(0.1):
        for pid in _descendants(trainer.pid):
            if pid in pinned:
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"_math_worker" in f.read():
                        os.sched_setaffinity(pid, {cpu})
                        pinned.add(pid)
            except OSError:  # exited meanwhile
                continue


def run(cfg_overrides: list[str], hf: str, log_dir: str, staleness: int, grading_core: str) -> list[float]:
    """Seconds per step of one run (its ``time/step`` metrics)."""
    from megatron_prime.config import SHIPPED_EXAMPLES
    from megatron_prime.platform.distributed import free_port
    from megatron_prime.rollout.protocol_server import local_server

    shutil.rmtree(log_dir, ignore_errors=True)
    with local_server(hf, cpu=SERVER_CPU) as url:
        args = [os.path.join(SHIPPED_EXAMPLES, "configs", "tiny_cpu.yaml"), f"model.hf_path={hf}",
                f"rollout.max_staleness={staleness}", "rollout.mode=remote", "rollout.engine=sglang",
                f"rollout.remote_urls=[{url}]", "rollout.weight_sync_address=127.0.0.1",
                f"rollout.weight_sync_port={free_port()}", f"logging.dir={log_dir}", "logging.progress=false",
                f"checkpoint.dir={log_dir}/ckpt", "checkpoint.export_hf=false", "checkpoint.interval=1000",
                "data.eval_files=[]", "algorithm.filter_low=0", "algorithm.filter_high=1", *cfg_overrides]
        cmd = ["taskset", "-c", str(TRAINER_CPU), sys.executable, "-m", "megatron_prime.cli", "train", *args]
        # a fresh single-process launch: not the rendezvous this process used for its SFT
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(env, OMP_NUM_THREADS="1"))
        done = threading.Event()
        if grading_core == "server":
            threading.Thread(target=pin_grading_workers, args=(proc, SERVER_CPU, done), daemon=True).start()
        stdout, stderr = proc.communicate()
        done.set()
    if proc.returncode != 0:
        raise SystemExit(f"the trainer failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    rows = [json.loads(line) for line in open(os.path.join(log_dir, "scalars.jsonl"))]
    return [r["time/step"] for r in rows if "time/step" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf", default=None, help="an HF checkpoint of the demo's shape (default: the demo's "
                        "tiny Qwen2 after 100 SFT steps, made here)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--grading-core", choices=("server", "trainer"), default="server",
                        help="where the trainer's math-grading workers run (default: the server's core)")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPU cores: one for the trainer, one for the rollout server")
    quiet()
    work = args.workdir or tempfile.mkdtemp(prefix="bench_async_")
    from megatron_prime.training.demo import demo_configs

    cfg, _ = demo_configs(os.path.join(work, "demo"), 1, None, ["sft.steps=100", "sft.log_every=1000"])
    hf = args.hf
    if hf is None:
        from megatron_prime.platform import distributed
        from megatron_prime.training.sft import sft

        hf = sft(cfg)["hf"]
        distributed.teardown()
    data = os.path.join(work, "demo", "data")
    common = [f"data.train_files=[{data}/rl.jsonl]", f"train.steps={args.steps}"]
    per_step = {0: [], 1: []}
    for repeat in range(args.repeats):
        for staleness in (0, 1):
            times = run(common, hf, os.path.join(work, f"r{repeat}_s{staleness}"), staleness, args.grading_core)
            per_step[staleness].append(statistics.fmean(times[1:]))
            print(f"repeat {repeat + 1}: max_staleness={staleness}: {per_step[staleness][-1]:.2f} s/step "
                  f"(steps 2..{len(times)})", flush=True)
    ratios = [a / s for a, s in zip(per_step[1], per_step[0])]
    rows = [(f"max_staleness={k}", f"{min(v):.2f}", f"{statistics.median(v):.2f}", f"{max(v):.2f}")
            for k, v in per_step.items()]
    rows.append(("async / sync", f"{min(ratios):.3f}", f"{statistics.median(ratios):.3f}", f"{max(ratios):.3f}"))
    print_table(["seconds per step", "min", "median", "max"], rows)
    print(f"async/sync step time: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
