"""Where the process rewards overrule the verifier (``advantage_flips``), worked by hand, and the
console warning when that persists."""

import warnings

import pytest
import torch

from megatron_prime.algorithm import advantage_flips, compute_advantages
from megatron_prime.metrics import SustainedWarning

NAN = float("nan")


def test_flips_hand_example():
    # Two groups of K = 2. Group 1: outcomes [1, 0] -> RLOO outcome terms +0.5 / -0.5 on every token.
    #   resp0 advantages [-0.5, -0.1] (mean -0.3): correct, pushed down     -> flipped
    #   resp1 advantages [0.4]        (mean +0.4): incorrect, pushed up     -> flipped
    # Group 2: outcomes [1, 1] -> outcome terms 0: not counted, whatever the advantages.
    #   resp2 [0.2], resp3 [-0.2]
    mask = torch.tensor([[1, 1], [1, 0], [1, 0], [1, 0]], dtype=torch.bool)
    advantages = torch.tensor([[-0.5, -0.1], [0.4, NAN], [0.2, NAN], [-0.2, NAN]])
    outcome_only = torch.tensor([[0.5, 0.5], [-0.5, NAN], [0.0, NAN], [0.0, NAN]])
    flipped, m = advantage_flips(advantages, outcome_only, mask)
    assert flipped.tolist() == [True, True, False, False]
    assert m["advantage/flip_frac"] == 1.0  # 2 flipped of the 2 with an outcome term
    assert m["advantage/flip_incorrect_up"] == 0.25 and m["advantage/flip_correct_down"] == 0.25
    # process terms: -0.3 - 0.5 = -0.8, 0.4 + 0.5 = 0.9, 0.2, -0.2 -> mean |.| 0.525;
    # outcome terms |0.5|, |0.5|, 0, 0 -> mean 0.25: ratio 2.1
    assert m["advantage/process_to_outcome"] == pytest.approx(2.1)


def test_flips_of_eq5_advantages():
    # One group, K = 2, outcomes [1, 0] (outcome terms +1 / -1 with K - 1 = 1).
    # Process rewards: resp0 [-1, -1, -1] (mean -1), resp1 [0.5, 0.5] (mean 0.5); baselines are the
    # other response's mean: b0 = 0.5, b1 = -1. Sum-form returns of r - b:
    #   resp0: r - b = [-1.5]*3 -> [-4.5, -3, -1.5], + 1 -> mean of [-3.5, -2, -0.5] = -2: flipped
    #   resp1: r - b = [1.5]*2  -> [3, 1.5],          - 1 -> mean of [2, 0.5] = 1.25: flipped
    # Min-form: resp0 [-1.5]*3 + 1 = -0.5 (still flipped); resp1 [1.5, 1.5] - 1 = 0.5 (flipped)
    # With beta 10x smaller the outcome wins again: no flips.
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    rewards = torch.tensor([[-1.0, -1.0, -1.0], [0.5, 0.5, NAN]])
    common = dict(outcome=torch.tensor([1.0, 0.0]), mask=mask, group_size=2)
    outcome_only = compute_advantages("prime_rloo", token_rewards=None, **common)
    for form, expect in (("sum", [True, True]), ("min", [True, True])):
        adv = compute_advantages("prime_rloo", token_rewards=rewards, process_return=form, **common)
        assert advantage_flips(adv, outcome_only, mask)[0].tolist() == expect, form
    small = compute_advantages("prime_rloo", token_rewards=0.1 * rewards, **common)
    flipped, m = advantage_flips(small, outcome_only, mask)
    assert flipped.tolist() == [False, False] and m["advantage/flip_frac"] == 0.0


def test_sustained_warning_needs_a_full_window_above_the_limit():
    alarm = SustainedWarning("advantage/flip_frac", 0.1, "too many flips", window=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fired = [alarm.update(step, {"advantage/flip_frac": v}) for step, v in enumerate([0.5, 0.5, 0.0, 0.2, 0.3, 0.4,
                                                                                          0.3, 0.3, 0.3])]
    # means over 3: -, -, 0.33 (fires at step 2), 0.23 (quiet), 0.17 (quiet), 0.3 (step 5: fires again),
    # 0.33 (quiet until step 8), 0.33, 0.3 (step 8: fires)
    assert fired == [False, False, True, False, False, True, False, False, True]
    assert len(caught) == 3 and "too many flips" in str(caught[0].message)
    assert not alarm.update(9, {"other": 1.0})  # absent metric: nothing recorded
