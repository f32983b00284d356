"""What a built model really holds on this rank, counted from its tensors (each storage once): the
measured side that the planner's figures are checked against (``tests/planner/test_plan.py``,
``tools/benchmarks/bench_lora_memory.py``)."""

from __future__ import annotations


def storage_bytes(tensors, exclude=()) -> int:
    """Bytes of the distinct storages behind ``tensors``, leaving out those behind ``exclude``."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def trainable_bytes(trainable, params=None) -> dict[str, int]:
    """Bytes of a ``TrainableModel``'s parameters (``params``; default: its DDP buffers' parameter
    storage, or the module's parameters where DDP keeps none), gradient buffers (expert ones too)
    and optimizer tensors (Adam moments, fp32 main copies; each optimizer of a chained one), each
    storage once and none counted twice."""
    ddp = trainable.model
    buffers = ddp.buffers + ddp.expert_parallel_buffers
    module_params = list(ddp.module.parameters())
    if params is None:
        params = [b.param_data for b in buffers if b.param_data is not None] or module_params
    grads = [b.grad_data for b in buffers]
    state = []
    for opt in getattr(trainable.optimizer, "chained_optimizers", [trainable.optimizer]):
        for group in opt.optimizer.param_groups:
            state += list(group["params"])  # main params: fp32 copies, or views of the model's
        for s in opt.optimizer.state.values():
            state += [v for v in s.values() if hasattr(v, "untyped_storage") and v.dim() > 0]
    return {"params": storage_bytes(params), "grads": storage_bytes(grads),
            "optimizer": storage_bytes(state, exclude=list(params) + module_params + grads)}
