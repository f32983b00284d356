"""Lines 3-6 of Algorithm 1: sample prompts, generate K responses each, verify, and apply the
accuracy filter, resampling until the batch is full; the prompts of surplus passing groups go to
the buffer and are generated afresh, first, at the next step. Global rank 0 samples and decides.

``collect_groups`` runs on every rank: the rollout fleet spreads each round's generation and
verification over its engines. ``collect_groups_on_rank0`` does the same on rank 0 alone with the
one engine it drives (remote mode), without a collective, so that it can run beside training
(one-step-off rollouts, ``fleet/ahead.py``)."""

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
from megatron_prime.rollout.base import RolloutEngine, SamplingParams
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
    policy_version: int = 0  # the policy (its training step) whose weights the engine sampled with
    routes: list[str] | None = None  # the engine's routed experts per response (Response.routes), when asked
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


def _round_functions(tokenizer, cfg: Config, seed: int, render, end_tokens, num_workers: int = 4):
    """(generate(engine, rows, offset), verify(rows, offset, generated)) of one rollout round."""
    k = cfg.rollout.n

    def generate(engine, part, offset):
        prompts = tokenize_prompts(part, tokenizer, cfg.data.max_prompt_len, render)
        r = cfg.rollout
        sampling = SamplingParams(
            n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=cfg.data.max_response_len,
            stop_token_ids=end_tokens, seed=seed,
            prompt_offset=offset,  # global prompt index: samples independent of the engine count
            return_routes=cfg.algorithm.replay_engine_routes,
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
                routes=[r.routes for r in rs] if cfg.algorithm.replay_engine_routes else None,
            ))
        return groups, rollout_s, time.perf_counter() - start, outcomes.timeouts

    return generate, verify


def _groups_of(parts, stats: CollectStats | None) -> list[Group]:
    if stats is not None:  # engines work in parallel: a round takes as long as the slowest
        stats.rollout_s += max(p[1] for p in parts)
        stats.verify_s += max(p[2] for p in parts)
        stats.verify_timeouts += sum(p[3] for p in parts)
    return [group for p in parts for group in p[0]]


def generate_and_verify(fleet: RolloutFleet, rows, tokenizer, cfg: Config, seed: int, render,
                        stats: CollectStats | None) -> list[Group] | None:
    """K responses for each of ``rows`` (the same rows on every rank), generated and verified
    shard by shard on the engines; the groups in row order on rank 0 (None elsewhere)."""
    generate, verify = _round_functions(tokenizer, cfg, seed, render, fleet.end_tokens)
    parts = [p for p in fleet.map_shards(rows, generate, verify) or [] if p is not None]
    return _groups_of(parts, stats) if is_rank0() else None


def collect_groups(fleet: RolloutFleet, sampler, buffer: PromptBuffer, tokenizer, cfg: Config, step: int,
                   render, version: int | None = None) -> tuple[list[Group], CollectStats | None]:
    """``cfg.train.prompts_per_step`` groups that pass the accuracy filter, on every rank.

    Each round generates ``prompts_per_step`` prompts with the current policy: the buffered prompts
    first (surplus that passed the filter at an earlier step), then fresh ones from the sampler.
    Rounds repeat until enough groups pass (``train.max_rollout_rounds``). Surplus passing groups
    give their *prompts* back to the buffer, never their responses: a buffered prompt is generated
    afresh by the policy of the step that uses it, so every trained response is on-policy. If the
    rounds run out, the batch is filled with this step's rejected groups (generated by the current
    policy too) and ``filter/unfiltered_fill`` says how many. Every group records ``version`` (the
    policy's; default ``step``).

    Rank 0 owns the sampler and the buffer and decides; every rank takes part in generation (its
    engine's shard). Stats on rank 0 only."""
    rounds = _FilterRounds(sampler, buffer, cfg, step, rank0=is_rank0())
    while (rows := broadcast_object(rounds.next_rows())) is not None:
        watchdog.heartbeat()
        groups = generate_and_verify(fleet, rows, tokenizer, cfg, rounds.seed, render, rounds.stats)
        rounds.take(rows, groups)
    return broadcast_object(on_rank0(lambda: rounds.finish(step if version is None else version))), rounds.stats


def collect_groups_on_rank0(engine: RolloutEngine, end_tokens, sampler, buffer: PromptBuffer, tokenizer,
                            cfg: Config, step: int, render, version: int) -> tuple[list[Group], CollectStats]:
    """``collect_groups`` on global rank 0 alone, with the engine it drives (remote mode): the same
    rounds, seeds and samples, and no collective, so that it can run in a thread beside training."""
    rounds = _FilterRounds(sampler, buffer, cfg, step, rank0=True)
    while (rows := rounds.next_rows()) is not None:
        watchdog.heartbeat()
        generate, verify = _round_functions(tokenizer, cfg, rounds.seed, render, end_tokens)
        rounds.take(rows, _groups_of([verify(rows, 0, generate(engine, rows, 0))], rounds.stats))
    return rounds.finish(version), rounds.stats


class _FilterRounds:
    """Rank 0's side of the accuracy filter's rounds (the other ranks only count rounds)."""

    def __init__(self, sampler, buffer: PromptBuffer, cfg: Config, step: int, rank0: bool):
        self.sampler, self.buffer, self.cfg, self.step, self.rank0 = sampler, buffer, cfg, step, rank0
        self.need = cfg.train.prompts_per_step
        self.stats = CollectStats() if rank0 else None
        self.kept: list[tuple[Group, PromptRow]] = []
        self.rejected: list[Group] = []
        self.rounds = 0

    @property
    def seed(self) -> int:
        return round_seed(self.cfg.train.seed, self.step, self.rounds)

    def next_rows(self) -> list[PromptRow] | None:
        """The next round's prompts (rank 0; None elsewhere and when the batch is full or the rounds
        ran out): the buffered ones first, then fresh ones from the sampler."""
        if not (self.rank0 and len(self.kept) < self.need and self.rounds < self.cfg.train.max_rollout_rounds):
            return None
        rows = self.buffer.pop(self.need)
        self.stats.from_buffer += len(rows)
        return rows + (self.sampler.next_batch(self.need - len(rows)) if len(rows) < self.need else [])

    def take(self, rows, groups) -> None:
        """Apply the filter to a round's groups (rank 0)."""
        self.rounds += 1
        if not self.rank0:
            return
        a, stats = self.cfg.algorithm, self.stats
        stats.rounds = self.rounds
        outcome = torch.tensor([o for g in groups for o in g.outcomes])
        truncated = torch.tensor([t for g in groups for t in g.truncated]) if a.filter_truncated else None
        keep = filter_groups(outcome, self.cfg.rollout.n, a.filter_low, a.filter_high, truncated)
        stats.sampled_groups += len(groups)
        stats.outcomes_sampled += outcome.tolist()
        for group, row, ok in zip(groups, rows, keep.tolist()):
            if ok:
                self.kept.append((group, row))
            else:
                self.rejected.append(group)
        stats.kept_groups += int(keep.sum())

    def finish(self, version: int) -> list[Group]:
        """The batch (rank 0): the first ``need`` passing groups; the surplus's prompts to the
        buffer; too few after the last round: filled with this step's latest rejected groups."""
        need, stats = self.need, self.stats
        self.buffer.push(row for _, row in self.kept[need:])
        batch = [group for group, _ in self.kept[:need]]
        if len(batch) < need:
            # Too few prompts in the filter band after max_rollout_rounds: fill with the latest
            # rejected groups so the step can run, and say so in the metrics.
            fill = self.rejected[max(0, len(self.rejected) - (need - len(batch))):]
            stats.unfiltered_fill = len(fill)
            batch += fill  # every round has `need` prompts, so this always fills the batch
        stats.buffer_size = len(self.buffer)
        stats.accuracy_sampled = sum(stats.outcomes_sampled) / max(1, len(stats.outcomes_sampled))
        for group in batch:
            group.policy_version = version
        return batch
