"""``megatron-prime sft``: supervised fine-tuning with the loss on response tokens only — the
stage that makes PRIME's starting checkpoint (the paper's Eurus-2-7B-SFT). Writes a Megatron
checkpoint (``output_dir/mcore``) and a Hugging Face export (``output_dir/hf``)."""

from __future__ import annotations

import os
import time

import torch

from megatron_prime.algorithm import metric, metric_means
from megatron_prime.bridge.convert import write_hf
from megatron_prime.bridge.mcore_io import save_model
from megatron_prime.config import Config, OptimizerConfig, validate
from megatron_prime.models.hf_config import read_hf_config
from megatron_prime.models.wrappers import unwrap
from megatron_prime.platform import distributed
from megatron_prime.training.batch import build_rollout_batch
from megatron_prime.platform.distributed import is_rank0
from megatron_prime.training.data_parallel import dp_rows, reduce_metric_pairs
from megatron_prime.training.models import build_trainable
from megatron_prime.training.passes import run_pass
from megatron_prime.training.trainer import load_initial_weights, model_options


def tokenize_sft(rows, tokenizer, render, max_len: int):
    prompts, responses = [], []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for row in rows:
        p = tokenizer(render(tokenizer, row.prompt), add_special_tokens=False)["input_ids"]
        r = tokenizer(row.response, add_special_tokens=False)["input_ids"] + eos
        if len(p) + len(r) > max_len:
            r = r[: max(1, max_len - len(p))]
        prompts.append(p)
        responses.append(r)
    return prompts, responses


def sft(cfg: Config) -> dict:
    from transformers import AutoTokenizer

    from megatron_prime.data import load_sft_dataset, render_prompt

    env = distributed.setup(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.parallel.ep, cfg.train.seed)
    validate(cfg, world_size=env.world_size)
    s = cfg.sft
    arch = read_hf_config(cfg.model.hf_path)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    optim = OptimizerConfig(lr=s.lr, min_lr=s.min_lr, lr_schedule="cosine" if s.min_lr < s.lr else "constant",
                            warmup_steps=s.warmup_steps, weight_decay=s.weight_decay, grad_clip=s.grad_clip)
    policy = build_trainable(arch, model_options(cfg), optim, total_steps=s.steps,
                             distributed_optimizer=cfg.parallel.distributed_optimizer)
    load_initial_weights(policy, cfg, arch)
    rows = load_sft_dataset(s.train_file)
    prompts, responses = tokenize_sft(rows, tokenizer, render_prompt,
                                      cfg.data.max_prompt_len + cfg.data.max_response_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def loss_fn(mb, logprobs, _entropy):
        mask = mb.response_mask
        nll = -(logprobs * mask).sum()
        return nll, int(mask.sum()), {"sft/nll": metric(nll, mask.sum())}

    generator = torch.Generator().manual_seed(cfg.train.seed)
    order = torch.randperm(len(rows), generator=generator)
    cursor, start, history = 0, time.time(), []
    for step in range(s.steps):
        if cursor + s.batch_size > len(order):  # next epoch, new shuffle
            order, cursor = torch.randperm(len(rows), generator=generator), 0
        picked = order[cursor: cursor + s.batch_size].tolist()
        cursor += s.batch_size
        batch = build_rollout_batch(
            prompts=[prompts[i] for i in picked], responses=[responses[i] for i in picked],
            outcomes=[0.0] * len(picked), rollout_logprobs=None,
            truncated=[False] * len(picked), group_size=1, pad_id=pad,
        ).to(distributed.device())
        policy.zero_grad()
        result = run_pass(policy.model, batch.rows(dp_rows(batch.size)), temperature=1.0,
                          token_budget=cfg.train.micro_batch_tokens, loss_fn=loss_fn)
        info = policy.step()
        nll = metric_means(reduce_metric_pairs(result.metrics)).get("sft/nll", float("nan"))
        history.append(nll)
        if is_rank0() and (step % s.log_every == 0 or step == s.steps - 1):
            print(f"[sft {step + 1}/{s.steps} | {time.time() - start:5.0f}s] nll={nll:.4f} "
                  f"lr={info['lr']:.2e} grad_norm={info['grad_norm']:.3f}", flush=True)

    mcore_dir = os.path.join(s.output_dir, "mcore")
    hf_dir = os.path.join(s.output_dir, "hf")
    save_model(policy.model, mcore_dir, cfg.model.hf_path, extra_meta={"dtype": cfg.model.dtype})
    write_hf(unwrap(policy.model), arch, hf_dir, cfg.model.hf_path)
    return {"mcore": mcore_dir, "hf": hf_dir, "final_nll": history[-1] if history else None}
