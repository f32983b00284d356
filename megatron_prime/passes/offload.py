"""Free accelerator memory held by training state while a phase does not need it: around the
rollout (the colocated engine needs the memory) and, between the PRM and policy phases, the
state of the model that is not training.

Uses megatron-core's own offload seams: ``DistributedDataParallel.offload_grad_buffers`` /
``restore_grad_buffers`` (gradient buffers freed and re-zeroed) and
``MegatronOptimizer.offload_to_cpu`` / ``restore_from_cpu`` (optimizer state to host memory).
The optimizer is only offloaded for half-precision models: with fp32 parameters the distributed
optimizer's main parameters are views of the model's, and moving them would break the aliasing.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from megatron_prime.passes.trainable import TrainableModel


@contextmanager
def offloaded(*trainables: TrainableModel | None, enabled: bool = True):
    """Inside the block, the gradient buffers (and, for bf16/fp16, the optimizer state) of
    ``trainables`` are released; they are restored (gradients zeroed) on exit."""
    trainables = [tm for tm in trainables if tm is not None]
    if not enabled or not trainables:
        yield
        return
    cuda = torch.cuda.is_available()
    moved_optimizers = []
    for tm in trainables:
        tm.model.offload_grad_buffers(synchronize=cuda, empty_cache=cuda)
        if cuda and tm.model.config.params_dtype != torch.float32:
            tm.optimizer.offload_to_cpu()
            moved_optimizers.append(tm.optimizer)
    if cuda:
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        for tm in trainables:
            tm.model.restore_grad_buffers(synchronize=cuda)
        for optimizer in moved_optimizers:
            optimizer.restore_from_cpu()
