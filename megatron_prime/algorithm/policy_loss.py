"""PPO-clip policy loss (paper Sec. 3.3) with the optional dual-clip, KL, entropy and
truncated-importance-sampling terms, and the KL estimators."""

from __future__ import annotations

import math

import torch

from megatron_prime.algorithm.masked_ops import as_bool_mask, zero_invalid
from megatron_prime.algorithm.metrics import metric

# exp() of a log-ratio beyond this would overflow or make inf * 0 = NaN in the backward of the
# branch torch.maximum did not pick; clamping only touches tokens whose ratio is absurd anyway.
_MAX_LOG_RATIO = 20.0

KL_ESTIMATORS = ("k1", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled from pi_theta (Schulman's
    estimators, http://joschu.net/blog/kl-approx.html), with log r = log pi_ref - log pi_theta:
      k1 = -log r                 unbiased, can be negative per token
      k3 = (r - 1) - log r >= 0   unbiased, low variance (log r clamped to +-20 against overflow)
    """
    log_ratio = ref_logprobs - logprobs
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
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
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
        Applied before the TIS weight. ``None`` (default): plain PPO-clip, as the paper.
      * ``ref_logprobs`` + ``kl_coef``: KL to the reference policy (``kl_penalty``, k1 or k3).
      * ``entropy`` ([B, T], e.g. from ``vocab_parallel_entropy``) + ``entropy_coef``: bonus.
      * ``rollout_logprobs``: the inference engine's log-probs of the same tokens. Used for the
        rollout/recompute mismatch metrics and, with ``tis_cap``, truncated importance sampling
        (Yao et al. 2025): w_t = min(pi_old / pi_rollout, tis_cap), detached, corrects the
        policy-gradient term for sampling from the engine rather than from pi_old. w_t = 1 otherwise.
    ``old_logprobs`` and ``rollout_logprobs`` are constants (no gradient flows into them).

    Metrics are (sum, count) pairs over valid tokens (see ``metrics.py``):
      policy/loss, policy/pg_loss     the per-token loss and its PPO part
      policy/clip_frac                tokens where the clipped branch is strictly active
      policy/dual_clip_frac           tokens where the dual-clip cap is active (if clip_ratio_c)
      policy/approx_kl                k3 estimate of KL(pi_old || pi_theta)
      policy/ratio                    rho_t
      policy/ref_kl                   the selected KL estimator to pi_ref (if ref_logprobs)
      policy/entropy                  H_t (if entropy)
      rollout/abs_logprob_diff        |log pi_old - log pi_rollout|   (if rollout_logprobs)
      rollout/kl                      k3 estimate of KL(pi_rollout || pi_old)
      rollout/tis_clip_frac           tokens whose TIS weight hit the cap (if tis_cap)
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kl_estimator!r}; choose one of {KL_ESTIMATORS}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if tis_cap is not None and tis_cap <= 0:
        raise ValueError(f"tis_cap must be > 0, got {tis_cap}")
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (the ratio bound for negative advantages), got {clip_ratio_c}")
    valid = as_bool_mask(mask)
    for name, tensor in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        if tensor.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} != logprobs shape {tuple(logprobs.shape)}")

    # Sanitise padding first: the gradient of a masked-out NaN would otherwise still be NaN.
    logprobs = zero_invalid(logprobs, valid)
    old_logprobs = zero_invalid(old_logprobs.detach(), valid)
    advantages = zero_invalid(advantages.detach(), valid)

    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    neg_advantages = -advantages
    unclipped = neg_advantages * ratio
    clipped = neg_advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg_loss = torch.maximum(unclipped, clipped)
    dual_clipped = None
    if clip_ratio_c is not None:
        cap = neg_advantages * clip_ratio_c  # only binds where A < 0 (there the cap is positive)
        dual_clipped = (advantages < 0) & (pg_loss > cap)
        pg_loss = torch.where(dual_clipped, cap, pg_loss)

    tis_weight = None
    if rollout_logprobs is not None:
        rollout_logprobs = zero_invalid(rollout_logprobs.detach(), valid)
        rollout_log_ratio = old_logprobs - rollout_logprobs  # log(pi_old / pi_rollout)
        if tis_cap is not None:
            # min(exp(x), cap) == exp(min(x, log cap)); clamping first avoids overflow.
            tis_weight = torch.exp(rollout_log_ratio.clamp(max=math.log(tis_cap)))
            pg_loss = pg_loss * tis_weight
    elif tis_cap is not None:
        raise ValueError("tis_cap needs rollout_logprobs")

    token_loss = pg_loss
    ref_kl = None
    if ref_logprobs is not None:
        ref_kl = kl_penalty(logprobs, zero_invalid(ref_logprobs.detach(), valid), kl_estimator)
        if kl_coef != 0.0:
            token_loss = token_loss + kl_coef * ref_kl
    elif kl_coef != 0.0:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if entropy is not None:
        entropy = zero_invalid(entropy, valid)
        if entropy_coef != 0.0:
            token_loss = token_loss - entropy_coef * entropy
    elif entropy_coef != 0.0:
        raise ValueError("entropy_coef != 0 needs entropy")

    # Inputs were zeroed on padding, so every per-token term there is exactly 0 (ratio 1 times
    # advantage 0, KL of 0 vs 0, entropy 0): plain sums need no further masking.
    loss_sum = token_loss.sum()
    loss = loss_sum / loss_normalizer

    with torch.no_grad():
        num_tokens = valid.sum()

        def token_metric(values: torch.Tensor) -> torch.Tensor:
            # float32 sums (pairwise in torch) are accurate enough for logging and avoid a float64
            # copy of every [B, T] tensor; bool sums are exact integers.
            return metric(values.sum(), num_tokens)

        metrics = {
            "policy/loss": metric(loss_sum, num_tokens),
            "policy/pg_loss": token_metric(pg_loss),
            "policy/clip_frac": token_metric(clipped > unclipped),
            "policy/approx_kl": token_metric((ratio - 1.0) - log_ratio),
            # ratio is exactly 1 on padding: sum (ratio - 1), which is 0 there, and add the count back
            "policy/ratio": metric((ratio - 1.0).sum() + num_tokens, num_tokens),
        }
        if dual_clipped is not None:
            metrics["policy/dual_clip_frac"] = token_metric(dual_clipped)
        if ref_kl is not None:
            metrics["policy/ref_kl"] = token_metric(ref_kl)
        if entropy is not None:
            metrics["policy/entropy"] = token_metric(entropy)
        if rollout_logprobs is not None:
            rollout_log_ratio = rollout_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
            metrics["rollout/abs_logprob_diff"] = token_metric(rollout_log_ratio.abs())
            metrics["rollout/kl"] = token_metric(torch.expm1(rollout_log_ratio) - rollout_log_ratio)
            if tis_weight is not None:
                metrics["rollout/tis_clip_frac"] = token_metric(
                    (rollout_log_ratio >= math.log(tis_cap)) & valid
                )
    return loss, metrics
