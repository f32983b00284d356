"""Steps 1-3 of a PRIME step on the rollout driver (global rank 0): sample prompts, generate K
responses each, verify, and apply the accuracy filter, resampling until the batch is full;
surplus kept groups go to the buffer, which is drawn from first next step."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch

from megatron_prime.algorithm import GroupBuffer, filter_groups
from megatron_prime.config import Config
from megatron_prime.rewards import score_batch
from megatron_prime.rollout.base import SamplingParams


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
    process_rewards: list[list[float]] | None = None  # per token, filled in after the PRM pass (for logs)


@dataclass
class CollectStats:
    rounds: int = 0
    sampled_groups: int = 0
    kept_groups: int = 0
    from_buffer: int = 0
    unfiltered_fill: int = 0
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


def generate_and_verify(engine, rows, tokenizer, cfg: Config, seed: int, render, stats: CollectStats,
                        num_workers: int = 4) -> list[Group]:
    prompts = tokenize_prompts(rows, tokenizer, cfg.data.max_prompt_len, render)
    sampling = SamplingParams(
        n=cfg.rollout.n,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        max_new_tokens=cfg.data.max_response_len,
        stop_token_ids=tuple(t for t in [tokenizer.eos_token_id] if t is not None),
        seed=seed,
    )
    start = time.perf_counter()
    responses = engine.generate([ids for ids, _ in prompts], sampling)
    stats.rollout_s += time.perf_counter() - start

    start = time.perf_counter()
    k = cfg.rollout.n
    items = [(rows[i // k].verifier, r.text, rows[i // k].ground_truth) for i, r in enumerate(responses)]
    outcomes = score_batch(items, num_workers=num_workers)
    stats.verify_s += time.perf_counter() - start

    groups = []
    for g, row in enumerate(rows):
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
    return groups


def collect_groups(engine, sampler, buffer: GroupBuffer, tokenizer, cfg: Config, step: int,
                   render) -> tuple[list[Group], CollectStats]:
    """``cfg.train.prompts_per_step`` groups that pass the accuracy filter (buffer first)."""
    need = cfg.train.prompts_per_step
    stats = CollectStats()
    kept: list[Group] = buffer.pop(need)
    stats.from_buffer = len(kept)
    rejected: list[Group] = []
    a = cfg.algorithm
    while len(kept) < need and stats.rounds < cfg.train.max_rollout_rounds:
        rows = sampler.next_batch()
        groups = generate_and_verify(engine, rows, tokenizer, cfg, round_seed(cfg.train.seed, step, stats.rounds),
                                     render, stats)
        stats.rounds += 1
        outcome = torch.tensor([o for g in groups for o in g.outcomes])
        truncated = torch.tensor([t for g in groups for t in g.truncated]) if a.filter_truncated else None
        keep = filter_groups(outcome, cfg.rollout.n, a.filter_low, a.filter_high, truncated)
        stats.sampled_groups += len(groups)
        stats.outcomes_sampled += outcome.tolist()
        for group, ok in zip(groups, keep.tolist()):
            (kept if ok else rejected).append(group)
        stats.kept_groups += int(keep.sum())
    if len(kept) > need:
        buffer.push(kept[need:])
        kept = kept[:need]
    if len(kept) < need:
        # Too few prompts in the filter band after max_rollout_rounds: fill with the latest
        # rejected groups so the step can run, and say so in the metrics.
        fill = rejected[-(need - len(kept)):]
        stats.unfiltered_fill = len(fill)
        kept += fill
    if len(kept) < need:
        raise RuntimeError(f"step {step}: only {len(kept)} of {need} prompt groups after "
                           f"{stats.rounds} rollout rounds (train.max_rollout_rounds)")
    stats.accuracy_sampled = sum(stats.outcomes_sampled) / max(1, len(stats.outcomes_sampled))
    return kept, stats
