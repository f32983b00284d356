"""Correction for the difference between the engine that sampled the responses and the trainer.

A bf16/fp8 rollout engine never samples from exactly the distribution Megatron computes, and a
one-step-off rollout samples from the previous policy. The trainer recomputes the old log-probs,
so the PPO ratio starts at exactly 1 and clipping never sees that difference: only an explicit
importance weight on the policy-gradient term corrects it,

    w_t = pi_old(y_t) / pi_rollout(y_t) = exp(old_logprob_t - rollout_logprob_t),

detached, per token, computed once per batch before the mini-batches (Yao et al. 2025, "Your
efficient RL framework secretly brings you off-policy RL training"; slime's ``--use-tis``, veRL's
rollout correction, NeMo-RL's and OpenRLHF's importance-sampling correction). Modes:

* ``none``: w = 1 (the metrics are still reported);
* ``token_tis``: truncated importance sampling, w clamped to [low, high] (default [0, 2]);
* ``icepop``: w where low <= w <= high, 0 outside (default [0.5, 5]);
* ``seq_mask``: keep a response only if the geometric mean of its token weights,
  exp(mean_t (old - rollout)), lies in [low, high] (default [0.999, 1.001]); kept tokens get their
  raw weights, a masked response weight 0 and ``keep`` False (it leaves the policy loss's mask; its
  advantages, computed on the whole group before, stay its group's baseline).
"""

from __future__ import annotations

import torch

from megatron_prime.algorithm.masked_ops import as_bool_mask, zero_invalid

ROLLOUT_CORRECTIONS = ("none", "token_tis", "icepop", "seq_mask")
DEFAULT_BOUNDS = {"none": (0.0, float("inf")), "token_tis": (0.0, 2.0), "icepop": (0.5, 5.0),
                  "seq_mask": (0.999, 1.001)}
_MAX_LOG_RATIO = 20.0  # exp() beyond this would overflow in fp32


def rollout_correction_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "none",
    bounds: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """``(weights [B, T], keep [B] bool, metrics)``: the per-token weights of the policy-gradient
    term (0 on padding and on masked responses), which responses stay in the policy loss
    (``seq_mask`` drops some; every other mode keeps all), and, whatever the mode:

      rollout_correction/weight_mean|min|max   the raw weights w over valid tokens
      rollout_correction/corrected_frac        valid tokens whose applied weight is not w (clamped,
                                               zeroed or masked by the mode)
      rollout_correction/masked_frac           responses ``seq_mask`` dropped (of those with tokens)
      rollout_correction/ess                   (sum w)^2 / (n sum w^2), the effective sample size of
                                               the raw weights as a fraction of the n valid tokens
      rollout_correction/kl_k1, kl_k3          KL(pi_rollout || pi_old) from the engine's samples:
                                               mean(-x) and mean(e^x - 1 - x), x = old - rollout

    ``bounds`` default to ``DEFAULT_BOUNDS[mode]``.
    """
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout correction mode must be one of {ROLLOUT_CORRECTIONS}, got {mode!r}")
    low, high = DEFAULT_BOUNDS[mode] if bounds is None else bounds
    if not 0.0 <= low <= high:
        raise ValueError(f"rollout correction bounds must be 0 <= low <= high, got {(low, high)}")
    if old_logprobs.shape != rollout_logprobs.shape or old_logprobs.shape != mask.shape:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)}, rollout_logprobs "
                         f"{tuple(rollout_logprobs.shape)} and mask {tuple(mask.shape)} must be the same [B, T]")
    valid = as_bool_mask(mask)
    with torch.no_grad():
        log_ratio = zero_invalid(old_logprobs.float() - rollout_logprobs.float(), valid)
        raw = zero_invalid(torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)), valid)
        lengths = valid.sum(dim=1)
        keep = torch.ones(valid.shape[0], dtype=torch.bool, device=valid.device)
        if mode == "none":
            weights = valid.to(raw.dtype)
        elif mode == "token_tis":
            weights = zero_invalid(raw.clamp(low, high), valid)
        elif mode == "icepop":
            weights = torch.where(valid & (raw >= low) & (raw <= high), raw, 0.0)
        else:  # seq_mask: the geometric mean of a response's weights
            geometric = torch.exp((log_ratio.sum(dim=1) / lengths.clamp(min=1)).clamp(-_MAX_LOG_RATIO,
                                                                                     _MAX_LOG_RATIO))
            keep = (geometric >= low) & (geometric <= high)
            weights = torch.where(keep[:, None], raw, 0.0)
        metrics = _metrics(raw, weights, log_ratio, valid, keep, lengths, mode)
    return weights, keep, metrics


def _metrics(raw, weights, log_ratio, valid, keep, lengths, mode) -> dict[str, float]:
    n = int(valid.sum())
    if n == 0:
        return {}
    values = raw[valid].double()
    corrected = 0 if mode == "none" else int(((weights != raw) & valid).sum())
    with_tokens = lengths > 0
    x = log_ratio[valid].double()
    return {
        "rollout_correction/weight_mean": float(values.mean()),
        "rollout_correction/weight_min": float(values.min()),
        "rollout_correction/weight_max": float(values.max()),
        "rollout_correction/corrected_frac": corrected / n,
        "rollout_correction/masked_frac": float((~keep & with_tokens).sum()) / max(1, int(with_tokens.sum())),
        "rollout_correction/ess": float(values.sum() ** 2 / (n * (values ** 2).sum())),
        "rollout_correction/kl_k1": float((-x).mean()),
        "rollout_correction/kl_k3": float((torch.expm1(x.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)) - x).mean()),
    }
