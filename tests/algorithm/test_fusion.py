"""``algorithm.compile_kernels``: the torch.compile'd kernels give the eager results (per-token
values within 1e-6 in float32) for every kernel the trainer runs, with NaN-filled padding, an
empty response, and a second batch shape (dynamic shapes: no recompile per step)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from megatron_prime.algorithm import compute_advantages, implicit_process_rewards, policy_loss, prm_loss
from megatron_prime.algorithm.fusion import kernel_fusion_enabled, set_kernel_fusion
from tests.helpers import requires_cpp_compiler

K = 4


def batch(rows: int, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, tokens + 1, (rows,), generator=g)
    lengths[1] = 0  # an empty response
    lengths[2] = tokens
    mask = torch.arange(tokens)[None, :] < lengths[:, None]
    mask[2, 5:9] = False  # a response with masked positions inside it
    old = -torch.rand(rows, tokens, generator=g) * 3

    def near_old(scale: float) -> torch.Tensor:
        return torch.where(mask, old + scale * torch.randn(rows, tokens, generator=g), torch.nan)

    return dict(
        mask=mask, old=old, prm=near_old(0.3), ref=near_old(0.3), logprobs=near_old(0.3),
        weights=torch.where(mask, 2 * torch.rand(rows, tokens, generator=g), torch.nan),
        outcome=torch.randint(0, 2, (rows,), generator=g).float(),
    )


def run_all(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every fused kernel's public caller, with the gradients of both losses."""
    out = {}
    out["rewards"] = implicit_process_rewards(b["prm"], b["ref"], b["mask"], 0.5)
    prm = b["prm"].clone().requires_grad_(True)
    loss, metrics = prm_loss(prm, b["ref"], b["mask"], b["outcome"], 0.5)
    loss.backward()
    out.update(prm_loss=loss.detach(), prm_grad=prm.grad, **{k: v[0] for k, v in metrics.items()})
    for estimator in ("prime_rloo", "prime_rloo_k_scaled", "prime_official"):
        for gamma in (1.0, 0.99):
            out[f"{estimator}@{gamma}"] = compute_advantages(
                estimator, token_rewards=out["rewards"], outcome=b["outcome"], mask=b["mask"], group_size=K,
                gamma=gamma, process_coef=0.7, outcome_coef=1.3,
            )
    out["prime_rloo whitened"] = compute_advantages("prime_rloo", token_rewards=out["rewards"], outcome=b["outcome"],
                                                    mask=b["mask"], group_size=K, whiten=True)
    advantages = out["prime_rloo@1.0"]
    for name, options in {
        "ppo": {},
        "dual_clip_weighted": dict(clip_ratio_c=3.0, correction_weights=b["weights"]),
    }.items():
        logprobs = b["logprobs"].clone().requires_grad_(True)
        loss, metrics = policy_loss(logprobs, b["old"], advantages, b["mask"], 0.2, 0.28,
                                    loss_normalizer=int(b["mask"].sum()), **options)
        loss.backward()
        out.update({f"{name}/loss": loss.detach(), f"{name}/grad": logprobs.grad})
        out.update({f"{name}/{k}": v[0] for k, v in metrics.items()})
    return out


@pytest.fixture
def fusion():
    yield set_kernel_fusion
    set_kernel_fusion(False)


@requires_cpp_compiler
def test_compiled_kernels_equal_eager(fusion):
    assert not kernel_fusion_enabled()  # the default: eager
    torch._dynamo.reset()
    counters.clear()
    compiled_graphs = []
    for rows, tokens, seed in ((40, 130, 0), (48, 161, 1)):  # both above inductor's small-tensor size class
        b = batch(rows, tokens, seed)
        fusion(False)
        eager = run_all(b)
        fusion(True)
        fused = run_all(b)
        compiled_graphs.append(counters["stats"]["unique_graphs"])
        assert eager.keys() == fused.keys()
        for key in eager:
            # Per-token tensors: within 1e-6. Sums (losses, metrics) are reduced in another order
            # (inductor's cascade sums), so they agree to float32 rounding of that order.
            tolerance = 1e-6 if eager[key].dim() else 1e-5
            torch.testing.assert_close(fused[key], eager[key], rtol=tolerance, atol=tolerance, msg=key)
            assert not fused[key].isnan().any(), key
    assert compiled_graphs[0] > 0 and compiled_graphs[1] == compiled_graphs[0]  # the new shape compiled nothing
