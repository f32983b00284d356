"""The watchdog's stop-signal grace period runs from the signal: a rank that was busy without a
heartbeat for longer than the grace period before SIGUSR1 arrived still gets the whole period to
reach its step boundary (and checkpoint); one that then makes no progress for the period is stuck.
A fresh interpreter per case: a watchdog that fires ends its process."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT

SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from megatron_prime.platform.watchdog import Watchdog
signal.signal(signal.SIGUSR1, lambda *a: None)  # the trainer's StopRequest handler stands here
watchdog = Watchdog(0, 1.5, poll_s=0.05).start()
time.sleep(2.5)  # long work without a heartbeat (an evaluation, a rollout round), before any signal
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(0.7)  # the grace period has only begun
watchdog.beat()
print("progress after the signal", flush=True)
time.sleep(3.0)  # now no progress for longer than the grace period: stuck
print("not reached", flush=True)
"""


def test_the_stop_grace_period_runs_from_the_signal():
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(root=ROOT)], capture_output=True, text=True,
                          timeout=60)
    assert "progress after the signal" in proc.stdout, proc.stderr[-3000:]
    assert "not reached" not in proc.stdout
    assert proc.returncode == 124
    assert "SIGUSR1 received and no progress for" in proc.stderr and "train.stop_grace_minutes=0.025" in proc.stderr
