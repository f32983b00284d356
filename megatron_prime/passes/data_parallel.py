"""Data-parallel helpers for rollout batches: which rows a data-parallel rank takes, gathering
per-row tensors back, and summing (sum, count) metric pairs over ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_prime.platform.distributed import all_gather_object


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


def dp_sum(value: float) -> float:
    """``value`` summed over the data-parallel ranks (the same on every rank)."""
    _, size = dp_rank_and_size()
    if size == 1:
        return value
    total = torch.tensor([float(value)], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return float(total.item())


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
