"""Steps 1-3 of a PRIME step: sample prompts, generate K responses each, verify, and apply the
accuracy filter, resampling until the batch is full; the prompts of surplus passing groups go to
the buffer and are generated afresh, first, at the next step. Global rank 0 samples and decides;
the rollout fleet spreads each round's generation and verification over its engines."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch

from megatron_prime.algorithm import PromptBuffer, filter_groups
from megatron_prime.config import Config
from megatron_prime.data import PromptRow
from megatron_prime.platform import watchdog
from megatron_prime.platform.distributed import broadcast_object, is_rank0, on_rank0
from megatron_prime.rewards import score_batch
from megatron_prime.rollout.base import SamplingParams
from megatron_prime.fleet.fleet import RolloutFleet


@dataclass
class Group:
    """The K responses of one prompt, as plain Python (picklable, checkpointable)."""

    prompt_ids: list[int]
    prompt_text: str
    responses: list[list[int]]
    texts: list[str]
    logprobs: list[list[float]]
    outcomes: list[float]
    truncated: list[bool]
    data_index: int = -1
    # Per token, filled in by the PRIME step for the sample log: the implicit process rewards
    # (None for outcome-only estimators) and the advantages the policy was trained with.
    process_rewards: list[list[float]] | None = None
    advantages: list[list[float]] | None = None
    flipped: list[bool] | None = None  # advantage sign against the outcome term's (algorithm.credit)


@dataclass
class CollectStats:
    rounds: int = 0
    sampled_groups: int = 0
    kept_groups: int = 0
    from_buffer: int = 0  # buffered prompts generated afresh this step
    buffer_size: int = 0  # prompts left in the buffer for later steps
    unfiltered_fill: int = 0
    verify_timeouts: int = 0  # math answers whose grading hit the time limit (scored 0)
    accuracy_sampled: float = 0.0  # mean outcome over everything generated this step
    rollout_s: float = 0.0
    verify_s: float = 0.0
    outcomes_sampled: list = field(default_factory=list)


def round_seed(seed: int, step: int, round_index: int) -> int:
    digest = hashlib.blake2b(f"rollout/{seed}/{step}/{round_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def tokenize_prompts(rows, tokenizer, max_prompt_len: int, render) -> list[tuple[list[int], str]]:
    out = []
    for row in rows:
        text = render(tokenizer, row.prompt)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_len:
            raise ValueError(
                f"prompt of dataset row {row.index} has {len(ids)} tokens > data.max_prompt_len="
                f"{max_prompt_len}; raise data.max_prompt_len or remove the row"
            )
        out.append((ids, text))
    return out


def generate_and_verify(fleet: RolloutFleet, rows, tokenizer, cfg: Config, seed: int, render,
                        stats: CollectStats | None, num_workers: int = 4) -> list[Group] | None:
    """K responses for each of ``rows`` (the same rows on every rank), generated and verified
    shard by shard on the engines; the groups in row order on rank 0 (None elsewhere)."""
    k = cfg.rollout.n

    def generate(engine, part, offset):
        prompts = tokenize_prompts(part, tokenizer, cfg.data.max_prompt_len, render)
        r = cfg.rollout
        sampling = SamplingParams(
            n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=cfg.data.max_response_len,
            stop_token_ids=fleet.end_tokens, seed=seed,
            prompt_offset=offset,  # global prompt index: samples independent of the engine count
        )
        start = time.perf_counter()
        responses = engine.generate([ids for ids, _ in prompts], sampling)
        return prompts, responses, time.perf_counter() - start

    def verify(part, _offset, generated):
        prompts, responses, rollout_s = generated
        start = time.perf_counter()
        items = [(part[i // k].verifier, r.text, part[i // k].ground_truth) for i, r in enumerate(responses)]
        outcomes = score_batch(items, num_workers=num_workers)
        groups = []
        for g, row in enumerate(part):
            rs = responses[g * k:(g + 1) * k]
            groups.append(Group(
                prompt_ids=prompts[g][0],
                prompt_text=prompts[g][1],
                responses=[r.token_ids for r in rs],
                texts=[r.text for r in rs],
                logprobs=[r.logprobs for r in rs],
                outcomes=outcomes[g * k:(g + 1) * k],
                truncated=[r.finish_reason == "length" for r in rs],
                data_index=row.index,
            ))
        return groups, rollout_s, time.perf_counter() - start, outcomes.timeouts

    parts = [p for p in fleet.map_shards(rows, generate, verify) or [] if p is not None]
    if not is_rank0():
        return None
    if stats is not None:  # engines work in parallel: a round takes as long as the slowest
        stats.rollout_s += max(p[1] for p in parts)
        stats.verify_s += max(p[2] for p in parts)
        stats.verify_timeouts += sum(p[3] for p in parts)
    return [group for p in parts for group in p[0]]


def collect_groups(fleet: RolloutFleet, sampler, buffer: PromptBuffer, tokenizer, cfg: Config, step: int,
                   render) -> tuple[list[Group], CollectStats | None]:
    """``cfg.train.prompts_per_step`` groups that pass the accuracy filter, on every rank.

    Each round generates ``prompts_per_step`` prompts with the current policy: the buffered prompts
    first (surplus that passed the filter at an earlier step), then fresh ones from the sampler.
    Rounds repeat until enough groups pass (``train.max_rollout_rounds``). Surplus passing groups
    give their *prompts* back to the buffer, never their responses: a buffered prompt is generated
    afresh by the policy of the step that uses it, so every trained response is on-policy. If the
    rounds run out, the batch is filled with this step's rejected groups (generated by the current
    policy too) and ``filter/unfiltered_fill`` says how many.

    Rank 0 owns the sampler and the buffer and decides; every rank takes part in generation (its
    engine's shard). Stats on rank 0 only."""
    need = cfg.train.prompts_per_step
    a = cfg.algorithm
    rank0 = is_rank0()
    stats = CollectStats() if rank0 else None
    kept: list[tuple[Group, PromptRow]] = []
    rejected: list[Group] = []

    def next_round() -> list[PromptRow]:
        rows = buffer.pop(need)
        stats.from_buffer += len(rows)
        return rows + (sampler.next_batch(need - len(rows)) if len(rows) < need else [])

    rounds = 0
    while True:
        more = rank0 and len(kept) < need and rounds < cfg.train.max_rollout_rounds
        rows = broadcast_object(next_round() if more else None)
        if rows is None:
            break
        watchdog.heartbeat()
        groups = generate_and_verify(fleet, rows, tokenizer, cfg, round_seed(cfg.train.seed, step, rounds),
                                     render, stats)
        rounds += 1
        if not rank0:
            continue
        stats.rounds = rounds
        outcome = torch.tensor([o for g in groups for o in g.outcomes])
        truncated = torch.tensor([t for g in groups for t in g.truncated]) if a.filter_truncated else None
        keep = filter_groups(outcome, cfg.rollout.n, a.filter_low, a.filter_high, truncated)
        stats.sampled_groups += len(groups)
        stats.outcomes_sampled += outcome.tolist()
        for group, row, ok in zip(groups, rows, keep.tolist()):
            if ok:
                kept.append((group, row))
            else:
                rejected.append(group)
        stats.kept_groups += int(keep.sum())

    def finish() -> list[Group]:
        buffer.push(row for _, row in kept[need:])
        batch = [group for group, _ in kept[:need]]
        if len(batch) < need:
            # Too few prompts in the filter band after max_rollout_rounds: fill with the latest
            # rejected groups so the step can run, and say so in the metrics.
            fill = rejected[max(0, len(rejected) - (need - len(batch))):]
            stats.unfiltered_fill = len(fill)
            batch += fill  # every round has `need` prompts, so this always fills the batch
        stats.buffer_size = len(buffer)
        stats.accuracy_sampled = sum(stats.outcomes_sampled) / max(1, len(stats.outcomes_sampled))
        return batch

    return broadcast_object(on_rank0(finish)), stats
