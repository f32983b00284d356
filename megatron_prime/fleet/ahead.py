"""One-step-off rollouts (``rollout.max_staleness=1``): the next step's batch is collected while
this step's batch trains.

    step k:  take batch k (collected with policy k-1's weights during step k-1)
             launch the collection of batch k+1 on the engines (they hold policy k)
             train on batch k (the PRM, then the policy: policy k -> k+1)
             drain: wait for batch k+1, then push policy k+1's weights to the engines

The group is the unit: a collection runs to its end with one set of engine weights (the weights
reach the engines only between collections: drain, then sync), so every group of a batch comes
from one policy version, recorded in ``Group.policy_version``, and is at most one step old when it
trains. The accuracy filter and its prompt buffer work on groups as in the synchronous loop.
Groups older than ``rollout.max_staleness`` are dropped whole (counted) and collected afresh.

The collection runs on global rank 0 alone, in a thread, against the remote engines it drives
(``collect_groups_on_rank0``: HTTP requests and verifier processes, no collective), so it never
meets the trainer's own collectives. The batch collected but not yet trained is checkpointed with
the trainer state (plain data), so a resumed run trains on exactly what the uninterrupted run did.
"""

from __future__ import annotations

import dataclasses
import threading
import time

from megatron_prime.config import Config
from megatron_prime.fleet.collect import CollectStats, Group, collect_groups_on_rank0
from megatron_prime.fleet.fleet import RolloutFleet
from megatron_prime.platform import watchdog
from megatron_prime.platform.distributed import broadcast_object, is_rank0

# How often the ranks waiting for a collection tell each other (and their watchdogs) it goes on: a
# collection of several filter rounds may outlast train.hang_timeout_minutes and is no hang.
DRAIN_BEAT_S = 10.0


class RolloutAhead:
    def __init__(self, fleet: RolloutFleet, sampler, buffer, tokenizer, cfg: Config, render):
        self.fleet, self.sampler, self.buffer = fleet, sampler, buffer
        self.tokenizer, self.cfg, self.render = tokenizer, cfg, render
        self.pending: tuple[list[Group], CollectStats] | None = None  # collected, not yet trained (rank 0)
        self._thread: threading.Thread | None = None
        self._outcome: dict = {}

    # ---- rank 0: the collection beside training ------------------------------------------------

    def _collect(self, step: int, version: int) -> tuple[list[Group], CollectStats]:
        return collect_groups_on_rank0(self.fleet.engine, self.fleet.end_tokens, self.sampler, self.buffer,
                                       self.tokenizer, self.cfg, step, self.render, version)

    def launch(self, step: int, version: int) -> None:
        """Start collecting the batch of ``step`` with the engines' weights, those of policy
        ``version`` (rank 0; the others do nothing)."""
        if not is_rank0():
            return
        assert self._thread is None and self.pending is None, "one collection in flight at a time"

        def run():
            try:
                self._outcome["result"] = self._collect(step, version)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the trainer's thread
                self._outcome["error"] = exc

        self._outcome = {}
        self._thread = threading.Thread(target=run, name=f"rollout-ahead-step{step}", daemon=True)
        self._thread.start()

    def drain(self) -> float:
        """Every rank: wait for the collection in flight on rank 0, if any; the seconds waited. The
        ranks wait together, beating their watchdogs every ``DRAIN_BEAT_S`` while the collection
        goes on. Its batch is kept for ``take`` (rank 0); if it failed, every rank raises (rank 0
        its error)."""
        start = time.perf_counter()
        while True:
            state = None
            if is_rank0():
                if self._thread is not None:
                    self._thread.join(DRAIN_BEAT_S)
                running = self._thread is not None and self._thread.is_alive()
                state = "running" if running else "failed" if "error" in self._outcome else "done"
            state = broadcast_object(state)
            if state != "running":
                break
            watchdog.heartbeat()
        if state == "failed":
            if is_rank0():
                self._thread = None
                raise self._outcome["error"]
            raise RuntimeError("the one-step-off rollout collection failed on rank 0 (its error is in rank 0's log)")
        if self._thread is not None:
            self._thread = None
            self.pending = self._outcome["result"]
        return time.perf_counter() - start

    # ---- every rank ---------------------------------------------------------------------------------

    def take(self, step: int) -> tuple[list[Group], CollectStats | None, dict[str, float]]:
        """The batch to train at ``step`` (policy version ``step``) on every rank: the one collected
        during the previous step, or, when there is none (the first step) or it is older than
        ``rollout.max_staleness``, one collected now. Rank 0 also returns its stats; every rank the
        ``rollout/`` metrics: staleness, dropped groups, the seconds the trainer waited for it."""
        result = None
        waited, dropped = self.drain(), 0
        if is_rank0() and self.pending is not None and any(
                step - g.policy_version > self.cfg.rollout.max_staleness for g in self.pending[0]):
            dropped = len(self.pending[0])  # a batch has one version: too old, dropped whole
            self.pending = None
        if broadcast_object(self.pending is None if is_rank0() else None):
            self.launch(step, version=step)  # collected now, the ranks waiting together
            waited += self.drain()
        if is_rank0():
            (groups, stats), self.pending = self.pending, None
            staleness = [step - g.policy_version for g in groups]
            metrics = {"rollout/staleness_mean": sum(staleness) / len(staleness),
                       "rollout/staleness_max": float(max(staleness)), "rollout/dropped_groups": float(dropped),
                       "rollout/wait_s": waited}
            result = (groups, stats, metrics)
        groups, metrics = broadcast_object(None if result is None else (result[0], result[2]))
        return groups, (result[1] if result is not None else None), metrics

    # ---- checkpoints (rank 0) -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The batch collected but not yet trained, as plain data (call after ``drain``)."""
        assert self._thread is None, "drain before checkpointing"
        if self.pending is None:
            return {"pending": None}
        groups, stats = self.pending
        return {"pending": {"groups": [dataclasses.asdict(g) for g in groups], "stats": dataclasses.asdict(stats)}}

    def load_state_dict(self, state: dict) -> None:
        pending = state.get("pending")
        self.pending = None if pending is None else (
            [Group(**g) for g in pending["groups"]], CollectStats(**pending["stats"]))
