"""Metrics: what a PRIME step reports (phase times, optimizer and batch statistics, sample
records for the run page) and where it goes (TensorBoard scalars, optional wandb, samples as jsonl,
console progress and warnings).

Only the process that logs (global rank 0) builds a ``MetricsLogger``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections import deque
from contextlib import contextmanager

import torch

from megatron_prime.platform import watchdog

# Console summary: (metric key, short label, format)
CONSOLE_KEYS = (
    ("eval/accuracy", "eval_acc", "{:.3f}"),
    ("outcome/accuracy_sampled", "acc", "{:.3f}"),
    ("filter/kept_frac", "kept", "{:.2f}"),
    ("prm/loss", "prm_loss", "{:.3f}"),
    ("prm/accuracy", "prm_acc", "{:.2f}"),
    ("policy/pg_loss", "pg", "{:+.4f}"),
    ("policy/clip_frac", "clip", "{:.3f}"),
    ("policy/entropy", "ent", "{:.3f}"),
    ("advantage/flip_frac", "flip", "{:.2f}"),
    ("response/length_mean", "len", "{:.1f}"),
    ("time/step", "s/step", "{:.1f}"),
)


class MetricsLogger:
    def __init__(self, log_dir: str, *, tensorboard: bool = True, wandb_project: str | None = None,
                 total_steps: int | None = None, progress: bool = True, config: dict | None = None):
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self.total_steps = total_steps
        self.progress = progress
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir)
        self.wandb = None
        if wandb_project:
            import wandb  # optional dependency

            self.wandb = wandb.init(project=wandb_project, config=config or {}, dir=log_dir)
        self.samples_path = os.path.join(log_dir, "samples.jsonl")
        self.scalars_path = os.path.join(log_dir, "scalars.jsonl")
        self._start = time.time()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.scalars_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.progress:
            self.console(step, metrics)

    def console(self, step: int, metrics: dict[str, float]) -> None:
        parts = [f"{label}={fmt.format(metrics[key])}" for key, label, fmt in CONSOLE_KEYS if key in metrics]
        total = f"/{self.total_steps}" if self.total_steps else ""
        elapsed = time.time() - self._start
        print(f"[step {step}{total} | {elapsed:6.0f}s] " + " ".join(parts), file=sys.stdout, flush=True)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        with open(self.samples_path, "a") as f:
            for sample in samples:
                f.write(json.dumps({"step": step, **sample}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


class SustainedWarning:
    """A console warning when a metric's mean over the last ``window`` steps stays above ``limit``
    (at most once per ``window`` steps): a trend worth a person's attention, not one noisy step."""

    def __init__(self, key: str, limit: float, message: str, window: int = 10):
        self.key, self.limit, self.message, self.window = key, limit, message, window
        self.recent: deque[float] = deque(maxlen=window)
        self.quiet_until = -1

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Record ``metrics[key]`` (if present); warn and return True when the window's mean is above."""
        if self.key not in metrics:
            return False
        self.recent.append(float(metrics[self.key]))
        mean = sum(self.recent) / len(self.recent)
        if len(self.recent) < self.window or mean <= self.limit or step < self.quiet_until:
            return False
        self.quiet_until = step + self.window
        warnings.warn(f"step {step}: {self.key} averaged {mean:.3f} over the last {self.window} steps, above "
                      f"{self.limit:g}: {self.message}", stacklevel=2)
        return True


class PhaseTimer:
    """Wall time per phase of a step (``time/<phase>``, ``time/other``, ``time/step``); each phase is
    also what the watchdog names if the rank hangs in it."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        with watchdog.phase(name):
            yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        total = time.perf_counter() - self.start
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out["time/other"] = max(0.0, total - sum(self.seconds.values()))
        out["time/step"] = total
        return out


def optimizer_metrics(prefix: str, steps: list[dict]) -> dict[str, float]:
    """Mean grad norm and last lr over the optimizer steps that updated; a step that was skipped
    (fp16/bf16 loss scaling saw inf/nan grads, or the rollout correction left nothing to train on)
    is counted apart, not as an update."""
    done = [s for s in steps if s["update_ok"]]
    return {
        f"{prefix}/grad_norm": sum(s["grad_norm"] for s in done) / len(done) if done else 0.0,
        f"{prefix}/lr": steps[-1]["lr"],
        f"{prefix}/updates": float(len(done)),
        f"{prefix}/skipped_updates": float(len(steps) - len(done)),
    }


def masked_stats(prefix: str, values: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    valid = values[mask.bool()]
    if valid.numel() == 0:
        return {}
    return {f"{prefix}/mean": valid.mean().item(), f"{prefix}/std": valid.std().item() if valid.numel() > 1 else 0.0,
            f"{prefix}/min": valid.min().item(), f"{prefix}/max": valid.max().item()}


def step_metrics(batch, stats, token_rewards, advantages, old_logprobs) -> dict[str, float]:
    """The batch's figures: outcomes, lengths, the accuracy filter's work (``stats``, rank 0's
    ``fleet.collect.CollectStats``; None elsewhere), advantages, process rewards and the largest
    difference between the engine's log-probs and Megatron's."""
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
    m.update(masked_stats("advantage", advantages, mask))
    if token_rewards is not None:
        m.update(masked_stats("process_reward/token", token_rewards, mask))
        m["process_reward/sequence_mean"] = token_rewards.sum(dim=1).mean().item()
    diff = (batch.rollout_logprobs - old_logprobs).abs()[mask.bool()]
    m["rollout/abs_logprob_diff"] = diff.mean().item() if diff.numel() else 0.0
    m["rollout/logprob_diff_max"] = diff.max().item() if diff.numel() else 0.0
    return m


def warn_on_timeouts(step: int, stats, limit: float) -> None:
    """A graded-0 timeout becomes a wrong PRM label: say so when there are many."""
    sampled = max(1, len(stats.outcomes_sampled))
    if stats.verify_timeouts / sampled > limit:
        warnings.warn(f"step {step}: {stats.verify_timeouts} of {sampled} answers hit the math grader's time limit "
                      f"and scored 0 (more than train.warn_verify_timeout_frac={limit}); they are label noise for "
                      "the implicit PRM", stacklevel=2)


def sample_records(groups, tokenizer) -> list[dict]:
    """One record per response for ``samples.jsonl`` (read by ``megatron-prime inspect``): the
    response's tokens as strings beside its per-token process rewards and advantages, the sequence
    reward (the sum of the process rewards, beta * sum_t q_t), the response's advantage (at its
    first token: for the RLOO-style estimators, the whole response's return minus the baseline) and
    whether that advantage contradicts its outcome (``flipped``). ``groups``: the step's
    ``fleet.collect.Group`` s, with the values the PRIME step attached."""
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
                "tokens": token_strings(tokenizer, group.prompt_ids[-1], ids),
                "outcome": group.outcomes[i],
                "truncated": group.truncated[i],
                "process_rewards": None if rewards is None else rewards[i],
                "sequence_reward": None if rewards is None else sum(rewards[i]),
                "advantages": None if advantages is None else advantages[i],
                "advantage": advantages[i][0] if advantages and advantages[i] else None,
                "flipped": None if group.flipped is None else group.flipped[i],
            })
    return out


def token_strings(tokenizer, previous: int, ids: list[int]) -> list[str]:
    """Each token's text as it reads in place: decode(previous, token) minus decode(previous), so
    SentencePiece tokenizers keep a token's leading space (decoding a token alone drops it). A
    token that is part of a multi-byte character decodes as it does alone."""
    before = [previous, *ids[:-1]]
    singles = tokenizer.batch_decode([[t] for t in before])
    pairs = tokenizer.batch_decode([[a, b] for a, b in zip(before, ids)])
    alone = tokenizer.batch_decode([[t] for t in ids])
    return [pair[len(single):] if pair.startswith(single) else own
            for single, pair, own in zip(singles, pairs, alone)]


def quiet_console() -> None:
    """Keep a tool's own output readable: no deprecation warnings or weight-loading progress bars."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
