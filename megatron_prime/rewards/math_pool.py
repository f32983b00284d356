"""Grade math answers in worker processes with a hard per-answer time limit.

sympy can take minutes (or forever) on adversarial answers such as towers of exponents, and parts
of that time are spent inside C code that no signal interrupts. The only limit that always holds
is killing the process. ``concurrent.futures.ProcessPoolExecutor`` cannot kill one stuck worker
(a hung task blocks its slot, and terminating the executor takes all the others with it), so this
pool manages its workers directly: each is a ``python -m megatron_prime.rewards._math_worker``
subprocess fed one answer at a time over a pipe; one that overruns its deadline is SIGKILLed,
scored 0 and replaced while the others keep going. Workers are started with fork+exec of a fresh
interpreter, so a trainer process holding threads and CUDA state is never forked.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)

DEFAULT_MATH_TIMEOUT_S = 15.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class MathWorkerError(RuntimeError):
    """A grading worker could not start (broken environment): never silently scored as 0."""


class _Worker:
    def __init__(self, startup_timeout_s: float):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_prime.rewards._math_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            bufsize=0,
        )
        self.ready = False
        self.ready_deadline = time.monotonic() + startup_timeout_s
        self.task: tuple[int, float] | None = None  # (item index, hard deadline)
        self._buf = b""

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, index: int, item: tuple[str, str], timeout_s: float, soft_timeout_s: int) -> None:
        response, ground_truth = item
        line = json.dumps({"i": index, "r": response, "g": ground_truth, "t": soft_timeout_s}) + "\n"
        self.proc.stdin.write(line.encode("utf-8"))
        self.task = (index, time.monotonic() + timeout_s)

    def read_messages(self) -> list[dict] | None:
        """Complete messages available now; None once the worker has exited."""
        chunk = os.read(self.fileno(), 1 << 16)
        if not chunk:
            return None
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class MathGraderPool:
    """``grade(items, timeout_s)`` scores (response, ground_truth) pairs in parallel."""

    def __init__(self, num_workers: int = 4, startup_timeout_s: float = 120.0):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.startup_timeout_s = startup_timeout_s
        self.timeouts = 0  # answers that hit the hard limit (their worker was killed)
        self.last_timeouts = 0  # of those, in the latest grade() call
        self.crashes = 0  # workers that died while grading
        self._lock = threading.Lock()
        self._workers = [_Worker(startup_timeout_s) for _ in range(num_workers)]

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def resize(self, num_workers: int) -> None:
        with self._lock:
            while len(self._workers) < num_workers:
                self._workers.append(_Worker(self.startup_timeout_s))
            while len(self._workers) > max(1, num_workers):
                self._workers.pop().kill()

    def close(self) -> None:
        with self._lock:
            for worker in self._workers:
                worker.kill()
            self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def grade(
        self,
        items: Sequence[tuple[str, str]],
        timeout_s: float = DEFAULT_MATH_TIMEOUT_S,
        soft_timeout_s: int | None = None,
    ) -> list[float]:
        """Scores for (response, ground_truth) pairs, in order. ``timeout_s`` is the hard limit
        per answer; ``soft_timeout_s`` (default a third of it) is math-verify's own limit per
        parse/verify stage, which ends most slow cases without the cost of a new worker."""
        if soft_timeout_s is None:
            soft_timeout_s = max(1, int(timeout_s / 3))
        with self._lock:
            if not self._workers:
                raise RuntimeError("MathGraderPool is closed")
            return self._grade(items, timeout_s, soft_timeout_s)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self.startup_timeout_s)

    def _grade(self, items: Sequence[tuple[str, str]], timeout_s: float, soft_timeout_s: int) -> list[float]:
        for worker in list(self._workers):
            if worker.task:  # still busy with an item of a call that raised: start clean
                self._replace(worker)
        scores = [0.0] * len(items)
        self.last_timeouts = 0
        todo = deque(range(len(items)))
        while todo or any(w.task for w in self._workers):
            for worker in self._workers:
                if worker.ready and worker.task is None and todo:
                    index = todo.popleft()
                    try:
                        worker.send(index, items[index], timeout_s, soft_timeout_s)
                    except BrokenPipeError:  # died while idle: retry the item on a new worker
                        self.crashes += 1
                        todo.appendleft(index)
                        self._replace(worker)
            self._wait_and_collect(scores)
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.task and now > worker.task[1]:
                    self.timeouts += 1
                    self.last_timeouts += 1
                    logger.warning("math answer %d exceeded %.1fs; worker killed", worker.task[0], timeout_s)
                    self._replace(worker)
                elif not worker.ready and now > worker.ready_deadline:
                    raise MathWorkerError(
                        f"math grading worker did not start within {self.startup_timeout_s:.0f}s"
                    )
        return scores

    def _wait_and_collect(self, scores: list[float]) -> None:
        deadlines = [w.task[1] for w in self._workers if w.task]
        deadlines += [w.ready_deadline for w in self._workers if not w.ready]
        wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 0.0
        with selectors.DefaultSelector() as sel:
            for worker in self._workers:
                if worker.task or not worker.ready:
                    sel.register(worker, selectors.EVENT_READ)
            events = sel.select(wait) if sel.get_map() else []
        for key, _ in events:
            worker = key.fileobj
            messages = worker.read_messages()
            if messages is None:
                if not worker.ready:
                    raise MathWorkerError(
                        "math grading worker exited during start-up (see its stderr above)"
                    )
                self.crashes += 1  # e.g. killed by the OOM killer: that answer scores 0
                self._replace(worker)
                continue
            for message in messages:
                if message.get("ready"):
                    worker.ready = True
                elif worker.task and message["i"] == worker.task[0]:
                    scores[message["i"]] = float(message["s"])
                    worker.task = None
