"""Implicit process rewards (paper Eq. 3) and the PRM cross-entropy loss (Algorithm 1)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_prime.algorithm import implicit_process_rewards, metric_means, prm_loss

torch.set_num_threads(1)
NAN = float("nan")


# --- naive references: plain Python loops over responses and tokens -----------------------------
def naive_process_rewards(prm, ref, mask, beta):
    out = torch.zeros_like(prm)
    for i in range(prm.shape[0]):
        for t in range(prm.shape[1]):
            if mask[i, t]:
                out[i, t] = beta * (prm[i, t].item() - ref[i, t].item())
    return out


def naive_prm_loss(prm, ref, mask, outcome, beta):
    total, correct = 0.0, 0
    for i in range(prm.shape[0]):
        s = beta * sum(prm[i, t].item() - ref[i, t].item() for t in range(prm.shape[1]) if mask[i, t])
        y = outcome[i].item()
        # log sigma(s) = -log(1 + exp(-s)), written stably by cases
        log_sigmoid = lambda z: (
            -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))
        )  # noqa: E731
        total += -(y * log_sigmoid(s) + (1 - y) * log_sigmoid(-s))
        correct += (s > 0) == (y > 0.5)
    return total / prm.shape[0], correct / prm.shape[0]


@st.composite
def prm_batches(draw):
    batch = draw(st.integers(1, 6))
    length = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    right_padded = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    if right_padded:
        lengths = torch.randint(0, length + 1, (batch,), generator=g)
        mask = torch.arange(length)[None, :] < lengths[:, None]
    else:
        mask = torch.rand(batch, length, generator=g) < 0.7
    prm = -3 * torch.rand(batch, length, generator=g, dtype=torch.float64)
    ref = -3 * torch.rand(batch, length, generator=g, dtype=torch.float64)
    # Garbage in padding must never matter.
    prm[~mask] = NAN
    ref[~mask] = -float("inf")
    if draw(st.booleans()):
        outcome = torch.randint(0, 2, (batch,), generator=g).double()
    else:
        outcome = torch.rand(batch, generator=g, dtype=torch.float64)
    beta = draw(st.sampled_from([0.05, 0.5, 1.0, 3.0]))
    return prm, ref, mask, outcome, beta


# --- Eq. 3 --------------------------------------------------------------------------------------
def test_implicit_process_rewards_hand_example():
    # beta = 0.05; q_t = log pi_phi - log pi_ref:
    #   t0: -1.0 - (-1.5) =  0.5  -> r = 0.05 *  0.5 =  0.025
    #   t1: -2.0 - (-1.0) = -1.0  -> r = 0.05 * -1.0 = -0.05
    #   t2: padding (NaN stored there)  -> exactly 0
    prm = torch.tensor([[-1.0, -2.0, NAN]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[1, 1, 0]])
    rewards = implicit_process_rewards(prm, ref, mask, beta=0.05)
    torch.testing.assert_close(rewards, torch.tensor([[0.025, -0.05, 0.0]]))
    assert rewards[0, 2].item() == 0.0 and not math.copysign(1, rewards[0, 2].item()) < 0


@settings(max_examples=50, deadline=None)
@given(prm_batches())
def test_implicit_process_rewards_matches_naive(batch):
    prm, ref, mask, _, beta = batch
    torch.testing.assert_close(
        implicit_process_rewards(prm, ref, mask, beta), naive_process_rewards(prm, ref, mask, beta)
    )


# --- PRM cross-entropy --------------------------------------------------------------------------
def test_prm_loss_hand_example():
    # beta = 0.5, sequence reward s = 0.5 * sum_t q_t
    #   A: q = [1.5, 0.5]        s =  1.0, r_o = 1    CE = -log sigma(1)    = log(1 + e^-1)   = 0.313261687
    #   B: q = [-1.0, pad]       s = -0.5, r_o = 0    CE = -log sigma(0.5)  = log(1 + e^-0.5) = 0.474076984
    #   C: q = [1.0, 1.0]        s =  1.0, r_o = 0.25 (fractional)
    #        CE = -(0.25 log sigma(1) + 0.75 log sigma(-1)) = 0.25*0.313261687 + 0.75*1.313261687 = 1.063261687
    #   mean CE = (0.313261687 + 0.474076984 + 1.063261687) / 3 = 0.616866786
    #   accuracy: A s>0 & 1>0.5 yes; B s<0 & 0<=0.5 yes; C s>0 but 0.25<=0.5 no -> 2/3
    prm = torch.tensor([[-0.5, -1.5], [-2.0, 7.0], [0.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[-2.0, -2.0], [-1.0, 0.0], [-1.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    outcome = torch.tensor([1.0, 0.0, 0.25], dtype=torch.float64)
    loss, metrics = prm_loss(prm, ref, mask, outcome, beta=0.5)
    assert loss.item() == pytest.approx(0.616866786, abs=1e-9)
    means = metric_means(metrics)
    assert means["prm/loss"] == pytest.approx(0.616866786, abs=1e-9)
    assert means["prm/accuracy"] == pytest.approx(2 / 3)
    assert means["prm/sequence_reward"] == pytest.approx((1.0 - 0.5 + 1.0) / 3)
    assert metrics["prm/accuracy"][1].item() == 3  # counted over responses


def test_prm_loss_gradient_hand_example():
    # dL/dq_t = (1/N) * beta * (sigma(s) - r_o) on every valid token, 0 on padding.
    # One response, beta = 0.5, q = [1, 1] -> s = 1, r_o = 0:
    #   dL/d prm_logprob_t = 0.5 * sigma(1) = 0.5 * 0.731058579 = 0.365529289
    prm = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, 5.0]], dtype=torch.float64)
    loss, _ = prm_loss(
        prm, ref, torch.tensor([[1, 1, 0]]), torch.tensor([0.0], dtype=torch.float64), beta=0.5
    )
    loss.backward()
    torch.testing.assert_close(prm.grad, torch.tensor([[0.365529289, 0.365529289, 0.0]], dtype=torch.float64))


@settings(max_examples=50, deadline=None)
@given(prm_batches())
def test_prm_loss_matches_naive(batch):
    prm, ref, mask, outcome, beta = batch
    loss, metrics = prm_loss(prm, ref, mask, outcome, beta)
    expected_loss, expected_accuracy = naive_prm_loss(prm, ref, mask, outcome, beta)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-9, abs=1e-12)
    assert metric_means(metrics)["prm/accuracy"] == pytest.approx(expected_accuracy)


def test_prm_loss_is_stable_for_huge_rewards():
    # s = +-1000 would overflow a naive log(sigmoid): the logsigmoid form gives exact values.
    #   s = -1000, r_o = 1:  CE = -log sigma(-1000) = 1000 (+ e^-1000)
    #   s = +1000, r_o = 1:  CE = log(1 + e^-1000) = 0
    prm = torch.tensor([[-1000.0], [1000.0]], requires_grad=True)
    ref = torch.zeros(2, 1)
    loss, _ = prm_loss(prm, ref, torch.ones(2, 1), torch.tensor([1.0, 1.0]), beta=1.0, loss_normalizer=1.0)
    assert loss.item() == pytest.approx(1000.0)
    loss.backward()
    assert torch.isfinite(prm.grad).all()
    torch.testing.assert_close(prm.grad, torch.tensor([[-1.0], [0.0]]))


def test_prm_loss_micro_batches_add_up_to_global_mean():
    g = torch.Generator().manual_seed(0)
    prm, ref = -torch.rand(6, 5, generator=g), -torch.rand(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) < 0.8
    outcome = torch.rand(6, generator=g)
    full, _ = prm_loss(prm, ref, mask, outcome, beta=0.5)
    parts = [
        prm_loss(prm[s], ref[s], mask[s], outcome[s], beta=0.5, loss_normalizer=6)[0]
        for s in (slice(0, 2), slice(2, 6))
    ]
    torch.testing.assert_close(sum(parts), full)


@settings(max_examples=25, deadline=None)
@given(prm_batches(), st.integers(1, 5))
def test_prm_loss_ignores_padding_length(batch, extra):
    prm, ref, mask, outcome, beta = batch
    pad = lambda x, value: torch.cat(
        [x, torch.full((x.shape[0], extra), value, dtype=x.dtype)], dim=1
    )  # noqa: E731
    loss, metrics = prm_loss(prm, ref, mask, outcome, beta)
    loss_padded, metrics_padded = prm_loss(pad(prm, NAN), pad(ref, 3.0), pad(mask, False), outcome, beta)
    torch.testing.assert_close(loss_padded, loss, rtol=1e-12, atol=1e-12)
    for name in metrics:
        torch.testing.assert_close(metrics_padded[name], metrics[name], rtol=1e-12, atol=1e-12)


def test_prm_loss_rejects_misshaped_outcome():
    with pytest.raises(ValueError, match="outcome"):
        prm_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(3), beta=0.05)
