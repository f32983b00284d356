"""Small collectives the trainer needs on top of megatron-core's ``parallel_state``."""

from __future__ import annotations

import pickle
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_prime.platform.distributed import broadcast_object, is_rank0

__all__ = ["all_gather_object", "broadcast_object", "dp_rank_and_size", "dp_rows", "gather_dp_rows", "is_rank0",
           "on_rank0", "picklable_error", "reduce_metric_pairs", "run_everywhere"]


def on_rank0(fn):
    """Run ``fn()`` on global rank 0 only; its result there (None elsewhere). An exception on rank
    0 is re-raised on every rank, so the others fail with it instead of waiting in a collective."""
    result, error = None, None
    if is_rank0():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    error = broadcast_object(error)
    if error is not None:
        raise error
    return result


def picklable_error(error: Exception | None) -> Exception | None:
    """``error`` if it can travel to other ranks, else a RuntimeError with its message."""
    try:
        pickle.dumps(error)
        return error
    except Exception:  # noqa: BLE001 - keep the message, lose the type
        return RuntimeError(repr(error))


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj``, in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_everywhere(fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank; if it raised on any rank, every rank raises (the first error), so
    none is left waiting in the next collective."""
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    errors = [e for e in all_gather_object(picklable_error(error)) if e is not None]
    if errors:
        raise errors[0]
    return result


def dp_rank_and_size() -> tuple[int, int]:
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def dp_rows(num_rows: int) -> slice:
    """This data-parallel rank's contiguous share of ``num_rows`` rows."""
    rank, size = dp_rank_and_size()
    if num_rows % size:
        raise ValueError(f"{num_rows} rows do not split over {size} data-parallel ranks")
    per = num_rows // size
    return slice(rank * per, (rank + 1) * per)


def gather_dp_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every data-parallel rank's rows (inverse of ``dp_rows``)."""
    _, size = dp_rank_and_size()
    if size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_data_parallel_group())
    return torch.cat(parts, dim=0)


def reduce_metric_pairs(metrics: dict) -> dict:
    """Sum (sum, count) metric pairs over every rank (ranks without a key contribute nothing).

    Tensor-parallel ranks hold identical copies: sum and count both scale by TP, so means
    are unchanged.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    local = {k: v.detach().cpu().double() for k, v in metrics.items()}
    total: dict = {}
    for part in all_gather_object(local):
        for k, v in part.items():
            total[k] = total[k] + v if k in total else v.clone()
    return total
