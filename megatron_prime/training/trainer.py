"""``megatron-prime train``: set up the three models, the rollout engine and the data, then run
PRIME steps with metrics, evaluation, checkpoints (exact resume) and a final HF export."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from megatron_prime.algorithm import OUTCOME_ONLY_ESTIMATORS, PromptBuffer, set_kernel_fusion
from megatron_prime.bridge.convert import write_hf
from megatron_prime.bridge.hf_io import SafetensorsSource
from megatron_prime.bridge.mcore_io import META_FILE, load_model
from megatron_prime.bridge.transfer import load_hf_weights
from megatron_prime.config import Config, ConfigError, config_to_dict
from megatron_prime.data import DatasetError, PromptRow, PromptSampler, load_prompt_dataset, render_prompt
from megatron_prime.data.lengths import describe_dropped, split_overlong_prompts
from megatron_prime.models.gpt import ModelOptions, resolve_use_te
from megatron_prime.models.hf_config import read_hf_config
from megatron_prime.models.wrappers import unwrap
from megatron_prime.platform import distributed
from megatron_prime.platform.distributed import broadcast_object, is_rank0, on_rank0
from megatron_prime.training import checkpoint
from megatron_prime.fleet.grading import fleet_greedy_accuracy
from megatron_prime.passes.trainable import TrainableModel, build_frozen, build_trainable
from megatron_prime.metrics import SustainedWarning
from megatron_prime.platform import watchdog
from megatron_prime.platform.watchdog import Watchdog
from megatron_prime.training.preemption import StopRequest
from megatron_prime.training.prime_step import PrimeContext, prime_step
from megatron_prime.fleet.fleet import build_fleet
from megatron_prime.training.validation import validate_run


def model_options(cfg: Config) -> ModelOptions:
    return ModelOptions(
        dtype=cfg.model.dtype, fp8=cfg.model.fp8, use_te=resolve_use_te(cfg.model.transformer_engine),
        vocab_pad_multiple=cfg.model.vocab_pad_multiple, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
        sequence_parallel=cfg.parallel.sequence_parallel,
    )


@dataclass
class WeightSources:
    """Where each of PRIME's three models takes its starting weights: an HF checkpoint dir or a
    Megatron checkpoint dir (``model.mcore_path`` style)."""

    policy: str
    prm: str
    reference: str


def weight_sources(cfg: Config) -> WeightSources:
    """The policy starts from ``model.mcore_path`` or ``model.hf_path``. The PRM and the reference
    start where the policy's run started (paper: all three from the SFT model), unless
    ``model.prm_mcore_path`` / ``model.prm_hf_path`` / ``model.ref_path`` say otherwise.

    When ``model.mcore_path`` is the policy of a trainer checkpoint (e.g. to continue at another
    TP/PP), its PRM is that checkpoint's ``prm/`` and its reference is the reference that run
    recorded: never the trained policy of step N, which would measure every implicit reward
    and KL against the wrong model."""
    m = cfg.model
    policy = m.mcore_path or m.hf_path
    prm, reference = m.prm_mcore_path or m.prm_hf_path, m.ref_path
    trainer_ckpt = checkpoint.trainer_checkpoint_of(m.mcore_path) if m.mcore_path else None
    if trainer_ckpt is not None:
        prm = prm or trainer_ckpt.get("prm", "")
        reference = reference or trainer_ckpt["reference"]
        if not os.path.isdir(reference):
            raise ConfigError(f"model.mcore_path={m.mcore_path} is a trainer checkpoint whose reference model was "
                              f"{reference}, which does not exist here: set model.ref_path to that model (the "
                              f"original starting checkpoint)")
    return WeightSources(policy=policy, prm=prm or policy, reference=reference or policy)


def load_initial_weights(target, path: str, arch, cfg: Config) -> None:
    """Weights of a trainable or frozen model from ``path``: a Megatron checkpoint dir (any TP/PP)
    or an HF checkpoint dir."""
    model = unwrap(target.model if isinstance(target, TrainableModel) else target)
    if os.path.exists(os.path.join(path, META_FILE)):
        load_model(model, path)
    else:
        source = SafetensorsSource(path, arch)
        source.check_shapes()
        load_hf_weights(model, arch, source, cfg.model.vocab_pad_multiple)
    if isinstance(target, TrainableModel):
        # In bf16/fp16 the optimizer holds fp32 main copies taken when it was built; without this
        # its first step would write the random initialisation back over the checkpoint.
        target.optimizer.reload_model_params()


def fitting_prompts(files: list[str], what: str, cfg: Config, tokenizer, render) -> list:
    """The prompts of ``files``, validated, with those longer than ``data.max_prompt_len`` dropped
    and counted once here (found at generation time they would stop the run, and again on resume)."""
    rows = [row for path in files for row in load_prompt_dataset(path)]
    kept, overlong = split_overlong_prompts(rows, tokenizer, cfg.data.max_prompt_len, render)
    if overlong:
        print(describe_dropped(what, overlong, len(rows), f"data.max_prompt_len={cfg.data.max_prompt_len}"),
              flush=True)
    return kept


def load_prompts(cfg: Config, tokenizer, render) -> PromptSampler:
    """The training prompts that fit (``fitting_prompts``), in a sampler."""
    kept = fitting_prompts(cfg.data.train_files, "prompts", cfg, tokenizer, render)
    if not kept:
        raise DatasetError([f"{', '.join(cfg.data.train_files)}: every prompt is longer than "
                            f"data.max_prompt_len={cfg.data.max_prompt_len} tokens"])
    return PromptSampler(kept, batch_size=cfg.train.prompts_per_step, seed=cfg.data.seed)


def build_context(cfg: Config, sources: WeightSources | None = None) -> PrimeContext:
    from transformers import AutoTokenizer

    arch = read_hf_config(cfg.model.hf_path)
    opts = model_options(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    uses_prm = cfg.algorithm.estimator not in OUTCOME_ONLY_ESTIMATORS
    sources = sources or weight_sources(cfg)
    updates_per_step = cfg.train.prompts_per_step * cfg.rollout.n // cfg.train.mini_batch_responses
    policy = build_trainable(arch, opts, cfg.optim.policy,
                             total_steps=cfg.train.steps * updates_per_step * cfg.algorithm.ppo_epochs,
                             distributed_optimizer=cfg.parallel.distributed_optimizer)
    load_initial_weights(policy, sources.policy, arch, cfg)
    loaded = {"policy": sources.policy}
    prm = reference = None
    if uses_prm:
        prm_updates = cfg.train.prompts_per_step * cfg.rollout.n // cfg.train.prm_responses_per_update
        prm = build_trainable(arch, opts, cfg.optim.prm, total_steps=cfg.train.steps * prm_updates,
                              distributed_optimizer=cfg.parallel.distributed_optimizer)
        load_initial_weights(prm, sources.prm, arch, cfg)
        loaded["implicit PRM"] = sources.prm
    if uses_prm or cfg.algorithm.kl_coef:
        reference = build_frozen(arch, opts)
        load_initial_weights(reference, sources.reference, arch, cfg)
        loaded["reference"] = sources.reference
    if is_rank0():
        print("weights: " + "; ".join(f"{role} from {path}" for role, path in loaded.items()), flush=True)

    # Rank 0 owns the prompts; a bad file fails every rank.
    sampler = on_rank0(lambda: load_prompts(cfg, tokenizer, render_prompt))
    fleet = build_fleet(cfg, tokenizer, policy.model, arch)
    return PrimeContext(cfg=cfg, arch=arch, policy=policy, prm=prm, reference=reference, fleet=fleet,
                        sampler=sampler, buffer=PromptBuffer(), tokenizer=tokenizer, render=render_prompt)


def _trainable(ctx: PrimeContext) -> dict:
    return {"policy": ctx.policy, **({"prm": ctx.prm} if ctx.prm is not None else {})}


def run_eval(ctx: PrimeContext, eval_rows) -> float:
    """Greedy accuracy with the engines' current (synced) weights; the same value on all ranks."""
    with watchdog.phase("evaluation"):
        return fleet_greedy_accuracy(ctx.fleet, eval_rows, ctx.tokenizer, ctx.render,
                                     max_prompt_len=ctx.cfg.data.max_prompt_len,
                                     max_new_tokens=ctx.cfg.data.max_response_len)


def train(cfg: Config) -> dict:
    """Run PRIME training; returns a summary (eval accuracy before/after, final paths, and
    ``stopped``: why the run stopped early at a step boundary, if it did)."""
    launch = distributed.detect_launch_env()
    validate_run(cfg, world_size=launch.world_size)
    with start_watchdog(cfg, launch.rank), StopRequest(cfg.train.exit_after_minutes) as stop:
        # from here on a signal stops at a step boundary, and a rank that hangs ends the run
        distributed.setup(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.parallel.ep, cfg.train.seed,
                          hang_timeout_minutes=cfg.train.hang_timeout_minutes)
        return _train(cfg, stop)


def start_watchdog(cfg: Config, rank: int) -> Watchdog:
    return Watchdog(60.0 * cfg.train.hang_timeout_minutes, 60.0 * cfg.train.stop_grace_minutes, rank=rank)


def _train(cfg: Config, stop: StopRequest) -> dict:
    torch.manual_seed(cfg.train.seed)
    set_kernel_fusion(cfg.algorithm.compile_kernels)
    if is_rank0():
        checkpoint.remove_leftovers(cfg.checkpoint.dir)
    sources = weight_sources(cfg)
    ctx = build_context(cfg, sources)
    from megatron_prime.metrics import MetricsLogger

    def load_eval_rows():
        rows = fitting_prompts(cfg.data.eval_files, "eval prompts", cfg, ctx.tokenizer, ctx.render)
        return rows[: cfg.train.eval_limit] if cfg.train.eval_limit else rows

    # Every engine evaluates a shard, so every rank holds the rows.
    eval_rows = broadcast_object(on_rank0(load_eval_rows)) if cfg.data.eval_files else None

    state = checkpoint.resume(cfg.checkpoint.dir, cfg.checkpoint.resume, _trainable(ctx))
    start_step = 0
    if state is not None:
        start_step = state["step"] + 1
        if is_rank0():
            ctx.sampler.load_state_dict(state["sampler"])
        # plain dicts in the checkpoint (it holds data only: nothing in it can run code on loading)
        ctx.buffer.load_state_dict({"prompts": [PromptRow(**row) for row in state["buffer"]["prompts"]]})
        if is_rank0():
            print(f"resumed from step {state['step']} ({cfg.checkpoint.dir})", flush=True)
    ctx.fleet.sync()  # the engines start from the (possibly resumed) policy

    logger = None
    if is_rank0():
        logger = MetricsLogger(cfg.logging.dir, tensorboard=cfg.logging.tensorboard,
                               wandb_project="megatron-prime" if cfg.logging.wandb else None,
                               total_steps=cfg.train.steps, progress=cfg.logging.progress,
                               config=config_to_dict(cfg))
    summary = {"log_dir": cfg.logging.dir}
    has_eval = bool(eval_rows)
    if has_eval and start_step == 0:
        summary["eval_before"] = run_eval(ctx, eval_rows)
        if logger:
            logger.log(0, {"eval/accuracy": summary["eval_before"]})

    def save(step: int) -> None:
        trainer_state = {"sampler": ctx.sampler.state_dict() if is_rank0() else None,
                         "buffer": {"prompts": [dataclasses.asdict(row) for row in ctx.buffer.state_dict()["prompts"]]}}
        with watchdog.phase("checkpoint"):
            checkpoint.save_checkpoint(cfg.checkpoint.dir, step, _trainable(ctx), trainer_state,
                                       cfg.model.hf_path, cfg.checkpoint.keep_last, cfg.model.dtype,
                                       reference=sources.reference)

    flips = SustainedWarning(
        "advantage/flip_frac", cfg.train.warn_advantage_flip_frac,
        "the process rewards overrule the verifier on that many responses (incorrect ones pushed up, correct "
        "ones pushed down; samples flagged 'flipped' on the run page, megatron-prime inspect). Consider "
        "algorithm.process_return=min, or a smaller algorithm.beta or algorithm.process_coef")
    # Step s is logged as step s + 1 (step 0 holds the evaluation before training).
    for step in range(start_step, cfg.train.steps):
        watchdog.set_step(step)
        metrics, groups = prime_step(ctx, step)
        last = step == cfg.train.steps - 1
        if has_eval and (last or (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0)):
            metrics["eval/accuracy"] = run_eval(ctx, eval_rows)
            if last:
                summary["eval_after"] = metrics["eval/accuracy"]
        if logger:
            flips.update(step, metrics)
            logger.log(step + 1, metrics)
            if cfg.logging.sample_every and step % cfg.logging.sample_every == 0:
                logger.log_samples(step, _samples(groups, ctx.tokenizer))
        summary["last_metrics"] = metrics
        saved = (step + 1) % cfg.checkpoint.interval == 0 or last
        if saved:
            save(step)
        reason = None if last else stop.should_stop()
        if reason is not None:
            if not saved:
                save(step)
            summary["stopped"] = reason
            if is_rank0():
                print(f"stopping after step {step} ({reason}); checkpoint {checkpoint.step_dir(cfg.checkpoint.dir, step)} "
                      "is complete: run the same command again to resume", flush=True)
            break
    watchdog.set_step(None)

    if "stopped" not in summary:
        if has_eval and "eval_after" not in summary:  # every step was done before this run
            summary["eval_after"] = run_eval(ctx, eval_rows)
        if cfg.checkpoint.export_hf:
            for name, tm in _trainable(ctx).items():
                out = os.path.join(cfg.checkpoint.export_dir, name)
                with watchdog.phase("export"):
                    write_hf(unwrap(tm.model), ctx.arch, out, cfg.model.hf_path)
                summary[f"export_{name}"] = out
    if logger:
        logger.close()
    ctx.fleet.shutdown()
    return summary


def _samples(groups, tokenizer) -> list[dict]:
    """One record per response for ``samples.jsonl`` (read by ``megatron-prime inspect``): the
    response's tokens as strings beside its per-token process rewards and advantages, the sequence
    reward (the sum of the process rewards, beta * sum_t q_t) and the response's advantage (at its
    first token: for the RLOO-style estimators, the whole response's return minus the baseline)."""
    out = []
    for g, group in enumerate(groups):
        rewards = group.process_rewards
        advantages = group.advantages
        for i, text in enumerate(group.texts):
            ids = group.responses[i]
            out.append({
                "group": g,
                "data_index": group.data_index,
                "prompt": group.prompt_text,
                "response": text,
                "tokens": _token_strings(tokenizer, group.prompt_ids[-1], ids),
                "outcome": group.outcomes[i],
                "truncated": group.truncated[i],
                "process_rewards": None if rewards is None else rewards[i],
                "sequence_reward": None if rewards is None else sum(rewards[i]),
                "advantages": None if advantages is None else advantages[i],
                "advantage": advantages[i][0] if advantages and advantages[i] else None,
                "flipped": None if group.flipped is None else group.flipped[i],
            })
    return out


def _token_strings(tokenizer, previous: int, ids: list[int]) -> list[str]:
    """Each token's text as it reads in place: decode(previous, token) minus decode(previous), so
    SentencePiece tokenizers keep a token's leading space (decoding a token alone drops it). A
    token that is part of a multi-byte character decodes as it does alone."""
    before = [previous, *ids[:-1]]
    singles = tokenizer.batch_decode([[t] for t in before])
    pairs = tokenizer.batch_decode([[a, b] for a, b in zip(before, ids)])
    alone = tokenizer.batch_decode([[t] for t in ids])
    return [pair[len(single):] if pair.startswith(single) else own
            for single, pair, own in zip(singles, pairs, alone)]
