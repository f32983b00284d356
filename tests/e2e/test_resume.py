"""Checkpoints and exact resume: a run stopped after step k and resumed gives the same step k+1
metrics as the uninterrupted run; a run killed with SIGKILL mid-step resumes from the last
complete checkpoint; a corrupt newest checkpoint is skipped for the previous one, and a run whose
checkpoints all fail to load stops instead of starting over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, greedy_contains7_accuracy, make_trainer_fixture, overrides, requires_cpp_compiler

pytestmark = pytest.mark.multi_rank

TRAIN = """
import sys
sys.path.insert(0, {root!r})
from tests.helpers import register_test_verifier
from megatron_prime.config import load_config
from megatron_prime.training.trainer import train
if __name__ == "__main__":
    register_test_verifier()
    train(load_config(None, sys.argv[1:]))
"""


# TRAIN, then how many graphs torch.compile built in the process.
COUNTING_COMPILES = TRAIN + """    from torch._dynamo.utils import counters
    print("compiled graphs:", counters["stats"]["unique_graphs"])
"""


def compiled_graphs(out: str) -> int:
    return int(out.split("compiled graphs: ")[1].split()[0])


def start(args: list[str], launcher: tuple[str, ...] = ("-c", TRAIN.format(root=ROOT)), **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *launcher, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def run(args: list[str], launcher: tuple[str, ...] = ("-c", TRAIN.format(root=ROOT))) -> str:
    proc = start(args, launcher)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def run_failing(args: list[str]) -> str:
    proc = start(args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, out[-3000:]
    return out


def truncate_tensors(checkpoint_dir: str) -> None:
    """Cut every tensor file of the policy in ``checkpoint_dir`` to 16 bytes."""
    policy = os.path.join(checkpoint_dir, "policy")
    for name in os.listdir(policy):
        if name.endswith(".distcp"):
            with open(os.path.join(policy, name), "r+b") as f:
                f.truncate(16)


def scalars(run_dir: str) -> dict[int, dict]:
    rows = {}
    with open(os.path.join(run_dir, "logs", "scalars.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            rows[row["step"]] = row  # a resumed run appends; the last record of a step wins
    return rows


DETERMINISTIC = ("prm/loss", "prm/accuracy", "policy/loss", "policy/pg_loss", "policy/entropy",
                 "outcome/accuracy_sampled", "advantage/mean", "advantage/std", "response/length_mean",
                 "process_reward/sequence_mean", "prm/grad_norm", "policy/grad_norm")


def assert_same_step(a: dict, b: dict) -> None:
    for key in DETERMINISTIC:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume"))
    return make_trainer_fixture(root)


def assert_engine_agrees(rows: dict) -> None:
    """fp32: the hf engine's sampling log-probs are an independent reference for Megatron's."""
    for step, row in rows.items():
        if "rollout/logprob_diff_max" in row:
            assert row["rollout/logprob_diff_max"] <= 1e-4, (step, row["rollout/logprob_diff_max"])


def buffered_prompts(checkpoint_dir: str) -> int:
    import torch

    return len(torch.load(os.path.join(checkpoint_dir, "trainer_state.pt"), weights_only=False)["buffer"]["prompts"])


def resume_settings(dtype: str, band: tuple[str, str]) -> list[str]:
    return ["checkpoint.interval=1", "checkpoint.export_hf=false", f"model.dtype={dtype}", "optim.policy.lr=1e-4",
            f"algorithm.filter_low={band[0]}", f"algorithm.filter_high={band[1]}"]


FP32 = ("fp32", ("0.2", "0.8"))  # the paper's filter band: surplus prompts cross checkpoints in the buffer


@pytest.fixture(scope="module")
def uninterrupted_fp32(fixture, tmp_path_factory) -> dict[int, dict]:
    """The reference: three fp32 steps without a stop, shared by the stop and the SIGKILL tests."""
    run_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    # No checkpoints: the runs it is compared with write one every step, which must not change them.
    settings = [s for s in resume_settings(*FP32) if not s.startswith("checkpoint.interval=")]
    out = run(overrides(fixture, run_dir, "train.steps=3", "checkpoint.interval=100", *settings),
              launcher=("-c", COUNTING_COMPILES.format(root=ROOT)))
    assert compiled_graphs(out) == 0  # eager: a fused run's compiles are its kernels'
    return scalars(run_dir)


# bf16: the optimizer's fp32 main params resume too.
@pytest.mark.parametrize("dtype,band", [FP32, ("bf16", ("0.0", "1.0"))])
def test_stop_and_resume_matches_uninterrupted(fixture, tmp_path, dtype, band, request):
    part = str(tmp_path / "part")
    common = resume_settings(dtype, band)
    if dtype == "fp32":
        a = request.getfixturevalue("uninterrupted_fp32")
    else:
        full = str(tmp_path / "full")
        run(overrides(fixture, full, "train.steps=3", *common))
        a = scalars(full)
    run(overrides(fixture, part, "train.steps=2", "checkpoint.keep_last=2", *common))
    out = run(overrides(fixture, part, "train.steps=3", "checkpoint.keep_last=2", *common))
    assert "resumed from step 1" in out
    b = scalars(part)
    for step in (1, 2, 3):
        assert_same_step(a[step], b[step])
    assert sorted(os.listdir(os.path.join(part, "ckpt"))) == ["step_00000001", "step_00000002"]  # keep_last=2
    if dtype == "fp32":
        assert buffered_prompts(os.path.join(part, "ckpt", "step_00000001")) > 0
        assert any(a[step]["filter/from_buffer"] > 0 for step in (1, 2, 3))
        # every trained response comes from the current policy, buffer or not
        assert_engine_agrees(a)
        assert_engine_agrees(b)


def test_sigkill_mid_step_resumes_from_last_complete_checkpoint(fixture, tmp_path, uninterrupted_fp32):
    run_dir = str(tmp_path / "killed")
    args = overrides(fixture, run_dir, "train.steps=3", "checkpoint.keep_last=5", *resume_settings(*FP32))
    proc = start(args, start_new_session=True)
    first = os.path.join(run_dir, "ckpt", "step_00000000")
    deadline = time.time() + 300
    while not os.path.exists(first) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert os.path.exists(first), "no checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)  # mid-way through step 1 (or its checkpoint write)
    proc.wait()
    complete = sorted(n for n in os.listdir(os.path.join(run_dir, "ckpt")) if n.startswith("step_"))
    out = run(args)
    last = int(complete[-1].split("_")[1])
    assert f"resumed from step {last}" in out
    final = scalars(run_dir)
    assert set(range(1, 4)) <= set(final)
    assert_same_step(final[3], uninterrupted_fp32[3])  # the uninterrupted run's final step


def test_corrupt_checkpoints_fall_back_to_the_previous_one_and_stop_when_none_loads(fixture, tmp_path):
    run_dir = str(tmp_path / "corrupt")
    settings = ("checkpoint.interval=1", "checkpoint.export_hf=false")
    run(overrides(fixture, run_dir, "train.steps=2", *settings))
    truncate_tensors(os.path.join(run_dir, "ckpt", "step_00000001"))
    out = run(overrides(fixture, run_dir, "train.steps=3", *settings))
    assert "step_00000001 could not be loaded" in out
    assert "resumed from step 0" in out

    steps = sorted(n for n in os.listdir(os.path.join(run_dir, "ckpt")) if n.startswith("step_"))
    for name in steps[:-1]:
        truncate_tensors(os.path.join(run_dir, "ckpt", name))
    # The newest one's tensors are fine, but its trainer state would run code on loading.
    import torch

    marker = os.path.join(run_dir, "payload_ran")
    newest_state = os.path.join(run_dir, "ckpt", steps[-1], "trainer_state.pt")
    torch.save({"step": 2, "payload": CodeRunningPayload(marker)}, newest_state)
    out = run_failing(overrides(fixture, run_dir, "train.steps=4", *settings))
    assert f"no checkpoint could be loaded: {steps[-1]} (CheckpointError: {newest_state}: refused" in out, out[-3000:]
    assert all(f"{name} (" in out for name in steps), out[-3000:]
    assert not os.path.exists(marker)


class CodeRunningPayload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def torchrun(script, args: list[str], **kwargs) -> subprocess.Popen:
    return start(args, launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)),
                 **kwargs)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def signal_rank_mid_step(proc: subprocess.Popen, run_dir: str, rank: int, sig: int) -> None:
    """Once step 0 is logged, send ``sig`` to the worker of ``rank`` only (it is then in step 1)."""
    import psutil

    log = os.path.join(run_dir, "logs", "scalars.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log) and any(json.loads(line)["step"] == 1 for line in open(log) if line.strip()):
            break
        time.sleep(0.05)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == str(rank)]
    assert workers, "worker not found"
    workers[0].send_signal(sig)


LAYOUT_CHECK = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.helpers import register_test_verifier
from megatron_prime.bridge.mcore_io import load_model
from megatron_prime.config import load_config
from megatron_prime.platform import distributed
from megatron_prime.passes.trainable import build_frozen
from megatron_prime.passes.forward_backward import run_pass
from megatron_prime.training.prime_step import to_batch
from megatron_prime.fleet.collect import collect_groups
from megatron_prime.passes.trainable import model_options
from megatron_prime.training.initial_weights import load_initial_weights
from megatron_prime.training.trainer import build_context

if __name__ == "__main__":
    register_test_verifier()
    cfg = load_config(None, sys.argv[1:])
    distributed.setup(seed=cfg.train.seed)
    ctx = build_context(cfg)
    groups, _ = collect_groups(ctx.fleet, ctx.sampler, ctx.buffer, ctx.tokenizer, cfg, 0, ctx.render)
    batch = to_batch(groups, cfg.rollout.n, ctx.tokenizer)

    def logprobs(model):
        return run_pass(model, batch, temperature=1.0, token_budget=cfg.train.micro_batch_tokens).logprobs

    def fresh(path):
        model = build_frozen(ctx.arch, model_options(cfg))
        load_initial_weights(model, path, ctx.arch, cfg)
        return model

    sft, trained_prm, trained_policy = fresh({sft!r}), fresh({ckpt!r} + "/prm"), fresh({ckpt!r} + "/policy")
    assert torch.equal(logprobs(ctx.reference), logprobs(sft)), "reference is not the original SFT model"
    assert torch.equal(logprobs(ctx.prm.model), logprobs(trained_prm)), "PRM is not the checkpointed PRM"
    assert torch.equal(logprobs(ctx.policy.model), logprobs(trained_policy)), "policy is not the checkpointed one"
    assert not torch.equal(logprobs(trained_policy), logprobs(sft)), "the policy did not train"
    assert not torch.equal(logprobs(trained_prm), logprobs(sft)), "the PRM did not train"
    print("LAYOUT CHECK OK")
"""


def test_torchrun_preemption_and_resume_at_another_layout(fixture, tmp_path):
    """The whole ``train`` under torchrun at TP=2 over 2 ranks (one hf engine per rank, evaluation,
    checkpoints, HF export). A SIGUSR1 that reaches one rank mid-step stops both after that step
    with a complete checkpoint and exit code 0; the rerun cleans a killed save's leftovers, resumes
    and matches the uninterrupted run. Then the TP=2 checkpoint is continued at TP=1 through
    ``model.mcore_path``: the reference is still the original SFT model and the PRM the trained one."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN.format(root=ROOT))
    common = ["train.steps=4", "checkpoint.interval=100", "parallel.tp=2", "optim.policy.lr=1e-3", "optim.prm.lr=1e-3",
              f"data.eval_files=[{fixture['eval7']}]", "train.eval_every=2"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    finish(torchrun(script, overrides(fixture, whole, *common)))
    rows = scalars(whole)
    # The held-out greedy accuracy over both ranks' engines, before and after training, is what
    # transformers' own greedy decoding of the starting and of the exported model gives.
    export = os.path.join(whole, "export", "policy")
    assert os.path.exists(os.path.join(export, "model.safetensors"))
    before = greedy_contains7_accuracy(fixture["hf"], fixture["eval7"], max_new_tokens=12)
    assert 0.0 < before < 1.0
    assert rows[0]["eval/accuracy"] == pytest.approx(before)
    assert rows[4]["eval/accuracy"] == pytest.approx(greedy_contains7_accuracy(export, fixture["eval7"], 12))
    assert_engine_agrees(rows)

    proc = torchrun(script, overrides(fixture, parts, *common))
    signal_rank_mid_step(proc, parts, rank=1, sig=signal.SIGUSR1)
    out = finish(proc)
    stopped = sorted(n for n in os.listdir(os.path.join(parts, "ckpt")) if n.startswith("step_"))
    assert len(stopped) == 1 and "stopping after step" in out and "another rank" in out, out[-3000:]
    last = int(stopped[0].split("_")[1])
    assert last < 3 and not os.path.exists(os.path.join(parts, "export"))  # stopped early: no export
    # What killed saves leave: a temporary step directory, and a replaced one awaiting deletion.
    for leftover in (".step_00000009.tmp-x1y2", f".step_{last:08d}.old-ab12/step_{last:08d}"):
        os.makedirs(os.path.join(parts, "ckpt", leftover, "policy"))
    out = finish(torchrun(script, overrides(fixture, parts, *common)))
    assert f"resumed from step {last}" in out and "removed 2 incomplete save(s)" in out, out[-3000:]
    assert sorted(n for n in os.listdir(os.path.join(parts, "ckpt"))) == [stopped[0], "step_00000003"]
    resumed = scalars(parts)
    for step in range(last + 2, 5):
        assert_same_step(resumed[step], rows[step])

    # At TP=1 the optimizer state cannot be resumed: the run stops with what to do instead ...
    ckpt = os.path.join(whole, "ckpt", "step_00000003")
    out = run_failing(overrides(fixture, whole, "train.steps=5"))
    assert "written at tp=2 pp=1 ep=1, this run has tp=1 pp=1 ep=1" in out and f"model.mcore_path={ckpt}/policy" in out
    assert sorted(os.listdir(os.path.join(whole, "ckpt"))) == ["step_00000003"]  # untouched
    # ... and continuing from the weights that way keeps the reference and the trained PRM.
    out = run(overrides(fixture, str(tmp_path / "tp1"), f"model.mcore_path={ckpt}/policy"),
              launcher=("-c", LAYOUT_CHECK.format(root=ROOT, sft=fixture["hf"], ckpt=ckpt)))
    assert "LAYOUT CHECK OK" in out


@requires_cpp_compiler
def test_fused_kernels_train_as_eager(fixture, tmp_path, uninterrupted_fp32):
    """``algorithm.compile_kernels``: inside Megatron's passes (and the CPU backend's torch-function
    mode) the compiled losses and advantages give the eager run's first step."""
    run_dir = str(tmp_path / "fused")
    out = run(overrides(fixture, run_dir, "train.steps=1", "algorithm.compile_kernels=true", *resume_settings(*FP32)),
              launcher=("-c", COUNTING_COMPILES.format(root=ROOT)))
    assert compiled_graphs(out) > 0, "nothing was compiled"
    (first, fused), = scalars(run_dir).items()
    eager = uninterrupted_fp32[first]
    for key in DETERMINISTIC:
        assert fused[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-6), key
