"""``megatron-prime sft``: supervised fine-tuning with the loss on response tokens only — the
stage that makes PRIME's starting checkpoint (the paper's Eurus-2-7B-SFT). Writes resumable
checkpoints (``output_dir/checkpoints``), then a Megatron checkpoint (``output_dir/mcore``) and a
Hugging Face export (``output_dir/hf``)."""

from __future__ import annotations

import os
import time

import torch

from megatron_prime.algorithm import metric, metric_means
from megatron_prime.bridge.convert import write_hf
from megatron_prime.bridge.mcore_io import save_model
from megatron_prime.config import Config
from megatron_prime.data import DatasetError, load_sft_dataset, render_prompt
from megatron_prime.data.lengths import describe_dropped, split_overlong_sft
from megatron_prime.models.hf_config import read_hf_config
from megatron_prime.models.wrappers import unwrap
from megatron_prime.passes.batch import build_rollout_batch
from megatron_prime.passes.data_parallel import dp_rows, reduce_metric_pairs
from megatron_prime.passes.forward_backward import run_pass
from megatron_prime.passes.trainable import build_trainable, model_options
from megatron_prime.platform import distributed, watchdog
from megatron_prime.platform.distributed import is_rank0
from megatron_prime.training import checkpoint
from megatron_prime.training.initial_weights import load_initial_weights
from megatron_prime.training.preemption import StopRequest, end_of_step, guarded_run
from megatron_prime.training.validation import validate_run


def tokenize_sft(rows, tokenizer, render):
    """(prompt ids, response ids + eos) per row; rows must already fit (``split_overlong_sft``)."""
    prompts, responses = [], []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for row in rows:
        prompts.append(tokenizer(render(tokenizer, row.prompt), add_special_tokens=False)["input_ids"])
        responses.append(tokenizer(row.response, add_special_tokens=False)["input_ids"] + eos)
    return prompts, responses


def load_sft_rows(cfg: Config, tokenizer, render) -> list:
    """The SFT rows, with those longer than data.max_prompt_len + data.max_response_len dropped and
    counted: a row cut to fit would teach the model to stop before its answer and eos."""
    rows = load_sft_dataset(cfg.sft.train_file)
    max_len = cfg.data.max_prompt_len + cfg.data.max_response_len
    kept, overlong = split_overlong_sft(rows, tokenizer, max_len, render)
    if overlong:
        print(describe_dropped("SFT rows", overlong, len(rows),
                               f"data.max_prompt_len + data.max_response_len = {max_len}", sft=True), flush=True)
    if not kept:
        raise DatasetError([f"{cfg.sft.train_file}: every row is longer than {max_len} tokens "
                            "(data.max_prompt_len + data.max_response_len)"])
    return kept


class BatchOrder:
    """Which rows each SFT step trains on: a fresh seeded shuffle per epoch. Checkpointable, so a
    resumed run trains on exactly the rows an uninterrupted one would."""

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        self.num_rows, self.batch_size = num_rows, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.cursor = torch.randperm(num_rows, generator=self.generator), 0

    def next(self) -> list[int]:
        if self.cursor + self.batch_size > self.num_rows:  # next epoch, new shuffle
            self.order, self.cursor = torch.randperm(self.num_rows, generator=self.generator), 0
        picked = self.order[self.cursor:self.cursor + self.batch_size].tolist()
        self.cursor += self.batch_size
        return picked

    def state_dict(self) -> dict:
        return {"order": self.order.clone(), "cursor": self.cursor, "generator": self.generator.get_state(),
                "num_rows": self.num_rows}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows:
            raise DatasetError([f"the SFT checkpoint was written for {state['num_rows']} rows, "
                                f"this run has {self.num_rows}: same data, or a new sft.output_dir"])
        self.order, self.cursor = state["order"], state["cursor"]
        self.generator.set_state(state["generator"])


def sft(cfg: Config) -> dict:
    """Supervised fine-tuning with periodic atomic checkpoints (``sft.output_dir/checkpoints``,
    every ``sft.checkpoint_interval`` steps): a rerun resumes from the newest (``checkpoint.resume``),
    and a stop signal or ``train.exit_after_minutes`` checkpoints and stops at a step boundary."""
    launch = distributed.detect_launch_env()
    validate_run(cfg, world_size=launch.world_size, stage="sft")
    with guarded_run(cfg, launch.rank) as stop:
        distributed.setup(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.parallel.ep, cfg.train.seed,
                          hang_timeout_minutes=cfg.train.hang_timeout_minutes)
        return _sft(cfg, stop)


def _sft(cfg: Config, stop: StopRequest) -> dict:
    from transformers import AutoTokenizer

    s = cfg.sft
    ckpt_root = os.path.join(s.output_dir, "checkpoints")
    if is_rank0():
        checkpoint.remove_leftovers(ckpt_root)
    arch = read_hf_config(cfg.model.hf_path)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    if cfg.model.lora.enabled and is_rank0():
        print(f"[sft] model.lora.rank={cfg.model.lora.rank} applies to PRIME training: SFT trains every weight "
              "(its model becomes the base the adapters share)", flush=True)
    policy = build_trainable(arch, model_options(cfg), s.optim, total_steps=s.steps,
                             distributed_optimizer=cfg.parallel.distributed_optimizer)
    load_initial_weights(policy, cfg.model.mcore_path or cfg.model.hf_path, arch, cfg)
    rows = load_sft_rows(cfg, tokenizer, render_prompt)
    prompts, responses = tokenize_sft(rows, tokenizer, render_prompt)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def loss_fn(mb, logprobs, _entropy):
        mask = mb.response_mask
        nll = -(logprobs * mask).sum()
        return nll, int(mask.sum()), {"sft/nll": metric(nll, mask.sum())}

    batches = BatchOrder(len(rows), s.batch_size, cfg.train.seed)
    start_step = 0
    state = checkpoint.resume(ckpt_root, cfg.checkpoint.resume, {"policy": policy})
    if state is not None:
        batches.load_state_dict(state["sft"])
        start_step = state["step"] + 1
        if is_rank0():
            print(f"[sft] resumed from step {state['step']} ({ckpt_root})", flush=True)

    def save(step: int) -> str:
        with watchdog.phase("checkpoint"):
            return checkpoint.save_checkpoint(ckpt_root, step, {"policy": policy}, {"sft": batches.state_dict()},
                                              cfg.model.hf_path, cfg.checkpoint.keep_last, cfg.model.dtype)

    start, history, stopped = time.time(), [], None
    for step in range(start_step, s.steps):
        watchdog.set_step(step)
        picked = batches.next()
        batch = build_rollout_batch(
            prompts=[prompts[i] for i in picked], responses=[responses[i] for i in picked],
            outcomes=[0.0] * len(picked), rollout_logprobs=None,
            truncated=[False] * len(picked), group_size=1, pad_id=pad,
        ).to(distributed.device())
        policy.zero_grad()
        with watchdog.phase("sft_update"):
            result = run_pass(policy.model, batch.rows(dp_rows(batch.size)), temperature=1.0,
                              token_budget=cfg.train.micro_batch_tokens, loss_fn=loss_fn)
            info = policy.step()
        nll = metric_means(reduce_metric_pairs(result.metrics)).get("sft/nll", float("nan"))
        history.append(nll)
        if is_rank0() and (step % s.log_every == 0 or step == s.steps - 1):
            skipped = "" if info["update_ok"] else " (update skipped: inf/nan grads)"
            print(f"[sft {step + 1}/{s.steps} | {time.time() - start:5.0f}s] nll={nll:.4f} "
                  f"lr={info['lr']:.2e} grad_norm={info['grad_norm']:.3f}{skipped}", flush=True)
        last = step == s.steps - 1
        due = last or bool(s.checkpoint_interval and (step + 1) % s.checkpoint_interval == 0)
        stopped = end_of_step(step, last=last, due=due, save=save, stop=stop, prefix="[sft] ")
        if stopped is not None:
            break
    watchdog.set_step(None)

    mcore_dir = os.path.join(s.output_dir, "mcore")
    hf_dir = os.path.join(s.output_dir, "hf")
    if stopped is None:
        with watchdog.phase("export"):
            save_model(policy.model, mcore_dir, cfg.model.hf_path, extra_meta={"dtype": cfg.model.dtype})
            write_hf(unwrap(policy.model), arch, hf_dir, cfg.model.hf_path)
    return {"mcore": mcore_dir, "hf": hf_dir, "final_nll": history[-1] if history else None, "history": history,
            "stopped": stopped}
