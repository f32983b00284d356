"""Optional fusion of the algorithm's elementwise kernels with ``torch.compile``.

Eager PyTorch makes one pass over ``[batch, response_len]`` memory per elementwise op: the PPO
loss alone is about 25 of them, each allocating a result. A function marked ``@fused`` is a pure
tensor kernel (no data-dependent Python control flow) that ``torch.compile`` turns into a few
fused loops (one per reduction shape, around any cumsum). Compilation uses dynamic shapes, so a
kernel compiles once per process and per variant of its Python arguments (which optional tensors
are ``None``), not per batch shape or step; dynamo still compiles apart the sizes it specialises
(a dimension of 1, small tensors of at most 4,096 elements, a dtype change). It compiles whole
(``fullgraph``): a kernel that would break into pieces raises instead of half running eagerly.

Off by default (``algorithm.compile_kernels``): compiling costs seconds per kernel at the first
step and needs a C++ compiler on CPU (Triton on GPU), while at model scale the algorithm's math is
a negligible part of a step. Off, every kernel runs eagerly, exactly the code below it.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

Kernel = TypeVar("Kernel", bound=Callable)

_enabled = False


def set_kernel_fusion(enabled: bool) -> None:
    """Run ``@fused`` kernels compiled (True) or eagerly (False) from now on, in this process."""
    global _enabled
    _enabled = bool(enabled)


def kernel_fusion_enabled() -> bool:
    return _enabled


def fused(kernel: Kernel) -> Kernel:
    """Mark ``kernel`` for compilation when kernel fusion is on (compiled lazily, at first use)."""
    compiled = None

    @functools.wraps(kernel)
    def run(*args, **kwargs):
        nonlocal compiled
        if not _enabled:
            return kernel(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(kernel, dynamic=True, fullgraph=True)
        return compiled(*args, **kwargs)

    return run  # type: ignore[return-value]
