"""Benchmark process start-up: the wall time of a fresh Python that imports the trainer.

Every trainer rank, converter and report command pays this once, and the test suite starts dozens
of such processes. Times, alternating, medians of ``--repeats``:

* ``import torch``: the floor (everything else builds on it),
* ``import megatron_prime.training.trainer``, as every process imports it: megatron-core's fused
  kernels are compiled on their first call (``megatron_prime/__init__.py``),
* the same after importing ``megatron.core`` first, which bypasses that hook: megatron-core wraps
  each kernel in ``torch.compile`` at import, which imports dynamo and inductor.

Each time is printed as a ratio to ``import torch`` measured in the same run.

    python tools/benchmarks/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import print_table  # noqa: E402

CASES = {
    "import torch": "import torch",
    "import the trainer (kernels compiled on first call)": "import megatron_prime.training.trainer",
    "the same, megatron-core imported first (compile wrappers at import)":
        "import megatron.core, megatron_prime.training.trainer",
}
PRINT_INDUCTOR_LOADED = "; import sys; print('torch._inductor.compile_fx' in sys.modules)"


def start_up(code: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code + PRINT_INDUCTOR_LOADED],
                         capture_output=True, text=True, check=True).stdout.strip()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    start_up(CASES["import torch"])  # warm-up: page cache
    times: dict[str, list[float]] = {name: [] for name in CASES}
    inductor: dict[str, str] = {}
    for _ in range(args.repeats):
        for name, code in CASES.items():
            seconds, inductor[name] = start_up(code)
            times[name].append(seconds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    floor = medians["import torch"]
    rows = [[name, f"{m:.2f}", f"{m / floor:.2f}x", f"{min(times[name]):.2f}-{max(times[name]):.2f}", inductor[name]]
            for name, m in medians.items()]
    print_table(["process start-up", "median s", "vs import torch", "range s", "inductor imported"], rows,
                title=f"bench_startup: wall time of a fresh {sys.executable} -c ..., median of {args.repeats}")


if __name__ == "__main__":
    main()
