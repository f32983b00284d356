"""Generate and grade responses to prompt rows on rollout engines: greedy accuracy of the trainer's
fleet (``fleet_greedy_accuracy``), and the graded samples ``megatron-prime eval`` and ``score``
build their reports from (``fleet_graded_responses``). Each engine takes a contiguous shard."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_prime.platform.distributed import broadcast_object
from megatron_prime.rewards import score_batch
from megatron_prime.rollout.base import Response, SamplingParams
from megatron_prime.fleet.collect import tokenize_prompts
from megatron_prime.fleet.fleet import RolloutFleet


@dataclass
class GradedResponse:
    prompt_ids: list[int]
    prompt_text: str
    response: Response
    score: float  # the row's verifier: math 0/1, code the fraction of tests passed


def sampling_params(fleet: RolloutFleet, *, n: int, temperature: float, max_new_tokens: int,
                    seed: int | None = None, top_p: float = 1.0, top_k: int = -1) -> SamplingParams:
    """Sampling on ``fleet``'s engines, which stop at the model's end tokens."""
    return SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                          stop_token_ids=fleet.end_tokens, seed=seed)


def scores(rows, responses, n: int = 1) -> list[float]:
    """The verifier's score of each response; responses are prompt-major, ``n`` per row."""
    return score_batch([(rows[i // n].verifier, r.text, rows[i // n].ground_truth) for i, r in enumerate(responses)])


def fleet_graded_responses(fleet: RolloutFleet, rows, tokenizer, render, sampling: SamplingParams, *,
                           max_prompt_len: int, prompt_offset: int = 0) -> list[list[GradedResponse]] | None:
    """``sampling.n`` graded responses for each of ``rows``, generated on the fleet's engines and
    graded by each engine's leader; on global rank 0 (None elsewhere). ``rows`` must be the same
    on every rank. ``prompt_offset`` is the first row's index in the whole set: per-sample seeds
    follow it, so a set generated in chunks samples what it would have sampled in one piece."""
    n = sampling.n

    def generate(engine, part, offset):
        prompts = tokenize_prompts(part, tokenizer, max_prompt_len, render)
        params = dataclasses.replace(sampling, prompt_offset=prompt_offset + offset)
        return prompts, engine.generate([ids for ids, _ in prompts], params)

    def grade(part, _offset, generated):
        prompts, responses = generated
        values = scores(part, responses, n)
        return [[GradedResponse(prompts[g][0], prompts[g][1], responses[g * n + j], values[g * n + j])
                 for j in range(n)] for g in range(len(part))]

    parts = fleet.map_shards(rows, generate, grade)
    return None if parts is None else [group for p in parts if p is not None for group in p]


def fleet_greedy_accuracy(fleet: RolloutFleet, rows, tokenizer, render, *, max_prompt_len: int,
                          max_new_tokens: int) -> float:
    """``greedy_accuracy`` with the rows spread over the fleet's engines; the same value on every
    rank. ``rows`` must be the same on every rank."""
    if not rows:
        return float("nan")
    sampling = sampling_params(fleet, n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    groups = fleet_graded_responses(fleet, rows, tokenizer, render, sampling, max_prompt_len=max_prompt_len)
    values = None if groups is None else [g[0].score for g in groups]
    return broadcast_object(None if values is None else sum(values) / len(values))
