"""One PRIME step, top-down, mirroring the paper's Algorithm 1.

    rollout K responses per prompt -> verify -> accuracy filter (resample; surplus prompts to buffer)
    -> reference and PRM log-probs -> PRM update (single forward by default, or double)
    -> implicit process rewards -> advantages -> old log-probs -> policy update -> weight sync

Rank 0 samples prompts and applies the filter; the rollout fleet spreads generation and
verification over its engines (``fleet/fleet.py``); the batch is shared and every data-parallel
rank takes its rows. Per-token tensors are gathered back over data-parallel
ranks so advantages are computed on the whole batch (whitening and batch-normalised estimators
see every response), identically on every rank.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_prime.algorithm import (
    OUTCOME_ONLY_ESTIMATORS,
    PromptBuffer,
    accumulate_metrics,
    advantage_flips,
    compute_advantages,
    implicit_process_rewards,
    metric_means,
    policy_loss,
    prm_loss,
)
from megatron_prime.config import Config
from megatron_prime.models.hf_config import HFArch
from megatron_prime.platform import distributed, watchdog
from megatron_prime.platform.distributed import broadcast_object
from megatron_prime.passes.batch import RolloutBatch, build_rollout_batch
from megatron_prime.passes.data_parallel import dp_rank_and_size, dp_rows, gather_dp_rows, reduce_metric_pairs
from megatron_prime.passes.trainable import TrainableModel
from megatron_prime.passes.offload import offloaded
from megatron_prime.passes.forward_backward import run_pass
from megatron_prime.fleet.collect import Group, collect_groups
from megatron_prime.fleet.fleet import RolloutFleet


@dataclass
class PrimeContext:
    cfg: Config
    arch: HFArch
    policy: TrainableModel
    prm: TrainableModel | None  # None for outcome-only estimators
    reference: object | None  # frozen model; None when neither PRM nor KL needs it
    fleet: RolloutFleet  # the rollout engines and how ranks drive them
    sampler: object | None  # prompt sampler, rank 0 only
    buffer: PromptBuffer
    tokenizer: object
    render: Callable  # render_prompt(tokenizer, prompt) -> str

    @property
    def uses_process_rewards(self) -> bool:
        return self.cfg.algorithm.estimator not in OUTCOME_ONLY_ESTIMATORS


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        with watchdog.phase(name):  # what a hang report names
            yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        total = time.perf_counter() - self.start
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out["time/other"] = max(0.0, total - sum(self.seconds.values()))
        out["time/step"] = total
        return out


def prime_step(ctx: PrimeContext, step: int) -> tuple[dict[str, float], list[Group]]:
    cfg, a = ctx.cfg, ctx.cfg.algorithm
    timer = PhaseTimer()

    # 1-3. Rollout K responses per prompt on the engines, verify, accuracy filter (rank 0 decides).
    offload = cfg.train.offload and torch.cuda.is_available()
    with offloaded(ctx.policy, ctx.prm, enabled=offload), watchdog.phase("rollout"):
        groups, stats = collect_groups(ctx.fleet, ctx.sampler, ctx.buffer, ctx.tokenizer, cfg, step, ctx.render)
        ctx.fleet.sleep()  # the engines give their memory back while Megatron trains
    if stats is not None:
        timer.seconds["rollout"] = stats.rollout_s
        timer.seconds["verify"] = stats.verify_s
        _warn_on_timeouts(step, stats, cfg.train.warn_verify_timeout_frac)
    batch = _to_batch(groups, cfg.rollout.n, ctx.tokenizer).to(distributed.device())
    local = batch.rows(dp_rows(batch.size))
    mask = batch.response_mask
    budget = cfg.train.micro_batch_tokens
    # The policy's log-probs (old, and in the loss) are those of the distribution the engine sampled
    # from: logits / T. The implicit reward (Eq. 3) is defined on the PRM's and the reference's own
    # distributions, so their log-probs are taken at T = 1 whatever the sampling temperature.
    policy_args = dict(temperature=cfg.rollout.temperature or 1.0, token_budget=budget)
    model_args = dict(temperature=1.0, token_budget=budget)
    metrics: dict = {}

    # 4. Reference and implicit-PRM log-probs; PRM update on outcome labels (Algorithm 1).
    token_rewards = None
    ref_logprobs = None
    if ctx.reference is not None:
        with timer("reference_forward"):
            ref_logprobs = gather_dp_rows(run_pass(ctx.reference, local, **model_args).logprobs)
            local.extras["ref_logprobs"] = ref_logprobs[dp_rows(batch.size)]
            if a.kl_coef and policy_args["temperature"] != 1.0:
                # The KL penalty compares the policy's tempered distribution with the reference's.
                local.extras["ref_kl_logprobs"] = run_pass(ctx.reference, local, **policy_args).logprobs
    if ctx.uses_process_rewards:
        if a.prm_update == "none":
            with timer("prm_forward"):
                prm_logprobs = gather_dp_rows(run_pass(ctx.prm.model, local, **model_args).logprobs)
        else:
            with timer("prm_update"), offloaded(ctx.policy, enabled=offload):
                # single forward: each mini-batch's log-probs come from the forward that computes
                # its loss, i.e. from the PRM before it is updated on those responses, and they
                # give this step's rewards.
                prm_logprobs, prm_metrics = update_prm(ctx, local, model_args)
                metrics.update(prm_metrics)
            if a.prm_update == "double":
                with timer("prm_forward"):
                    prm_logprobs = gather_dp_rows(run_pass(ctx.prm.model, local, **model_args).logprobs)
                # In-sample fit after the update, beside prm/accuracy measured before it.
                _, after = prm_loss(prm_logprobs, ref_logprobs, mask, batch.outcome, a.beta)
                metrics.update({f"{k}_after_update": v for k, v in metric_means(after).items()
                                if k in ("prm/loss", "prm/accuracy")})
        token_rewards = implicit_process_rewards(prm_logprobs, ref_logprobs, mask, a.beta)

    # 5. Advantages on the whole batch (paper Eq. 5 for "prime_rloo").
    estimator_args = dict(outcome=batch.outcome, mask=mask, group_size=cfg.rollout.n, gamma=a.gamma,
                          process_return=a.process_return, process_coef=a.process_coef,
                          outcome_coef=a.outcome_coef, whiten=a.whiten)
    advantages = compute_advantages(a.estimator, token_rewards=token_rewards, **estimator_args)
    flipped = None
    if token_rewards is not None:  # where the process rewards overrule the verifier
        outcome_only = compute_advantages(a.estimator, token_rewards=None, **estimator_args)
        flipped, flip_metrics = advantage_flips(advantages, outcome_only, mask)
        metrics.update(flip_metrics)
    local.extras["advantages"] = advantages[dp_rows(batch.size)]

    # 6. Old log-probs, recomputed by Megatron (never trusted from the rollout engine).
    with timer("old_logprobs"):
        old_logprobs = gather_dp_rows(run_pass(ctx.policy.model, local, **policy_args).logprobs)
    local.extras["old_logprobs"] = old_logprobs[dp_rows(batch.size)]

    # 7. Policy update: mini-batches x PPO epochs, PPO-clip with a global token mean.
    with timer("policy_update"), offloaded(ctx.prm, enabled=offload):
        metrics.update(update_policy(ctx, local, step, policy_args))

    # 8. Send the new policy weights to the rollout engines.
    with timer("weight_sync"):
        ctx.fleet.sync()

    metrics.update(_step_metrics(batch, stats, token_rewards, advantages, old_logprobs))
    metrics.update(timer.metrics())
    metrics["perf/tokens_per_s"] = float(mask.sum()) / max(metrics["time/step"], 1e-9)
    _attach_token_values(groups, cfg.rollout.n, mask, token_rewards, advantages, flipped)
    return broadcast_object(metrics), groups


def _warn_on_timeouts(step: int, stats, limit: float) -> None:
    """A graded-0 timeout becomes a wrong PRM label: say so when there are many."""
    sampled = max(1, len(stats.outcomes_sampled))
    if stats.verify_timeouts / sampled > limit:
        warnings.warn(f"step {step}: {stats.verify_timeouts} of {sampled} answers hit the math grader's time limit "
                      f"and scored 0 (more than train.warn_verify_timeout_frac={limit}); they are label noise for "
                      "the implicit PRM", stacklevel=2)


def _attach_token_values(groups: list[Group], k: int, mask, token_rewards, advantages, flipped) -> None:
    """Per-token process rewards and advantages of each response, and whether its advantage
    contradicts its outcome, for the sample log."""
    lengths = mask.sum(dim=1).long().cpu().tolist()

    def per_response(values, rows):
        return [v[:n].tolist() for v, n in zip(values[rows].cpu(), lengths[rows])]

    for g, group in enumerate(groups):
        rows = slice(g * k, (g + 1) * k)
        group.process_rewards = None if token_rewards is None else per_response(token_rewards, rows)
        group.advantages = per_response(advantages, rows)
        group.flipped = None if flipped is None else flipped[rows].tolist()


def update_prm(ctx: PrimeContext, local: RolloutBatch, pass_args: dict):
    """Implicit-PRM optimizer steps on L_CE (Algorithm 1), one per mini-batch of
    ``train.prm_mini_batch_responses`` responses, in batch order. Returns the PRM log-probs of every
    row from the forward that computed its loss (before the update on it) and the metrics."""
    cfg = ctx.cfg
    prm = ctx.prm
    per_rank = cfg.train.prm_responses_per_update // dp_rank_and_size()[1]

    def loss_fn(mb: RolloutBatch, logprobs, _entropy):
        loss, m = prm_loss(logprobs, mb.extras["ref_logprobs"], mb.response_mask, mb.outcome, cfg.algorithm.beta,
                           loss_normalizer=1.0)
        return loss, mb.size, m

    logprobs = torch.zeros_like(local.response_mask)
    pairs: dict = {}
    steps = []
    for start in range(0, local.size, per_rank):
        rows = torch.arange(start, min(start + per_rank, local.size))
        prm.zero_grad()
        result = run_pass(prm.model, local.rows(rows), loss_fn=loss_fn, **pass_args)
        steps.append(prm.step())
        logprobs[rows] = result.logprobs
        accumulate_metrics(pairs, result.metrics)
    metrics = metric_means(reduce_metric_pairs(pairs))
    metrics.update(_optimizer_metrics("prm", steps))
    return gather_dp_rows(logprobs), metrics


def _optimizer_metrics(prefix: str, steps: list[dict]) -> dict[str, float]:
    """Mean grad norm and last lr over the steps that updated; a step that fp16/bf16 loss scaling
    skipped (inf/nan grads) is counted apart, not as an update."""
    done = [s for s in steps if s["update_ok"]]
    return {
        f"{prefix}/grad_norm": sum(s["grad_norm"] for s in done) / len(done) if done else 0.0,
        f"{prefix}/lr": steps[-1]["lr"],
        f"{prefix}/updates": float(len(done)),
        f"{prefix}/skipped_updates": float(len(steps) - len(done)),
    }


def update_policy(ctx: PrimeContext, local: RolloutBatch, step: int, pass_args: dict) -> dict:
    cfg, a = ctx.cfg, ctx.cfg.algorithm
    _, dp_size = dp_rank_and_size()
    per_rank = cfg.train.mini_batch_responses // dp_size
    num_minibatches = local.size // per_rank
    generator = torch.Generator().manual_seed(cfg.train.seed * 100003 + step)

    def loss_fn(mb: RolloutBatch, logprobs, entropy):
        loss, m = policy_loss(
            logprobs, mb.extras["old_logprobs"], mb.extras["advantages"], mb.response_mask,
            a.clip_low, a.clip_high, loss_normalizer=1.0, clip_ratio_c=a.clip_ratio_c,
            ref_logprobs=mb.extras.get("ref_kl_logprobs", mb.extras.get("ref_logprobs")) if a.kl_coef else None,
            kl_coef=a.kl_coef, kl_estimator=a.kl_estimator,
            entropy=entropy, entropy_coef=a.entropy_coef,
            rollout_logprobs=mb.rollout_logprobs, tis_cap=a.tis_cap,
        )
        return loss, int(mb.response_mask.sum()), m

    pairs: dict = {}
    steps = []
    for _epoch in range(a.ppo_epochs):
        order = torch.randperm(local.size, generator=generator)
        for i in range(num_minibatches):
            rows = order[i * per_rank:(i + 1) * per_rank]
            ctx.policy.zero_grad()
            result = run_pass(ctx.policy.model, local.rows(rows), loss_fn=loss_fn, with_entropy=True,
                              entropy_grad=a.entropy_coef != 0.0,
                              **pass_args)
            steps.append(ctx.policy.step())
            accumulate_metrics(pairs, result.metrics)
    metrics = metric_means(reduce_metric_pairs(pairs))
    metrics.update(_optimizer_metrics("policy", steps))
    return metrics


def _to_batch(groups: list[Group], k: int, tokenizer) -> RolloutBatch:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return build_rollout_batch(
        prompts=[g.prompt_ids for g in groups for _ in range(k)],
        responses=[r for g in groups for r in g.responses],
        outcomes=[o for g in groups for o in g.outcomes],
        rollout_logprobs=[lp for g in groups for lp in g.logprobs],
        truncated=[t for g in groups for t in g.truncated],
        group_size=k,
        pad_id=pad,
    )


def _masked_stats(prefix: str, values: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    valid = values[mask.bool()]
    if valid.numel() == 0:
        return {}
    return {f"{prefix}/mean": valid.mean().item(), f"{prefix}/std": valid.std().item() if valid.numel() > 1 else 0.0,
            f"{prefix}/min": valid.min().item(), f"{prefix}/max": valid.max().item()}


def _step_metrics(batch: RolloutBatch, stats, token_rewards, advantages, old_logprobs) -> dict[str, float]:
    mask = batch.response_mask
    lengths = mask.sum(dim=1)
    m = {
        "outcome/accuracy_filtered": batch.outcome.mean().item(),
        "response/length_mean": lengths.mean().item(),
        "response/length_max": lengths.max().item(),
        "response/truncated_frac": batch.truncated.float().mean().item(),
    }
    if stats is not None:
        m.update({
            "outcome/accuracy_sampled": stats.accuracy_sampled,
            "filter/kept_frac": stats.kept_groups / max(1, stats.sampled_groups),
            "filter/rounds": float(stats.rounds),
            "filter/from_buffer": float(stats.from_buffer),
            "filter/buffer_size": float(stats.buffer_size),
            "filter/unfiltered_fill": float(stats.unfiltered_fill),
            "verify/timeouts": float(stats.verify_timeouts),
            "verify/timeout_frac": stats.verify_timeouts / max(1, len(stats.outcomes_sampled)),
        })
    m.update(_masked_stats("advantage", advantages, mask))
    if token_rewards is not None:
        m.update(_masked_stats("process_reward/token", token_rewards, mask))
        m["process_reward/sequence_mean"] = token_rewards.sum(dim=1).mean().item()
    diff = (batch.rollout_logprobs - old_logprobs).abs()[mask.bool()]
    # the mean is the policy loss's rollout/abs_logprob_diff
    m["rollout/logprob_diff_max"] = diff.max().item() if diff.numel() else 0.0
    return m
