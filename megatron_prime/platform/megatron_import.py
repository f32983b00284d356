"""Import megatron-core without paying for its fused kernels' compile wrappers up front.

megatron-core decorates about thirty fused kernels with ``torch.compile`` as its modules are
imported (``megatron.core.jit.jit_fuser``). Building those wrappers imports dynamo and inductor:
about 2.5 s in every process (trainer ranks, converters, report commands), even when none of the
kernels is ever called, as on the CPU path, which disables those fusions. megatron-core's own
switch, ``megatron.core.jit.disable_jit_fuser``, cannot help: importing ``megatron.core.jit``
imports the whole package first, decorators included.

So while megatron-core is being imported, ``torch.compile`` applied to a plain function returns a
wrapper that calls the real ``torch.compile`` on its first call. A kernel that runs compiles as it
did before, with the same options, only later; one that never runs costs nothing.
"""

from __future__ import annotations

import functools
import sys
import types

import torch


def import_megatron_core() -> None:
    """Import ``megatron.core`` (once per process) with its compile wrappers deferred."""
    if "megatron.core" in sys.modules:
        return
    real_compile = torch.compile
    torch.compile = functools.partial(_compile_on_first_call, real_compile)
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = real_compile


def _compile_on_first_call(real_compile, model=None, **options):
    if model is None:  # used as ``@torch.compile(**options)``
        return lambda fn: _compile_on_first_call(real_compile, fn, **options)
    if not isinstance(model, types.FunctionType):
        return real_compile(model, **options)
    compiled = None

    @functools.wraps(model)
    def compile_then_call(*args, **kwargs):
        nonlocal compiled
        if torch.compiler.is_compiling():
            # inside a caller's compiled region dynamo inlines a compiled function's original
            # code anyway; compiling here would nest a compile in a trace
            return model(*args, **kwargs)
        if compiled is None:
            compiled = real_compile(model, **options)
        return compiled(*args, **kwargs)

    return compile_then_call
