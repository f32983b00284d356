"""Trainer checkpoints: policy and PRM with their optimizers and lr schedules (Megatron
distributed checkpoints, reshardable), plus step, RNG states, data cursor and filter buffer.

    CKPT_ROOT/step_00000010/
        policy/   dist checkpoint {model, optimizer, scheduler} + hf/ + megatron_prime.json
        prm/      the same for the implicit PRM (absent for outcome-only runs)
        rng/rank_00000.pt ...   per-rank RNG states
        trainer_state.pt        step, data cursor, filter buffer (rank 0)

Each step directory appears in one rename once every rank has written (so a visible one is
complete); ``policy/`` and ``prm/`` are also plain model checkpoints that
``megatron-prime convert mcore-to-hf`` converts. A directory that fails to load (corrupt or
truncated files) is skipped with a warning and the previous one is used.

Loading runs no code from the files: our own files hold plain data only (tensors, numbers,
strings, lists, dicts) and are read with ``torch.load(weights_only=True)``; the distributed
checkpoint's ``.metadata`` (which torch reads with plain pickle) is first checked to reference
nothing but torch's checkpoint metadata types (``mcore_io.check_dcp_metadata``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import warnings

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from megatron_prime.bridge.atomic_dir import DistributedAtomicDir
from megatron_prime.bridge.hf_io import CheckpointError
from megatron_prime.bridge.mcore_io import check_dcp_metadata, load_plain_data, read_meta, write_model_metadata
from megatron_prime.models.wrappers import unwrap
from megatron_prime.platform import watchdog
from megatron_prime.platform.distributed import any_rank, is_rank0
from megatron_prime.passes.trainable import TrainableModel

STEP_PATTERN = re.compile(r"^step_(\d{8})$")
# DistributedAtomicDir's temporary ".step_N.tmp-XXXX", and ".step_N.old-XXXX/step_N": a replaced step
# directory awaiting deletion
LEFTOVER_PATTERN = re.compile(r"^\.(step_\d{8})\.(tmp|old)-.+$")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def list_checkpoints(root: str) -> list[str]:
    """Complete step directories under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if STEP_PATTERN.match(n))
    return [os.path.join(root, n) for n in names if os.path.exists(os.path.join(root, n, "trainer_state.pt"))]


def _materialize_optimizer_state(tm: TrainableModel) -> None:
    """Adam has no state before its first step, but the sharded state dict used for loading
    needs its structure: take one step with zero gradients (the loaded values replace it)."""
    for opt in getattr(tm.optimizer, "chained_optimizers", [tm.optimizer]):
        inner = opt.optimizer
        if any(len(state) for state in inner.state.values()):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad()


def _restore_adam_step(tm: TrainableModel, optimizer_state: dict) -> None:
    """megatron-core 0.16 without Apex/TE restores Adam's step count from the saved param groups,
    then overwrites it with the placeholder step of the per-parameter state it loads into; put
    the saved count back (it drives Adam's bias correction, so resume would not be exact)."""
    chained = getattr(tm.optimizer, "chained_optimizers", [tm.optimizer])
    states = [optimizer_state] if len(chained) == 1 else [optimizer_state[i] for i in range(len(chained))]
    for opt, state in zip(chained, states):
        inner = state.get("optimizer", state)  # the (distributed) mixed-precision optimizers nest it
        steps = {g["step"] for g in inner["param_groups"] if "step" in g}
        if len(steps) != 1:
            continue
        step = float(steps.pop())
        for param_state in opt.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = torch.tensor(step, dtype=torch.float32)


def _model_state(tm: TrainableModel, is_loading: bool) -> dict:
    if is_loading:
        _materialize_optimizer_state(tm)
    model_sd = unwrap(tm.model).sharded_state_dict()
    if tm.adapter is not None:  # shared-base LoRA: the adapter alone (the base is model.hf_path, frozen)
        model_sd = {k: v for k, v in model_sd.items() if f".lora.{tm.adapter}." in k}
    return {
        "model": model_sd,
        # "dp_reshardable": megatron-core 0.16 rejects its default format, and without Apex/TE
        # its "fully_reshardable" loader expects no per-parameter Adam "step". The optimizer
        # state thus reloads at the same TP/PP only; the model weights reshard freely.
        "optimizer": tm.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
        ),
    }


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: str, step: int, models: dict[str, TrainableModel], trainer_state: dict,
                    hf_meta_dir: str, keep_last: int, dtype: str, reference: str | None = None) -> str:
    """Write step ``step`` atomically (all ranks call this); keep the newest ``keep_last``.
    ``reference`` (the reference model's source) is recorded so that a run continued from these
    weights at another layout (``model.mcore_path``) measures its rewards against the same one."""
    final = step_dir(root, step)
    with DistributedAtomicDir(final) as tmp:
        for name, tm in models.items():
            watchdog.heartbeat()
            path = os.path.join(tmp, name)
            if is_rank0():
                os.makedirs(path)
            _barrier()
            dist_checkpointing.save(_model_state(tm, is_loading=False), path)
            if is_rank0():
                torch.save(tm.scheduler.state_dict(), os.path.join(path, "scheduler.pt"))
                # None for an SFT run's checkpoints: their weights are a starting point of their own.
                meta = {"dtype": dtype, "step": step, "role": name,
                        "reference": os.path.abspath(reference) if reference else None, **_layout()}
                if tm.adapter is not None:
                    meta["lora"] = lora_meta(tm, hf_meta_dir)
                write_model_metadata(path, hf_meta_dir, meta)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if is_rank0():
            os.makedirs(os.path.join(tmp, "rng"))
        _barrier()
        torch.save({"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                   os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
        if is_rank0():
            torch.save({"step": step, **trainer_state}, os.path.join(tmp, "trainer_state.pt"))
    if is_rank0():  # the new step directory's name is on disk (DistributedAtomicDir) before older ones go
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def remove_leftovers(root: str) -> list[str]:
    """Remove what killed saves left under ``root`` (rank 0, at start-up): temporary step
    directories and replaced ones awaiting deletion, each a full copy of the models and optimizer
    state. Complete step directories are never touched: one that a save killed between its two
    renames left only inside its ``.old`` directory is put back. Returns what was removed."""
    if not os.path.isdir(root):
        return []
    leftovers = []
    for name in sorted(os.listdir(root)):
        match, path = LEFTOVER_PATTERN.match(name), os.path.join(root, name)
        if not match or not os.path.isdir(path):
            continue
        step_name, kind = match.groups()
        replaced, final = os.path.join(path, step_name), os.path.join(root, step_name)
        if kind == "old" and os.path.isdir(replaced) and not os.path.exists(final):
            os.rename(replaced, final)
            print(f"checkpoint: restored {step_name} from {name} (a save was killed while replacing it)", flush=True)
        shutil.rmtree(path, ignore_errors=True)
        leftovers.append(path)
    if leftovers:
        print(f"checkpoint: removed {len(leftovers)} incomplete save(s) left by a killed run: "
              + ", ".join(os.path.basename(p) for p in leftovers), flush=True)
    return leftovers


def trainer_checkpoint_of(model_dir: str) -> dict | None:
    """If ``model_dir`` is the ``policy/`` of a PRIME trainer step directory: the sources a run
    continued from it must use, ``{"reference": path, "prm": path or absent}``; else None (an SFT
    run's checkpoint, which records no reference, is a starting point like an HF model)."""
    try:
        meta = read_meta(model_dir)
    except (CheckpointError, ValueError):
        return None
    if meta.get("role") != "policy" or not meta.get("reference"):
        return None
    out = {"reference": meta["reference"]}
    prm = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "prm")
    if os.path.isdir(prm):
        out["prm"] = prm
    return out


def _layout() -> dict:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "ep": parallel_state.get_expert_model_parallel_world_size()}


def lora_meta(tm: TrainableModel, base_dir: str) -> dict:
    """What a LoRA checkpoint's adapter needs to be resumed: the base it was trained on (its path and
    fingerprint), and the adapter's shape."""
    settings = unwrap(tm.model).lora_settings
    return {"adapter": tm.adapter, "base": os.path.abspath(base_dir), "base_fingerprint": base_fingerprint(base_dir),
            "rank": settings.ranks[tm.adapter], "alpha": settings.alpha, "targets": list(settings.targets)}


@functools.lru_cache(maxsize=8)
def base_fingerprint(hf_dir: str) -> str:
    """A checksum of an HF checkpoint that is cheap at 70B: config.json, and of every safetensors
    file its size, its header (every tensor's name, dtype, shape and offsets) and its first and last
    MiB of data. Different weights of the same shape differ there unless crafted not to."""
    digest = hashlib.sha256()
    names = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors") or n == "config.json")
    for name in names:
        path = os.path.join(hf_dir, name)
        size = os.path.getsize(path)
        digest.update(f"{name}:{size}:".encode())
        with open(path, "rb") as f:
            if name == "config.json":
                digest.update(f.read())
                continue
            header = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header, size)))
            digest.update(f.read(2**20))
            f.seek(max(0, size - 2**20))
            digest.update(f.read())
    return digest.hexdigest()


def check_lora(path: str, name: str, expected: dict | None) -> None:
    """Refuse (one line) to resume ``path``'s ``name`` into a model it does not fit: a LoRA adapter
    into a full model or the reverse, onto another base, or with another adapter shape. ``expected``:
    this run's ``lora_meta`` (None: full fine-tuning)."""
    try:
        saved = read_meta(os.path.join(path, name)).get("lora")
    except (CheckpointError, ValueError):
        return  # unreadable: loading it reports the problem
    where = os.path.join(path, name)
    if (saved is None) != (expected is None):
        kind = "LoRA adapters" if saved is not None else "full models"
        raise CheckpointError(f"{where}: holds {kind}, this run has model.lora.rank="
                              f"{expected['rank'] if expected else 0}: resume with the model.lora it was written with")
    if saved is None:
        return
    if saved["base_fingerprint"] != expected["base_fingerprint"]:
        raise CheckpointError(f"{where}: its adapter was trained on the base {saved['base']}, this run's "
                              f"model.hf_path {expected['base']} holds other weights (fingerprint "
                              f"{expected['base_fingerprint'][:12]}, expected {saved['base_fingerprint'][:12]})")
    for key in ("rank", "alpha", "targets"):
        if saved[key] != expected[key]:
            raise CheckpointError(f"{where}: written with model.lora {key}={saved[key]}, this run has {expected[key]}")


def check_layout(path: str, name: str) -> None:
    """The optimizer state reloads only at the TP/PP/EP it was written at: say so up front. (A LoRA
    checkpoint's is kept whole per parameter, not the distributed optimizer's: it reshards.)"""
    try:
        saved = read_meta(os.path.join(path, name))
    except (CheckpointError, ValueError):
        return  # unreadable: loading it reports the problem
    if saved.get("lora"):
        return
    now = _layout()
    if any(key in saved and saved[key] != now[key] for key in now):
        was = {key: saved.get(key, 1 if key == "ep" else None) for key in now}
        raise CheckpointError(
            f"{path}: written at {' '.join(f'{k}={v}' for k, v in was.items())}, this run has "
            f"{' '.join(f'{k}={v}' for k, v in now.items())}; the optimizer state resumes only at the same "
            f"layout. Resume with {' '.join(f'parallel.{k}={v}' for k, v in was.items())}, or continue from "
            f"its weights "
            f"(policy and implicit PRM resharded, the same reference model; fresh optimizers, starting at "
            f"step 0) with model.mcore_path={os.path.join(path, 'policy')} and a new checkpoint.dir"
        )


def load_checkpoint(path: str, models: dict[str, TrainableModel]) -> dict:
    """Load one step directory into ``models``; returns the trainer state (on every rank)."""
    for name, tm in models.items():
        sub = os.path.join(path, name)
        check_dcp_metadata(sub)
        state = dist_checkpointing.load(_model_state(tm, is_loading=True), sub)
        missing, unexpected = unwrap(tm.model).load_state_dict(state["model"], strict=tm.adapter is None)
        if unexpected or any(f".lora.{tm.adapter}." in k for k in missing):
            raise CheckpointError(f"{sub}: the adapter does not fit the model: missing "
                                  f"{[k for k in missing if '.lora.' in k][:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():  # the loader copies into parameters in place
            tm.optimizer.load_state_dict(state["optimizer"])
        _restore_adam_step(tm, state["optimizer"])
        tm.scheduler.load_state_dict(load_plain_data(os.path.join(sub, "scheduler.pt")))
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_path = os.path.join(path, "rng", f"rank_{rank:05d}.pt")
    if os.path.exists(rng_path):  # absent when resuming on a different number of ranks
        rng = load_plain_data(rng_path)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return load_plain_data(os.path.join(path, "trainer_state.pt"))


def resume(root: str, resume_from: str, models: dict[str, TrainableModel], base_dir: str = "") -> dict | None:
    """``resume_from``: "none", "latest" (newest loadable under ``root``) or a step directory.
    ``base_dir``: the shared base of LoRA models (``model.hf_path``).

    A checkpoint that fails to load on any rank is skipped with a warning and the one before it
    is tried. Returns the trainer state, or None when starting fresh."""
    if resume_from == "none":
        return None
    candidates = [resume_from] if resume_from != "latest" else list(reversed(list_checkpoints(root)))
    if candidates:  # older checkpoints share the newest one's layout: no point in falling back
        check_layout(candidates[0], "policy")
        for name, tm in models.items():
            check_lora(candidates[0], name, lora_meta(tm, base_dir) if tm.adapter is not None else None)
    failures = []
    for path in candidates:
        error = None
        try:
            state = load_checkpoint(path, models)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # corrupt / truncated files (torch's CheckpointException is a BaseException)
            state, error = None, e
        if not any_rank(error is not None):
            return state
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1]}" if error else "failed on another rank"
        failures.append(f"{os.path.basename(path)} ({reason})")
        if is_rank0():
            warnings.warn(f"checkpoint {path} could not be loaded ({reason}); trying the previous one", stacklevel=2)
        if resume_from != "latest":
            raise CheckpointError(f"cannot resume from {path}: {reason}")
    if failures:  # never start over silently on top of checkpoints that exist
        raise CheckpointError(f"{root}: no checkpoint could be loaded: {'; '.join(failures)}. Move them away "
                              "(or set checkpoint.resume=none) to start fresh")
    return None
