"""R3 end to end on CPU: a tiny Qwen3-MoE trained in remote mode against the CPU rollout server
(``rollout.protocol_server``: transformers behind SGLang's HTTP protocol, which returns the experts
its routers chose as SGLang encodes them). With ``algorithm.replay_engine_routes`` the policy's
old-log-prob pass and update replay the engine's routes:

* the runs finish, the server's routes decode for every row, and the trainer's router agrees with
  the engine's on almost every route (``routing/engine_flipped_frac``; fp32 on both sides);
* the first step, where the engine and the trainer hold the same weights, equals the same step
  replaying the trainer's own routes (R2): the engine's routes are the trainer's;
* after the weight syncs the engine's log-probs still match the trainer's (at most 1e-4).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, make_trainer_fixture, overrides, run_scalars

pytestmark = pytest.mark.slow

LAUNCHER = """
import sys
sys.path.insert(0, {root!r})
from megatron_prime.config import load_config
from megatron_prime.training.trainer import train
from tests.helpers import register_test_verifier

if __name__ == "__main__":  # a process it spawns imports this file again
    register_test_verifier()
    train(load_config(None, sys.argv[1:]))
"""
SAME_STEP = ("prm/loss", "policy/loss", "policy/grad_norm", "advantage/mean", "outcome/accuracy_sampled")


def train(fixture, run_dir: str, *extra: str) -> dict[int, dict]:
    from megatron_prime.platform.distributed import free_port
    from megatron_prime.rollout.protocol_server import local_server

    os.makedirs(run_dir, exist_ok=True)
    script = os.path.join(run_dir, "launch.py")
    with open(script, "w") as f:
        f.write(LAUNCHER.format(root=ROOT))
    with local_server(fixture["hf"]) as url:
        args = overrides(fixture, run_dir, "train.steps=3", "checkpoint.export_hf=false", "optim.policy.lr=1e-3",
                         f"model.prm_hf_path={fixture['prm_hf']}", "rollout.mode=remote", "rollout.engine=sglang",
                         f"rollout.remote_urls=[{url}]", "rollout.weight_sync_address=127.0.0.1",
                         f"rollout.weight_sync_port={free_port()}", *extra)
        proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_scalars(run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("engine_routes"))
    fixture = make_trainer_fixture(root, moe=True)
    return {"engine": train(fixture, os.path.join(root, "engine"), "algorithm.replay_engine_routes=true"),
            "trainer": train(fixture, os.path.join(root, "trainer"))}


def test_the_engines_routes_are_replayed_and_agree_with_the_trainers(runs):
    engine = runs["engine"]
    for step in (1, 2, 3):
        assert 0 <= engine[step]["routing/engine_flipped_frac"] <= 0.01, step
        assert engine[step]["rollout/logprob_diff_max"] <= 1e-4, step
    assert "routing/engine_flipped_frac" not in runs["trainer"][1]  # R2 records its own routes


def test_the_first_step_equals_replaying_the_trainers_own_routes(runs):
    engine, trainer = runs["engine"][1], runs["trainer"][1]
    for key in SAME_STEP:
        assert engine[key] == pytest.approx(trainer[key], rel=1e-5, abs=1e-6), key
