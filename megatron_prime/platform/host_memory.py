"""CPU runs keep freed host memory for reuse instead of handing it back to the OS.

glibc's malloc returns every freed block above its mmap threshold (at most 32 MiB by default) to
the OS at once, and trims the top of its heap; the next tensor of that size then faults in every
page again. On the development machine a fresh 80 MiB tensor takes ~5x as long to fill as a
reused one, and a training step allocates such temporaries every time (logit chunks, gathered
weights, loss terms). A training process's working set recurs every step, so CPU runs keep it:
the main thread's blocks up to 1 GiB come from the heap (other threads' arenas still map blocks
above 64 MiB) and the heap top is trimmed only beyond 2 GiB of free space. Resident memory then
stays near the process's peak instead of following its live tensors.

Only with glibc's own malloc (not under a preloaded tcmalloc/jemalloc), only without CUDA (device
memory has torch's caching allocator), and not when the environment already tunes glibc's malloc
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``glibc.malloc.*`` in ``GLIBC_TUNABLES``),
as the memory-measuring benchmarks do.
"""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 2**30
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes a C int
_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def malloc_is_tuned_by_environment() -> bool:
    return (any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
            or any(name in os.environ.get("LD_PRELOAD", "") for name in _ALLOCATORS))


def keep_freed_memory() -> bool:
    """Apply the settings above to this process; returns whether they were applied."""
    if malloc_is_tuned_by_environment():
        return False
    try:
        os.confstr("CS_GNU_LIBC_VERSION")  # glibc only (musl and macOS have no such name)
        libc = ctypes.CDLL("libc.so.6")
    except (ValueError, OSError):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    )
