"""One PRIME step: an iteration of the paper's Algorithm 1 (lines 3-11), one line of code per line
of the algorithm.

Rank 0 samples prompts and applies the accuracy filter; the rollout fleet spreads generation and
verification over its engines (``fleet/``); every data-parallel rank takes its rows of the batch
for Megatron's passes (``passes/``). Per-token results are gathered back over data-parallel ranks
(``BatchShare``), so the implicit rewards and the advantages are computed on the whole batch
(whitening and batch-normalised estimators see every response), identically on every rank.
"""

from __future__ import annotations

import time
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
    rollout_correction_weights,
)
from megatron_prime.config import Config
from megatron_prime.fleet.ahead import RolloutAhead
from megatron_prime.fleet.collect import Group, collect_groups
from megatron_prime.fleet.fleet import RolloutFleet
from megatron_prime.metrics import PhaseTimer, optimizer_metrics, step_metrics, warn_on_timeouts
from megatron_prime.models.hf_config import HFArch
from megatron_prime.passes.batch import RolloutBatch, build_rollout_batch
from megatron_prime.passes.data_parallel import dp_rank_and_size, dp_rows, dp_sum, gather_dp_rows, reduce_metric_pairs
from megatron_prime.passes.forward_backward import run_pass
from megatron_prime.passes import routing_replay
from megatron_prime.passes.offload import offloaded
from megatron_prime.passes.trainable import TrainableModel
from megatron_prime.platform import distributed, watchdog
from megatron_prime.platform.distributed import broadcast_object


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
    ahead: RolloutAhead | None = None  # one-step-off rollouts (rollout.max_staleness=1)

    @property
    def uses_process_rewards(self) -> bool:
        return self.cfg.algorithm.estimator not in OUTCOME_ONLY_ESTIMATORS

    @property
    def offload(self) -> bool:
        return self.cfg.train.offload and torch.cuda.is_available()


def prime_step(ctx: PrimeContext, step: int) -> tuple[dict[str, float], list[Group]]:
    cfg, a = ctx.cfg, ctx.cfg.algorithm
    timer, metrics = PhaseTimer(), {}
    # The policy's log-probs are those of the distribution the engine sampled from, logits / T; the
    # implicit reward (Eq. 3) is defined on the PRM's and the reference's own distributions (T = 1).
    policy_args = dict(temperature=cfg.rollout.temperature or 1.0, token_budget=cfg.train.micro_batch_tokens)
    model_args = dict(temperature=1.0, token_budget=cfg.train.micro_batch_tokens)

    # Alg. 1 l.3-6: sample prompts, generate K responses each, outcome rewards r_o, accuracy filter.
    groups, stats = rollout(ctx, step, timer, metrics)
    routed = ctx.policy.model if a.replay_engine_routes else None  # R3: the engine's routes come along
    share = BatchShare(to_batch(groups, cfg.rollout.n, ctx.tokenizer, ctx.arch, routed).to(distributed.device()))
    batch, mask = share.batch, share.batch.response_mask
    # Alg. 1 l.7: forward pass of pi_ref (and of pi_phi, inside l.8 in single-forward mode).
    ref_logprobs = reference_logprobs(ctx, share, model_args, policy_args, timer)
    # Alg. 1 l.8: update pi_phi by the cross-entropy on (x, y, r_o(y)); its log-probs for l.7.
    prm_logprobs = implicit_prm_logprobs(ctx, share, ref_logprobs, model_args, timer, metrics)
    # Alg. 1 l.7: implicit process rewards r_phi(y_t) = beta (log pi_phi - log pi_ref), Eq. 3.
    token_rewards = (implicit_process_rewards(prm_logprobs, ref_logprobs, mask, a.beta)
                     if prm_logprobs is not None else None)
    # Alg. 1 l.9: advantages, Eq. 5 for prime_rloo (and where they overrule the verifier).
    advantages, flipped = advantages_of(cfg, batch, token_rewards, metrics)
    share.keep("advantages", advantages)
    # Alg. 1 l.10: update pi_theta by the PPO loss (Eq. 6), pi_theta_old recomputed by Megatron and
    # the engine's samples weighted for what separates it from pi_theta_old.
    # mixture of experts: the routes of pi_theta_old for the update to replay (R2), or the engine's (R3)
    routing = "replay" if "routes" in share.local.extras else "record"
    with timer("old_logprobs"):
        old_logprobs = share.logprobs(ctx.policy.model, "old_logprobs", routing=routing, **policy_args)
    if routing == "replay":  # R3: the routes the trainer's own router would have chosen otherwise
        metrics["routing/engine_flipped_frac"] = metric_means(
            reduce_metric_pairs(share.pass_metrics))["routing/flipped_frac"]
    correct_for_the_engine(cfg, share, old_logprobs, metrics)
    with timer("policy_update"), offloaded(ctx.prm, enabled=ctx.offload):
        metrics.update(update_policy(ctx, share.local, step, policy_args))
    # Alg. 1 l.11: theta_old <- theta, which is what the engines sample from next (one-step-off: once
    # the batch they are collecting for the next step is complete).
    if ctx.ahead is not None:
        with timer("rollout_drain"):
            metrics["rollout/wait_s"] += ctx.ahead.drain()
    with timer("weight_sync"):
        ctx.fleet.sync()

    metrics.update(step_metrics(batch, stats, token_rewards, advantages, old_logprobs))
    metrics.update(timer.metrics())
    metrics["perf/tokens_per_s"] = float(mask.sum()) / max(metrics["time/step"], 1e-9)
    attach_sample_values(groups, cfg.rollout.n, mask, token_rewards, advantages, flipped)
    return broadcast_object(metrics), groups


class BatchShare:
    """The whole rollout batch (the same on every rank) and this data-parallel rank's contiguous
    rows of it (``local``), which its Megatron passes take."""

    def __init__(self, batch: RolloutBatch):
        self.batch = batch
        self.rows = dp_rows(batch.size)
        self.local = batch.rows(self.rows)
        self.pass_metrics: dict = {}  # the last pass's metric pairs on this rank

    def logprobs(self, model, name: str, **pass_args) -> torch.Tensor:
        """Per-token log-probs of the whole batch: this rank's rows through ``model``, gathered over
        data-parallel ranks; this rank's rows are also kept for the losses as ``local.extras[name]``
        (and the routes a mixture-of-experts model recorded as ``local.extras["routes"]``)."""
        result = run_pass(model, self.local, **pass_args)
        self.pass_metrics = result.metrics  # this rank's (sum, count) pairs of the pass
        self.local.extras[name] = result.logprobs
        if result.routes is not None:
            self.local.extras["routes"] = result.routes
        return gather_dp_rows(result.logprobs)

    def keep(self, name: str, whole: torch.Tensor) -> None:
        """This rank's rows of a whole-batch tensor, for the losses."""
        self.local.extras[name] = whole[self.rows]


def rollout(ctx: PrimeContext, step: int, timer: PhaseTimer, metrics: dict):
    """K responses for each of ``train.prompts_per_step`` prompts that pass the accuracy filter,
    verified, on every rank. Synchronous: generated now by this step's policy, and the engines
    release their memory while Megatron trains. One-step-off (``ctx.ahead``): the batch collected
    during the previous step, and the next one's collection starts."""
    if ctx.ahead is not None:
        with watchdog.phase("rollout"):
            groups, stats, ahead_metrics = ctx.ahead.take(step)
        metrics.update(ahead_metrics)
        if step + 1 < ctx.cfg.train.steps:
            ctx.ahead.launch(step + 1, version=step)  # the engines hold this step's policy
    else:
        start = time.perf_counter()
        with offloaded(ctx.policy, ctx.prm, enabled=ctx.offload), watchdog.phase("rollout"):
            groups, stats = collect_groups(ctx.fleet, ctx.sampler, ctx.buffer, ctx.tokenizer, ctx.cfg, step,
                                           ctx.render)
            ctx.fleet.sleep()
        metrics.update({"rollout/staleness_mean": 0.0, "rollout/staleness_max": 0.0, "rollout/dropped_groups": 0.0,
                        "rollout/wait_s": time.perf_counter() - start})
    if stats is not None:
        if ctx.ahead is None:
            timer.seconds["rollout"] = stats.rollout_s
            timer.seconds["verify"] = stats.verify_s
        else:  # collected beside the previous step's training: not part of this step's time
            metrics["time/rollout_background"] = stats.rollout_s
            metrics["time/verify_background"] = stats.verify_s
        warn_on_timeouts(step, stats, ctx.cfg.train.warn_verify_timeout_frac)
    return groups, stats


def to_batch(groups: list[Group], k: int, tokenizer, arch: HFArch | None = None, routed_model=None) -> RolloutBatch:
    """The groups' prompts and responses as one right-padded batch, the K responses of a prompt
    adjacent. ``routed_model``: the engine's routes go with it (``extras["routes"]``) for the layers
    of this pipeline stage of that model (R3)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = build_rollout_batch(
        prompts=[g.prompt_ids for g in groups for _ in range(k)],
        responses=[r for g in groups for r in g.responses],
        outcomes=[o for g in groups for o in g.outcomes],
        rollout_logprobs=[lp for g in groups for lp in g.logprobs],
        truncated=[t for g in groups for t in g.truncated],
        group_size=k,
        pad_id=pad,
    )
    if routed_model is not None:
        batch.extras["routes"] = routing_replay.engine_routes(
            [r for g in groups for r in (g.routes or [None] * k)], batch.attention_mask.sum(dim=1).tolist(),
            num_layers=arch.num_layers, num_experts=arch.num_experts, topk=arch.moe_topk,
            layers=routing_replay.stage_layers(routed_model), width=batch.input_ids.shape[1])
        # the engine routed every position but the last (filled in): flips are counted where it did
        known = batch.attention_mask.clone()
        known[torch.arange(batch.size), batch.attention_mask.sum(dim=1) - 1] = 0
        batch.extras["routes_known"] = known
    return batch


def reference_logprobs(ctx: PrimeContext, share: BatchShare, model_args: dict, policy_args: dict,
                       timer: PhaseTimer):
    """log pi_ref of every response token (None without a reference model). With a KL penalty at a
    sampling temperature other than 1, also the reference at that temperature, which the KL term
    compares with the policy's tempered distribution."""
    if ctx.reference is None:
        return None
    with timer("reference_forward"):
        whole = share.logprobs(ctx.reference, "ref_logprobs", **model_args)
        if ctx.cfg.algorithm.kl_coef and policy_args["temperature"] != 1.0:
            share.local.extras["ref_kl_logprobs"] = run_pass(ctx.reference, share.local, **policy_args).logprobs
    return whole


def implicit_prm_logprobs(ctx: PrimeContext, share: BatchShare, ref_logprobs, model_args: dict,
                          timer: PhaseTimer, metrics: dict):
    """log pi_phi of every response token for this step's implicit rewards, updating the PRM on
    the way (``algorithm.prm_update``); None for outcome-only estimators.

    * single (the paper's default): one optimizer step per PRM mini-batch, and each mini-batch's
      log-probs come from the forward that computes its loss, i.e. from the PRM *before* it is
      updated on those responses (``prm/accuracy`` is thus measured on responses it has not seen);
    * double: update first, then a fresh forward with the updated PRM (and its in-sample fit);
    * none: a forward only, the PRM is never trained.
    """
    mode = ctx.cfg.algorithm.prm_update
    if not ctx.uses_process_rewards:
        return None
    if mode != "none":
        with timer("prm_update"), offloaded(ctx.policy, enabled=ctx.offload):
            logprobs, prm_metrics = update_prm(ctx, share.local, model_args)
        metrics.update(prm_metrics)
        if mode == "single":
            return logprobs
    with timer("prm_forward"):
        logprobs = share.logprobs(ctx.prm.model, "prm_logprobs", **model_args)
    if mode == "double":
        batch, beta = share.batch, ctx.cfg.algorithm.beta
        _, after = prm_loss(logprobs, ref_logprobs, batch.response_mask, batch.outcome, beta)
        metrics.update({f"{k}_after_update": v for k, v in metric_means(after).items()
                        if k in ("prm/loss", "prm/accuracy")})
    return logprobs


def update_prm(ctx: PrimeContext, local: RolloutBatch, pass_args: dict):
    """Implicit-PRM optimizer steps on L_CE (Algorithm 1), one per mini-batch of
    ``train.prm_mini_batch_responses`` responses, in batch order. Returns the PRM log-probs of every
    row of the whole batch from the forward that computed its loss (before the update on it) and
    the metrics."""
    cfg = ctx.cfg
    prm = ctx.prm
    per_rank = cfg.train.prm_responses_per_update // dp_rank_and_size()[1]

    def loss_fn(mb: RolloutBatch, logprobs, _entropy):
        loss, m = prm_loss(logprobs, mb.extras["ref_logprobs"], mb.response_mask, mb.outcome, cfg.algorithm.beta,
                           loss_normalizer=1.0)
        return loss, mb.size, m  # a mean over the responses of the global PRM mini-batch

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
    metrics.update(optimizer_metrics("prm", steps))
    return gather_dp_rows(logprobs), metrics


def advantages_of(cfg: Config, batch: RolloutBatch, token_rewards, metrics: dict):
    """The estimator's advantages of the whole batch (``algorithm.estimator``; Eq. 5 for prime_rloo)
    and, with process rewards, which responses they flip against their outcome (``metrics`` get
    the ``advantage/flip_*`` figures)."""
    a = cfg.algorithm
    inputs = dict(outcome=batch.outcome, mask=batch.response_mask, group_size=cfg.rollout.n, gamma=a.gamma,
                  process_return=a.process_return, process_coef=a.process_coef, outcome_coef=a.outcome_coef,
                  whiten=a.whiten)
    advantages = compute_advantages(a.estimator, token_rewards=token_rewards, **inputs)
    if token_rewards is None:
        return advantages, None
    outcome_only = compute_advantages(a.estimator, token_rewards=None, **inputs)
    flipped, flip_metrics = advantage_flips(advantages, outcome_only, batch.response_mask)
    metrics.update(flip_metrics)
    return advantages, flipped


def correct_for_the_engine(cfg: Config, share: BatchShare, old_logprobs, metrics: dict) -> None:
    """The rollout correction (``algorithm.rollout_correction``): per-token weights
    exp(old - rollout) on the policy-gradient term and the responses that stay in the policy loss,
    computed once on the whole batch; its metrics whatever the mode."""
    a, batch = cfg.algorithm, share.batch
    bounds = tuple(a.rollout_correction_bounds) if a.rollout_correction_bounds else None
    weights, keep, correction_metrics = rollout_correction_weights(
        old_logprobs, batch.rollout_logprobs, batch.response_mask, a.rollout_correction, bounds)
    metrics.update(correction_metrics)
    if a.rollout_correction != "none":
        share.keep("correction_weights", weights)
        share.keep("policy_mask", batch.response_mask * keep[:, None])


def update_policy(ctx: PrimeContext, local: RolloutBatch, step: int, pass_args: dict) -> dict:
    """PPO epochs x mini-batches of ``train.mini_batch_responses`` responses (shuffled per epoch,
    seeded by the step), the PPO-clip loss as a token mean over the global mini-batch."""
    cfg, a = ctx.cfg, ctx.cfg.algorithm
    _, dp_size = dp_rank_and_size()
    per_rank = cfg.train.mini_batch_responses // dp_size
    num_minibatches = local.size // per_rank
    generator = torch.Generator().manual_seed(cfg.train.seed * 100003 + step)
    # mixture of experts: the experts pi_theta_old chose (R2), or the drift from them measured only
    routing = ("replay" if a.routing_replay else "observe") if "routes" in local.extras else None

    def loss_fn(mb: RolloutBatch, logprobs, entropy):
        mask = mb.extras.get("policy_mask", mb.response_mask)  # seq_mask's dropped responses leave it
        loss, m = policy_loss(
            logprobs, mb.extras["old_logprobs"], mb.extras["advantages"], mask,
            a.clip_low, a.clip_high, loss_normalizer=1.0, clip_ratio_c=a.clip_ratio_c,
            ref_logprobs=mb.extras.get("ref_kl_logprobs", mb.extras.get("ref_logprobs")) if a.kl_coef else None,
            kl_coef=a.kl_coef, kl_estimator=a.kl_estimator,
            entropy=entropy, entropy_coef=a.entropy_coef,
            correction_weights=mb.extras.get("correction_weights"),
        )
        return loss, int(mask.sum()), m  # a token mean over the global mini-batch

    pairs: dict = {}
    steps = []
    for _epoch in range(a.ppo_epochs):
        order = torch.randperm(local.size, generator=generator)
        for i in range(num_minibatches):
            rows = order[i * per_rank:(i + 1) * per_rank]
            if "policy_mask" in local.extras and dp_sum(float(local.extras["policy_mask"][rows].sum())) == 0:
                # the rollout correction dropped every response of this mini-batch: nothing to learn,
                # but the lr schedule (sized in mini-batches) moves on as for any other
                steps.append({"update_ok": False, "grad_norm": 0.0, "lr": ctx.policy.optimizer.param_groups[0]["lr"]})
                ctx.policy.scheduler.step(increment=1)
                continue
            ctx.policy.zero_grad()
            result = run_pass(ctx.policy.model, local.rows(rows), loss_fn=loss_fn, with_entropy=True,
                              entropy_grad=a.entropy_coef != 0.0, routing=routing, **pass_args)
            steps.append(ctx.policy.step())
            accumulate_metrics(pairs, result.metrics)
    metrics = metric_means(reduce_metric_pairs(pairs))
    metrics.update(optimizer_metrics("policy", steps))
    return metrics


def attach_sample_values(groups: list[Group], k: int, mask, token_rewards, advantages, flipped) -> None:
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
