"""Greedy accuracy of the rollout engine's current weights on prompt rows (rank 0)."""

from __future__ import annotations

from megatron_prime.rewards import score_batch
from megatron_prime.rollout.base import SamplingParams
from megatron_prime.training.rollout_collect import tokenize_prompts


def greedy_accuracy(engine, rows, tokenizer, render, *, max_prompt_len: int, max_new_tokens: int) -> float:
    """Fraction of ``rows`` whose greedy response the row's verifier accepts (mean reward)."""
    if not rows:
        return float("nan")
    prompts = tokenize_prompts(rows, tokenizer, max_prompt_len, render)
    sampling = SamplingParams(
        n=1, temperature=0.0, max_new_tokens=max_new_tokens,
        stop_token_ids=tuple(t for t in [tokenizer.eos_token_id] if t is not None),
    )
    responses = engine.generate([ids for ids, _ in prompts], sampling)
    scores = score_batch([(row.verifier, r.text, row.ground_truth) for row, r in zip(rows, responses)])
    return sum(scores) / len(scores)
