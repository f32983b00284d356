"""megatron-prime: PRIME (Process Reinforcement through Implicit Rewards) on megatron-core.

Importing the package sets up how megatron-core is imported in our processes:

* warnings that megatron-core gives at import time with nothing for users to do are silenced;
* megatron-core's fused kernels are compiled on their first call instead of wrapped at import.
  megatron-core decorates some forty kernels with ``megatron.core.jit.jit_fuser``, which is
  ``torch.compile``, as its modules are imported. Building those wrappers imports dynamo and
  inductor: 2.5-3 s in every process (trainer ranks, converters, report commands), even when none
  of the kernels ever runs, as on the CPU path, which turns those fusions off
  (``tools/benchmarks/bench_startup.py``). megatron-core's own switch, ``disable_jit_fuser``, comes
  too late: importing ``megatron.core.jit`` imports the whole package first, decorators included.
  So an import hook sets ``jit_fuser`` the moment ``megatron.core.jit`` has run, before any kernel
  is decorated, to a decorator that calls ``torch.compile`` with the same options on the kernel's
  first call. A kernel that runs compiles as before, only later; one that never runs costs nothing.
"""

import functools
import importlib.abc
import importlib.machinery
import sys
import warnings

# megatron-core warns at import time that optional Apex / Transformer Engine kernels are missing
# and replaced by torch ones; the README documents that both are optional.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed")
# megatron-core 0.16 calls torch.distributed APIs that torch 2.13 deprecates; nothing for users to do.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
warnings.filterwarnings("ignore", message=r"full scope is deprecated")

__version__ = "0.1.0"

_JIT_MODULE = "megatron.core.jit"


class _JitFuserHook(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core.jit`` as Python would, and replaces its ``jit_fuser`` once it has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _JIT_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            import torch

            if module.jit_fuser is torch.compile:  # not megatron-core's fallbacks (TorchScript, no-op)
                module.jit_fuser = compile_on_first_call

        spec.loader.exec_module = exec_module
        return spec


def compile_on_first_call(kernel=None, **options):
    """``torch.compile(kernel, **options)``, built when ``kernel`` is first called."""
    if kernel is None:  # used as ``@jit_fuser(**options)``
        return functools.partial(compile_on_first_call, **options)
    import torch

    compiled = None

    @functools.wraps(kernel)
    def compile_then_call(*args, **kwargs):
        nonlocal compiled
        if torch.compiler.is_compiling():
            # inside a caller's compiled region dynamo inlines a compiled function's own code
            # anyway; building a compile wrapper here would nest it in the trace
            return kernel(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(kernel, **options)
        return compiled(*args, **kwargs)

    return compile_then_call


if _JIT_MODULE not in sys.modules:
    sys.meta_path.insert(0, _JitFuserHook())
