"""The single-pass losses and estimators against their direct autograd formulation.

``policy_loss`` and ``prm_loss`` compute each token's derivative in the same pass as the loss
(``attach_gradient``) and the estimators work in place; the references below are the plain
formulation they replaced (an autograd graph through ``torch.where``/``maximum``/``clamp``, fresh
tensors everywhere). Losses, gradients, metrics and advantages must agree within 1e-6 in float32
on paper-like data: long right-padded responses, ratios inside and outside the clip range,
log-ratios beyond the +-20 clamp, NaN in padding.
"""


import pytest
import torch

from megatron_prime.algorithm import (
    compute_advantages,
    masked_whiten,
    metric_means,
    policy_loss,
    prm_loss,
)

torch.set_num_threads(1)
NAN = float("nan")
TOL = dict(rtol=1e-6, atol=1e-6)
MAX_LOG_RATIO = 20.0


def zero(x, valid):
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype))


def reference_policy_loss(lp, old, adv, valid, clip_low=0.2, clip_high=0.2, *, clip_ratio_c=None, ref=None,
                          kl_coef=0.0, kl_estimator="k3", entropy=None, entropy_coef=0.0, weights=None):
    lp, old, adv = zero(lp, valid), zero(old.detach(), valid), zero(adv.detach(), valid)
    log_ratio = (lp - old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(unclipped, clipped)
    sums = {"policy/clip_frac": (clipped > unclipped).sum()}
    if clip_ratio_c is not None:
        cap = -adv * clip_ratio_c
        capped = (adv < 0) & (pg > cap)
        sums["policy/dual_clip_frac"] = capped.sum()
        pg = torch.where(capped, cap, pg)
    if weights is not None:
        pg = pg * zero(weights, valid)
    token_loss = pg
    if ref is not None:
        x = zero(ref, valid) - lp
        kl = -x if kl_estimator == "k1" else torch.expm1(x.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)) - x.clamp(
            -MAX_LOG_RATIO, MAX_LOG_RATIO)
        token_loss = token_loss + kl_coef * kl
        sums["policy/ref_kl"] = kl.sum()
    if entropy is not None:
        entropy = zero(entropy, valid)
        token_loss = token_loss - entropy_coef * entropy
        sums["policy/entropy"] = entropy.sum()
    loss = token_loss.sum()
    sums.update({
        "policy/loss": loss, "policy/pg_loss": pg.sum(), "policy/approx_kl": ((ratio - 1) - log_ratio).sum(),
        "policy/ratio": (ratio - 1).sum() + valid.sum(),
    })
    n = valid.sum()
    return loss, {k: (v / n).item() for k, v in sums.items()}


def reference_prm_loss(prm, ref, valid, outcome, beta):
    s = zero(beta * (prm - ref), valid).sum(-1)
    ce = -(outcome * torch.nn.functional.logsigmoid(s) + (1 - outcome) * torch.nn.functional.logsigmoid(-s))
    return ce.sum()


def reference_prime_rloo(r, outcome, valid, K):
    r = zero(r, valid)
    lengths = valid.sum(-1).clamp(min=1)
    means = (r.sum(-1, dtype=torch.float64) / lengths).view(-1, K)
    baseline = ((means.sum(1, keepdim=True) - means) / (K - 1)).view(-1).float()
    shaped = zero(r - baseline[:, None], valid)
    process = shaped.flip(-1).cumsum(-1).flip(-1)
    grouped = outcome.double().view(-1, K)
    outcome_term = (grouped - (grouped.sum(1, keepdim=True) - grouped) / (K - 1)).view(-1).float()
    return zero(process + outcome_term[:, None], valid)


def reference_whiten(x, valid):
    n = valid.sum()
    mean = (zero(x, valid).sum(dtype=torch.float64) / n).float()
    var = (zero((x - mean) ** 2, valid).sum(dtype=torch.float64) / (n - 1)).float()
    return zero((x - mean) * torch.rsqrt(var + 1e-8), valid)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    B, T = 64, 700
    lengths = torch.randint(T // 8, T + 1, (B,), generator=g)
    valid = torch.arange(T)[None, :] < lengths[:, None]
    old = -3 * torch.rand(B, T, generator=g)
    lp = old + 0.3 * torch.randn(B, T, generator=g)  # a good share of ratios outside [0.8, 1.2]
    lp[0, :4] = old[0, :4] + torch.tensor([25.0, -25.0, 20.0, -20.0])  # beyond and on the clamp
    b = dict(
        valid=valid, old=old, lp=lp, adv=torch.randn(B, T, generator=g),
        weights=2 * torch.rand(B, T, generator=g), ref=old + 0.2 * torch.randn(B, T, generator=g),
        entropy=torch.rand(B, T, generator=g), prm=old + 0.1 * torch.randn(B, T, generator=g),
        outcome=torch.randint(0, 2, (B,), generator=g).float(),
    )
    b["ref"][1, :2] = b["lp"][1, :2] + torch.tensor([30.0, -30.0])  # KL log-ratios beyond the clamp
    for name in ("old", "lp", "adv", "weights", "ref", "entropy", "prm"):
        b[name][~valid] = NAN
    return b


OPTIONS = [
    dict(),
    dict(weights=True),
    dict(clip_ratio_c=3.0, weights=True),
    dict(clip_low=0.1, clip_high=0.28, ref=True, kl_coef=0.1, kl_estimator="k3"),
    dict(ref=True, kl_coef=0.05, kl_estimator="k1", entropy=True, entropy_coef=0.01),
    dict(clip_ratio_c=1.5, weights=True, ref=True, kl_coef=0.1, entropy=True, entropy_coef=0.01),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "paper")
def test_policy_loss_matches_the_autograd_formulation(batch, options):
    b = batch
    kwargs = {k: v for k, v in options.items() if k not in ("weights", "ref", "entropy")}
    results = []
    for fn in (policy_loss, reference_policy_loss):
        lp = b["lp"].clone().requires_grad_(True)
        entropy = b["entropy"].clone().requires_grad_(True)
        extra = dict(kwargs)
        extra.update({k: (entropy if k == "entropy" else b[k]) for k in ("weights", "ref", "entropy") if k in options})
        if fn is policy_loss:
            extra = {({"weights": "correction_weights", "ref": "ref_logprobs"}.get(k, k)): v for k, v in extra.items()}
            loss, metrics = fn(lp, b["old"], b["adv"], b["valid"], loss_normalizer=1.0, **extra)
            metrics = metric_means(metrics)
        else:
            loss, metrics = fn(lp, b["old"], b["adv"], b["valid"], **extra)
        loss.backward()
        results.append((loss.detach(), lp.grad, entropy.grad, metrics))
    (loss, grad, entropy_grad, metrics), (ref_loss, ref_grad, ref_entropy_grad, ref_metrics) = results
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    assert (grad[~b["valid"]] == 0).all() and torch.isfinite(grad).all()
    if ref_entropy_grad is None:
        assert entropy_grad is None
    else:
        torch.testing.assert_close(entropy_grad, ref_entropy_grad, **TOL)
    assert metrics.keys() == ref_metrics.keys()
    for name in metrics:
        assert metrics[name] == pytest.approx(ref_metrics[name], rel=1e-6, abs=1e-6), name
    # the log-ratios beyond the clamp got no gradient (k1's KL term has no clamp)
    if options.get("kl_estimator") != "k1":
        assert (grad[0, :2] == 0).all()


def test_prm_loss_matches_the_autograd_formulation(batch):
    b = batch
    grads = []
    for fn in (lambda p: prm_loss(p, b["ref"], b["valid"], b["outcome"], 0.05, loss_normalizer=1.0)[0],
               lambda p: reference_prm_loss(p, b["ref"], b["valid"], b["outcome"], 0.05)):
        prm = b["prm"].clone().requires_grad_(True)
        loss = fn(prm)
        loss.backward()
        grads.append((loss.detach(), prm.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], **TOL)
    torch.testing.assert_close(grads[0][1], grads[1][1], **TOL)


def test_prime_rloo_and_whitening_match_the_plain_formulation(batch):
    b = batch
    rewards = 0.05 * (b["prm"] - b["ref"])
    adv = compute_advantages("prime_rloo", token_rewards=rewards, outcome=b["outcome"], mask=b["valid"], group_size=4)
    expected = reference_prime_rloo(rewards, b["outcome"], b["valid"], 4)
    torch.testing.assert_close(adv, expected, **TOL)
    torch.testing.assert_close(masked_whiten(expected, b["valid"]), reference_whiten(expected, b["valid"]), **TOL)
