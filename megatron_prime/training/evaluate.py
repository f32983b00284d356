"""Greedy accuracy of rollout engines' current weights on prompt rows: one engine (the ``eval``
command), or the trainer's whole rollout fleet, each engine taking a shard of the rows."""

from __future__ import annotations

from megatron_prime.platform.distributed import broadcast_object
from megatron_prime.rewards import score_batch
from megatron_prime.rollout.base import SamplingParams
from megatron_prime.training.rollout_collect import stop_token_ids, tokenize_prompts
from megatron_prime.training.rollout_fleet import RolloutFleet


def greedy_responses(engine, rows, tokenizer, render, *, max_prompt_len: int, max_new_tokens: int):
    prompts = tokenize_prompts(rows, tokenizer, max_prompt_len, render)
    sampling = SamplingParams(
        n=1, temperature=0.0, max_new_tokens=max_new_tokens,
        stop_token_ids=stop_token_ids(tokenizer),
    )
    return engine.generate([ids for ids, _ in prompts], sampling)


def scores(rows, responses) -> list[float]:
    return score_batch([(row.verifier, r.text, row.ground_truth) for row, r in zip(rows, responses)])


def greedy_accuracy(engine, rows, tokenizer, render, *, max_prompt_len: int, max_new_tokens: int) -> float:
    """Fraction of ``rows`` whose greedy response the row's verifier accepts (mean reward)."""
    if not rows:
        return float("nan")
    responses = greedy_responses(engine, rows, tokenizer, render, max_prompt_len=max_prompt_len,
                                 max_new_tokens=max_new_tokens)
    values = scores(rows, responses)
    return sum(values) / len(values)


def fleet_greedy_accuracy(fleet: RolloutFleet, rows, tokenizer, render, *, max_prompt_len: int,
                          max_new_tokens: int) -> float:
    """``greedy_accuracy`` with the rows spread over the fleet's engines; the same value on every
    rank. ``rows`` must be the same on every rank."""
    if not rows:
        return float("nan")
    parts = fleet.map_shards(
        rows,
        lambda engine, part, _offset: greedy_responses(engine, part, tokenizer, render,
                                                       max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens),
        lambda part, _offset, responses: scores(part, responses),
    )
    values = None if parts is None else [v for p in parts if p is not None for v in p]
    return broadcast_object(None if values is None else sum(values) / len(values))
