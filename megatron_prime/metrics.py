"""Metrics: TensorBoard scalars (+ optional wandb), rollout samples as jsonl, console progress.

Only the process that logs (global rank 0) builds a ``MetricsLogger``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections import deque

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
