"""``megatron-prime train``: set up the three models, the rollout engines and the data, then run
PRIME steps (``prime_step``) with metrics, evaluation, checkpoints (exact resume) and a final HF
export.

    train(cfg)
      guarded_run      signals stop at a step boundary; a hang ends the run with every rank's stacks
      PrimeRun.start   models (policy, implicit PRM, reference), engines, prompts, logger
      run.resume       the newest complete checkpoint, or step 0
      for each step:   prime_step -> evaluate -> log -> end_of_step (checkpoint, stop)
      run.finish       final evaluation and HF export
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from megatron_prime.algorithm import OUTCOME_ONLY_ESTIMATORS, PromptBuffer, set_kernel_fusion
from megatron_prime.bridge.convert import write_hf
from megatron_prime.bridge.lora_export import write_peft_adapter
from megatron_prime.config import Config, config_to_dict
from megatron_prime.data import DatasetError, PromptRow, PromptSampler, load_prompt_dataset, render_prompt
from megatron_prime.data.lengths import describe_dropped, split_overlong_prompts
from megatron_prime.fleet.ahead import RolloutAhead
from megatron_prime.fleet.fleet import build_fleet
from megatron_prime.fleet.grading import fleet_greedy_accuracy
from megatron_prime.metrics import MetricsLogger, SustainedWarning, sample_records
from megatron_prime.models.hf_config import read_hf_config
from megatron_prime.models.wrappers import unwrap
from megatron_prime.models.lora import LoRASettings
from megatron_prime.passes.trainable import build_frozen, build_shared_base, build_trainable, model_options
from megatron_prime.platform import distributed, watchdog
from megatron_prime.platform.distributed import broadcast_object, is_rank0, on_rank0
from megatron_prime.training import checkpoint
from megatron_prime.training.initial_weights import WeightSources, load_initial_weights, weight_sources
from megatron_prime.training.preemption import end_of_step, guarded_run
from megatron_prime.training.prime_step import PrimeContext, prime_step
from megatron_prime.training.validation import validate_run

FLIP_ADVICE = ("the process rewards overrule the verifier on that many responses (incorrect ones pushed up, "
               "correct ones pushed down; flagged 'flipped' on the run page, megatron-prime inspect). Consider "
               "algorithm.process_return=min, or a smaller algorithm.beta or algorithm.process_coef")


def train(cfg: Config) -> dict:
    """Run PRIME training; returns a summary (eval accuracy before/after, final paths, and
    ``stopped``: why the run stopped early at a step boundary, if it did)."""
    launch = distributed.detect_launch_env()
    validate_run(cfg, world_size=launch.world_size)
    with guarded_run(cfg, launch.rank) as stop:
        distributed.setup(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.parallel.ep, cfg.train.seed,
                          hang_timeout_minutes=cfg.train.hang_timeout_minutes)
        torch.manual_seed(cfg.train.seed)
        set_kernel_fusion(cfg.algorithm.compile_kernels)
        run = PrimeRun.start(cfg)
        first = run.resume()
        run.evaluate_before(first)
        # Step s is logged as step s + 1 (step 0 holds the evaluation before training).
        for step in range(first, cfg.train.steps):
            watchdog.set_step(step)
            metrics, groups = prime_step(run.ctx, step)
            last = step == cfg.train.steps - 1
            run.evaluate(step, last, metrics)
            run.log(step, metrics, groups)
            due = (step + 1) % cfg.checkpoint.interval == 0 or last
            stopped = end_of_step(step, last=last, due=due, save=run.save, stop=stop)
            if stopped is not None:
                run.summary["stopped"] = stopped
                break
        watchdog.set_step(None)
        return run.finish()


@dataclass
class PrimeRun:
    """What one ``train`` run holds besides the PRIME step's context: where the weights came from,
    the evaluation prompts, the metrics logger (rank 0) and the summary it returns."""

    cfg: Config
    ctx: PrimeContext
    sources: WeightSources
    eval_rows: list | None
    logger: MetricsLogger | None
    flips: SustainedWarning
    summary: dict = field(default_factory=dict)

    @classmethod
    def start(cls, cfg: Config) -> "PrimeRun":
        if is_rank0():
            checkpoint.remove_leftovers(cfg.checkpoint.dir)
        sources = weight_sources(cfg)
        ctx = build_context(cfg, sources)
        # Every engine evaluates a shard, so every rank holds the rows.
        eval_rows = None
        if cfg.data.eval_files:
            eval_rows = broadcast_object(on_rank0(lambda: eval_prompts(cfg, ctx.tokenizer, ctx.render)))
        logger = None
        if is_rank0():
            logger = MetricsLogger(cfg.logging.dir, tensorboard=cfg.logging.tensorboard,
                                   wandb_project="megatron-prime" if cfg.logging.wandb else None,
                                   total_steps=cfg.train.steps, progress=cfg.logging.progress,
                                   config=config_to_dict(cfg))
        flips = SustainedWarning("advantage/flip_frac", cfg.train.warn_advantage_flip_frac, FLIP_ADVICE)
        return cls(cfg, ctx, sources, eval_rows, logger, flips, {"log_dir": cfg.logging.dir})

    @property
    def trainables(self) -> dict:
        return {"policy": self.ctx.policy, **({"prm": self.ctx.prm} if self.ctx.prm is not None else {})}

    def resume(self) -> int:
        """Load the newest complete checkpoint (``checkpoint.resume``) and put the engines on the
        policy; returns the first step to run."""
        cfg, ctx = self.cfg, self.ctx
        state = checkpoint.resume(cfg.checkpoint.dir, cfg.checkpoint.resume, self.trainables, cfg.model.hf_path)
        first = 0
        if state is not None:
            first = state["step"] + 1
            if is_rank0():
                ctx.sampler.load_state_dict(state["sampler"])
                print(f"resumed from step {state['step']} ({cfg.checkpoint.dir})", flush=True)
            # plain dicts in the checkpoint (it holds data only: nothing in it can run code on loading)
            ctx.buffer.load_state_dict({"prompts": [PromptRow(**row) for row in state["buffer"]["prompts"]]})
            pending = (state.get("rollout_ahead") or {}).get("pending")
            if ctx.ahead is None and pending is not None:
                raise checkpoint.CheckpointError(
                    f"{cfg.checkpoint.dir}: step {state['step']} was saved by a one-step-off run "
                    "(rollout.max_staleness=1) with the next step's batch already collected; resuming it "
                    "synchronously would skip that batch's prompts. Resume with rollout.max_staleness=1")
            if ctx.ahead is not None and is_rank0():  # the batch collected during the saved step
                ctx.ahead.load_state_dict(state.get("rollout_ahead") or {})
        ctx.fleet.sync()  # the engines start from the (possibly resumed) policy
        return first

    def save(self, step: int) -> str:
        ctx = self.ctx
        state = {"sampler": ctx.sampler.state_dict() if is_rank0() else None,
                 "buffer": {"prompts": [dataclasses.asdict(row) for row in ctx.buffer.state_dict()["prompts"]]}}
        if ctx.ahead is not None and is_rank0():
            state["rollout_ahead"] = ctx.ahead.state_dict()
        with watchdog.phase("checkpoint"):
            return checkpoint.save_checkpoint(self.cfg.checkpoint.dir, step, self.trainables, state,
                                              self.cfg.model.hf_path, self.cfg.checkpoint.keep_last,
                                              self.cfg.model.dtype, reference=self.sources.reference)

    def greedy_accuracy(self) -> float:
        """Held-out greedy accuracy with the engines' current (synced) weights, on every rank."""
        ctx = self.ctx
        with watchdog.phase("evaluation"):
            return fleet_greedy_accuracy(ctx.fleet, self.eval_rows, ctx.tokenizer, ctx.render,
                                         max_prompt_len=self.cfg.data.max_prompt_len,
                                         max_new_tokens=self.cfg.data.max_response_len)

    def evaluate_before(self, first: int) -> None:
        if self.eval_rows and first == 0:
            self.summary["eval_before"] = self.greedy_accuracy()
            if self.logger:
                self.logger.log(0, {"eval/accuracy": self.summary["eval_before"]})

    def evaluate(self, step: int, last: bool, metrics: dict) -> None:
        every = self.cfg.train.eval_every
        if self.eval_rows and (last or (every and (step + 1) % every == 0)):
            metrics["eval/accuracy"] = self.greedy_accuracy()
            if last:
                self.summary["eval_after"] = metrics["eval/accuracy"]

    def log(self, step: int, metrics: dict, groups) -> None:
        self.summary["last_metrics"] = metrics
        if self.logger is None:
            return
        self.flips.update(step, metrics)
        self.logger.log(step + 1, metrics)
        if self.cfg.logging.sample_every and step % self.cfg.logging.sample_every == 0:
            self.logger.log_samples(step, sample_records(groups, self.ctx.tokenizer))

    def finish(self) -> dict:
        """After the last step: the final evaluation (if it was not run yet) and the HF export of
        the trained models; neither after an early stop. Returns the summary."""
        cfg, summary = self.cfg, self.summary
        if "stopped" not in summary:
            if self.eval_rows and "eval_after" not in summary:  # every step was done before this run
                summary["eval_after"] = self.greedy_accuracy()
            if cfg.checkpoint.export_hf:
                for name, tm in self.trainables.items():
                    out = os.path.join(cfg.checkpoint.export_dir, name)
                    with watchdog.phase("export"):
                        # a LoRA model: merged with its adapter, and the adapter alone beside it (PEFT)
                        write_hf(unwrap(tm.model), self.ctx.arch, out, cfg.model.hf_path, adapter=tm.adapter)
                        if tm.adapter is not None:
                            write_peft_adapter(tm.model, self.ctx.arch, unwrap(tm.model).lora_settings, tm.adapter,
                                               f"{out}_adapter", base_model_dir=cfg.model.hf_path)
                            summary[f"export_{name}_adapter"] = f"{out}_adapter"
                    summary[f"export_{name}"] = out
        if self.logger:
            self.logger.close()
        self.ctx.fleet.shutdown()
        return summary


def build_context(cfg: Config, sources: WeightSources | None = None) -> PrimeContext:
    """The PRIME step's context: the policy, the implicit PRM and the reference in this rank's
    layout, loaded from ``sources``; the rollout fleet; the prompt sampler (rank 0)."""
    from transformers import AutoTokenizer

    arch = read_hf_config(cfg.model.hf_path)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    sources = sources or weight_sources(cfg)
    policy, prm, reference = build_models(cfg, arch, sources)

    # Rank 0 owns the prompts; a bad file fails every rank.
    sampler = on_rank0(lambda: load_prompts(cfg, tokenizer, render_prompt))
    fleet = build_fleet(cfg, tokenizer, policy.model, arch)
    buffer = PromptBuffer()
    ahead = None
    if cfg.rollout.max_staleness > 0:
        ahead = RolloutAhead(fleet, sampler, buffer, tokenizer, cfg, render_prompt)
        if is_rank0() and cfg.algorithm.rollout_correction == "none":
            print("note: rollout.max_staleness=1 trains each batch one policy version after it was sampled, and "
                  "algorithm.rollout_correction=none leaves that lag uncorrected (token_tis corrects it)", flush=True)
    return PrimeContext(cfg=cfg, arch=arch, policy=policy, prm=prm, reference=reference, fleet=fleet,
                        sampler=sampler, buffer=buffer, tokenizer=tokenizer, render=render_prompt, ahead=ahead)


def build_models(cfg: Config, arch, sources: WeightSources):
    """The policy, the implicit PRM (None for outcome-only estimators) and the reference (None when
    neither the PRM nor a KL penalty needs it), in this rank's layout, with their starting weights.
    With ``model.lora``: one frozen base (``model.hf_path``) carrying two adapters, the reference
    being that base with no adapter active."""
    opts = model_options(cfg)
    # mixture of experts: the policy's routers can record and replay; algorithm.routing_replay chooses
    # whether its update replays the recorded routes or only counts how many it would change. With one
    # shared base the PRM's and the reference's passes just never ask them to
    replay_opts = model_options(cfg, routing_replay=arch.is_moe)
    uses_prm = cfg.algorithm.estimator not in OUTCOME_ONLY_ESTIMATORS
    needs_reference = uses_prm or bool(cfg.algorithm.kl_coef)
    t = cfg.train
    steps = {"policy": t.steps * (t.prompts_per_step * cfg.rollout.n // t.mini_batch_responses) * cfg.algorithm.ppo_epochs,
             "prm": t.steps * (t.prompts_per_step * cfg.rollout.n // t.prm_responses_per_update)}
    optims = {"policy": cfg.optim.policy, "prm": cfg.optim.prm}
    roles = ["policy", "prm"] if uses_prm else ["policy"]
    lora = cfg.model.lora
    if lora.enabled:
        settings = LoRASettings(ranks={r: lora.ranks[r] for r in roles}, alpha=lora.alpha, targets=tuple(lora.targets))
        # The adapters' optimizer state is ~1% of the model's: kept whole on every data-parallel rank
        # (not the distributed optimizer), which also lets it resume at another TP/PP.
        trainables, base = build_shared_base(arch, replay_opts, settings, {r: (optims[r], steps[r]) for r in roles},
                                             distributed_optimizer=False, seed=cfg.train.seed)
        load_initial_weights(base, sources.policy, arch, cfg)
        for tm in trainables.values():  # the optimizers' fp32 copies of the adapters, taken at build
            tm.optimizer.reload_model_params()
        if is_rank0():
            print(f"weights: one base from {sources.policy} (the reference: no adapter), LoRA adapters "
                  + ", ".join(f"{r} rank {settings.ranks[r]}" for r in roles) + f", alpha {lora.alpha}, on "
                  + ", ".join(settings.targets), flush=True)
        return trainables["policy"], trainables.get("prm"), base if needs_reference else None
    policy = build_trainable(arch, replay_opts, cfg.optim.policy, total_steps=steps["policy"],
                             distributed_optimizer=cfg.parallel.distributed_optimizer)
    load_initial_weights(policy, sources.policy, arch, cfg)
    loaded = {"policy": sources.policy}
    prm = reference = None
    if uses_prm:
        prm = build_trainable(arch, opts, cfg.optim.prm, total_steps=steps["prm"],
                              distributed_optimizer=cfg.parallel.distributed_optimizer)
        load_initial_weights(prm, sources.prm, arch, cfg)
        loaded["implicit PRM"] = sources.prm
    if needs_reference:
        reference = build_frozen(arch, opts)
        load_initial_weights(reference, sources.reference, arch, cfg)
        loaded["reference"] = sources.reference
    if is_rank0():
        print("weights: " + "; ".join(f"{role} from {path}" for role, path in loaded.items()), flush=True)
    return policy, prm, reference


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


def eval_prompts(cfg: Config, tokenizer, render) -> list:
    """The evaluation prompts that fit, the first ``train.eval_limit`` of them (0: all)."""
    rows = fitting_prompts(cfg.data.eval_files, "eval prompts", cfg, tokenizer, render)
    return rows[: cfg.train.eval_limit] if cfg.train.eval_limit else rows
