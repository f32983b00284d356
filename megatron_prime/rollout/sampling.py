"""Token choice for one decoding step of a batch, in plain torch (used by the hf engine).

Randomness comes from one ``torch.Generator`` per sequence and inverse-CDF sampling, so a
sequence's tokens depend only on its own seed and logits: not on which other sequences
share its batch, on the batch size, nor on torch's global RNG (which stays untouched).
"""

from __future__ import annotations

import torch


def filter_top_k_top_p(scaled_logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens that top-k / top-p sampling excludes, row by row.

    top-k keeps the k largest logits; top-p keeps the smallest set of most probable tokens
    whose probability reaches top_p (the most probable token is always kept)."""
    vocab = scaled_logits.shape[-1]
    out = scaled_logits
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p  # position 0 has mass_before 0: always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def choose_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generators: list[torch.Generator] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of ``logits`` [B, V]; return (token_ids [B], logprobs [B]).

    Log-probs follow the package convention (see base.py): log_softmax(logits / T) of the
    untruncated distribution, with T taken as 1 for greedy (temperature 0)."""
    logits = logits.float()
    if temperature == 0.0:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1)
    else:
        scaled = logits / temperature
        logprobs = torch.log_softmax(scaled, dim=-1)
        probs = torch.softmax(filter_top_k_top_p(scaled, top_k, top_p), dim=-1)
        assert generators is not None and len(generators) == logits.shape[0]
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
        cdf = probs.double().cumsum(dim=-1)
        # right=True returns the first index whose cdf exceeds u*total: never a token whose
        # probability is zero (its cdf equals its predecessor's).
        tokens = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1), right=True)
        tokens = tokens.squeeze(-1).clamp(max=logits.shape[-1] - 1)
    chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, chosen
