"""Benchmark the algorithm core: PRIME advantages + losses on a paper-sized batch.

256 prompts x K=4 = 1,024 responses x 3,072 tokens (paper Sec. 2 settings), right-padded to
random lengths. Every time is printed as a ratio to one ``torch.cumsum`` over the same
[responses, tokens] tensor measured in the same run, so numbers compare across machines.

Each row is timed as the trainer runs it: forward-only rows under ``torch.no_grad`` (advantages
are constants of the losses; ``compute_advantages`` runs without autograd), forward + backward
rows on fresh leaf tensors, so no row builds an autograd graph it does not need. Times are the
CPU time of this thread (``time.thread_time``), minimum over the repeats: on a shared machine,
time spent waiting for a core is not work and would only add noise. Every row is timed eagerly
and with the algorithm's kernels fused by ``torch.compile`` (``algorithm.compile_kernels``); the
compile happens in each row's untimed warm-up call.

    python tools/benchmarks/bench_algorithm.py [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_prime.algorithm import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    implicit_process_rewards,
    policy_loss,
    prm_loss,
    rollout_correction_weights,
)
from megatron_prime.algorithm.fusion import set_kernel_fusion


def cpu_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, lazy init
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return min(times)


def make_batch(responses: int, tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(tokens // 8, tokens + 1, (responses,), generator=g)
    mask = torch.arange(tokens)[None, :] < lengths[:, None]
    old = -torch.rand(responses, tokens, generator=g) * 3
    return dict(
        mask=mask,
        prm=old + 0.1 * torch.randn(responses, tokens, generator=g),
        ref=old + 0.1 * torch.randn(responses, tokens, generator=g),
        old=old,
        logprobs=old + 0.05 * torch.randn(responses, tokens, generator=g),
        rollout=old + 0.05 * torch.randn(responses, tokens, generator=g),
        entropy=torch.rand(responses, tokens, generator=g),
        outcome=torch.randint(0, 2, (responses,), generator=g).float(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=3072)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1 = reproducible on a shared box)"
    )
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    b = make_batch(args.responses, args.tokens)
    mask, K = b["mask"], args.group_size
    num_tokens = int(mask.sum())
    beta = 0.05

    def leaf(name: str) -> torch.Tensor:
        # A fresh leaf per call: the shared inputs never require grad, so forward-only rows stay so.
        return b[name].detach().requires_grad_(True)

    def rewards():
        with torch.no_grad():
            return implicit_process_rewards(b["prm"], b["ref"], mask, beta)

    def prm_step():
        prm = leaf("prm")
        loss, _ = prm_loss(prm, b["ref"], mask, b["outcome"], beta)
        loss.backward()

    def advantages(token_rewards=None):
        return compute_advantages(
            "prime_rloo", token_rewards=rewards() if token_rewards is None else token_rewards,
            outcome=b["outcome"], mask=mask, group_size=K,
        )

    fixed_rewards = rewards()
    fixed_advantages = advantages(fixed_rewards)

    def policy_step(all_options: bool, adv=fixed_advantages):
        logprobs, entropy = leaf("logprobs"), leaf("entropy")
        # as the trainer does: the engine-mismatch weights and metrics once per batch, whatever the mode
        with torch.no_grad():
            weights, _, _ = rollout_correction_weights(b["old"], b["rollout"], mask, "token_tis" if all_options else "none")
        options = {}
        if all_options:
            options.update(ref_logprobs=b["ref"], kl_coef=0.01, entropy=entropy, entropy_coef=0.001,
                           correction_weights=weights)
        loss, _ = policy_loss(logprobs, b["old"], adv, mask, loss_normalizer=num_tokens, **options)
        loss.backward()

    def paper_step(all_options: bool):
        def step():
            prm_step()  # the PRM update's forward gives this step's rewards (single forward)
            policy_step(all_options, advantages())

        return step

    rows = [
        ("implicit_process_rewards (Eq. 3)", rewards),
        ("prm_loss fwd+bwd", prm_step),
        ("compute_advantages prime_rloo (Eq. 5, incl. Eq. 3)", advantages),
        ("policy_loss fwd+bwd, paper (PPO clip)", lambda: policy_step(False)),
        ("policy_loss fwd+bwd, + k3 KL + entropy + token TIS", lambda: policy_step(True)),
    ]
    for name in ADVANTAGE_ESTIMATORS:
        for gamma in (1.0, 0.99):

            def estimator(name=name, gamma=gamma):
                return compute_advantages(
                    name, token_rewards=fixed_rewards, outcome=b["outcome"], mask=mask, group_size=K,
                    gamma=gamma,
                )

            rows.append((f"compute_advantages({name!r}, gamma={gamma})", estimator))
    rows.append(("TOTAL paper step: prm_loss + Eq. 3 + Eq. 5 + policy_loss", paper_step(False)))
    rows.append(("TOTAL with every policy_loss option", paper_step(True)))

    x = b["old"]
    cumsum_before = cpu_seconds(lambda: torch.cumsum(x, dim=-1), args.repeats)
    timings = {}
    for fusion in (False, True):
        set_kernel_fusion(fusion)
        timings[fusion] = [cpu_seconds(fn, args.repeats) for _, fn in rows]
    set_kernel_fusion(False)
    # The box may be shared: measure the baseline again after the rows and take the faster.
    cumsum_after = cpu_seconds(lambda: torch.cumsum(x, dim=-1), args.repeats)
    cumsum = min(cumsum_before, cumsum_after)

    print(
        f"bench_algorithm: {args.responses} responses x {args.tokens} tokens, K={K}, "
        f"{num_tokens} valid tokens, float32, {args.threads} thread(s), thread CPU time, min of {args.repeats}"
    )
    print(
        f"  baseline torch.cumsum([{args.responses}, {args.tokens}]): {cumsum * 1e3:.2f} ms = 1.0 "
        f"(before {cumsum_before * 1e3:.2f} ms, after {cumsum_after * 1e3:.2f} ms)"
    )
    print(f"  {'':<58s} {'eager':>20s}   {'fused (torch.compile)':>22s}")
    for (label, _), eager, fused in zip(rows, timings[False], timings[True]):
        print(f"  {label:<58s} {eager * 1e3:8.2f} ms {eager / cumsum:6.1f}x   {fused * 1e3:8.2f} ms {fused / cumsum:6.1f}x")


if __name__ == "__main__":
    main()
