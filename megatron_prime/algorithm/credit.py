"""Where the process rewards overrule the verifier: per response, the advantage's sign against the
sign of its outcome term.

A response's *outcome term* is what its advantage would be from the outcome alone: the mean over its
tokens of the advantages the same estimator gives without process rewards (for Eq. 5, the RLOO term
r_o(y^i) - 1/(K-1) sum_{j!=i} r_o(y^j)). Its *process term* is the rest of its mean advantage. A
response is *flipped* when its mean advantage has the opposite sign of its outcome term: an
incorrect response pushed up, or a correct one pushed down, because summed process rewards
outweigh the outcome (the reward-hacking channel PURE, arXiv 2504.15275, attributes to sum-form
credit assignment). Responses whose outcome term is 0 (with a group baseline: a group whose
outcomes are all equal) and empty responses do not count. The outcome term is the estimator's own:
one that whitens over the batch (``prime_official``, ``reinforce_pp``, ``algorithm.whiten``) whitens
it too, so an all-equal group's responses get a non-zero term and count; ``reinforce`` has no
baseline, so an incorrect response's term is 0 and ``flip_incorrect_up`` stays 0.
"""

from __future__ import annotations

import torch

from megatron_prime.algorithm.masked_ops import as_bool_mask, zero_invalid


def advantage_flips(advantages: torch.Tensor, outcome_advantages: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """``(flipped [B] bool, metrics)`` from the advantages ``[B, T]`` and the outcome-only
    advantages of the same estimator. Metrics:

      advantage/flip_frac            flipped / responses whose outcome term is not 0
      advantage/flip_incorrect_up    outcome term < 0 and mean advantage > 0, over all responses
      advantage/flip_correct_down    outcome term > 0 and mean advantage < 0, over all responses
      advantage/process_to_outcome   mean |process term| / mean |outcome term| over responses with
                                     tokens (0 when every outcome term is 0)
    """
    valid = as_bool_mask(mask)
    lengths = valid.sum(dim=1)
    has_tokens = lengths > 0

    def response_mean(values):
        return zero_invalid(values, valid).sum(dim=1, dtype=torch.float64) / lengths.clamp(min=1)

    total, outcome = response_mean(advantages), response_mean(outcome_advantages)
    counted = has_tokens & (outcome != 0)
    incorrect_up = counted & (outcome < 0) & (total > 0)
    correct_down = counted & (outcome > 0) & (total < 0)
    flipped = incorrect_up | correct_down
    responses = max(1, advantages.shape[0])
    outcome_size = outcome[has_tokens].abs().mean() if has_tokens.any() else torch.zeros((), dtype=torch.float64)
    process_size = (total - outcome)[has_tokens].abs().mean() if has_tokens.any() else outcome_size
    metrics = {
        "advantage/flip_frac": float(flipped.sum()) / max(1, int(counted.sum())),
        "advantage/flip_incorrect_up": float(incorrect_up.sum()) / responses,
        "advantage/flip_correct_down": float(correct_down.sum()) / responses,
        "advantage/process_to_outcome": float(process_size / outcome_size) if outcome_size > 0 else 0.0,
    }
    return flipped, metrics
