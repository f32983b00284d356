"""Metric convention for the algorithm's losses: every metric is a (sum, count) pair.

Losses return ``dict[str, Tensor]`` whose values are detached float64 tensors ``[sum, count]``.
Pairs add: sum them over micro-batches (``accumulate_metrics``) and all-reduce the stacked
values over data-parallel ranks with SUM; ``metric_means`` then gives exact global means, never a
mean of means. The count says what the metric is averaged over (tokens or responses).
"""

from __future__ import annotations

import torch


def metric(total: torch.Tensor, count: torch.Tensor | int | float) -> torch.Tensor:
    """Pack one metric as a detached float64 ``[sum, count]`` tensor."""
    total = total.detach().to(torch.float64)
    count = torch.as_tensor(count, dtype=torch.float64, device=total.device)
    return torch.stack([total, count])


def accumulate_metrics(
    into: dict[str, torch.Tensor], new: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Add ``new``'s (sum, count) pairs into ``into`` (in place) and return it."""
    for name, value in new.items():
        into[name] = into[name] + value if name in into else value.clone()
    return into


def metric_means(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """sum / count for every metric; a metric seen on no token or response reports 0.0."""
    return {name: (value[0] / value[1]).item() if value[1] > 0 else 0.0 for name, value in metrics.items()}
