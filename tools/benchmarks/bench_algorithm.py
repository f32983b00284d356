"""Benchmark the algorithm core: PRIME advantages + losses on a paper-sized batch.

256 prompts x K=4 = 1,024 responses x 3,072 tokens (paper Sec. 2 settings), right-padded to
random lengths. Every time is printed as a ratio to one ``torch.cumsum`` over the same
[responses, tokens] tensor measured in the same run, so numbers compare across machines.

    python tools/benchmarks/bench_algorithm.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_prime.algorithm import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    implicit_process_rewards,
    policy_loss,
    prime_rloo_advantages,
    prm_loss,
)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, lazy init
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
        values=torch.randn(responses, tokens, generator=g),
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
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    b = make_batch(args.responses, args.tokens)
    mask, K = b["mask"], args.group_size
    num_tokens = int(mask.sum())
    beta = 0.05

    def step_rewards():
        return implicit_process_rewards(b["prm"], b["ref"], mask, beta)

    def step_prm_loss():
        prm = b["prm"].requires_grad_(True)
        loss, _ = prm_loss(prm, b["ref"], mask, b["outcome"], beta)
        loss.backward()
        prm.grad = None

    def step_advantages():
        return prime_rloo_advantages(step_rewards(), b["outcome"], mask, K)

    advantages = step_advantages()

    def policy_step(all_options: bool):
        def step():
            logprobs = b["logprobs"].requires_grad_(True)
            entropy = b["entropy"].requires_grad_(True)
            options = dict(rollout_logprobs=b["rollout"])  # mismatch metrics are always on
            if all_options:
                options.update(
                    ref_logprobs=b["ref"], kl_coef=0.01, entropy=entropy, entropy_coef=0.001, tis_cap=2.0
                )
            loss, _ = policy_loss(logprobs, b["old"], advantages, mask, loss_normalizer=num_tokens, **options)
            loss.backward()
            logprobs.grad = entropy.grad = None

        return step

    def prime_step(all_options: bool):
        policy = policy_step(all_options)

        def step():
            step_prm_loss()
            step_advantages()
            policy()

        return step

    x = b["old"]
    cumsum_before = median_seconds(lambda: torch.cumsum(x, dim=-1), args.repeats)

    rows = [
        ("implicit_process_rewards (Eq. 3)", step_rewards),
        ("prm_loss fwd+bwd", step_prm_loss),
        ("prime_rloo_advantages (Eq. 5, incl. Eq. 3)", step_advantages),
        ("policy_loss fwd+bwd, paper (PPO clip)", policy_step(False)),
        ("policy_loss fwd+bwd, + k3 KL + entropy + TIS", policy_step(True)),
    ]
    for name in ADVANTAGE_ESTIMATORS:
        for gamma in (1.0, 0.99):

            def estimator(name=name, gamma=gamma):
                return compute_advantages(
                    name,
                    token_rewards=advantages,
                    outcome=b["outcome"],
                    mask=mask,
                    group_size=K,
                    gamma=gamma,
                    lam=0.95,
                    values=b["values"],
                )

            rows.append((f"compute_advantages({name!r}, gamma={gamma})", estimator))
    rows.append(("TOTAL paper step: prm_loss + prime_rloo + policy_loss", prime_step(False)))
    rows.append(("TOTAL with every policy_loss option", prime_step(True)))
    timings = [(label, median_seconds(fn, args.repeats)) for label, fn in rows]

    # The box may be shared: measure the baseline again after the rows and use the mean.
    cumsum_after = median_seconds(lambda: torch.cumsum(x, dim=-1), args.repeats)
    cumsum = (cumsum_before + cumsum_after) / 2

    print(
        f"bench_algorithm: {args.responses} responses x {args.tokens} tokens, K={K}, "
        f"{num_tokens} valid tokens, float32, {args.threads} thread(s), median of {args.repeats}"
    )
    print(
        f"  baseline torch.cumsum([{args.responses}, {args.tokens}]): {cumsum * 1e3:.2f} ms = 1.0 "
        f"(before {cumsum_before * 1e3:.2f} ms, after {cumsum_after * 1e3:.2f} ms)"
    )
    for label, seconds in timings:
        print(f"  {label:<54s} {seconds * 1e3:8.2f} ms  {seconds / cumsum:6.1f}x cumsum")


if __name__ == "__main__":
    main()
