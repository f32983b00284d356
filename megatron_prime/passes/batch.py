"""A rollout batch as tensors, and its micro-batches for Megatron passes.

Sequences are ``prompt + response`` right-padded to ``[N, S]``. Per-token quantities of the
algorithm live in the *response frame* ``[N, R]``: column j is response token j. The log-prob
of response token j of row i comes from the logits at position ``prompt_len[i] - 1 + j``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [N, S] prompt + response, right-padded
    attention_mask: torch.Tensor  # [N, S] 1 on real tokens
    response_index: torch.Tensor  # [N, R] position in input_ids of response token j (clamped)
    response_mask: torch.Tensor  # [N, R] 1 on real response tokens
    outcome: torch.Tensor  # [N] verifier reward in [0, 1]
    rollout_logprobs: torch.Tensor  # [N, R] the engine's log-probs (for the mismatch metric / TIS)
    truncated: torch.Tensor  # [N] bool, response hit max_new_tokens
    group_size: int
    extras: dict = field(default_factory=dict)  # per-step tensors computed along the way

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor | slice) -> "RolloutBatch":
        """A sub-batch (the same rows of every tensor, extras included)."""
        return self._map(lambda t: t[index])

    def to(self, device) -> "RolloutBatch":
        return self._map(lambda t: t.to(device))

    def _map(self, pick) -> "RolloutBatch":
        return RolloutBatch(
            input_ids=pick(self.input_ids),
            attention_mask=pick(self.attention_mask),
            response_index=pick(self.response_index),
            response_mask=pick(self.response_mask),
            outcome=pick(self.outcome),
            rollout_logprobs=pick(self.rollout_logprobs),
            truncated=pick(self.truncated),
            group_size=self.group_size,
            extras={k: pick(v) for k, v in self.extras.items()},
        )


def build_rollout_batch(
    prompts: list[list[int]],
    responses: list[list[int]],
    outcomes: list[float],
    rollout_logprobs: list[list[float]] | None,
    truncated: list[bool],
    group_size: int,
    pad_id: int = 0,
) -> RolloutBatch:
    """Pack token lists (response i belongs to ``prompts[i]``) into a RolloutBatch."""
    n = len(responses)
    seq_len = max(len(p) + len(r) for p, r in zip(prompts, responses))
    resp_len = max(1, max(len(r) for r in responses))
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, seq_len), dtype=torch.long)
    response_index = torch.zeros((n, resp_len), dtype=torch.long)
    response_mask = torch.zeros((n, resp_len), dtype=torch.float32)
    logprobs = torch.zeros((n, resp_len), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError(f"rollout row {i}: empty prompt")
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, : len(p) + len(r)] = 1
        # logits at position t predict token t + 1
        response_index[i] = (len(p) - 1 + torch.arange(resp_len)).clamp(max=seq_len - 2 if seq_len > 1 else 0)
        response_mask[i, : len(r)] = 1
        if rollout_logprobs is not None:
            logprobs[i, : len(r)] = torch.tensor(rollout_logprobs[i][: len(r)], dtype=torch.float32)
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_index=response_index,
        response_mask=response_mask,
        outcome=torch.tensor(outcomes, dtype=torch.float32),
        rollout_logprobs=logprobs,
        truncated=torch.tensor(truncated, dtype=torch.bool),
        group_size=group_size,
    )


def micro_batch_rows(lengths: torch.Tensor, token_budget: int) -> list[torch.Tensor]:
    """Split rows into micro-batches whose padded size (rows x longest row) fits the budget.

    Rows are taken longest-first so that similar lengths share a micro-batch (less padding);
    a single row longer than the budget still gets its own micro-batch.
    """
    order = torch.argsort(lengths, descending=True, stable=True)
    groups, current, longest = [], [], 0
    for row in order.tolist():
        length = int(lengths[row])
        if current and max(longest, length) * (len(current) + 1) > token_budget:
            groups.append(torch.tensor(current, dtype=torch.long))
            current, longest = [], 0
        current.append(row)
        longest = max(longest, length)
    if current:
        groups.append(torch.tensor(current, dtype=torch.long))
    return groups
