"""The rollout fleet on real gloo ranks: one hf engine per rank, each generating and verifying a
shard of every round.

* The trainer's first PRIME step with two engines (world 2, DP=2) equals the step with one engine
  (world 1): the same sampled tokens (per-sample seeds use the global prompt index) and the same
  losses, gradient norms and advantages. This is the one-rank reference for the distributed
  rollout.
* Each engine really takes its own shard; greedy evaluation over the fleet equals one engine
  evaluating every row.
* An engine that dies is restarted, every engine is resynced from the current policy, and the
  step goes on with the same samples; with ``rollout.max_restarts=0`` every rank raises the
  engine's error instead of hanging.
* Remote mode: rank 0 drives two servers speaking SGLang's protocol
  (``megatron_prime.rollout.protocol_server``, an hf engine behind SGLang's routes) behind the real
  ``sglang-router`` (its own process on loopback): generation over HTTP through the router, weights
  broadcast in buckets over a gloo group formed the way SGLang forms it. The step
  equals the colocated one-engine step, and after it both servers hold the updated policy.
"""

from __future__ import annotations

import os
import re
import signal

import pytest
import torch

from tests.helpers import make_trainer_fixture, overrides, register_test_verifier, run_distributed

pytestmark = [pytest.mark.multi_rank, pytest.mark.slow]

COMPARED = ("prm/loss", "prm/accuracy", "prm/grad_norm", "policy/loss", "policy/pg_loss", "policy/grad_norm",
            "policy/entropy", "process_reward/sequence_mean", "outcome/accuracy_sampled",
            "rollout/abs_logprob_diff")


def _context(fixture, root, *extra):
    from megatron_prime.config import load_config
    from megatron_prime.platform import distributed
    from megatron_prime.training.trainer import build_context

    cfg = load_config(None, overrides(fixture, root, f"model.prm_hf_path={fixture['prm_hf']}",
                                      "train.mini_batch_responses=32", *extra))
    distributed.init_model_parallel(seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    ctx = build_context(cfg)
    ctx.fleet.sync()
    return ctx


def _first_step(ctx):
    from megatron_prime.training import prime_step as ps

    captured = {}
    original = ps.compute_advantages

    def capture(*args, **kwargs):
        captured["advantages"] = original(*args, **kwargs)
        return captured["advantages"]

    ps.compute_advantages = capture
    try:
        metrics, groups = ps.prime_step(ctx, step=0)
    finally:
        ps.compute_advantages = original
    return {"metrics": metrics, "advantages": captured["advantages"].clone(),
            "responses": [g.responses for g in groups]}


def _one_engine(rank, world_size, fixture, root):
    register_test_verifier()
    return _first_step(_context(fixture, root))


def _two_engines(rank, world_size, fixture, root):
    import torch.distributed as dist

    from megatron_prime.data import load_prompt_dataset
    from megatron_prime.rollout import RolloutError
    from megatron_prime.fleet.grading import fleet_graded_responses, sampling_params
    from megatron_prime.fleet.collect import tokenize_prompts

    register_test_verifier()
    out = {}
    ctx = _context(fixture, root)
    out["groups"] = ctx.fleet.groups
    out["step"] = _first_step(ctx)

    # Who generated what: each engine gets its own contiguous shard.
    items = list(range(7))
    out["shards"] = ctx.fleet.map_shards(items, lambda engine, part, offset: (dist.get_rank(), part, offset),
                                         lambda part, offset, generated: generated)
    # Greedy responses to the eval prompts, spread over both engines and from one engine alone.
    rows = load_prompt_dataset(fixture["eval"])
    greedy = sampling_params(ctx.fleet, n=1, temperature=0.0, max_new_tokens=12)
    graded = fleet_graded_responses(ctx.fleet, rows, ctx.tokenizer, ctx.render, greedy, max_prompt_len=16)
    if rank == 0:
        out["fleet_eval"] = [g[0].response.token_ids for g in graded]
        prompts = [ids for ids, _ in tokenize_prompts(rows, ctx.tokenizer, 16, ctx.render)]
        out["one_engine_eval"] = [r.token_ids for r in ctx.fleet.engine.generate(prompts, greedy)]
    ctx.fleet.shutdown()

    # Rank 1's engine dies before the step: restart, resync, retry.
    ctx = _context(fixture, root)
    if rank == 1:
        ctx.fleet.engine.shutdown()
    out["recovered"] = _first_step(ctx)
    ctx.fleet.shutdown()

    # Without restarts every rank raises the engine's error.
    ctx = _context(fixture, root, "rollout.max_restarts=0")
    if rank == 1:
        ctx.fleet.engine.shutdown()
    try:
        _first_step(ctx)
        out["unrecovered"] = None
    except RolloutError as exc:
        out["unrecovered"] = str(exc)
    errors = [None] * world_size
    dist.all_gather_object(errors, out["unrecovered"])
    out["unrecovered_per_rank"] = errors
    return out


def _servers_stale_vs(urls, export) -> list:
    """(server, tensor) pairs where a server does not hold the exported tensor."""
    import json
    import urllib.request

    stale = []
    for url in urls:
        for name, tensor in export.items():
            req = urllib.request.Request(url + "/get_weights_by_name", method="POST",
                                         data=json.dumps({"name": name, "truncate_size": 50}).encode())
            with urllib.request.urlopen(req) as resp:
                held = torch.tensor(json.loads(resp.read()))
            if not torch.equal(held, tensor.reshape(-1)[:50]):
                stale.append((url, name))
    return stale


def _remote(rank, world_size, fixture, root, urls, sync_port, server_pids, model_dir, router_url):
    """Remote mode: rank 0 drives two protocol servers that start from other weights, generating
    through the real sglang-router in front of them; then one server dies and comes back (stale)
    between steps."""
    import os
    import signal

    from megatron_prime.bridge.transfer import iter_hf_tensors

    register_test_verifier()
    ctx = _context(fixture, root, "rollout.engine=sglang", "rollout.mode=remote",
                   f"rollout.remote_urls=[{','.join(urls)}]", "rollout.weight_sync_address=127.0.0.1",
                   f"rollout.weight_sync_port={sync_port}", "rollout.bucket_mb=1", f"rollout.router_url={router_url}")
    out = {"groups": ctx.fleet.groups, "has_engine": [ctx.fleet.engine is not None], "step": _first_step(ctx)}
    export = dict(iter_hf_tensors(ctx.policy.model, ctx.arch))  # rank 0 gets every tensor
    if rank == 0:
        out["stale_on_servers"] = _servers_stale_vs(urls, export)
        out["num_tensors"] = len(export)
        os.kill(server_pids[1], signal.SIGKILL)  # the second server dies ...
        out["relaunched"] = _start_servers(model_dir, 1, ports=[int(urls[1].rsplit(":", 1)[1])])[0][0].pid
    from megatron_prime.training import prime_step as ps

    metrics, _ = ps.prime_step(ctx, step=1)  # ... fails the round, is restarted and resynced
    out["second_step"] = {k: metrics[k] for k in ("policy/loss", "policy/grad_norm", "policy/updates")}
    before = export
    export = dict(iter_hf_tensors(ctx.policy.model, ctx.arch))
    if rank == 0:
        out["stale_after_restart"] = _servers_stale_vs(urls, export)
        out["moved_by_second_step"] = sum(not torch.equal(before[n], export[n]) for n in export)
    ctx.fleet.shutdown()
    return out


def _start_servers(model_dir: str, count: int, ports: list[int] | None = None):
    import subprocess
    import sys

    from megatron_prime.platform.distributed import free_port
    from tests.helpers import ROOT as repo

    servers, urls = [], []
    for i in range(count):
        port = ports[i] if ports else free_port()
        servers.append(subprocess.Popen([sys.executable, "-m", "megatron_prime.rollout.protocol_server",
                                         "--model", model_dir, "--port", str(port)], cwd=repo))
        urls.append(f"http://127.0.0.1:{port}")
    return servers, urls


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_prime.platform.distributed import free_port

    root = str(tmp_path_factory.mktemp("rollout_fleet"))
    fixture = make_trainer_fixture(root)
    out = {"one": run_distributed(_one_engine, fixture, root, world_size=1),
           "two": run_distributed(_two_engines, fixture, root, world_size=2)}
    # The servers start from the perturbed PRM weights: only a working sync makes them the policy.
    servers, urls = _start_servers(fixture["prm_hf"], 2)
    router = None
    router_log = os.path.join(root, "router.log")
    try:
        router, router_url = _start_router(urls, router_log)
        out["remote"] = run_distributed(_remote, fixture, root, urls, free_port(), [s.pid for s in servers],
                                        fixture["prm_hf"], router_url, world_size=2)
    finally:
        for process in servers + ([router] if router else []):
            process.kill()
            process.wait()
        if "remote" in out:
            os.kill(out["remote"]["relaunched"], signal.SIGKILL)
    out["router_log"] = re.sub(r"\x1b\[[0-9;]*m", "", open(router_log).read())  # without colour codes
    return out


def _wait_http(url: str, timeout_s: float = 300.0) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _start_router(worker_urls: list[str], log_path: str):
    """The real sglang-router (registry package ``sglang-router``, the Rust router) on loopback, with
    the protocol servers registered as its workers once they answer."""
    import importlib.util
    import json
    import subprocess
    import sys
    import time
    import urllib.request

    from megatron_prime.platform.distributed import free_port

    if importlib.util.find_spec("sglang_router") is None:
        raise RuntimeError("sglang-router is not installed: bash scripts/setup.sh, or pip install -e '.[router]'")
    for url in worker_urls:
        _wait_http(url + "/health")
    port = free_port()
    with open(log_path, "w") as log:
        router = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                                   "--port", str(port), "--worker-urls", *worker_urls, "--policy", "round_robin",
                                   "--log-level", "info"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait_http(url + "/readiness")
    deadline = time.monotonic() + 120
    while json.loads(urllib.request.urlopen(url + "/readiness", timeout=5).read())["healthy_workers"] < len(worker_urls):
        assert time.monotonic() < deadline, "sglang-router did not register the workers"
        time.sleep(0.5)
    return router, url


def test_two_engines_one_per_rank(runs):
    assert runs["two"]["groups"] == [[0], [1]]


def test_each_engine_generates_its_own_shard(runs):
    assert runs["two"]["shards"] == [(0, [0, 1, 2, 3], 0), (1, [4, 5, 6], 4)]


def test_two_engines_sample_what_one_engine_samples(runs):
    one, two = runs["one"], runs["two"]["step"]
    assert one["responses"] == two["responses"]
    assert 0.0 < one["metrics"]["outcome/accuracy_sampled"] < 1.0


def test_two_engine_step_equals_one_engine_step(runs):
    one, two = runs["one"], runs["two"]["step"]
    assert one["advantages"].abs().max() > 1e-3
    torch.testing.assert_close(two["advantages"], one["advantages"], rtol=1e-4, atol=1e-5)
    for key in COMPARED:
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-5), key


def test_fleet_eval_equals_one_engine_eval(runs):
    two = runs["two"]
    assert len(two["fleet_eval"]) == 16 and len({tuple(r) for r in two["fleet_eval"]}) > 1  # not all alike
    assert two["fleet_eval"] == two["one_engine_eval"]


def test_dead_engine_is_restarted_and_resynced(runs):
    two = runs["two"]
    assert two["recovered"]["responses"] == two["step"]["responses"]
    for key in COMPARED:
        assert two["recovered"]["metrics"][key] == pytest.approx(two["step"]["metrics"][key], rel=1e-6), key


def test_dead_engine_without_restarts_fails_every_rank(runs):
    errors = runs["two"]["unrecovered_per_rank"]
    assert all(e is not None for e in errors), errors
    assert errors[0] == errors[1]
    assert "rollout engine 'hf' failed on generate(" in errors[0]


def test_remote_mode_engine_on_rank0_only(runs):
    assert runs["remote"]["groups"] == [[0]]
    assert runs["remote"]["has_engine"] == [True]


def test_remote_step_equals_colocated_step(runs):
    """Generation over HTTP on two servers fed by broadcast = the colocated one-engine step."""
    one, remote = runs["one"], runs["remote"]["step"]
    assert remote["responses"] == one["responses"]
    for key in COMPARED:
        assert remote["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-5), key


def test_remote_generation_went_through_the_router(runs):
    log = runs["router_log"]
    assert "Activated 2 worker(s)" in log or log.count("Activated 1 worker(s)") == 2, log[-3000:]
    assert log.count("uri=/generate") > 0, log[-3000:]


def test_remote_servers_hold_the_updated_policy(runs):
    remote = runs["remote"]
    assert remote["num_tensors"] > 0
    assert remote["stale_on_servers"] == []


def test_remote_server_that_died_is_waited_for_and_resynced(runs):
    remote = runs["remote"]
    import math

    second = remote["second_step"]  # the step ran and updated the policy ...
    assert math.isfinite(second["policy/loss"]) and second["policy/grad_norm"] > 0 and second["policy/updates"] == 1
    assert remote["moved_by_second_step"] > 0
    assert remote["stale_after_restart"] == []  # ... and every server holds the new weights
