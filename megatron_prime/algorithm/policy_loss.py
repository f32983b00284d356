"""PPO-clip policy loss (paper Sec. 3.3, Eq. 6) with the optional dual-clip, KL, entropy and
rollout-correction terms, and the KL estimators."""

from __future__ import annotations

import torch

from megatron_prime.algorithm.fusion import fused
from megatron_prime.algorithm.masked_ops import as_bool_mask, attach_gradient, zero_invalid, zero_invalid_
from megatron_prime.algorithm.metrics import metric

# exp() of a log-ratio beyond this would overflow; clamping only touches tokens whose ratio is
# absurd anyway (and, as a clamp does, passes them no gradient).
_MAX_LOG_RATIO = 20.0

KL_ESTIMATORS = ("k1", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled from pi_theta (Schulman's
    estimators, http://joschu.net/blog/kl-approx.html), with log r = log pi_ref - log pi_theta:
      k1 = -log r                 unbiased, can be negative per token
      k3 = (r - 1) - log r >= 0   unbiased, low variance (log r clamped to +-20 against overflow)
    """
    return _kl_from_log_ratio(ref_logprobs - logprobs, estimator)


def _kl_from_log_ratio(log_ratio: torch.Tensor, estimator: str) -> torch.Tensor:
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    *,
    loss_normalizer: float | torch.Tensor,
    clip_ratio_c: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    correction_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip loss (Schulman et al. 2017), summed over valid tokens and divided by
    ``loss_normalizer``.

    Per valid token, with rho_t = pi_theta(y_t) / pi_old(y_t) = exp(logprobs - old_logprobs):
        pg_t   = -min(rho_t A_t, clip(rho_t, 1 - clip_low, 1 + clip_high) A_t) * w_t
        loss_t = pg_t + kl_coef * KL_t - entropy_coef * H_t
        loss   = sum_t loss_t / loss_normalizer
    ``loss_normalizer`` is the number of valid tokens in the *global* batch (all micro-batches,
    all data-parallel ranks), so micro-batch losses add up to the global token mean.

    Optional terms:
      * ``clip_ratio_c`` (> 1): dual-clip PPO (Ye et al. 2020, arXiv 1912.09729; veRL's
        ``clip_ratio_c``). For A_t < 0 the clipped loss grows without bound in rho_t; dual-clip
        caps it: pg_t = min(pg_t, -A_t * clip_ratio_c), so a token whose ratio already exceeds
        clip_ratio_c contributes a constant (no gradient). Tokens with A_t >= 0 are unchanged.
        Applied before the correction weight. ``None`` (default): plain PPO-clip, as the paper.
      * ``ref_logprobs`` + ``kl_coef``: KL to the reference policy (``kl_penalty``, k1 or k3).
      * ``entropy`` ([B, T], e.g. from ``output_layer_logprobs``) + ``entropy_coef``: bonus.
      * ``correction_weights``: w_t, the rollout correction's per-token weights
        (``rollout_correction_weights``: pi_old / pi_rollout, truncated, zeroed or masked by its
        mode), detached; they multiply the policy-gradient term only, not the KL or entropy terms.
        w_t = 1 when None.
    ``old_logprobs`` and ``correction_weights`` are constants (no gradient flows into them).

    Metrics are (sum, count) pairs over valid tokens (see ``metrics.py``):
      policy/loss, policy/pg_loss     the per-token loss and its PPO part
      policy/clip_frac                tokens where the clipped branch is strictly active
      policy/dual_clip_frac           tokens where the dual-clip cap is active (if clip_ratio_c)
      policy/approx_kl                k3 estimate of KL(pi_old || pi_theta)
      policy/ratio                    rho_t
      policy/ref_kl                   the selected KL estimator to pi_ref (if ref_logprobs)
      policy/entropy                  H_t (if entropy)
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kl_estimator!r}; choose one of {KL_ESTIMATORS}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (the ratio bound for negative advantages), got {clip_ratio_c}")
    valid = as_bool_mask(mask)
    for name, tensor in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask),
                         ("correction_weights", correction_weights)):
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} != logprobs shape {tuple(logprobs.shape)}")

    with torch.no_grad():
        terms = _ppo_terms(
            logprobs.detach(), old_logprobs.detach(), advantages.detach(), valid, clip_low, clip_high,
            clip_ratio_c, None if correction_weights is None else correction_weights.detach(),
        )
        d_logprobs = terms["d_logprobs"]
        loss_sum = terms["pg_loss"]
        ref_kl = None
        if ref_logprobs is not None:
            ref_log_ratio = zero_invalid_(ref_logprobs.detach() - logprobs.detach(), valid)
            ref_kl = _kl_from_log_ratio(ref_log_ratio, kl_estimator)
            if kl_coef != 0.0:
                loss_sum = loss_sum + kl_coef * ref_kl.sum()
                if kl_estimator == "k1":  # d/dlogprob (logprob - ref) = 1
                    d_logprobs.add_(valid.to(d_logprobs.dtype), alpha=kl_coef)
                else:  # d/dlogprob (e^x - 1 - x) with x = ref - logprob: 1 - e^x, 0 where x is clamped
                    x = ref_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
                    d_kl = torch.exp(x).neg_().add_(1.0).mul_(x == ref_log_ratio)
                    d_logprobs.add_(d_kl, alpha=kl_coef)
        elif kl_coef != 0.0:
            raise ValueError("kl_coef != 0 needs ref_logprobs")
        d_entropy = None
        if entropy is not None:
            entropy_sum = zero_invalid(entropy.detach(), valid).sum()
            if entropy_coef != 0.0:
                loss_sum = loss_sum - entropy_coef * entropy_sum
                if entropy.requires_grad:
                    d_entropy = valid.to(entropy.dtype).mul_(-entropy_coef)
        elif entropy_coef != 0.0:
            raise ValueError("entropy_coef != 0 needs entropy")

    if d_entropy is not None:
        loss_sum = attach_gradient(loss_sum, (logprobs, entropy), (d_logprobs, d_entropy))
    else:
        loss_sum = attach_gradient(loss_sum, (logprobs,), (d_logprobs,))
    loss = loss_sum / loss_normalizer

    with torch.no_grad():
        num_tokens = torch.count_nonzero(valid)
        metrics = {"policy/loss": metric(loss_sum, num_tokens)}
        for name in ("pg_loss", "clip_frac", "approx_kl", "dual_clip_frac"):
            if name in terms:
                metrics[f"policy/{name}"] = metric(terms[name], num_tokens)
        metrics["policy/ratio"] = metric(terms["ratio_minus_one"] + num_tokens, num_tokens)
        if ref_kl is not None:
            metrics["policy/ref_kl"] = metric(ref_kl.sum(), num_tokens)
        if entropy is not None:
            metrics["policy/entropy"] = metric(entropy_sum, num_tokens)
    return loss, metrics


@fused
def _ppo_terms(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float | None,
    correction_weights: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """The PPO term of ``policy_loss`` on detached inputs: its derivative per token
    (``d_logprobs``, [B, T]) and the sums behind the loss and its metrics (0-dim tensors).

    Padding is zeroed first, so every per-token term there is exactly 0 (ratio 1 times advantage
    0): plain sums need no further masking. Computing the derivative in the same pass as the loss
    means no autograd graph of these elementwise ops is built and none of their intermediates kept.
    """
    raw_log_ratio = zero_invalid_(logprobs - old_logprobs, valid)
    log_ratio = raw_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    inside = log_ratio == raw_log_ratio  # the clamp passes no gradient where it acts
    ratio = torch.exp(log_ratio)
    neg_advantages = zero_invalid(advantages, valid).neg_()
    # pg_t = max(-A rho, -A clip(rho)): the unclipped branch wins, ties included, exactly where
    # its derivative -A rho flows; on padding A = 0 makes both branches 0.
    unclipped = neg_advantages * ratio
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high).mul_(neg_advantages)
    unclipped_wins = unclipped >= clipped
    terms = {"clip_frac": valid.numel() - torch.count_nonzero(unclipped_wins)}
    pg_loss = torch.maximum(unclipped, clipped)
    if clip_ratio_c is not None:
        # -min(A, 0) * c caps the loss of A < 0 tokens; for A >= 0 it is 0, which never binds.
        cap = neg_advantages.clamp_(min=0.0).mul_(clip_ratio_c)
        capped = pg_loss > cap
        terms["dual_clip_frac"] = torch.count_nonzero(capped)
        pg_loss = torch.minimum(pg_loss, cap)
        unclipped_wins &= ~capped
    d_logprobs = zero_invalid_(unclipped, unclipped_wins & inside)
    if correction_weights is not None:  # the rollout correction, on the policy-gradient term only
        weights = zero_invalid(correction_weights, valid)
        pg_loss.mul_(weights)
        d_logprobs.mul_(weights)

    terms["pg_loss"] = pg_loss.sum()
    ratio_minus_one = ratio.sub_(1.0).sum()  # rho - 1 is 0 on padding
    terms["ratio_minus_one"] = ratio_minus_one
    terms["approx_kl"] = ratio_minus_one - log_ratio.sum()  # k3 of KL(pi_old || pi_theta)
    terms["d_logprobs"] = d_logprobs
    return terms
