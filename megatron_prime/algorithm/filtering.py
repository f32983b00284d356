"""PRIME's accuracy filter on prompt groups (DESIGN.md §2.2) and the buffer for surplus groups."""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable

import torch

from megatron_prime.algorithm.masked_ops import check_groups

# Slack on the inclusive bounds so that a group mean such as 1/5 passes low=0.2 although
# float rounding may land it a hair below the decimal bound.
_BOUND_SLACK = 1e-6


def filter_groups(
    outcome: torch.Tensor,
    group_size: int,
    low: float = 0.2,
    high: float = 0.8,
    truncated: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which prompt groups to keep: ``[num_groups]`` bool.

    A group is kept when the mean outcome reward of its K responses lies in [low, high]
    (inclusive), i.e. the prompt is neither too easy nor too hard for the current policy. When
    ``truncated`` ([batch] bool, a response hit the length limit) is given, a group with any
    truncated response is dropped too. Rows of the kept groups are
    ``keep.repeat_interleave(group_size)``.
    """
    num_groups = check_groups(outcome.shape[0], group_size)
    if not low <= high:
        raise ValueError(f"accuracy filter needs low <= high, got low={low}, high={high}")
    group_mean = outcome.to(torch.float64).reshape(num_groups, group_size).mean(dim=1)
    keep = (group_mean >= low - _BOUND_SLACK) & (group_mean <= high + _BOUND_SLACK)
    if truncated is not None:
        if truncated.shape != outcome.shape:
            raise ValueError(
                f"truncated must be [batch]={tuple(outcome.shape)}, got {tuple(truncated.shape)}"
            )
        keep &= ~truncated.bool().reshape(num_groups, group_size).any(dim=1)
    return keep


class GroupBuffer:
    """FIFO of kept prompt groups carried to later steps (DESIGN.md §2.2).

    When a rollout step yields more groups that pass the filter than the batch needs, the
    surplus goes here and is used first at the next step. A group is whatever object the trainer
    uses for the K responses of one prompt (e.g. a dict of tensors); the buffer never looks
    inside. ``max_groups`` bounds memory (and staleness) by dropping the oldest groups.

    Checkpointable: ``state_dict()`` holds only the groups list and plain values, so it can go
    into ``torch.save`` with the rest of the trainer state.
    """

    def __init__(self, max_groups: int | None = None):
        if max_groups is not None and max_groups < 0:
            raise ValueError(f"max_groups must be >= 0 or None, got {max_groups}")
        self.max_groups = max_groups
        self._groups: deque[Any] = deque()
        self.num_dropped = 0  # groups discarded because the buffer was full

    def __len__(self) -> int:
        return len(self._groups)

    def push(self, groups: Iterable[Any]) -> None:
        """Append groups (newest last); the oldest are dropped beyond ``max_groups``."""
        self._groups.extend(groups)
        if self.max_groups is not None:
            while len(self._groups) > self.max_groups:
                self._groups.popleft()
                self.num_dropped += 1

    def pop(self, n: int) -> list[Any]:
        """Remove and return up to ``n`` of the oldest groups."""
        if n < 0:
            raise ValueError(f"cannot pop {n} groups")
        return [self._groups.popleft() for _ in range(min(n, len(self._groups)))]

    def state_dict(self) -> dict[str, Any]:
        return {"groups": list(self._groups), "max_groups": self.max_groups, "num_dropped": self.num_dropped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.max_groups = state["max_groups"]
        self.num_dropped = state["num_dropped"]
        self._groups = deque(state["groups"])
