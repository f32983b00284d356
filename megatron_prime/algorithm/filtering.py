"""PRIME's accuracy filter on prompt groups and the buffer that carries surplus prompts to the next step."""

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


class PromptBuffer:
    """FIFO of prompts carried to later steps by the accuracy filter.

    When a rollout step yields more groups that pass the filter than the batch needs, the
    *prompts* of the surplus groups go here (not their responses, which a later, updated policy
    would train on off-policy) and are generated afresh, first, at the next step, as the official
    PRIME code does. An item is whatever the trainer uses for a prompt; the buffer never looks
    inside. It stays smaller than one step's prompts: every round takes up to a batch's worth
    from it first, and the last round leaves less than one batch of surplus.

    Checkpointable: ``state_dict()`` holds only the items, so it can go into ``torch.save`` with
    the rest of the trainer state.
    """

    def __init__(self):
        self._items: deque[Any] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, items: Iterable[Any]) -> None:
        """Append prompts (newest last)."""
        self._items.extend(items)

    def pop(self, n: int) -> list[Any]:
        """Remove and return up to ``n`` of the oldest prompts."""
        if n < 0:
            raise ValueError(f"cannot pop {n} prompts")
        return [self._items.popleft() for _ in range(min(n, len(self._items)))]

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": list(self._items)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "prompts" not in state:
            raise ValueError("this checkpoint's filter buffer holds sampled responses (written before the "
                             "buffer kept prompts only); resume it with the release that wrote it")
        self._items = deque(state["prompts"])
