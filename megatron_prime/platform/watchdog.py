"""A hang must never be silent: a per-rank watchdog that ends a run which stops making progress.

The training loop marks progress (``heartbeat()``, called per micro-batch, weight bucket, rollout
round, checkpoint and tensor loaded at start-up) and names the phase it is in (``phase("policy update")``). A thread of its
own checks the time since the last heartbeat. When it exceeds the timeout — a rank stuck in a
collective that a peer never joins, an engine that never answers — the rank writes which phase
it was in and the Python stack of every thread to stderr, and exits with ``HANG_EXIT_CODE``, so
the launcher (torchrun, srun) ends the job and a person or a SLURM requeue sees why. It tells the
other ranks through the process group's key-value store (a side channel no stuck collective
blocks): each of them writes its own phase and stacks too, before any rank exits, so the log
shows the rank that stalled and where every other one was waiting for it.

Stop signals (SIGTERM, SIGUSR1) normally let the step finish and checkpoint (``StopRequest``).
But a rank stuck inside a collective never returns to the interpreter, so its Python signal
handler never runs. The watchdog learns of the signal from the C-level handler through
``signal.set_wakeup_fd``; from then on a rank that makes no progress for ``grace_s`` (the
preemption grace period) is stuck: stacks, exit non-zero, rather than wait for SIGKILL.
"""

from __future__ import annotations

import faulthandler
import os
import select
import signal
import sys
import threading
import time
from contextlib import contextmanager

HANG_EXIT_CODE = 124  # as coreutils' timeout(1)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_FIRED_KEY = "megatron_prime/watchdog/fired"
_DUMPED_KEY = "megatron_prime/watchdog/dumped/"
PEER_WAIT_S = 10.0  # how long a rank that dumped waits for the others' dumps before it exits

_ACTIVE: "Watchdog | None" = None


def heartbeat() -> None:
    """Mark progress for the active watchdog (a no-op without one)."""
    if _ACTIVE is not None:
        _ACTIVE.beat()


def share_with_peers(store, world_size: int) -> None:
    """Let the active watchdog (if any) tell, and be told by, the other ranks."""
    if _ACTIVE is not None:
        _ACTIVE.share_with_peers(store, world_size)


def set_step(step: int | None) -> None:
    """The training step the active watchdog reports (None: the steps are over). Outside the named
    phases of a step the rank is in ``step`` (advantages, metrics, the stop check), after the
    steps in ``finish``."""
    if _ACTIVE is not None:
        _ACTIVE.step = step
        _ACTIVE.current_phase = "step" if step is not None else "finish"
        _ACTIVE.beat()


@contextmanager
def phase(name: str):
    """Name the phase the rank is in, for the active watchdog's report (a no-op without one)."""
    if _ACTIVE is None:
        yield
        return
    with _ACTIVE.phase(name):
        yield


class Watchdog:
    """One per rank (``start()`` makes it the active one). ``timeout_s`` 0 turns hang detection
    off; ``grace_s`` is the most a rank may go without progress once a stop signal arrived."""

    def __init__(self, timeout_s: float, grace_s: float, *, rank: int = 0, signals=STOP_SIGNALS,
                 poll_s: float = 0.5):
        self.timeout_s, self.grace_s, self.rank, self.poll_s = timeout_s, grace_s, rank, poll_s
        self.signals = signals
        self.current_phase = "startup"
        self.step: int | None = None
        self._last_beat = time.monotonic()
        self._signal_name: str | None = None
        self._signal_at = 0.0  # when it arrived (time.monotonic)
        self._stop = threading.Event()
        self._read_fd = self._write_fd = None
        self._previous_wakeup_fd = None
        self._thread: threading.Thread | None = None
        self._store = None  # the process group's key-value store, once there is one
        self._world_size = 1

    # ---- what the loop calls ------------------------------------------------------------------

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    @contextmanager
    def phase(self, name: str):
        previous, self.current_phase = self.current_phase, name
        self.beat()
        try:
            yield
        finally:
            self.current_phase = previous
            self.beat()

    # ---- life cycle ---------------------------------------------------------------------------

    def start(self) -> "Watchdog":
        global _ACTIVE
        if threading.current_thread() is threading.main_thread():
            # Signal numbers written by the C-level handler, readable while the main thread is
            # stuck in C++ (its Python handler then never runs).
            self._read_fd, self._write_fd = os.pipe()
            os.set_blocking(self._write_fd, False)
            self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="megatron-prime-watchdog", daemon=True)
        self._thread.start()
        _ACTIVE = self
        return self

    def share_with_peers(self, store, world_size: int) -> None:
        """From now on a hang on any rank makes every rank dump (``store``: the process group's
        key-value store, e.g. ``torch.distributed.distributed_c10d._get_default_store()``)."""
        self._store, self._world_size = store, world_size

    def close(self) -> None:
        global _ACTIVE
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._write_fd is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd if self._previous_wakeup_fd is not None else -1)
            os.close(self._read_fd)
            os.close(self._write_fd)
            self._read_fd = self._write_fd = None
        if _ACTIVE is self:
            _ACTIVE = None

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the thread ---------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._read_signals()
            peer = self._peer_report()
            if peer is not None:
                self._fire(f"{peer}; this rank was", tell_peers=False)
            idle = time.monotonic() - self._last_beat
            if self.timeout_s and idle > self.timeout_s:
                self._fire(f"no progress for {idle:.0f} s (train.hang_timeout_minutes={self.timeout_s / 60:g})")
            # the grace period runs from the signal (or the last progress after it), not from
            # progress made before it
            since = time.monotonic() - max(self._last_beat, self._signal_at)
            if self._signal_name is not None and since > self.grace_s:
                self._fire(f"{self._signal_name} received and no progress for {since:.0f} s since "
                           f"(train.stop_grace_minutes={self.grace_s / 60:g}): stuck, not stopping at a step boundary")

    def _read_signals(self) -> None:
        if self._read_fd is None:
            self._stop.wait(self.poll_s)
            return
        readable, _, _ = select.select([self._read_fd], [], [], self.poll_s)
        if not readable:
            return
        for number in os.read(self._read_fd, 64):
            if number in [int(s) for s in self.signals] and self._signal_name is None:
                self._signal_name = signal.Signals(number).name
                self._signal_at = time.monotonic()

    def _peer_report(self) -> str | None:
        """What another rank's watchdog reported, if one fired."""
        if self._store is None:
            return None
        try:
            if self._store.check([_FIRED_KEY]):
                return self._store.get(_FIRED_KEY).decode()
        except Exception:  # noqa: BLE001 - the store's host is gone: nothing to learn from it
            self._store = None
        return None

    def _fire(self, reason: str, tell_peers: bool = True) -> None:
        where = f"phase '{self.current_phase}'" + (f" of step {self.step}" if self.step is not None else "")
        err = sys.stderr
        try:
            if tell_peers:
                self._tell_peers(f"rank {self.rank}'s watchdog fired ({reason}, in {where})")
            err.write(f"\n[rank {self.rank}] megatron-prime watchdog: {reason}, in {where}. The Python stack of "
                      f"every thread of this rank follows; exiting with code {HANG_EXIT_CODE}.\n")
            err.flush()
            faulthandler.dump_traceback(file=err, all_threads=True)
            err.write(f"[rank {self.rank}] megatron-prime watchdog: exit {HANG_EXIT_CODE} (hung in {where})\n")
            err.flush()
            self._wait_for_peers()
        finally:
            os._exit(HANG_EXIT_CODE)

    def _tell_peers(self, report: str) -> None:
        try:
            if self._store is not None and not self._store.check([_FIRED_KEY]):
                self._store.set(_FIRED_KEY, report)
        except Exception:  # noqa: BLE001 - dumping this rank's stacks matters more
            self._store = None

    def _wait_for_peers(self) -> None:
        """Say this rank dumped, and stay (a bounded time) until every rank did: the store may live
        in this process (rank 0 under srun), and an exit would also end peers' collectives with
        errors before they write their stacks."""
        if self._store is None:
            return
        try:
            self._store.set(f"{_DUMPED_KEY}{self.rank}", "1")
            deadline = time.monotonic() + PEER_WAIT_S
            keys = [f"{_DUMPED_KEY}{r}" for r in range(self._world_size)]
            while time.monotonic() < deadline and not self._store.check(keys):
                time.sleep(0.1)
        except Exception:  # noqa: BLE001 - the store's host exited
            pass
