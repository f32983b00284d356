"""Stopping at a step boundary: SIGTERM (preemption, ``scancel``), SIGUSR1 (SLURM's
``--signal=B:USR1@600`` warning before the time limit) or a wall-clock budget
(``train.exit_after_minutes``); and the guards of a training run (PRIME or SFT) as one context.

A signal only sets a flag; the step in progress runs to its end. At each step boundary every rank
calls ``should_stop()``, which all-reduces the flag, so all ranks stop after the same step (a signal
that reached one rank stops them all) and none is left waiting in a collective. The trainer then
writes a checkpoint and exits 0; rerunning the same command resumes from it.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from typing import Callable

from megatron_prime.config import Config
from megatron_prime.platform.distributed import any_rank, is_rank0
from megatron_prime.platform.watchdog import STOP_SIGNALS, Watchdog


class StopRequest:
    def __init__(self, exit_after_minutes: float = 0.0, signals=STOP_SIGNALS):
        self.deadline = time.monotonic() + 60.0 * exit_after_minutes if exit_after_minutes > 0 else None
        self.exit_after_minutes = exit_after_minutes
        self.received: str | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def should_stop(self) -> str | None:
        """Collective: the reason to stop now (on every rank), or None."""
        reason = self.received
        if reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            reason = f"train.exit_after_minutes={self.exit_after_minutes:g} reached"
        if not any_rank(reason is not None):
            return None
        return reason or "a stop signal reached another rank"

    def close(self) -> None:
        """Put the previous signal handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def guarded_run(cfg: Config, rank: int):
    """Inside: a stop signal stops the run at a step boundary (``StopRequest``, yielded) and a rank
    that hangs ends the run with its stacks (``platform.watchdog``, ``train.hang_timeout_minutes``)."""
    with Watchdog(60.0 * cfg.train.hang_timeout_minutes, 60.0 * cfg.train.stop_grace_minutes, rank=rank), \
            StopRequest(cfg.train.exit_after_minutes) as stop:
        yield stop


def end_of_step(step: int, *, last: bool, due: bool, save: Callable[[int], str], stop: StopRequest,
                prefix: str = "") -> str | None:
    """A training loop's step boundary (every rank calls it): checkpoint when ``due`` (the interval,
    the last step); on a stop request, checkpoint if that was not done yet and return why the run
    stops (None: go on). ``save(step)`` writes the checkpoint and returns its directory."""
    path = save(step) if due else None
    reason = None if last else stop.should_stop()
    if reason is not None:
        path = path or save(step)
        if is_rank0():
            print(f"{prefix}stopping after step {step} ({reason}); checkpoint {path} is complete: run the same "
                  "command again to resume", flush=True)
    return reason
