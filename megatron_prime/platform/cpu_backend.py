"""Run megatron-core on CPU (development, CI, the laptop demo).

megatron-core assumes CUDA throughout: ``torch.cuda.current_device()`` as a device, factory calls
with ``device="cuda"``, ``tensor.cuda()``, CUDA RNG state, ``torch.cuda.synchronize`` and optimizer
asserts that ``param.type() == "torch.cuda.FloatTensor"``. Rather than fork megatron-core we map
CUDA to CPU at the torch level, in this one module:

* a ``TorchFunctionMode`` rewrites CUDA device arguments to ``cpu``, makes ``.cuda()`` a no-op,
  and reports CPU float tensors' ``.type()`` as their CUDA names (the optimizer checks);
* a few ``torch.cuda`` functions that have no tensor argument (``current_device``, RNG state,
  ``synchronize``, ``manual_seed``, ``empty_cache``, streams and their events) are replaced by CPU
  equivalents;
* megatron-core's MoE token dispatcher hands its split sizes to ``all_to_all_single`` as Python
  lists only after moving them off the GPU (``maybe_move_tensor_to_cpu``): on CPU they are CPU
  tensors already, which it leaves as tensors, so CPU tensors are converted too.

``enable()`` does nothing when CUDA is available, so GPU runs use megatron-core untouched.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE_MODE: "_CudaToCpuMode | None" = None

_CPU_TYPE_TO_CUDA = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # megatron passes torch.cuda.current_device() (an int) as a device
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CPU_TYPE_TO_CUDA.get(name, name)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event if event is not None else _NullEvent()


class _NullEvent:
    """Stands in for ``torch.cuda.Event``: everything recorded on CPU has happened already."""

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True


def _patch_torch_cuda():
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    # torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    _patch_moe_dispatcher()


def _patch_moe_dispatcher():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    cuda_only = moe_utils.maybe_move_tensor_to_cpu

    def to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return cuda_only(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = token_dispatcher.maybe_move_tensor_to_cpu = to_host
    fill_moe_gaps()


def fill_moe_gaps() -> None:
    """megatron-core 0.16 without Transformer Engine leaves ``te_general_gemm`` undefined in
    ``moe_utils`` while its router gating tests it for None (fixed in 0.17): define it as None."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def enable() -> bool:
    """Activate the CPU mapping for the rest of the process. Returns whether it is active.

    A no-op (returns False) when CUDA is available.
    """
    global _ACTIVE_MODE
    if torch.cuda.is_available():
        return False
    if _ACTIVE_MODE is None:
        _patch_torch_cuda()
        _ACTIVE_MODE = _CudaToCpuMode()
        _ACTIVE_MODE.__enter__()
    return True


def is_active() -> bool:
    return _ACTIVE_MODE is not None
