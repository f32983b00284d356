"""The rollout correction's weights, worked by hand for every mode and both bounds.

Two responses of one group (K = 2), the second with padding (NaN in the padding must not matter):
  response 0: old - rollout = [log 3, log 0.5, log 1.2]   -> raw w = [3, 0.5, 1.2]
  response 1: old - rollout = [log 0.25, 0, pad]          -> raw w = [0.25, 1, 0]
"""

import math

import pytest
import torch

from megatron_prime.algorithm import compute_advantages, rollout_correction_weights

F64 = torch.float64
NAN = float("nan")
LOG = math.log
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, NAN]], dtype=F64)
ROLLOUT = OLD - torch.tensor([[LOG(3.0), LOG(0.5), LOG(1.2)], [LOG(0.25), 0.0, NAN]], dtype=F64)


def weights(mode, bounds=None):
    w, keep, metrics = rollout_correction_weights(OLD, ROLLOUT, MASK, mode, bounds)
    return w.double(), keep.tolist(), metrics


def test_none_weighs_one_and_reports_the_mismatch():
    w, keep, m = weights("none")
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=F64))
    assert keep == [True, True]
    # raw w over the 5 valid tokens: 3, 0.5, 1.2, 0.25, 1 -> mean 5.95 / 5 = 1.19, min 0.25, max 3
    assert m["rollout_correction/weight_mean"] == pytest.approx(1.19, rel=1e-6)
    assert m["rollout_correction/weight_min"] == pytest.approx(0.25, rel=1e-6)
    assert m["rollout_correction/weight_max"] == pytest.approx(3.0, rel=1e-6)
    assert m["rollout_correction/corrected_frac"] == 0.0 and m["rollout_correction/masked_frac"] == 0.0
    # ESS = (sum w)^2 / (n sum w^2) = 5.95^2 / (5 * (9 + 0.25 + 1.44 + 0.0625 + 1)) = 35.4025 / 58.7625
    assert m["rollout_correction/ess"] == pytest.approx(35.4025 / 58.7625, rel=1e-6)
    # KL(rollout || old) with x = old - rollout = log [3, 0.5, 1.2, 0.25, 1]:
    #   k1 = mean(-x); k3 = mean(e^x - 1 - x)
    xs = [LOG(3), LOG(0.5), LOG(1.2), LOG(0.25), 0.0]
    assert m["rollout_correction/kl_k1"] == pytest.approx(-sum(xs) / 5, rel=1e-6)
    assert m["rollout_correction/kl_k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in xs) / 5, rel=1e-6)


@pytest.mark.parametrize("bounds, expected, corrected", [
    # default [0, 2]: 3 -> 2, the rest unchanged
    (None, [[2.0, 0.5, 1.2], [0.25, 1.0, 0.0]], 1),
    # [0.5, 1.1]: 3 -> 1.1, 1.2 -> 1.1, 0.25 -> 0.5 (both bounds bind)
    ((0.5, 1.1), [[1.1, 0.5, 1.1], [0.5, 1.0, 0.0]], 3),
])
def test_token_tis_clamps_to_the_bounds(bounds, expected, corrected):
    w, keep, m = weights("token_tis", bounds)
    torch.testing.assert_close(w, torch.tensor(expected, dtype=F64))
    assert keep == [True, True] and m["rollout_correction/corrected_frac"] == pytest.approx(corrected / 5)


@pytest.mark.parametrize("bounds, expected", [
    # default [0.5, 5]: only 0.25 falls outside (zeroed); 0.5 sits on the bound and stays
    (None, [[3.0, 0.5, 1.2], [0.0, 1.0, 0.0]]),
    # [0.6, 2]: 3 above, 0.5 and 0.25 below
    ((0.6, 2.0), [[0.0, 0.0, 1.2], [0.0, 1.0, 0.0]]),
])
def test_icepop_zeroes_outside_the_bounds(bounds, expected):
    w, keep, _ = weights("icepop", bounds)
    torch.testing.assert_close(w, torch.tensor(expected, dtype=F64))
    assert keep == [True, True]  # zero weights, but the responses stay in the loss


def test_seq_mask_keeps_a_response_by_the_geometric_mean_of_its_weights():
    # geometric means: response 0 exp((log 3 + log 0.5 + log 1.2) / 3) = 1.8^(1/3) = 1.2164;
    #                  response 1 exp((log 0.25 + 0) / 2) = 0.5
    w, keep, m = weights("seq_mask", (0.9, 1.5))
    assert keep == [True, False]
    torch.testing.assert_close(w, torch.tensor([[3.0, 0.5, 1.2], [0.0, 0.0, 0.0]], dtype=F64))  # kept: raw
    assert m["rollout_correction/masked_frac"] == 0.5
    assert m["rollout_correction/corrected_frac"] == pytest.approx(2 / 5)
    # default [0.999, 1.001] keeps neither; [0.4, 1.2163] drops response 0 (just below its 1.2164)
    assert weights("seq_mask")[1] == [False, False]
    assert weights("seq_mask", (0.4, 1.2163))[1] == [False, True]
    # The group's advantages are computed before any masking: response 1 (outcome 0) still is
    # response 0's baseline, and masking it changes none of them.
    adv = compute_advantages("rloo", token_rewards=None, outcome=torch.tensor([1.0, 0.0]), mask=MASK, group_size=2)
    torch.testing.assert_close(adv, torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]]))


def test_bad_mode_and_bounds_are_refused():
    with pytest.raises(ValueError, match="one of"):
        rollout_correction_weights(OLD, ROLLOUT, MASK, "tis")
    with pytest.raises(ValueError, match="0 <= low <= high"):
        rollout_correction_weights(OLD, ROLLOUT, MASK, "token_tis", (2.0, 1.0))
