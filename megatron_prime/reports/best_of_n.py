"""Best-of-N with a reward model, against the usual baselines.

For each prompt with M graded responses and each N <= M, a strategy picks one response out of N;
its accuracy is the expected correctness of the pick over the N-subsets of the M responses (all of
them when there are at most ``max_subsets``, else that many drawn at random, seeded):

  prm       the response with the highest reward (ties: the mean over the tied ones)
  majority  a response carrying the most common final answer (ties: the mean over the tied answers;
            responses without an answer do not vote unless none has one)
  random    any response (the mean correctness of the N)
  oracle    a correct response if there is one (pass@N)
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from megatron_prime.reports.pass_at_k import powers_of_two_through

STRATEGIES = ("prm", "majority", "random", "oracle")


@dataclass(frozen=True)
class Candidate:
    correct: bool
    reward: float  # the reward model's score of the whole response
    answer: str | None  # the final answer majority voting compares (None: no answer found)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def pick_by_reward(cands: list[Candidate]) -> float:
    best = max(c.reward for c in cands)
    return _mean(c.correct for c in cands if c.reward == best)


def pick_by_majority(cands: list[Candidate]) -> float:
    voters = [c for c in cands if c.answer is not None] or cands
    votes: dict = {}
    for c in voters:
        votes.setdefault(c.answer, []).append(c.correct)
    most = max(len(v) for v in votes.values())
    return _mean(_mean(v) for v in votes.values() if len(v) == most)


def pick_at_random(cands: list[Candidate]) -> float:
    return _mean(c.correct for c in cands)


def pick_oracle(cands: list[Candidate]) -> float:
    return float(any(c.correct for c in cands))


PICKS = {"prm": pick_by_reward, "majority": pick_by_majority, "random": pick_at_random, "oracle": pick_oracle}


def subsets(m: int, n: int, max_subsets: int, rng: random.Random) -> list[tuple[int, ...]]:
    """Every n-subset of range(m) when there are at most ``max_subsets``, else that many distinct
    ones drawn uniformly."""
    if math.comb(m, n) <= max_subsets:
        return list(itertools.combinations(range(m), n))
    drawn: set[tuple[int, ...]] = set()
    while len(drawn) < max_subsets:
        drawn.add(tuple(sorted(rng.sample(range(m), n))))
    return sorted(drawn)


def per_prompt_accuracy(prompts: list[list[Candidate]], n: int, max_subsets: int = 256,
                        seed: int = 0) -> dict[str, list[float]]:
    """Each strategy's expected accuracy on each prompt when choosing among ``n`` responses."""
    rng = random.Random(seed)
    out: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    for cands in prompts:
        chosen = subsets(len(cands), n, max_subsets, rng)
        for name, pick in PICKS.items():
            out[name].append(_mean(pick([cands[i] for i in s]) for s in chosen))
    return out


def best_of_n_curve(prompts: list[list[Candidate]], max_subsets: int = 256, seed: int = 0) -> dict[int, dict[str, float]]:
    """{N: {strategy: accuracy over prompts}} for N = 1, 2, 4, ... up to the responses per prompt."""
    m = min(len(c) for c in prompts)
    return {n: {s: _mean(v) for s, v in per_prompt_accuracy(prompts, n, max_subsets, seed).items()}
            for n in powers_of_two_through(m)}


def verdict(prompts: list[list[Candidate]], n: int, max_subsets: int = 256, seed: int = 0) -> tuple[str, float, float]:
    """Is best-of-``n`` by reward better than random choice? (sentence, mean difference, its
    standard error over prompts). Better or worse only when the difference is more than two
    standard errors from zero."""
    acc = per_prompt_accuracy(prompts, n, max_subsets, seed)
    diffs = [a - b for a, b in zip(acc["prm"], acc["random"])]
    mean = _mean(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1)
    se = math.sqrt(var / len(diffs))
    if mean - 2 * se > 0:
        word = "better than"
    elif mean + 2 * se < 0:
        word = "worse than"
    else:
        word = "no better than"
    return (f"best-of-{n} by PRM score is {word} random choice: {100 * mean:+.1f} points "
            f"(± {200 * se:.1f} at 2 standard errors, {len(diffs)} prompts)"), mean, se


def pairwise_accuracy(prompts: list[list[Candidate]]) -> tuple[float, int]:
    """How often a correct response outscores an incorrect one of the same prompt (ties count
    half), and over how many such pairs; NaN when there are none."""
    wins, pairs = 0.0, 0
    for cands in prompts:
        for good in (c for c in cands if c.correct):
            for bad in (c for c in cands if not c.correct):
                pairs += 1
                wins += 1.0 if good.reward > bad.reward else 0.5 if good.reward == bad.reward else 0.0
    return (wins / pairs if pairs else float("nan")), pairs
