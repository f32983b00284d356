"""What a Megatron policy itself says about a batch of token sequences (full recompute, no
engine): the references the rollout-engine tests compare engines against."""

from __future__ import annotations

import torch


def right_padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of ``seqs`` right-padded with 0 to the longest."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def megatron_logprobs(model, vocab: int, seqs: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
    """log_softmax(logits / T) of each token of ``seqs`` given its prefix (positions 1..)."""
    from megatron_prime.models.forward import full_logits

    ids, mask = right_padded(seqs)
    logprobs = torch.log_softmax(full_logits(model, ids, mask, vocab) / temperature, dim=-1)
    return [[logprobs[i, t - 1, s[t]].item() for t in range(1, len(s))] for i, s in enumerate(seqs)]


def megatron_greedy(model, vocab: int, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy decoding with full recompute: right-padded batch, next token from each row's last
    valid position. Returns the new tokens and the smallest top-1 / top-2 logit gap seen."""
    from megatron_prime.models.forward import full_logits

    seqs = [list(p) for p in prompts]
    min_gap = float("inf")
    for _ in range(new_tokens):
        logits = full_logits(model, *right_padded(seqs), vocab)
        for i, s in enumerate(seqs):
            top2 = logits[i, len(s) - 1].topk(2).values
            min_gap = min(min_gap, (top2[0] - top2[1]).item())
            s.append(int(logits[i, len(s) - 1].argmax()))
    return [s[len(p):] for s, p in zip(seqs, prompts)], min_gap
