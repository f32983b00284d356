"""``megatron-prime train``: set up the three models, the rollout engine and the data, then run
PRIME steps with metrics, evaluation, checkpoints (exact resume) and a final HF export."""

from __future__ import annotations

import os

import torch

from megatron_prime.algorithm import OUTCOME_ONLY_ESTIMATORS, GroupBuffer
from megatron_prime.bridge.convert import write_hf
from megatron_prime.bridge.hf_io import SafetensorsSource
from megatron_prime.bridge.mcore_io import load_model
from megatron_prime.bridge.transfer import load_hf_weights
from megatron_prime.config import Config, config_to_dict, validate
from megatron_prime.models.gpt import ModelOptions, resolve_use_te
from megatron_prime.models.hf_config import read_hf_config
from megatron_prime.models.wrappers import unwrap
from megatron_prime.platform import distributed
from megatron_prime.training import checkpoint
from megatron_prime.platform.distributed import broadcast_object, is_rank0, on_rank0
from megatron_prime.training.evaluate import fleet_greedy_accuracy
from megatron_prime.training.models import TrainableModel, build_frozen, build_trainable
from megatron_prime.training.prime_step import PrimeContext, prime_step
from megatron_prime.training.rollout_fleet import build_fleet


def model_options(cfg: Config) -> ModelOptions:
    return ModelOptions(
        dtype=cfg.model.dtype, fp8=cfg.model.fp8, use_te=resolve_use_te(cfg.model.transformer_engine),
        vocab_pad_multiple=cfg.model.vocab_pad_multiple, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
        sequence_parallel=cfg.parallel.sequence_parallel,
    )


def load_initial_weights(target, cfg: Config, arch, hf_path: str | None = None) -> None:
    """Weights for a trainable model or a frozen one: from ``hf_path`` if given, else
    ``model.mcore_path`` (a Megatron checkpoint) if set, else ``model.hf_path``."""
    model = unwrap(target.model if isinstance(target, TrainableModel) else target)
    if not hf_path and cfg.model.mcore_path:
        load_model(model, cfg.model.mcore_path)
    else:
        source = SafetensorsSource(hf_path or cfg.model.hf_path, arch)
        source.check_shapes()
        load_hf_weights(model, arch, source, cfg.model.vocab_pad_multiple)
    if isinstance(target, TrainableModel):
        # In bf16/fp16 the optimizer holds fp32 main copies taken when it was built; without this
        # its first step would write the random initialisation back over the checkpoint.
        target.optimizer.reload_model_params()


def build_context(cfg: Config) -> PrimeContext:
    from transformers import AutoTokenizer

    from megatron_prime.data import PromptSampler, load_prompt_dataset, render_prompt

    arch = read_hf_config(cfg.model.hf_path)
    opts = model_options(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    uses_prm = cfg.algorithm.estimator not in OUTCOME_ONLY_ESTIMATORS
    updates_per_step = cfg.train.prompts_per_step * cfg.rollout.n // cfg.train.mini_batch_responses
    policy = build_trainable(arch, opts, cfg.optim.policy,
                             total_steps=cfg.train.steps * updates_per_step * cfg.algorithm.ppo_epochs,
                             distributed_optimizer=cfg.parallel.distributed_optimizer)
    load_initial_weights(policy, cfg, arch)
    prm = reference = None
    if uses_prm:
        prm = build_trainable(arch, opts, cfg.optim.prm, total_steps=cfg.train.steps,
                              distributed_optimizer=cfg.parallel.distributed_optimizer)
        load_initial_weights(prm, cfg, arch, hf_path=cfg.model.prm_hf_path or None)
    if uses_prm or cfg.algorithm.kl_coef:
        reference = build_frozen(arch, opts)
        load_initial_weights(reference, cfg, arch)

    def load_prompts():
        rows = [row for path in cfg.data.train_files for row in load_prompt_dataset(path)]
        return PromptSampler(rows, batch_size=cfg.train.prompts_per_step, seed=cfg.data.seed)

    # Rank 0 owns the prompts; a bad file fails every rank.
    sampler = on_rank0(load_prompts)
    fleet = build_fleet(cfg, tokenizer, policy.model, arch)
    return PrimeContext(cfg=cfg, arch=arch, policy=policy, prm=prm, reference=reference, fleet=fleet,
                        sampler=sampler, buffer=GroupBuffer(), tokenizer=tokenizer, render=render_prompt)


def _trainable(ctx: PrimeContext) -> dict:
    return {"policy": ctx.policy, **({"prm": ctx.prm} if ctx.prm is not None else {})}


def run_eval(ctx: PrimeContext, eval_rows) -> float:
    """Greedy accuracy with the engines' current (synced) weights; the same value on all ranks."""
    return fleet_greedy_accuracy(ctx.fleet, eval_rows, ctx.tokenizer, ctx.render,
                                 max_prompt_len=ctx.cfg.data.max_prompt_len,
                                 max_new_tokens=ctx.cfg.data.max_response_len)


def train(cfg: Config) -> dict:
    """Run PRIME training; returns a summary (eval accuracy before/after, final paths)."""
    env = distributed.setup(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.parallel.ep, cfg.train.seed)
    validate(cfg, world_size=env.world_size)
    torch.manual_seed(cfg.train.seed)
    ctx = build_context(cfg)
    from megatron_prime.data import load_prompt_dataset
    from megatron_prime.metrics import MetricsLogger

    def load_eval_rows():
        rows = [row for path in cfg.data.eval_files for row in load_prompt_dataset(path)]
        return rows[: cfg.train.eval_limit] if cfg.train.eval_limit else rows

    # Every engine evaluates a shard, so every rank holds the rows.
    eval_rows = broadcast_object(on_rank0(load_eval_rows)) if cfg.data.eval_files else None

    state = checkpoint.resume(cfg.checkpoint.dir, cfg.checkpoint.resume, _trainable(ctx))
    start_step = 0
    if state is not None:
        start_step = state["step"] + 1
        if is_rank0():
            ctx.sampler.load_state_dict(state["sampler"])
        ctx.buffer.load_state_dict(state["buffer"])
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

    for step in range(start_step, cfg.train.steps):
        metrics, groups = prime_step(ctx, step)
        last = step == cfg.train.steps - 1
        if has_eval and cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and not last:
            metrics["eval/accuracy"] = run_eval(ctx, eval_rows)
        if logger:
            logger.log(step + 1, metrics)
            if cfg.logging.sample_every and step % cfg.logging.sample_every == 0:
                logger.log_samples(step, _samples(groups))
        if (step + 1) % cfg.checkpoint.interval == 0 or last:
            trainer_state = {"sampler": ctx.sampler.state_dict() if is_rank0() else None,
                             "buffer": ctx.buffer.state_dict()}
            checkpoint.save_checkpoint(cfg.checkpoint.dir, step, _trainable(ctx), trainer_state,
                                       cfg.model.hf_path, cfg.checkpoint.keep_last, cfg.model.dtype)
        summary["last_metrics"] = metrics

    if has_eval:
        summary["eval_after"] = run_eval(ctx, eval_rows)
        if logger:
            logger.log(cfg.train.steps + 1, {"eval/accuracy": summary["eval_after"]})
    if cfg.checkpoint.export_hf:
        for name, tm in _trainable(ctx).items():
            out = os.path.join(cfg.checkpoint.export_dir, name)
            write_hf(unwrap(tm.model), ctx.arch, out, cfg.model.hf_path)
            summary[f"export_{name}"] = out
    if logger:
        logger.close()
    ctx.fleet.shutdown()
    return summary


def _samples(groups) -> list[dict]:
    out = []
    for group in groups:
        rewards = group.process_rewards
        for i, text in enumerate(group.texts):
            out.append({
                "prompt": group.prompt_text,
                "response": text,
                "outcome": group.outcomes[i],
                "process_rewards": None if rewards is None else rewards[i],
            })
    return out
