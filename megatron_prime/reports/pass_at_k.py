"""Sampled-accuracy metrics of a benchmark run."""

from __future__ import annotations

from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021, Eq. 1):
    1 - C(n - c, k) / C(n, k), the chance that k of the n samples drawn without replacement
    contain a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def powers_of_two_through(n: int) -> list[int]:
    """1, 2, 4, ... below ``n``, then ``n`` itself: the k of pass@k reported for n samples per prompt,
    and the N of best-of-N for n candidates."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return out + [n]
