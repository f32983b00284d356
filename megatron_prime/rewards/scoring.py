"""Public grading entry points: ``grade_math`` (hard time limit) and ``score_batch``."""

from __future__ import annotations

import atexit
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from megatron_prime.rewards.code_grader import DEFAULT_TIMEOUT_S as DEFAULT_CODE_TIMEOUT_S
from megatron_prime.rewards.code_grader import grade_code
from megatron_prime.rewards.math_pool import DEFAULT_MATH_TIMEOUT_S, MathGraderPool
from megatron_prime.rewards.registry import BUILTIN_VERIFIERS, custom_verifier, known_verifiers

_pool: MathGraderPool | None = None
_pool_lock = threading.Lock()


def shared_math_pool(num_workers: int | None = None) -> MathGraderPool:
    """The process-wide math worker pool (started on first use, closed at exit). Workers take
    ~1 s to start, so the pool outlives single calls; ``num_workers`` resizes it."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = MathGraderPool(num_workers or 1)
            atexit.register(close_shared_pool)
        elif num_workers is not None and num_workers != _pool.num_workers:
            _pool.resize(num_workers)
        return _pool


def close_shared_pool() -> None:
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


def grade_math(response: str, ground_truth: str, timeout_s: float = DEFAULT_MATH_TIMEOUT_S) -> float:
    """1.0 if the final answer of ``response`` (last \\boxed{...}, else "The answer is ...") is
    equivalent to ``ground_truth`` according to math-verify, else 0.0. Runs in a worker process
    that is killed after ``timeout_s`` (score 0), so it cannot hang the caller."""
    return shared_math_pool().grade([(response, ground_truth)], timeout_s)[0]


class Scores(list):
    """Outcome rewards in item order, plus ``timeouts``: how many math answers hit the hard time
    limit and scored 0 (label noise for the PRM, worth watching)."""

    timeouts: int = 0


def score_batch(
    items: Sequence[tuple[str, str, str]],
    num_workers: int = 4,
    *,
    math_timeout_s: float = DEFAULT_MATH_TIMEOUT_S,
    code_timeout_s: float = DEFAULT_CODE_TIMEOUT_S,
    unsafe_code: bool | None = None,
) -> Scores:
    """Outcome rewards for ``(verifier_name, response, ground_truth)`` items, in order.

    Math answers are graded by ``num_workers`` worker processes with a hard limit each; code
    (and custom verifiers) by ``num_workers`` threads, each driving its own sandbox process.
    Both kinds run at the same time. For code, ``ground_truth`` is the test-case JSON and
    ``code_timeout_s`` the limit per test case.
    """
    names = {name for name, _, _ in items}
    unknown = names - set(known_verifiers())
    if unknown:
        raise ValueError(f"unknown verifier(s) {sorted(unknown)}; known: {known_verifiers()}")
    scores = Scores([0.0] * len(items))
    math_idx = [i for i, (name, _, _) in enumerate(items) if name == "math"]
    other_idx = [i for i, (name, _, _) in enumerate(items) if name != "math"]

    def grade_other(i: int) -> float:
        name, response, ground_truth = items[i]
        if name == "code":
            return grade_code(response, ground_truth, code_timeout_s, unsafe=unsafe_code)
        assert name not in BUILTIN_VERIFIERS
        return float(custom_verifier(name)(response, ground_truth))

    with ThreadPoolExecutor(max_workers=num_workers) as threads:
        futures = {i: threads.submit(grade_other, i) for i in other_idx}
        if math_idx:
            pool = shared_math_pool(num_workers)
            math_scores = pool.grade([items[i][1:] for i in math_idx], math_timeout_s)
            for i, score in zip(math_idx, math_scores):
                scores[i] = score
            scores.timeouts = pool.last_timeouts
        for i, future in futures.items():
            scores[i] = future.result()
    return scores
