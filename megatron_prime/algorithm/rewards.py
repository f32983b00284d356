"""Implicit process rewards (paper Eq. 3) and the implicit PRM's cross-entropy loss (Algorithm 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_prime.algorithm.fusion import fused
from megatron_prime.algorithm.masked_ops import as_bool_mask, attach_row_gradient, zero_invalid
from megatron_prime.algorithm.metrics import metric


@fused
def implicit_process_rewards(
    prm_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Token-level implicit process rewards, paper Eq. 3.

    r_phi(y_t) = beta * (log pi_phi(y_t | y_<t) - log pi_ref(y_t | y_<t)), zero on padding.
    All tensors are ``[batch, response_len]``; the result has ``prm_logprobs``' dtype.
    """
    return _rewards(prm_logprobs, ref_logprobs, as_bool_mask(mask), beta)


def _rewards(prm_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, valid: torch.Tensor, beta: float) -> torch.Tensor:
    return zero_invalid((prm_logprobs - ref_logprobs).mul_(beta), valid)


def prm_loss(
    prm_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    outcome: torch.Tensor,
    beta: float,
    *,
    loss_normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of the implicit PRM against outcome labels (Algorithm 1, PRM update).

    With the sequence reward s = beta * sum_t q_t = r_phi(y) (Eq. 3 summed over the response):
        L_CE = -[ r_o * log sigma(s) + (1 - r_o) * log(1 - sigma(s)) ]
    computed as -[ r_o * logsigmoid(s) + (1 - r_o) * logsigmoid(-s) ], which is finite for any
    s. ``outcome`` is ``[batch]`` in [0, 1]; fractional labels (code pass rates) are soft targets.

    The loss is sum_i L_CE_i / loss_normalizer. The default normaliser is this call's number of
    responses (a plain mean); under micro-batching pass the global batch's response count so the
    micro-batch losses add up to the global mean.

    Metrics, as (sum, count) pairs over responses (see ``metrics.py``):
      prm/loss            the cross-entropy
      prm/accuracy        sign agreement: the PRM says "correct" (s > 0, i.e. sigma(s) > 0.5)
                          exactly when the label says so (r_o > 0.5); s = 0 counts as "wrong"
      prm/sequence_reward s = beta * sum_t q_t
    """
    valid = as_bool_mask(mask)
    if outcome.shape != prm_logprobs.shape[:1]:
        raise ValueError(
            f"outcome must be [batch]={tuple(prm_logprobs.shape[:1])}, got {tuple(outcome.shape)}"
        )
    with torch.no_grad():
        terms = _prm_terms(prm_logprobs.detach(), ref_logprobs.detach(), valid, outcome, beta)

    num_responses = prm_logprobs.shape[0]
    normalizer = num_responses if loss_normalizer is None else loss_normalizer
    loss = attach_row_gradient(terms["loss"], prm_logprobs, terms["row_gradient"], valid) / normalizer
    metrics = {
        "prm/loss": metric(terms["loss"], num_responses),
        "prm/accuracy": metric(terms["accuracy"], num_responses),
        "prm/sequence_reward": metric(terms["sequence_reward"], num_responses),
    }
    return loss, metrics


@fused
def _prm_terms(
    prm_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, valid: torch.Tensor, outcome: torch.Tensor, beta: float
) -> dict[str, torch.Tensor]:
    """The cross-entropy of ``prm_loss`` on detached inputs: its derivative (``row_gradient``,
    [B]: d L_CE / d logprob_t, the same on every valid token of a row) and the sums behind the
    loss and its metrics (0-dim tensors)."""
    # s_i depends on the PRM's log-probs only through a masked row sum, so d L_CE / d logprob_t
    # = beta * (sigma(s_i) - r_o) on every valid token of response i: one number per response.
    sequence_reward = _rewards(prm_logprobs, ref_logprobs, valid, beta).sum(dim=-1)
    label = outcome.to(sequence_reward.dtype)
    cross_entropy = -(label * F.logsigmoid(sequence_reward) + (1.0 - label) * F.logsigmoid(-sequence_reward))
    return {
        "loss": cross_entropy.sum(),
        "row_gradient": torch.sigmoid(sequence_reward).sub_(label).mul_(beta),
        "accuracy": ((sequence_reward > 0) == (label > 0.5)).sum(),
        "sequence_reward": sequence_reward.sum(),
    }
