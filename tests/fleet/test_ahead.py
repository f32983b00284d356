"""Waiting for a one-step-off collection on 2 gloo ranks: the ranks wait together and beat their
hang watchdogs while rank 0's collection goes on, so a collection longer than
``train.hang_timeout_minutes`` is not taken for a hang; a collection that fails stops every rank.
The collection here is a stand-in that sleeps (or fails): what it collects is tested in
``tests/fleet/test_collect.py`` and ``tests/e2e/test_one_step_off.py``; under test is the wait."""

from __future__ import annotations

import time

import pytest

from tests.helpers import run_distributed

pytestmark = pytest.mark.multi_rank

COLLECTION_S, HANG_TIMEOUT_S = 8.0, 3.0


def _wait(rank, world_size, fail):
    from megatron_prime.fleet import ahead
    from megatron_prime.platform.watchdog import Watchdog

    ahead.DRAIN_BEAT_S = 0.2
    waiting = ahead.RolloutAhead(None, None, None, None, None, None)

    def collect(step, version):
        time.sleep(COLLECTION_S)
        if fail:
            raise ValueError("the engine went away")
        return [f"groups of step {step}"], f"stats of version {version}"

    waiting._collect = collect
    import torch.distributed as dist

    dist.barrier()  # both ranks started: what the watchdog sees from here is the wait alone
    with Watchdog(HANG_TIMEOUT_S, 60.0, rank=rank, poll_s=0.05):
        waiting.launch(3, version=2)
        try:
            waited = waiting.drain()
        except Exception as e:  # noqa: BLE001 - what each rank raises is the subject
            return f"{type(e).__name__}: {e}"
        return waited, waiting.pending


def test_the_ranks_wait_for_a_long_collection_together_without_a_hang_report():
    waited, pending = run_distributed(_wait, False, timeout_s=120)
    assert waited >= COLLECTION_S - 0.5 > HANG_TIMEOUT_S
    assert pending == (["groups of step 3"], "stats of version 2")


def _wait_rank1(rank, world_size, fail):
    result = _wait(rank, world_size, fail)
    import torch.distributed as dist

    gathered = [None, None]
    dist.all_gather_object(gathered, result)
    return gathered


def test_a_failed_collection_stops_every_rank():
    rank0, rank1 = run_distributed(_wait_rank1, True, timeout_s=120)
    assert rank0 == "ValueError: the engine went away"
    assert rank1.startswith("RuntimeError: the one-step-off rollout collection failed on rank 0")
