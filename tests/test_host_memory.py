"""CPU runs keep freed memory: a large tensor allocated again after a free reuses its pages
instead of faulting each one in again (glibc's default), unless the environment tunes malloc."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import resource, sys
sys.path.insert(0, {root!r})
import torch
from megatron_prime.platform.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
elements = 64 * 2**20 // 4  # 64 MiB: above glibc's largest default mmap threshold (32 MiB)
torch.ones(elements)  # allocated, filled and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(elements)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, faults / (elements * 4 / resource.getpagesize()))
"""


def page_faults_per_page(mode: str, **env: str) -> tuple[bool, float]:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                                                 "GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=ROOT), mode], capture_output=True, text=True,
                         env={**clean, **env}, check=True).stdout.split()
    return out[0] == "True", float(out[1])


def transparent_huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
@pytest.mark.skipif(transparent_huge_pages_always(), reason="huge pages fault once per 2 MiB: no per-page count")
def test_freed_memory_is_reused_without_page_faults():
    applied, default_faults = page_faults_per_page("default")
    assert not applied and default_faults > 0.5  # glibc hands the block back: every page faults again
    applied, kept_faults = page_faults_per_page("keep")
    assert applied and kept_faults < 0.05
    applied, faults = page_faults_per_page("keep", MALLOC_MMAP_THRESHOLD_="65536")
    assert not applied and faults > 0.5  # the environment's own malloc tuning is left alone
