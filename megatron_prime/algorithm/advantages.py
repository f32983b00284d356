"""Advantage estimators: PRIME's RLOO with implicit process rewards (paper Eq. 5) and the other
estimators of the paper's Table 4, each able to take the implicit process rewards.

Shared conventions
------------------
* ``token_rewards`` are the implicit process rewards r_phi(y_t) = beta * q_t (Eq. 3), ``[B, T]``;
  ``None`` means "no process rewards" (outcome-only) and equals ``process_coef = 0``.
* ``outcome`` is the verifier's reward r_o in [0, 1], ``[B]``.
* ``mask`` is 0/1 ``[B, T]``; rows are grouped so that the K = ``group_size`` responses of one
  prompt are adjacent. Advantages are exactly 0 on padding and do not depend on what padding holds
  or on how many padding columns there are.
* PRIME's rule for mixing the two rewards (paper Sec. 3.3): returns are computed for the process
  and the outcome rewards *separately* and then summed. The process return is the (discounted)
  reverse cumulative sum over the response (``process_return="sum"``, Eq. 5) or, with
  ``process_return="min"``, the minimum of the future process rewards (PURE's min-form credit
  assignment, ``min_form_returns``); the outcome term is placed, undiscounted, on every token,
  exactly as in Eq. 5. ``process_coef`` and ``outcome_coef`` weight the two terms.
* ``gamma`` discounts per *valid* token: masked positions inside a response are skipped
  (see ``masked_ops.discounted_reverse_cumsum``).
* ``whiten=True`` standardises the final advantages with the masked mean and unbiased std over
  every valid token of the whole batch passed in. Under data parallelism call the estimators on
  the full rollout batch, not per rank, if whitening or REINFORCE++ must see the whole batch.

PRIME comes in three variants (the README's table lists every difference and its setting):
``prime_rloo`` is Eq. 5 exactly; ``prime_rloo_k_scaled`` swaps in the official code's K/(K-1)
token scaling; ``prime_official`` is the official code's whole default advantage pipeline
(process-reward normalisation, K/(K-1) scaling, outcome on the last token, whitening).

Every estimator takes keyword arguments only. The registry ``ADVANTAGE_ESTIMATORS`` maps config
names to the functions themselves; ``compute_advantages(name, ...)`` passes each the inputs it
declares (an outcome-only estimator never sees the process rewards, say).

PPO with a learned value model (GAE) is not offered: the trainer builds no critic.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Literal

import torch

from megatron_prime.algorithm.fusion import fused
from megatron_prime.algorithm.masked_ops import (
    as_bool_mask,
    check_groups,
    discounted_reverse_cumsum,
    leave_one_out_mean,
    masked_mean_var,
    masked_whiten,
    reverse_returns,
    zero_invalid,
    zero_invalid_,
)


def _check_shapes(outcome: torch.Tensor, mask: torch.Tensor, *token_tensors: torch.Tensor | None) -> None:
    if mask.dim() != 2:
        raise ValueError(f"mask must be [batch, response_len], got shape {tuple(mask.shape)}")
    for tensor in token_tensors:
        if tensor is not None and tensor.shape != mask.shape:
            raise ValueError(f"token tensor shape {tuple(tensor.shape)} != mask shape {tuple(mask.shape)}")
    if outcome.shape != mask.shape[:1]:
        raise ValueError(f"outcome must be [batch]={tuple(mask.shape[:1])}, got {tuple(outcome.shape)}")


def _result_dtype(outcome: torch.Tensor, token_rewards: torch.Tensor | None) -> torch.dtype:
    reference = token_rewards if token_rewards is not None else outcome
    return reference.dtype if reference.is_floating_point() else torch.get_default_dtype()


def _uses_process(token_rewards: torch.Tensor | None, process_coef: float) -> bool:
    return token_rewards is not None and process_coef != 0.0


def _combine(
    valid: torch.Tensor,
    outcome_term: torch.Tensor,
    outcome_coef: float,
    process_return: torch.Tensor | None = None,
    process_coef: float = 1.0,
    whiten: bool = False,
) -> torch.Tensor:
    """process_coef * process_return + outcome_coef * outcome_term (``[B]``, on every token),
    exactly 0 on padding, optionally whitened over the batch. ``process_return`` is a fresh
    tensor (it is scaled, added to and masked in place)."""
    outcome_column = (outcome_coef * outcome_term)[:, None]
    if process_return is None:
        advantages = zero_invalid(outcome_column, valid)  # broadcasts [B, 1] to [B, T]
    else:
        advantages = process_return if process_coef == 1.0 else process_return.mul_(process_coef)
        advantages = zero_invalid_(advantages.add_(outcome_column), valid)
    return masked_whiten(advantages, valid) if whiten else advantages


def _rloo_token_rewards(
    rewards: torch.Tensor, valid: torch.Tensor, group_size: int, k_scaled: bool
) -> torch.Tensor:
    """Token rewards minus the leave-one-out mean of the other responses' per-token means
    (Eq. 5's bracket), or the official code's K/(K-1) form when ``k_scaled``; zero on padding."""
    scale, baseline = _rloo_token_baseline(rewards, valid, group_size, k_scaled)
    return _shifted_rewards(rewards, valid, scale, baseline)


def _rloo_token_baseline(
    rewards: torch.Tensor, valid: torch.Tensor, group_size: int, k_scaled: bool
) -> tuple[float, torch.Tensor]:
    """(scale, baseline [B]) such that the shaped token reward is scale * r_t - baseline_i: Eq. 5's
    bracket (scale 1), or the official code's K/(K-1) form when ``k_scaled``."""
    # r_phi(y^j) / |y^j|, accumulated in float64 (see masked_mean_var for why)
    mean_reward = _masked_row_mean(rewards, valid)
    baseline = leave_one_out_mean(mean_reward, group_size)
    if k_scaled and group_size > 1:
        # r - baseline + (r - mean) / (K - 1) = r * K/(K-1) - (baseline + mean / (K-1))
        return group_size / (group_size - 1), baseline + mean_reward / (group_size - 1)
    return 1.0, baseline


@fused
def _masked_row_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    lengths = valid.sum(dim=-1, dtype=torch.int32).clamp(min=1)
    return (zero_invalid(values, valid).sum(dim=-1, dtype=torch.float64) / lengths).to(values.dtype)


def _shift(rewards: torch.Tensor, valid: torch.Tensor, scale: float, baseline: torch.Tensor) -> torch.Tensor:
    return zero_invalid(rewards * scale - baseline[:, None], valid)


_shifted_rewards = fused(_shift)


@fused
def _undiscounted_rloo_advantages(
    rewards: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    baseline: torch.Tensor,
    process_coef: float,
    outcome_column: torch.Tensor,
) -> torch.Tensor:
    """process_coef * sum_{s >= t} (scale * r_s - baseline) + outcome_column, zero on padding
    (Eq. 5 at gamma = 1). One kernel, so that when fused the flips and the masking join the
    elementwise passes around the one cumsum."""
    returns = _shift(rewards, valid, scale, baseline).flip(-1).cumsum_(-1).flip(-1)
    return zero_invalid(returns.mul_(process_coef).add_(outcome_column), valid)


ProcessReturn = Literal["sum", "min"]
PROCESS_RETURNS = ("sum", "min")


def min_form_returns(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Min-form credit assignment (PURE, Cheng et al. 2025, arXiv 2504.15275):

        G_t = min_{s >= t, s valid} r_s

    The return of a token is the *worst* process reward from it to the end of the response, not
    their sum. A single bad step caps the return of every token before it, and many small positive
    rewards cannot add up to outweigh the outcome term, which is the reward-hacking channel PURE
    attributes to the summed ("sum-form") return of Eq. 5. PURE reaches it by re-weighting the
    rewards so that their sum approximates the minimum; this takes the minimum exactly. There is no
    discount (it is defined for gamma = 1). Masked positions inside a response are skipped; zero
    on padding, and on every position of an empty response.
    """
    valid = as_bool_mask(mask)
    if rewards.dim() != 2 or rewards.shape != valid.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and mask {tuple(valid.shape)} must be the same [batch, T]")
    largest = torch.finfo(rewards.dtype).max
    future_min = rewards.masked_fill(~valid, largest).flip(-1).cummin(-1).values.flip(-1)
    return zero_invalid(future_min, valid)


def process_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float, form: ProcessReturn) -> torch.Tensor:
    """The return of shaped process rewards: Eq. 5's discounted sum of the future rewards
    (``"sum"``) or PURE's minimum of them (``"min"``, gamma must be 1). Zero on padding."""
    if form == "sum":
        return discounted_reverse_cumsum(rewards, mask, gamma)
    if form == "min":
        if gamma != 1.0:
            raise ValueError(f"process_return='min' has no discount: gamma must be 1, got {gamma}")
        return min_form_returns(rewards, mask)
    raise ValueError(f"process_return must be one of {PROCESS_RETURNS}, got {form!r}")


def prime_rloo_advantages(
    *,
    token_rewards: torch.Tensor | None,
    outcome: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    gamma: float = 1.0,
    process_coef: float = 1.0,
    outcome_coef: float = 1.0,
    whiten: bool = False,
    process_return: ProcessReturn = "sum",
    k_scaled_tokens: bool = False,
) -> torch.Tensor:
    """PRIME's advantage, paper Eq. 5 (RLOO with implicit process rewards):

        A_t^i = sum_{s=t}^{|y^i|} gamma^(s-t) [ r_phi(y_s^i) - 1/(K-1) sum_{j!=i} r_phi(y^j) / |y^j| ]
              + [ r_o(y^i) - 1/(K-1) sum_{j!=i} r_o(y^j) ]

    r_phi(y^j) / |y^j| is response j's mean process reward per valid token; its leave-one-out
    mean over the other K-1 responses is subtracted from every token of response i before the
    reverse discounted cumsum. The outcome term is plain RLOO, added to every token.

    K = 1: the leave-one-out baselines are empty means, taken as 0 (REINFORCE). An empty response
    (no valid tokens) contributes a mean process reward of 0 to the others' baselines.

    Departures from Eq. 5: none with the defaults; ``process_coef``/``outcome_coef`` weight the
    two terms and ``whiten`` standardises the result (both are outside Eq. 5).
    ``process_return="min"`` replaces the bracket's discounted sum over s >= t by its minimum over
    s >= t (PURE's min-form, ``min_form_returns``); the leave-one-out baseline is a constant of the
    response, so that is min_{s>=t} r_phi(y_s^i) minus the same baseline.
    Departures from the official PRIME code (github PRIME-RL/PRIME, its default config): it
    normalises the process rewards by the batch's largest |reverse cumsum| first, uses the K/(K-1)
    token form below, places the outcome on the last token (discounted when gamma < 1) and always
    whitens; ``prime_official_advantages`` reproduces all of that.

    ``k_scaled_tokens=True`` is the official PRIME code's token form (not Eq. 5): each token reward
    becomes r_t * K/(K-1) - (sum over all K responses' per-token means)/(K-1)
    = r_t - baseline_i + (r_t - own mean)/(K-1). The extra term sums to zero over a response, so
    A_0 is unchanged and only later tokens differ (at gamma = 1). Ignored for K = 1. This is the
    only official-code difference it adopts: no normalisation, outcome on every token, no whitening
    unless ``whiten``.
    """
    _check_shapes(outcome, mask, token_rewards)
    check_groups(mask.shape[0], group_size)
    valid = as_bool_mask(mask)
    dtype = _result_dtype(outcome, token_rewards)

    outcome_term = outcome.to(dtype) - leave_one_out_mean(outcome.to(dtype), group_size)

    if not _uses_process(token_rewards, process_coef):
        return _combine(valid, outcome_term, outcome_coef, whiten=whiten)
    rewards = token_rewards.to(dtype)
    if gamma != 1.0 or process_return != "sum":
        shaped = _rloo_token_rewards(rewards, valid, group_size, k_scaled_tokens)
        return _combine(valid, outcome_term, outcome_coef, process_returns(shaped, valid, gamma, process_return),
                        process_coef, whiten)
    scale, baseline = _rloo_token_baseline(rewards, valid, group_size, k_scaled_tokens)
    advantages = _undiscounted_rloo_advantages(rewards, valid, scale, baseline, process_coef,
                                               (outcome_coef * outcome_term)[:, None])
    return masked_whiten(advantages, valid) if whiten else advantages


def normalize_by_max_return(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official PRIME code's process-reward normalisation (its default ``prime_norm=batch_norm``):

        r_t <- r_t / max_{i, t} | sum_{s >= t} r_s^i |

    i.e. every token reward divided by the largest absolute undiscounted return-to-go over the
    whole batch passed in, so that no process return exceeds 1 in magnitude while the relative
    sizes of all rewards are kept. Zero on padding. Exactly invariant to the rewards' scale
    (beta cancels): the official code divides by (max + 1e-6) instead, which differs by a relative
    1e-6 / max, and all-zero rewards stay zero here without an epsilon.
    """
    valid = as_bool_mask(mask)
    rewards = zero_invalid(token_rewards, valid)
    lowest, highest = torch.aminmax(rewards.flip(-1).cumsum_(-1))  # flipping back changes no extreme
    largest_return = torch.maximum(-lowest, highest)
    return rewards.div_(torch.where(largest_return > 0, largest_return, 1.0))


def prime_official_advantages(
    *,
    token_rewards: torch.Tensor | None,
    outcome: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    gamma: float = 1.0,
    process_coef: float = 1.0,
    outcome_coef: float = 1.0,
    process_return: ProcessReturn = "sum",
) -> torch.Tensor:
    """The official PRIME code's default advantage pipeline (github PRIME-RL/PRIME, ``rloo``
    estimator with ``prime_norm=batch_norm``, token granularity), on the implicit rewards:

      1. r_t = normalize_by_max_return(r_phi): divide by the batch's largest |return-to-go|.
      2. RLOO per reward source, K/(K-1) form (as ``k_scaled_tokens``):
           process:  r_t * K/(K-1) - (sum over the K responses of their per-token means) / (K-1)
           outcome:  r_o^i - 1/(K-1) sum_{j!=i} r_o^j, placed on the *last* valid token only.
      3. G_t = sum_{s >= t} gamma^(s-t) [process_coef * process_s + outcome_coef * outcome_s]
         (one gamma for both sources, as the official default).
      4. A = (G - mean) / sqrt(var + 1e-8) over every valid token of the batch (always).
    With ``process_return="min"`` the process part of G is the minimum of the future process
    rewards of step 2 (``min_form_returns``) and the outcome part its own (discounted) return.
    Whitening is always on: ``whiten`` is not a parameter.

    Departures from Eq. 5: the normalisation (1); the K/(K-1) token form (2), which keeps A_0 and
    changes later tokens; the outcome term discounted from the last token, gamma^(|y|-1-t) times
    Eq. 5's (identical at gamma = 1); whitening (4).
    Departures from the official code: it takes the raw log-ratio q, we take r_phi = beta * q like
    every estimator (step 1 removes the scale exactly; the official max + 1e-6 gives a relative
    1e-6 / max difference); its normalisation max runs over each data-parallel worker's share of
    the batch, ours over the batch passed in (the trainer passes the whole rollout batch); its
    advantages ignore ``rm_coef``/``reward_coef`` (= our defaults 1 and 1; veRL's PRIME recipe
    multiplies both by 5, which whitening cancels); K = 1 and empty responses, which divide by
    zero there, get empty baselines (0) and zero advantages here; gamma counts valid tokens, so
    masked positions inside a response are skipped.
    """
    _check_shapes(outcome, mask, token_rewards)
    check_groups(mask.shape[0], group_size)
    valid = as_bool_mask(mask)
    dtype = _result_dtype(outcome, token_rewards)

    outcome_rloo = outcome.to(dtype) - leave_one_out_mean(outcome.to(dtype), group_size)
    process_shaped = None
    if _uses_process(token_rewards, process_coef):
        process = normalize_by_max_return(token_rewards.to(dtype), valid)
        process_shaped = _rloo_token_rewards(process, valid, group_size, k_scaled=True)
        if process_coef != 1.0:
            process_shaped.mul_(process_coef)
    summed = process_shaped if process_shaped is not None and process_return == "sum" else None
    rewards = summed if summed is not None else torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    # The outcome on each response's last valid token (none for an empty response).
    last = valid.shape[-1] - 1 - valid.flip(-1).to(torch.uint8).argmax(dim=-1)
    has_tokens = valid.any(dim=-1)
    rows = torch.arange(valid.shape[0], device=valid.device)
    rewards.index_put_((rows, last), torch.where(has_tokens, outcome_coef * outcome_rloo, 0.0), accumulate=True)
    # The scans are linear, so one scan of the summed rewards is the sum of the two returns.
    returns = reverse_returns(rewards, valid, gamma)
    if process_shaped is not None and summed is None:
        returns = returns + process_returns(process_shaped, valid, gamma, process_return)
    return masked_whiten(returns, valid)


def rloo_advantages(
    *,
    outcome: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    outcome_coef: float = 1.0,
    whiten: bool = False,
) -> torch.Tensor:
    """Outcome-only RLOO, the paper's baseline: A_t^i = r_o(y^i) - 1/(K-1) sum_{j!=i} r_o(y^j) on
    every token. Identical to ``prime_rloo_advantages`` with ``process_coef=0`` (or no process
    rewards), so the baseline run is one switch away. K = 1 gives A = r_o (empty baseline = 0).
    The official code's pipeline without process rewards (outcome on the last token, whitened) is
    ``prime_official_advantages`` with ``process_coef=0``; at gamma = 1 it equals this whitened.
    """
    return prime_rloo_advantages(token_rewards=None, outcome=outcome, mask=mask, group_size=group_size,
                                 outcome_coef=outcome_coef, whiten=whiten)


def grpo_advantages(
    *,
    token_rewards: torch.Tensor | None,
    outcome: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    gamma: float = 1.0,
    process_coef: float = 1.0,
    outcome_coef: float = 1.0,
    whiten: bool = False,
    process_return: ProcessReturn = "sum",
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO (group mean/std normalisation) with implicit process rewards.

        A_t^i = process_coef * sum_{s>=t} gamma^(s-t) (r_phi(y_s^i) - mu_g) / (sigma_g + eps)
              + outcome_coef * (r_o(y^i) - mean_g r_o) / (std_g r_o + eps)

    The outcome term is GRPO's outcome supervision. The process term follows GRPO's process
    supervision (DeepSeekMath Sec. 4.1.3): every process reward is normalised by the mean and std
    of *all* valid process rewards of its group (all tokens of the K responses), and the advantage
    of a token is the sum of the normalised rewards from it to the end. Stds are unbiased (n - 1);
    a single sample has std 0. K = 1 therefore gives a zero outcome term, not NaN; groups whose
    outcomes are all equal get a zero outcome term. ``process_return="min"``: the minimum of the
    future normalised rewards instead of their sum.
    """
    _check_shapes(outcome, mask, token_rewards)
    num_groups = check_groups(mask.shape[0], group_size)
    valid = as_bool_mask(mask)
    dtype = _result_dtype(outcome, token_rewards)

    grouped = outcome.to(dtype).reshape(num_groups, group_size)
    mean, var = masked_mean_var(grouped, torch.ones_like(grouped, dtype=torch.bool), dim=1)
    outcome_term = ((grouped - mean) / (var.sqrt() + eps)).reshape(-1)

    if _uses_process(token_rewards, process_coef):
        # Pool every valid token of the group: [G, K*T] rows with their mask.
        group_rewards = token_rewards.to(dtype).reshape(num_groups, -1)
        group_valid = valid.reshape(num_groups, -1)
        token_mean, token_var = masked_mean_var(group_rewards, group_valid, dim=1)
        normalised = ((group_rewards - token_mean) / (token_var.sqrt() + eps)).reshape(valid.shape)
        process_part = process_returns(normalised, valid, gamma, process_return)
        return _combine(valid, outcome_term, outcome_coef, process_part, process_coef, whiten)
    return _combine(valid, outcome_term, outcome_coef, whiten=whiten)


def reinforce_returns(
    *,
    token_rewards: torch.Tensor | None,
    outcome: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    process_coef: float = 1.0,
    outcome_coef: float = 1.0,
    process_return: ProcessReturn = "sum",
) -> torch.Tensor:
    """PRIME's combined return without a baseline:
    G_t = process_coef * sum_{s>=t} gamma^(s-t) r_phi(y_s) + outcome_coef * r_o(y) on every token
    (with ``process_return="min"``: process_coef * min_{s>=t} r_phi(y_s) + outcome_coef * r_o(y))."""
    _check_shapes(outcome, mask, token_rewards)
    valid = as_bool_mask(mask)
    dtype = _result_dtype(outcome, token_rewards)
    if _uses_process(token_rewards, process_coef):
        process_part = process_returns(token_rewards.to(dtype), valid, gamma, process_return)
        return _combine(valid, outcome.to(dtype), outcome_coef, process_part, process_coef)
    return _combine(valid, outcome.to(dtype), outcome_coef)


def reinforce_advantages(
    *,
    token_rewards: torch.Tensor | None,
    outcome: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    process_coef: float = 1.0,
    outcome_coef: float = 1.0,
    whiten: bool = False,
    process_return: ProcessReturn = "sum",
) -> torch.Tensor:
    """REINFORCE (Williams 1992) with implicit process rewards: A_t = G_t of ``reinforce_returns``,
    no baseline."""
    returns = reinforce_returns(token_rewards=token_rewards, outcome=outcome, mask=mask, gamma=gamma,
                                process_coef=process_coef, outcome_coef=outcome_coef, process_return=process_return)
    return masked_whiten(returns, mask) if whiten else returns


def reinforce_pp_advantages(
    *,
    token_rewards: torch.Tensor | None,
    outcome: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    process_coef: float = 1.0,
    outcome_coef: float = 1.0,
    process_return: ProcessReturn = "sum",
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): the REINFORCE return G_t, normalised over the whole batch,
    A_t = (G_t - mean) / std with the masked mean and unbiased std over every valid token
    (always: ``whiten`` is not a parameter). REINFORCE++'s KL-in-reward term lives in
    ``policy_loss`` (``kl_coef``) in this code base."""
    valid = as_bool_mask(mask)
    returns = reinforce_returns(token_rewards=token_rewards, outcome=outcome, mask=mask, gamma=gamma,
                                process_coef=process_coef, outcome_coef=outcome_coef, process_return=process_return)
    return masked_whiten(returns, valid)


# --- registry -----------------------------------------------------------------------------------
AdvantageEstimator = Callable[..., torch.Tensor]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "prime_rloo": prime_rloo_advantages,  # Eq. 5, the paper's method
    "prime_rloo_k_scaled": functools.partial(prime_rloo_advantages, k_scaled_tokens=True),  # official K/(K-1) tokens
    "prime_official": prime_official_advantages,  # the official code's default pipeline (always whitened)
    "rloo": rloo_advantages,  # outcome-only RLOO, the paper's baseline
    "grpo": grpo_advantages,
    "reinforce": reinforce_advantages,
    "reinforce_pp": reinforce_pp_advantages,  # always batch-normalised
}

# Estimators that never read process rewards: a trainer may skip the PRM forward for them.
OUTCOME_ONLY_ESTIMATORS = frozenset({"rloo"})


def compute_advantages(
    name: str,
    *,
    token_rewards: torch.Tensor | None,
    outcome: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    gamma: float = 1.0,
    process_coef: float = 1.0,
    outcome_coef: float = 1.0,
    whiten: bool = False,
    process_return: ProcessReturn = "sum",
) -> torch.Tensor:
    """Advantages ``[B, T]`` from the estimator registered as ``name`` (see ADVANTAGE_ESTIMATORS),
    given the inputs it declares: an estimator without a ``whiten`` parameter always whitens (or
    never needs to), one without ``token_rewards`` uses outcomes only, one without ``group_size``
    has no group baseline.

    Runs without autograd: advantages are constants of the policy loss, and in PRIME's
    single-forward mode ``token_rewards`` come from the PRM forward that also builds the PRM
    loss's graph, which must not be extended here. Pass whole groups (K adjacent rows).
    """
    try:
        estimator = ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; choose one of {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None
    inputs = dict(token_rewards=token_rewards, outcome=outcome, mask=mask, group_size=group_size, gamma=gamma,
                  process_coef=process_coef, outcome_coef=outcome_coef, whiten=whiten, process_return=process_return)
    accepted = inspect.signature(estimator).parameters
    with torch.no_grad():
        return estimator(**{key: value for key, value in inputs.items() if key in accepted})
