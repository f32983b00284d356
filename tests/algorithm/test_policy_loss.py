"""PPO-clip policy loss with dual-clip, KL, entropy, truncated importance sampling and its metrics."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_prime.algorithm import accumulate_metrics, kl_penalty, metric_means, policy_loss

torch.set_num_threads(1)
NAN = float("nan")
F64 = torch.float64
LOG = math.log


# --- naive reference: one token at a time ------------------------------------------------------
def naive_policy_loss(
    lp,
    old,
    adv,
    mask,
    clip_low,
    clip_high,
    normalizer,
    ref=None,
    kl_coef=0.0,
    kl_estimator="k3",
    entropy=None,
    entropy_coef=0.0,
    weights=None,
    clip_ratio_c=None,
):
    total, clipped_tokens, tokens = 0.0, 0, 0
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not mask[i, t]:
                continue
            tokens += 1
            ratio = math.exp(lp[i, t].item() - old[i, t].item())
            a = adv[i, t].item()
            unclipped = -a * ratio
            clipped = -a * min(max(ratio, 1 - clip_low), 1 + clip_high)
            pg = max(unclipped, clipped)
            clipped_tokens += clipped > unclipped
            if clip_ratio_c is not None and a < 0:
                pg = min(pg, -a * clip_ratio_c)
            if weights is not None:
                pg *= weights[i, t].item()
            if ref is not None and kl_coef:
                log_r = ref[i, t].item() - lp[i, t].item()
                pg += kl_coef * (-log_r if kl_estimator == "k1" else math.exp(log_r) - 1 - log_r)
            if entropy is not None:
                pg -= entropy_coef * entropy[i, t].item()
            total += pg
    return total / normalizer, clipped_tokens / max(tokens, 1)


@st.composite
def loss_batches(draw):
    B, T = draw(st.integers(1, 5)), draw(st.integers(1, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        mask = torch.arange(T)[None, :] < torch.randint(0, T + 1, (B,), generator=g)[:, None]
    else:
        mask = torch.rand(B, T, generator=g) < 0.7
    old = -2 * torch.rand(B, T, generator=g, dtype=F64)
    lp = old + 0.4 * torch.randn(
        B, T, generator=g, dtype=F64
    )  # ratios both inside and outside the clip range
    tensors = dict(
        lp=lp,
        old=old,
        adv=torch.randn(B, T, generator=g, dtype=F64),
        ref=old + 0.3 * torch.randn(B, T, generator=g, dtype=F64),
        entropy=torch.rand(B, T, generator=g, dtype=F64),
        weights=2 * torch.rand(B, T, generator=g, dtype=F64),  # rollout-correction weights
    )
    for x in tensors.values():
        x[~mask] = NAN  # padding garbage must never matter
    options = dict(
        clip_low=draw(st.sampled_from([0.2, 0.1])),
        clip_high=draw(st.sampled_from([0.2, 0.28])),
        kl_coef=draw(st.sampled_from([0.0, 0.1])),
        kl_estimator=draw(st.sampled_from(["k1", "k3"])),
        entropy_coef=draw(st.sampled_from([0.0, 0.01])),
        weighted=draw(st.booleans()),
        clip_ratio_c=draw(st.sampled_from([None, 1.3, 3.0])),
    )
    return tensors, mask, options


def _call(tensors, mask, options, normalizer):
    return policy_loss(
        tensors["lp"],
        tensors["old"],
        tensors["adv"],
        mask,
        options["clip_low"],
        options["clip_high"],
        loss_normalizer=normalizer,
        ref_logprobs=tensors["ref"],
        kl_coef=options["kl_coef"],
        kl_estimator=options["kl_estimator"],
        entropy=tensors["entropy"],
        entropy_coef=options["entropy_coef"],
        correction_weights=tensors["weights"] if options["weighted"] else None,
        clip_ratio_c=options["clip_ratio_c"],
    )


# --- hand examples ------------------------------------------------------------------------------
def test_ppo_clip_hand_example():
    # Four tokens, eps = 0.2 (clip range [0.8, 1.2]), normaliser 4:
    #   rho = 1.5, A = +1: unclipped -1.5, clipped -1.2 -> max = -1.2  (clip active)
    #   rho = 0.5, A = +1: unclipped -0.5, clipped -0.8 -> max = -0.5
    #   rho = 0.5, A = -1: unclipped  0.5, clipped  0.8 -> max =  0.8  (clip active)
    #   rho = 1.5, A = -1: unclipped  1.5, clipped  1.2 -> max =  1.5
    #   loss = (-1.2 - 0.5 + 0.8 + 1.5) / 4 = 0.15, clip fraction 2/4
    # Gradient d loss / d logprob = -A * rho / 4 where unclipped, 0 where clipped:
    #   [0, -0.5/4, 0, 1.5/4] = [0, -0.125, 0, 0.375]
    old = torch.zeros(1, 5, dtype=F64)
    lp = torch.tensor([[LOG(1.5), LOG(0.5), LOG(0.5), LOG(1.5), NAN]], dtype=F64, requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, NAN]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, metrics = policy_loss(lp, old, adv, mask, loss_normalizer=4)
    assert loss.item() == pytest.approx(0.15)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -0.125, 0.0, 0.375, 0.0]], dtype=F64))
    means = metric_means(metrics)
    assert means["policy/clip_frac"] == pytest.approx(0.5)
    assert means["policy/pg_loss"] == pytest.approx(0.15)
    assert means["policy/ratio"] == pytest.approx((1.5 + 0.5 + 0.5 + 1.5) / 4)
    # approx KL(old || new), k3 = (rho - 1) - log rho:
    #   rho = 1.5: 0.5 - 0.405465108 = 0.094534892;  rho = 0.5: -0.5 + 0.693147181 = 0.193147181
    assert means["policy/approx_kl"] == pytest.approx((0.094534892 + 0.193147181) / 2)


def test_asymmetric_clip_hand_example():
    # clip_low = 0.2, clip_high = 0.28 (clip-higher): rho = 1.5, A = +1 -> max(-1.5, -1.28) = -1.28;
    # rho = 0.5, A = -1 -> max(0.5, 0.8) = 0.8.  Loss (-1.28 + 0.8) / 2 = -0.24
    lp = torch.tensor([[LOG(1.5), LOG(0.5)]], dtype=F64)
    loss, _ = policy_loss(
        lp,
        torch.zeros(1, 2, dtype=F64),
        torch.tensor([[1.0, -1.0]], dtype=F64),
        torch.ones(1, 2),
        0.2,
        0.28,
        loss_normalizer=2,
    )
    assert loss.item() == pytest.approx(-0.24)


def test_kl_estimators_hand_example():
    # log pi = -1, log pi_ref = -1.5, log r = log pi_ref - log pi = -0.5
    #   k1 = -log r = 0.5
    #   k3 = (r - 1) - log r = e^-0.5 - 1 + 0.5 = 0.606530660 - 0.5 = 0.106530660
    lp, ref = torch.tensor([-1.0], dtype=F64), torch.tensor([-1.5], dtype=F64)
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.106530660)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(lp, ref, "k2")


def test_kl_and_entropy_terms_hand_example():
    # One token, rho = 1, A = 0 -> PPO term 0.
    # kl_coef = 0.1 with k3 = 0.106530660 -> +0.010653066; entropy 2.0 with coef 0.01 -> -0.02
    # loss = 0.010653066 - 0.02 = -0.009346934
    lp = torch.tensor([[-1.0]], dtype=F64)
    loss, metrics = policy_loss(
        lp,
        lp.clone(),
        torch.zeros(1, 1, dtype=F64),
        torch.ones(1, 1),
        loss_normalizer=1,
        ref_logprobs=torch.tensor([[-1.5]], dtype=F64),
        kl_coef=0.1,
        entropy=torch.tensor([[2.0]], dtype=F64),
        entropy_coef=0.01,
    )
    assert loss.item() == pytest.approx(-0.009346934)
    means = metric_means(metrics)
    assert means["policy/ref_kl"] == pytest.approx(0.106530660)
    assert means["policy/entropy"] == pytest.approx(2.0)


def test_correction_weights_multiply_the_policy_gradient_term_only():
    # rho = 1 (no PPO clipping), A = 1 -> PPO term -1 per token before weighting; weights [2, 0.5]:
    #   loss = (-2 - 0.5) / 2 = -1.25;  d loss / d logprob = -w / 2 = [-1, -0.25]
    # With a k1 KL to a reference (logprob - ref = 0.5 per token, coef 0.1) and an entropy bonus
    # (H = 1, coef 0.2), those terms are not weighted: + 0.1 * 0.5 - 0.2 * 1 per token.
    old = torch.tensor([[-1.0, -1.0]], dtype=F64)
    lp = old.clone().requires_grad_(True)
    weights = torch.tensor([[2.0, 0.5]], dtype=F64)
    loss, _ = policy_loss(lp, old, torch.ones(1, 2, dtype=F64), torch.ones(1, 2), loss_normalizer=2,
                          correction_weights=weights)
    assert loss.item() == pytest.approx(-1.25)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.0, -0.25]], dtype=F64))
    loss, _ = policy_loss(old.clone(), old, torch.ones(1, 2, dtype=F64), torch.ones(1, 2), loss_normalizer=2,
                          correction_weights=weights, ref_logprobs=old - 0.5, kl_coef=0.1, kl_estimator="k1",
                          entropy=torch.ones(1, 2, dtype=F64), entropy_coef=0.2)
    assert loss.item() == pytest.approx(-1.25 + 0.1 * 0.5 - 0.2 * 1.0)


def test_dual_clip_hand_example():
    # clip_ratio_c = 3, eps = 0.2, normaliser 4:
    #   rho = 4,   A = -1: PPO max(4, 1.2) = 4      -> capped at -A * 3 = 3   (dual-clip active)
    #   rho = 2,   A = -1: PPO max(2, 1.2) = 2      -> 2, below the cap 3
    #   rho = 4,   A = +1: PPO max(-4, -1.2) = -1.2 -> unchanged (A > 0)
    #   rho = 0.5, A = -1: PPO max(0.5, 0.8) = 0.8  -> unchanged (below the cap)
    #   loss = (3 + 2 - 1.2 + 0.8) / 4 = 1.15, dual-clip fraction 1/4
    # Gradient d loss / d logprob: capped and clipped tokens 0, rho = 2 token -A * rho / 4 = 0.5
    lp = torch.tensor([[LOG(4.0), LOG(2.0), LOG(4.0), LOG(0.5)]], dtype=F64, requires_grad=True)
    adv = torch.tensor([[-1.0, -1.0, 1.0, -1.0]], dtype=F64)
    loss, metrics = policy_loss(lp, torch.zeros(1, 4, dtype=F64), adv, torch.ones(1, 4), loss_normalizer=4,
                                clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(1.15)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.5, 0.0, 0.0]], dtype=F64))
    assert metric_means(metrics)["policy/dual_clip_frac"] == pytest.approx(0.25)
    # Without dual-clip the first token costs 4: loss (4 + 2 - 1.2 + 0.8) / 4 = 1.4
    plain, plain_metrics = policy_loss(lp, torch.zeros(1, 4, dtype=F64), adv, torch.ones(1, 4), loss_normalizer=4)
    assert plain.item() == pytest.approx(1.4)
    assert "policy/dual_clip_frac" not in plain_metrics


@settings(max_examples=25, deadline=None)
@given(loss_batches(), st.sampled_from([1.3, 3.0]))
def test_dual_clip_leaves_positive_advantages_unchanged(batch, clip_ratio_c):
    # With every advantage >= 0, dual-clip changes neither the loss, nor its gradient, nor a metric
    # (other than its own fraction, which is 0).
    tensors, mask, options = batch
    tensors = dict(tensors, adv=tensors["adv"].abs(), lp=tensors["lp"].clone().requires_grad_(True))
    normalizer = max(int(mask.sum()), 1)
    loss, metrics = _call(tensors, mask, dict(options, clip_ratio_c=None), normalizer)
    (grad,) = torch.autograd.grad(loss, tensors["lp"])
    loss_c, metrics_c = _call(tensors, mask, dict(options, clip_ratio_c=clip_ratio_c), normalizer)
    (grad_c,) = torch.autograd.grad(loss_c, tensors["lp"])
    assert torch.equal(loss_c, loss) and torch.equal(grad_c, grad)
    assert metric_means(metrics_c).pop("policy/dual_clip_frac") == 0
    for name in metrics:
        torch.testing.assert_close(metrics_c[name], metrics[name])


@settings(max_examples=25, deadline=None)
@given(loss_batches(), st.sampled_from([1.3, 3.0]))
def test_dual_clip_caps_negative_advantages_at_c(batch, clip_ratio_c):
    # Per token (PPO part only): with A < 0 the loss is min(PPO-clip loss, -A * c), so it never
    # exceeds -A * c, and a token whose ratio exceeds c gets no gradient; A >= 0 tokens keep their
    # PPO-clip loss and gradient.
    tensors, mask, options = batch
    lp = tensors["lp"].clone().requires_grad_(True)
    adv, old = tensors["adv"], tensors["old"]
    token_loss = []
    for c in (None, clip_ratio_c):
        per_token = []
        for i, t in mask.nonzero().tolist():  # one-token calls: the loss is that token's PPO loss
            loss, _ = policy_loss(lp[i : i + 1, t : t + 1], old[i : i + 1, t : t + 1], adv[i : i + 1, t : t + 1],
                                  torch.ones(1, 1), loss_normalizer=1, clip_ratio_c=c)
            per_token.append(loss)
        token_loss.append(per_token)
    for (i, t), plain, capped in zip(mask.nonzero().tolist(), *token_loss):
        a, ratio = adv[i, t].item(), math.exp(lp[i, t].item() - old[i, t].item())
        (grad_plain,) = torch.autograd.grad(plain, lp)
        (grad_capped,) = torch.autograd.grad(capped, lp)
        if a < 0:
            assert capped.item() == pytest.approx(min(plain.item(), -a * clip_ratio_c), rel=1e-12)
            assert capped.item() <= -a * clip_ratio_c * (1 + 1e-12)
            if ratio > clip_ratio_c:
                assert grad_capped[i, t] == 0 and grad_plain[i, t] != 0
            else:
                assert torch.equal(grad_capped, grad_plain)
        else:
            assert torch.equal(capped, plain) and torch.equal(grad_capped, grad_plain)


# --- random inputs --------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(loss_batches())
def test_policy_loss_matches_naive(batch):
    tensors, mask, options = batch
    normalizer = max(int(mask.sum()), 1)
    loss, metrics = _call(tensors, mask, options, normalizer)
    expected_loss, expected_clip_frac = naive_policy_loss(
        tensors["lp"],
        tensors["old"],
        tensors["adv"],
        mask,
        options["clip_low"],
        options["clip_high"],
        normalizer,
        tensors["ref"],
        options["kl_coef"],
        options["kl_estimator"],
        tensors["entropy"],
        options["entropy_coef"],
        tensors["weights"] if options["weighted"] else None,
        options["clip_ratio_c"],
    )
    assert loss.item() == pytest.approx(expected_loss, rel=1e-9, abs=1e-12)
    assert metric_means(metrics)["policy/clip_frac"] == pytest.approx(expected_clip_frac)
    assert metric_means(metrics)["policy/loss"] == pytest.approx(expected_loss)


@settings(max_examples=25, deadline=None)
@given(loss_batches())
def test_micro_batches_add_up_to_global_token_mean(batch):
    # Two micro-batches with the global normaliser: losses, gradients and metrics add up exactly
    # to the whole batch's (token-mean over the global batch, not a mean of micro-batch means).
    tensors, mask, options = batch
    B = mask.shape[0]
    if B < 2:
        return
    normalizer = max(int(mask.sum()), 1)
    lp = tensors["lp"].clone().requires_grad_(True)
    full_loss, full_metrics = _call(dict(tensors, lp=lp), mask, options, normalizer)
    full_loss.backward()
    full_grad = lp.grad.clone()
    lp.grad = None

    total_loss, total_metrics = 0.0, {}
    for rows in (slice(0, B // 2), slice(B // 2, B)):
        part = {k: v[rows] for k, v in dict(tensors, lp=lp).items()}
        loss, metrics = _call(part, mask[rows], options, normalizer)
        loss.backward()
        total_loss = total_loss + loss.detach()
        accumulate_metrics(total_metrics, metrics)
    torch.testing.assert_close(total_loss, full_loss.detach())
    torch.testing.assert_close(lp.grad, full_grad)
    assert total_metrics.keys() == full_metrics.keys()
    for name in full_metrics:
        torch.testing.assert_close(total_metrics[name], full_metrics[name])


@settings(max_examples=25, deadline=None)
@given(loss_batches(), st.integers(1, 4))
def test_padding_is_inert(batch, extra):
    # Extra padding columns full of NaN change neither the loss nor the metrics, and gradients
    # on padding are exactly zero (no NaN leaks through the masked branches).
    tensors, mask, options = batch
    B = mask.shape[0]
    normalizer = max(int(mask.sum()), 1)
    padded = {k: torch.cat([v, torch.full((B, extra), NAN, dtype=F64)], 1) for k, v in tensors.items()}
    padded["lp"].requires_grad_(True)
    padded["entropy"].requires_grad_(True)
    padded_mask = torch.cat([mask, torch.zeros(B, extra, dtype=torch.bool)], 1)
    loss, metrics = _call(tensors, mask, options, normalizer)
    loss_padded, metrics_padded = _call(padded, padded_mask, options, normalizer)
    torch.testing.assert_close(loss_padded, loss)
    for name in metrics:
        torch.testing.assert_close(metrics_padded[name], metrics[name])
    loss_padded.backward()
    grads = [padded["lp"].grad] + ([padded["entropy"].grad] if options["entropy_coef"] else [])
    for grad in grads:
        assert torch.isfinite(grad).all()
        assert (grad[~padded_mask] == 0).all()


def test_extreme_ratios_stay_finite():
    # A log-ratio of 100 would overflow exp(); the clamp keeps loss and gradients finite.
    lp = torch.tensor([[100.0, -100.0]], requires_grad=True)
    loss, _ = policy_loss(
        lp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), loss_normalizer=2
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()


def test_argument_errors():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_loss(x, x, x, x, loss_normalizer=1, kl_coef=0.1)
    with pytest.raises(ValueError, match="correction_weights shape"):
        policy_loss(x, x, x, x, loss_normalizer=1, correction_weights=torch.ones(1, 3))
    with pytest.raises(ValueError, match="needs entropy"):
        policy_loss(x, x, x, x, loss_normalizer=1, entropy_coef=0.01)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(x, x, torch.zeros(1, 3), x, loss_normalizer=1)
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
            policy_loss(x, x, x, x, loss_normalizer=1, clip_ratio_c=bad)
    with pytest.raises(TypeError):
        policy_loss(x, x, x, x)  # the normaliser is deliberately required


def test_gradients_match_finite_differences():
    # Autograd through every term (PPO, correction weight, k3 KL, entropy) against numerical derivatives.
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(2, 4, generator=g, dtype=F64)
    lp = (old + 0.3 * torch.randn(2, 4, generator=g, dtype=F64)).requires_grad_(True)
    entropy = torch.rand(2, 4, generator=g, dtype=F64).requires_grad_(True)
    adv = torch.randn(2, 4, generator=g, dtype=F64)
    ref = old + 0.2 * torch.randn(2, 4, generator=g, dtype=F64)
    weights = 2 * torch.rand(2, 4, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]])

    def loss_fn(lp, entropy):
        return policy_loss(
            lp,
            old,
            adv,
            mask,
            loss_normalizer=6,
            ref_logprobs=ref,
            kl_coef=0.1,
            entropy=entropy,
            entropy_coef=0.01,
            correction_weights=weights,
        )[0]

    assert torch.autograd.gradcheck(loss_fn, (lp, entropy))
