"""Advantage estimators: PRIME's Eq. 5 and the paper's Table 4 estimators with process rewards.

Each estimator has a hand-worked example and a naive per-token loop that the vectorised code must
match on random inputs with random (right or general) padding. Padding holds NaN throughout.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_prime.algorithm import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    discounted_reverse_cumsum,
    grpo_advantages,
    min_form_returns,
    normalize_by_max_return,
    prime_official_advantages,
    prime_rloo_advantages,
    reinforce_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)

torch.set_num_threads(1)
NAN = float("nan")
F64 = torch.float64
EXACT = dict(rtol=1e-9, atol=1e-9)


def t(rows, dtype=F64):
    """Right-padded ragged rows -> (values with NaN padding, mask)."""
    width = max(len(r) for r in rows)
    values = torch.full((len(rows), width), NAN, dtype=dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        values[i, : len(row)] = torch.tensor(row, dtype=dtype)
        mask[i, : len(row)] = True
    return values, mask


def assert_rows(actual, mask, rows):
    expected, _ = t(rows)
    torch.testing.assert_close(actual, torch.where(mask, expected, 0.0), **EXACT)


# --- naive references -------------------------------------------------------------------------
def _valid_positions(mask, i):
    return [t for t in range(mask.shape[1]) if mask[i, t]]


def _reverse_discounted(xs, gamma):
    out, running = [0.0] * len(xs), 0.0
    for k in reversed(range(len(xs))):
        running = xs[k] + gamma * running
        out[k] = running
    return out


def _process_return(xs, gamma, form):
    """The return of shaped process rewards: discounted sum (Eq. 5) or the min of the future ones."""
    if form == "sum":
        return _reverse_discounted(xs, gamma)
    return [min(xs[k:]) for k in range(len(xs))]


def _mean_std(xs):
    """Mean and unbiased std; a single sample has std 0 (an empty list: mean 0, std 0)."""
    if not xs:
        return 0.0, 0.0
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
    return mean, math.sqrt(var)


def _naive_whiten(adv, mask):
    values = [adv[i, t].item() for i in range(adv.shape[0]) for t in range(adv.shape[1]) if mask[i, t]]
    mean, std = _mean_std(values)
    out = torch.zeros_like(adv)
    for i in range(adv.shape[0]):
        for t in _valid_positions(mask, i):
            out[i, t] = (adv[i, t].item() - mean) / math.sqrt(std**2 + 1e-8)
    return out


def _write(out, mask, i, values):
    for t, v in zip(_valid_positions(mask, i), values):
        out[i, t] = v


def naive_prime_rloo(rewards, outcome, mask, K, gamma, pc, oc, whiten, form="sum", k_scaled=False):
    B = outcome.shape[0]
    out = torch.zeros(mask.shape, dtype=F64)
    token_rewards = [[rewards[i, t].item() for t in _valid_positions(mask, i)] for i in range(B)]
    means = [sum(r) / max(len(r), 1) for r in token_rewards]  # r_phi(y^j) / |y^j|
    for i in range(B):
        group = range(i - i % K, i - i % K + K)
        others = [j for j in group if j != i]
        process_baseline = sum(means[j] for j in others) / (K - 1) if K > 1 else 0.0
        outcome_baseline = sum(outcome[j].item() for j in others) / (K - 1) if K > 1 else 0.0
        shaped = []
        for r in token_rewards[i]:
            s = r - process_baseline
            if k_scaled and K > 1:
                s = r * K / (K - 1) - sum(means[j] for j in group) / (K - 1)
            shaped.append(s)
        process = _process_return(shaped, gamma, form)
        outcome_term = outcome[i].item() - outcome_baseline
        _write(out, mask, i, [pc * p + oc * outcome_term for p in process])
    return _naive_whiten(out, mask) if whiten else out


def naive_prime_official(rewards, outcome, mask, K, gamma, pc, oc, form="sum"):
    """The official PRIME pipeline step by step, one response at a time (valid tokens only)."""
    B = outcome.shape[0]
    token_rewards = [[rewards[i, t].item() for t in _valid_positions(mask, i)] for i in range(B)]
    # 1. divide by the batch's largest |undiscounted return-to-go|
    largest = max((abs(x) for r in token_rewards for x in _reverse_discounted(r, 1.0)), default=0.0)
    if largest > 0:
        token_rewards = [[x / largest for x in r] for r in token_rewards]
    means = [sum(r) / max(len(r), 1) for r in token_rewards]
    out = torch.zeros(mask.shape, dtype=F64)
    for i in range(B):
        group = range(i - i % K, i - i % K + K)
        others = [j for j in group if j != i]
        # 2. RLOO per source: K/(K-1) token form for the process rewards, outcome on the last token
        if K > 1:
            process = [x * K / (K - 1) - sum(means[j] for j in group) / (K - 1) for x in token_rewards[i]]
            outcome_rloo = outcome[i].item() - sum(outcome[j].item() for j in others) / (K - 1)
        else:
            process, outcome_rloo = list(token_rewards[i]), outcome[i].item()
        outcome_rewards = [0.0] * len(process)
        if outcome_rewards:
            outcome_rewards[-1] = oc * outcome_rloo
        # 3. the returns of both sources (one discounted sum of both, for sum-form)
        returns = [pc * p + q for p, q in zip(_process_return(process, gamma, form),
                                              _reverse_discounted(outcome_rewards, gamma))]
        _write(out, mask, i, returns)
    # 4. always whitened over the batch
    return _naive_whiten(out, mask)


def naive_grpo(rewards, outcome, mask, K, gamma, pc, oc, whiten, form="sum", eps=1e-6):
    B = outcome.shape[0]
    out = torch.zeros(mask.shape, dtype=F64)
    for start in range(0, B, K):
        group = range(start, start + K)
        o_mean, o_std = _mean_std([outcome[j].item() for j in group])
        pooled = [rewards[j, t].item() for j in group for t in _valid_positions(mask, j)]
        r_mean, r_std = _mean_std(pooled)
        for i in group:
            normalised = [(rewards[i, t].item() - r_mean) / (r_std + eps) for t in _valid_positions(mask, i)]
            process = _process_return(normalised, gamma, form)
            outcome_term = (outcome[i].item() - o_mean) / (o_std + eps)
            _write(out, mask, i, [pc * p + oc * outcome_term for p in process])
    return _naive_whiten(out, mask) if whiten else out


def naive_reinforce(rewards, outcome, mask, gamma, pc, oc, form="sum"):
    out = torch.zeros(mask.shape, dtype=F64)
    for i in range(outcome.shape[0]):
        process = _process_return([rewards[i, t].item() for t in _valid_positions(mask, i)], gamma, form)
        _write(out, mask, i, [pc * p + oc * outcome[i].item() for p in process])
    return out


# --- random batches ---------------------------------------------------------------------------
@st.composite
def batches(draw, max_groups=3, max_k=4, max_len=9):
    G = draw(st.integers(1, max_groups))
    K = draw(st.integers(1, max_k))
    T = draw(st.integers(1, max_len))
    B = G * K
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.sampled_from(["right", "general"])) == "right":
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        mask = torch.arange(T)[None, :] < lengths[:, None]
    else:
        mask = torch.rand(B, T, generator=g) < 0.7
    rewards = torch.randn(B, T, generator=g, dtype=F64)
    rewards[~mask] = NAN
    kind = draw(st.sampled_from(["binary", "fractional", "all_equal"]))
    if kind == "binary":
        outcome = torch.randint(0, 2, (B,), generator=g).to(F64)
    elif kind == "fractional":
        outcome = torch.rand(B, generator=g, dtype=F64)
    else:
        outcome = torch.full((B,), float(torch.randint(0, 2, (), generator=g)), dtype=F64)
    process_return = draw(st.sampled_from(["sum", "min"]))
    return dict(
        token_rewards=rewards,
        outcome=outcome,
        mask=mask,
        group_size=K,
        gamma=1.0 if process_return == "min" else draw(st.sampled_from([1.0, 0.0, 0.5, 0.97])),
        process_coef=draw(st.sampled_from([1.0, 0.0, 2.5])),
        outcome_coef=draw(st.sampled_from([1.0, 0.0, 0.5])),
        whiten=draw(st.booleans()),
        process_return=process_return,
    )


def positional(b, *names):
    """The naive references' positional arguments, from a batch dict."""
    return tuple(b[name] for name in names)


def keywords(b, *names):
    return {name: b[name] for name in names}


CORE = ("token_rewards", "outcome", "mask", "group_size", "gamma", "process_coef", "outcome_coef")


# --- discounted reverse cumsum (the shared scan) --------------------------------------------------
@pytest.mark.parametrize("length", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.99, 1.0])
def test_discounted_reverse_cumsum_matches_loop_across_blocks(length, gamma):
    # Lengths around the 64-token block size exercise the blocked scan's carries.
    g = torch.Generator().manual_seed(length)
    x = torch.randn(3, length, generator=g, dtype=F64)
    for mask in (
        torch.arange(length)[None, :] < torch.tensor([[length], [length // 2], [0]]),
        torch.rand(3, length, generator=g) < 0.6,
    ):
        expected = torch.zeros_like(x)
        for i in range(3):
            _write(
                expected,
                mask,
                i,
                _reverse_discounted([x[i, t].item() for t in _valid_positions(mask, i)], gamma),
            )
        torch.testing.assert_close(
            discounted_reverse_cumsum(x, mask, gamma), expected, rtol=1e-10, atol=1e-10
        )


def test_discounted_reverse_cumsum_hand_example():
    # gamma = 0.5, x = [1, 2, 4]:  R2 = 4, R1 = 2 + 0.5*4 = 4, R0 = 1 + 0.5*4 = 3
    # With a hole, x = [1, (masked), 2, 4] the hole is skipped: [3, 0, 4, 4]
    x = torch.tensor([[1.0, 2.0, 4.0, NAN], [1.0, NAN, 2.0, 4.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]])
    expected = torch.tensor([[3.0, 4.0, 4.0, 0.0], [3.0, 0.0, 4.0, 4.0]], dtype=F64)
    torch.testing.assert_close(discounted_reverse_cumsum(x, mask, 0.5), expected)


# --- PRIME, Eq. 5 -----------------------------------------------------------------------------
# One group, K = 3:
#   response 1: r_phi = [0.3, 0.3, 0.0]  |y| = 3  mean 0.6/3 = 0.2   outcome 1
#   response 2: r_phi = [0.4, 0.2]       |y| = 2  mean 0.6/2 = 0.3   outcome 0
#   response 3: r_phi = [-0.1]           |y| = 1  mean -0.1          outcome 1
# Leave-one-out process baselines, 1/(K-1) = 1/2 of the others' means:
#   b1 = (0.3 + -0.1)/2 = 0.1    b2 = (0.2 + -0.1)/2 = 0.05    b3 = (0.2 + 0.3)/2 = 0.25
# Outcome RLOO: o1 = 1 - (0+1)/2 = 0.5   o2 = 0 - (1+1)/2 = -1   o3 = 1 - (1+0)/2 = 0.5   (sum 0)
HAND_REWARDS = [[0.3, 0.3, 0.0], [0.4, 0.2], [-0.1]]
HAND_OUTCOME = torch.tensor([1.0, 0.0, 1.0], dtype=F64)


def test_prime_rloo_hand_example_gamma_1():
    # r - b:  resp1 [0.2, 0.2, -0.1]  resp2 [0.35, 0.15]  resp3 [-0.35]
    # reverse cumsum:  resp1 [0.3, 0.1, -0.1]  resp2 [0.5, 0.15]  resp3 [-0.35]
    # + outcome term:  resp1 [0.8, 0.6, 0.4]   resp2 [-0.5, -0.85] resp3 [0.15]
    rewards, mask = t(HAND_REWARDS)
    adv = prime_rloo_advantages(token_rewards=rewards, outcome=HAND_OUTCOME, mask=mask, group_size=3)
    assert_rows(adv, mask, [[0.8, 0.6, 0.4], [-0.5, -0.85], [0.15]])


def test_prime_rloo_hand_example_gamma_half_and_coefs():
    # gamma = 0.5 on r - b:
    #   resp1: R2 = -0.1, R1 = 0.2 + 0.5*-0.1 = 0.15, R0 = 0.2 + 0.5*0.15 = 0.275
    #   resp2: R1 = 0.15, R0 = 0.35 + 0.5*0.15 = 0.425
    #   resp3: R0 = -0.35
    # process_coef = 2, outcome_coef = 0.5:
    #   resp1: [0.55 + 0.25, 0.3 + 0.25, -0.2 + 0.25] = [0.8, 0.55, 0.05]
    #   resp2: [0.85 - 0.5, 0.3 - 0.5] = [0.35, -0.2]
    #   resp3: [-0.7 + 0.25] = [-0.45]
    rewards, mask = t(HAND_REWARDS)
    adv = prime_rloo_advantages(token_rewards=rewards, outcome=HAND_OUTCOME, mask=mask, group_size=3, gamma=0.5,
                                process_coef=2.0, outcome_coef=0.5)
    assert_rows(adv, mask, [[0.8, 0.55, 0.05], [0.35, -0.2], [-0.45]])


def test_prime_rloo_k_scaled_variant_hand_example():
    # Official-code variant: r * K/(K-1) - (sum of all means)/(K-1) = 1.5 r - (0.2+0.3-0.1)/2 = 1.5 r - 0.2
    #   resp1: [0.25, 0.25, -0.2] -> reverse cumsum [0.3, 0.05, -0.2]   (t=0 equals Eq. 5's 0.3)
    #   resp2: [0.4, 0.1]         -> [0.5, 0.1]
    #   resp3: [-0.35]            -> [-0.35]
    # + outcome terms 0.5, -1, 0.5
    rewards, mask = t(HAND_REWARDS)
    adv = compute_advantages(
        "prime_rloo_k_scaled", token_rewards=rewards, outcome=HAND_OUTCOME, mask=mask, group_size=3
    )
    assert_rows(adv, mask, [[0.8, 0.55, 0.3], [-0.5, -0.9], [0.15]])


def test_rloo_is_prime_rloo_without_process_rewards():
    # Outcome-only RLOO: only the outcome terms 0.5, -1, 0.5 on every token.
    rewards, mask = t(HAND_REWARDS)
    adv = rloo_advantages(outcome=HAND_OUTCOME, mask=mask, group_size=3)
    assert_rows(adv, mask, [[0.5, 0.5, 0.5], [-1.0, -1.0], [0.5]])
    # One switch away: the same numbers from PRIME with process_coef = 0, or with no PRM at all.
    common = dict(outcome=HAND_OUTCOME, mask=mask, group_size=3)
    assert torch.equal(adv, prime_rloo_advantages(token_rewards=rewards, process_coef=0.0, **common))
    assert torch.equal(adv, prime_rloo_advantages(token_rewards=None, **common))
    via_registry = compute_advantages(
        "rloo", token_rewards=rewards, outcome=HAND_OUTCOME, mask=mask, group_size=3
    )
    assert torch.equal(adv, via_registry)


def test_prime_rloo_min_form_hand_example():
    # The same r - b as above: resp1 [0.2, 0.2, -0.1]  resp2 [0.35, 0.15]  resp3 [-0.35]
    # min over s >= t:  resp1 [-0.1, -0.1, -0.1]  resp2 [0.15, 0.15]  resp3 [-0.35]
    #   (sum-form gave resp1 [0.3, 0.1, -0.1]: the bad last step now caps every earlier token)
    # + outcome terms 0.5, -1, 0.5:  resp1 [0.4, 0.4, 0.4]  resp2 [-0.85, -0.85]  resp3 [0.15]
    rewards, mask = t(HAND_REWARDS)
    adv = prime_rloo_advantages(token_rewards=rewards, outcome=HAND_OUTCOME, mask=mask, group_size=3,
                                process_return="min")
    assert_rows(adv, mask, [[0.4, 0.4, 0.4], [-0.85, -0.85], [0.15]])
    # A rising run: r - b = [-0.2, 0.5, 0.1] has future minima [-0.2, 0.1, 0.1] (sum-form: [0.4, 0.6, 0.1])
    rising, mask = t([[-0.2, 0.5, 0.1]])
    assert_rows(min_form_returns(rising, mask), mask, [[-0.2, 0.1, 0.1]])


def test_min_form_skips_holes_and_padding():
    # x = [3, (masked), -1, 2] -> [-1, 0, -1, 2]; an empty row stays 0
    x = torch.tensor([[3.0, NAN, -1.0, 2.0], [NAN, NAN, NAN, NAN]], dtype=F64)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0]])
    expected = torch.tensor([[-1.0, 0.0, -1.0, 2.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(min_form_returns(x, mask), expected)


def test_min_form_needs_gamma_1():
    rewards, mask = t(HAND_REWARDS)
    with pytest.raises(ValueError, match="gamma must be 1"):
        prime_rloo_advantages(token_rewards=rewards, outcome=HAND_OUTCOME, mask=mask, group_size=3, gamma=0.9,
                              process_return="min")


@settings(max_examples=50, deadline=None)
@given(batches(), st.booleans())
def test_prime_rloo_matches_naive(b, k_scaled):
    actual = prime_rloo_advantages(**keywords(b, *CORE, "whiten", "process_return"), k_scaled_tokens=k_scaled)
    expected = naive_prime_rloo(*positional(b, *CORE, "whiten", "process_return"), k_scaled=k_scaled)
    torch.testing.assert_close(actual, expected, **EXACT)


# --- the official PRIME pipeline ----------------------------------------------------------------
# One group, K = 2 (token rewards are r_phi = beta * q, here already small numbers):
#   response 1: r = [0.2, -0.1, 0.3]  outcome 1
#   response 2: r = [-0.2, 0.4]       outcome 0
OFFICIAL_REWARDS = [[0.2, -0.1, 0.3], [-0.2, 0.4]]
OFFICIAL_OUTCOME = torch.tensor([1.0, 0.0], dtype=F64)


def test_normalize_by_max_return_hand_example():
    # Reverse cumsums: resp1 [0.4, 0.2, 0.3], resp2 [0.2, 0.4]; the largest |.| is 0.4, so every
    # reward is divided by 0.4: resp1 [0.5, -0.25, 0.75], resp2 [-0.5, 1.0].
    rewards, mask = t(OFFICIAL_REWARDS)
    assert_rows(normalize_by_max_return(rewards, mask), mask, [[0.5, -0.25, 0.75], [-0.5, 1.0]])
    # A negative return can be the largest: [-0.6, 0.1] has reverse cumsum [-0.5, 0.1] -> / 0.5
    rewards, mask = t([[-0.6, 0.1], [0.2]])
    assert_rows(normalize_by_max_return(rewards, mask), mask, [[-1.2, 0.2], [0.4]])
    # All-zero rewards stay zero (no 0/0).
    zeros, mask = t([[0.0, 0.0], [0.0]])
    assert_rows(normalize_by_max_return(zeros, mask), mask, [[0.0, 0.0], [0.0]])


def test_prime_official_hand_example_gamma_1():
    # 1. normalised (above): resp1 [0.5, -0.25, 0.75], resp2 [-0.5, 1.0]
    # 2. per-token means m1 = 1/3, m2 = 1/4; K/(K-1) = 2, (m1 + m2)/(K-1) = 7/12:
    #      process: resp1 [1 - 7/12, -0.5 - 7/12, 1.5 - 7/12] = [5, -13, 11]/12
    #               resp2 [-1 - 7/12, 2 - 7/12]               = [-19, 17]/12
    #    outcome RLOO o1 = 1 - 0 = 1, o2 = 0 - 1 = -1, on the last token only:
    #      resp1 [5, -13, 11 + 12]/12 = [5, -13, 23]/12      resp2 [-19, 17 - 12]/12 = [-19, 5]/12
    # 3. returns (gamma = 1): resp1 [15, 10, 23]/12, resp2 [-14, 5]/12
    # 4. whiten over the 5 tokens: mean 39/5 /12 = 7.8/12; deviations [7.2, 2.2, 15.2, -21.8, -2.8]/12;
    #    squares sum 51.84 + 4.84 + 231.04 + 475.24 + 7.84 = 770.8 -> unbiased var = 192.7 / 144
    rewards, mask = t(OFFICIAL_REWARDS)
    adv = compute_advantages(
        "prime_official", token_rewards=rewards, outcome=OFFICIAL_OUTCOME, mask=mask, group_size=2
    )
    scale = 12 * math.sqrt(192.7 / 144 + 1e-8)
    assert_rows(adv, mask, [[7.2 / scale, 2.2 / scale, 15.2 / scale], [-21.8 / scale, -2.8 / scale]])
    # The beta placement does not matter: the raw log-ratios q = r / 0.05 give the same advantages.
    torch.testing.assert_close(
        prime_official_advantages(token_rewards=rewards / 0.05, outcome=OFFICIAL_OUTCOME, mask=mask, group_size=2),
        adv, **EXACT,
    )


def test_prime_official_outcome_on_last_token_with_gamma_below_1():
    # Outcome only (process_coef = 0), gamma = 0.5: o1 = 1 on resp1's last token, o2 = -1 on resp2's:
    #   returns resp1 [0.25, 0.5, 1], resp2 [-0.5, -1]   (Eq. 5 would put 1 and -1 on every token)
    #   mean 0.25/5 = 0.05; deviations [0.2, 0.45, 0.95, -0.55, -1.05];
    #   squares 0.04 + 0.2025 + 0.9025 + 0.3025 + 1.1025 = 2.55 -> unbiased var 0.6375
    rewards, mask = t(OFFICIAL_REWARDS)
    common = dict(outcome=OFFICIAL_OUTCOME, mask=mask, group_size=2, gamma=0.5)
    adv = prime_official_advantages(token_rewards=rewards, process_coef=0.0, **common)
    s = math.sqrt(0.6375 + 1e-8)
    assert_rows(adv, mask, [[0.2 / s, 0.45 / s, 0.95 / s], [-0.55 / s, -1.05 / s]])
    # No process rewards at all is the same thing.
    torch.testing.assert_close(prime_official_advantages(token_rewards=None, **common), adv)


def test_prime_official_hand_example_gamma_half():
    # Steps 1-2 as in the gamma = 1 example: resp1 [5, -13, 23]/12, resp2 [-19, 5]/12. gamma = 0.5:
    #   resp1: R2 = 23/12 = 46/24, R1 = -13/12 + 23/24 = -3/24, R0 = 5/12 - 3/48 = 17/48
    #   resp2: R1 = 5/12, R0 = -19/12 + 5/24 = -33/24
    # then whitened over the batch (checked with the naive whitening loop).
    rewards, mask = t(OFFICIAL_REWARDS)
    adv = prime_official_advantages(token_rewards=rewards, outcome=OFFICIAL_OUTCOME, mask=mask, group_size=2,
                                    gamma=0.5)
    returns, _ = t([[17 / 48, -3 / 24, 46 / 24], [-33 / 24, 5 / 12]])
    torch.testing.assert_close(adv, _naive_whiten(returns, mask), **EXACT)


def test_prime_official_min_form_hand_example():
    # Steps 1-2 as in the gamma = 1 example: process resp1 [5, -13, 11]/12, resp2 [-19, 17]/12;
    # outcome +1 / -1 on the last tokens.
    # min-form process returns: resp1 [-13, -13, 11]/12, resp2 [-19, 17]/12
    # + outcome returns (gamma = 1: on every token): resp1 [-1, -1, 23]/12, resp2 [-31, 5]/12
    rewards, mask = t(OFFICIAL_REWARDS)
    adv = prime_official_advantages(token_rewards=rewards, outcome=OFFICIAL_OUTCOME, mask=mask, group_size=2,
                                    process_return="min")
    returns, _ = t([[-1 / 12, -1 / 12, 23 / 12], [-31 / 12, 5 / 12]])
    torch.testing.assert_close(adv, _naive_whiten(returns, mask), **EXACT)


@settings(max_examples=50, deadline=None)
@given(batches())
def test_prime_official_matches_naive(b):
    torch.testing.assert_close(
        prime_official_advantages(**keywords(b, *CORE, "process_return")),
        naive_prime_official(*positional(b, *CORE, "process_return")), **EXACT
    )


@settings(max_examples=50, deadline=None)
@given(batches(), st.sampled_from([1e-3, 0.05, 1.0, 7.3, 1e4]))
def test_prime_official_is_invariant_to_the_token_rewards_scale(b, scale):
    # beta * q and q (any positive scale) give the same advantages: the normalisation divides it out.
    args = keywords(b, "outcome", "mask", "group_size", "gamma", "process_coef", "outcome_coef", "process_return")
    torch.testing.assert_close(
        prime_official_advantages(token_rewards=scale * b["token_rewards"], **args),
        prime_official_advantages(token_rewards=b["token_rewards"], **args),
        rtol=1e-10,
        atol=1e-10,
    )


@settings(max_examples=25, deadline=None)
@given(batches())
def test_prime_official_at_gamma_1_is_whitened_k_scaled_rloo_of_normalised_rewards(b):
    # At gamma = 1 the last-token outcome sums to the same value on every token as Eq. 5's, so the
    # official pipeline is normalisation -> prime_rloo_k_scaled -> whitening.
    mask, K = b["mask"], b["group_size"]
    normalised = normalize_by_max_return(b["token_rewards"], mask)
    common = dict(outcome=b["outcome"], mask=mask, group_size=K, gamma=1.0, process_coef=2.0, outcome_coef=0.5,
                  process_return=b["process_return"])
    expected = prime_rloo_advantages(token_rewards=normalised, whiten=True, k_scaled_tokens=True, **common)
    actual = prime_official_advantages(token_rewards=b["token_rewards"], **common)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)

# --- GRPO -------------------------------------------------------------------------------------
def test_grpo_hand_example():
    # K = 2: resp1 r_phi = [1, 2], outcome 1;  resp2 r_phi = [3], outcome 0.
    # Process: pooled tokens {1, 2, 3}: mean 2, unbiased std sqrt((1 + 0 + 1)/2) = 1
    #   normalised resp1 [-1, 0] -> reverse cumsum [-1, 0];  resp2 [1] -> [1]
    # Outcome: mean 0.5, unbiased std sqrt((0.25 + 0.25)/1) = 0.70710678 -> +-0.70710678
    #   resp1 [-1 + 0.70710678, 0 + 0.70710678] = [-0.29289322, 0.70710678]
    #   resp2 [1 - 0.70710678] = [0.29289322]
    rewards, mask = t([[1.0, 2.0], [3.0]])
    adv = grpo_advantages(token_rewards=rewards, outcome=torch.tensor([1.0, 0.0], dtype=F64), mask=mask, group_size=2)
    expected, _ = t([[-0.29289322, 0.70710678], [0.29289322]])
    torch.testing.assert_close(adv, torch.where(mask, expected, 0.0), rtol=0, atol=2e-6)  # eps = 1e-6


def test_grpo_outcome_only_hand_example():
    # K = 4, outcomes [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735027
    # advantages +-0.5 / 0.57735027 = +-0.86602540 on every token
    mask = torch.ones(4, 2, dtype=torch.bool)
    adv = grpo_advantages(token_rewards=None, outcome=torch.tensor([1.0, 0.0, 0.0, 1.0]), mask=mask, group_size=4)
    expected = torch.tensor([0.8660254, -0.8660254, -0.8660254, 0.8660254])[:, None].expand(4, 2)
    torch.testing.assert_close(adv, expected, rtol=0, atol=2e-6)


@settings(max_examples=50, deadline=None)
@given(batches())
def test_grpo_matches_naive(b):
    names = (*CORE, "whiten", "process_return")
    torch.testing.assert_close(grpo_advantages(**keywords(b, *names)), naive_grpo(*positional(b, *names)), **EXACT)


# --- REINFORCE and REINFORCE++ ------------------------------------------------------------------
def test_reinforce_hand_example():
    # gamma = 0.5, r_phi = [0.1, 0.2, 0.3], outcome 1 on every token:
    #   G2 = 0.3, G1 = 0.2 + 0.5*0.3 = 0.35, G0 = 0.1 + 0.5*0.35 = 0.275;  + 1 -> [1.275, 1.35, 1.3]
    rewards, mask = t([[0.1, 0.2, 0.3]])
    adv = reinforce_advantages(token_rewards=rewards, outcome=torch.tensor([1.0], dtype=F64), mask=mask, gamma=0.5)
    assert_rows(adv, mask, [[1.275, 1.35, 1.3]])


def test_reinforce_pp_hand_example():
    # resp1 r_phi = [1, 2], outcome 0 -> returns [3, 2];  resp2 r_phi = [1], outcome 0 -> [1]
    # batch over valid tokens {3, 2, 1}: mean 2, unbiased var (1 + 0 + 1)/2 = 1
    #   -> [(3-2)/1, (2-2)/1] = [1, 0] and [(1-2)/1] = [-1]      (eps = 1e-8 inside the sqrt)
    rewards, mask = t([[1.0, 2.0], [1.0]])
    adv = reinforce_pp_advantages(token_rewards=rewards, outcome=torch.zeros(2, dtype=F64), mask=mask)
    expected, _ = t([[1.0, 0.0], [-1.0]])
    torch.testing.assert_close(adv, torch.where(mask, expected, 0.0), rtol=0, atol=1e-7)


@settings(max_examples=50, deadline=None)
@given(batches())
def test_reinforce_and_reinforce_pp_match_naive(b):
    names = ("token_rewards", "outcome", "mask", "gamma", "process_coef", "outcome_coef", "process_return")
    core = keywords(b, *names)
    expected = naive_reinforce(*positional(b, *names))
    torch.testing.assert_close(reinforce_advantages(**core), expected, **EXACT)
    torch.testing.assert_close(
        reinforce_advantages(**core, whiten=True), _naive_whiten(expected, b["mask"]), **EXACT
    )
    torch.testing.assert_close(reinforce_pp_advantages(**core), _naive_whiten(expected, b["mask"]), **EXACT)


# --- properties of every estimator ---------------------------------------------------------------
def _all_estimators(b, **overrides):
    kwargs = {**b, **overrides}
    return {name: compute_advantages(name, **kwargs) for name in ADVANTAGE_ESTIMATORS}


@settings(max_examples=50, deadline=None)
@given(batches())
def test_advantages_exactly_zero_on_padding_and_finite(b):
    for name, adv in _all_estimators(b).items():
        assert torch.isfinite(adv).all(), name
        padding = adv[~b["mask"]]
        assert (padding == 0).all() and not torch.signbit(padding).any(), name


@settings(max_examples=50, deadline=None)
@given(batches(), st.integers(1, 70))
def test_padding_length_does_not_change_any_result(b, extra):
    # Appending padding columns (holding garbage) leaves every valid token's advantage unchanged,
    # up to float rounding of reductions; 70 extra columns also move T past a scan block boundary.
    B = b["mask"].shape[0]
    garbage = torch.full((B, extra), NAN, dtype=F64)
    padded = dict(
        b,
        token_rewards=torch.cat([b["token_rewards"], garbage], 1),
        mask=torch.cat([b["mask"], torch.zeros(B, extra, dtype=torch.bool)], 1),
    )
    before, after = _all_estimators(b), _all_estimators(padded)
    T = b["mask"].shape[1]
    for name in ADVANTAGE_ESTIMATORS:
        torch.testing.assert_close(after[name][:, :T], before[name], rtol=1e-12, atol=1e-12, msg=name)
        assert (after[name][:, T:] == 0).all(), name


@settings(max_examples=50, deadline=None)
@given(batches(max_k=6))
def test_rloo_outcome_terms_sum_to_zero_within_a_group(b):
    K = b["group_size"]
    if K == 1:
        return  # no leave-one-out baseline exists
    mask = torch.ones(b["outcome"].shape[0], 1, dtype=torch.bool)  # every response has a token
    outcome_term = rloo_advantages(outcome=b["outcome"], mask=mask, group_size=K)[:, 0]
    torch.testing.assert_close(
        outcome_term.view(-1, K).sum(dim=1),
        torch.zeros(outcome_term.shape[0] // K, dtype=F64),
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize("outcome_value", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("group_size", [1, 4])
@pytest.mark.parametrize("whiten", [False, True])
def test_degenerate_groups_do_not_produce_nan(outcome_value, group_size, whiten):
    # K = 1 and groups whose outcomes (and process rewards) are all equal, in float32 as in training.
    B, T = 2 * group_size, 5
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    rewards = torch.full((B, T), 0.01)
    outcome = torch.full((B,), outcome_value)
    b = dict(
        token_rewards=rewards,
        outcome=outcome,
        mask=mask,
        group_size=group_size,
        gamma=1.0,
        process_coef=1.0,
        outcome_coef=1.0,
        whiten=whiten,
    )
    results = _all_estimators(b)
    for name, adv in results.items():
        assert torch.isfinite(adv).all(), name
    # The comparison-based estimators see no difference to learn from (RLOO needs K > 1 for a baseline).
    assert (results["grpo"] == 0).all()
    if group_size > 1:
        assert (results["rloo"] == 0).all() and (results["prime_rloo"] == 0).all()


def test_k1_baselines_are_empty():
    # K = 1: RLOO's leave-one-out mean over no responses is 0, so RLOO = REINFORCE;
    # GRPO's group of one equals its own mean, so its advantage is 0.
    rewards, mask = t([[0.2, 0.4], [0.1]])
    outcome = torch.tensor([1.0, 0.0], dtype=F64)
    torch.testing.assert_close(
        prime_rloo_advantages(token_rewards=rewards, outcome=outcome, mask=mask, group_size=1),
        reinforce_advantages(token_rewards=rewards, outcome=outcome, mask=mask),
    )
    torch.testing.assert_close(grpo_advantages(token_rewards=None, outcome=outcome, mask=mask, group_size=1),
                               torch.zeros(2, 2, dtype=F64))


@settings(max_examples=25, deadline=None)
@given(batches())
def test_whitening_is_over_all_valid_tokens_of_the_batch(b):
    common = keywords(b, "token_rewards", "outcome", "mask", "group_size")
    adv = prime_rloo_advantages(whiten=True, **common)
    valid = adv[b["mask"]]
    raw = prime_rloo_advantages(**common)[b["mask"]]
    if valid.numel() > 1:
        # mean 0 and std 1 over the batch's valid tokens (up to the eps = 1e-8 added to the variance)
        assert valid.mean().abs().item() < 1e-9
        assert valid.std().item() == pytest.approx(
            math.sqrt(raw.var().item() / (raw.var().item() + 1e-8)), rel=1e-9
        )


def test_registry_errors():
    mask = torch.ones(4, 3)
    with pytest.raises(ValueError, match="unknown advantage estimator 'gae'"):
        compute_advantages("gae", token_rewards=None, outcome=torch.zeros(4), mask=mask, group_size=2)
    with pytest.raises(ValueError, match="whole number of groups"):
        compute_advantages("prime_rloo", token_rewards=None, outcome=torch.zeros(4), mask=mask, group_size=3)
    with pytest.raises(ValueError, match="outcome"):
        compute_advantages("grpo", token_rewards=None, outcome=torch.zeros(5), mask=mask, group_size=2)


def test_float32_matches_float64():
    # Training runs in float32: the vectorised code must stay accurate there, on long responses too.
    g = torch.Generator().manual_seed(0)
    B, T = 8, 300
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = 0.05 * torch.randn(B, T, generator=g, dtype=F64)
    outcome = torch.randint(0, 2, (B,), generator=g).to(F64)
    b64 = dict(
        token_rewards=rewards,
        outcome=outcome,
        mask=mask,
        group_size=4,
        gamma=0.99,
        process_coef=1.0,
        outcome_coef=1.0,
        whiten=False,
    )
    b32 = {
        k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in b64.items()
    }
    for name in ADVANTAGE_ESTIMATORS:
        torch.testing.assert_close(
            compute_advantages(name, **b32).double(),
            compute_advantages(name, **b64),
            rtol=1e-4,
            atol=1e-4,
            msg=name,
        )


def test_compute_advantages_builds_no_graph():
    # Single-forward PRIME: the rewards come from the PRM forward whose graph the PRM loss needs;
    # the advantages must be constants and leave that graph alone.
    prm = torch.randn(4, 3, requires_grad=True)
    rewards = 0.05 * prm
    adv = compute_advantages(
        "prime_rloo",
        token_rewards=rewards,
        outcome=torch.tensor([1.0, 0.0, 1.0, 1.0]),
        mask=torch.ones(4, 3),
        group_size=2,
    )
    assert not adv.requires_grad and adv.grad_fn is None
