"""Process groups for one SPMD program: torchrun or SLURM (srun) environment -> torch.distributed
-> megatron-core ``parallel_state`` (TP, PP, CP, EP, DP).

nccl on GPU, gloo on CPU. On CPU the megatron-core CPU backend (``cpu_backend``) is switched on.
"""

from __future__ import annotations

import datetime
import math
import os
import pickle
import re
import socket
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from megatron_prime.platform import cpu_backend, watchdog


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """``"gpu[001-003,007],login1"`` -> ``["gpu001", "gpu002", "gpu003", "gpu007", "login1"]``."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous of processes started here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_launch_env(environ=os.environ) -> LaunchEnv:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; srun sets SLURM_* (used when RANK is
    absent); otherwise this is a single process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return LaunchEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
        hosts = expand_slurm_nodelist(nodelist) if nodelist else ["127.0.0.1"]
        # A port derived from the job id lets every task agree on it without talking first.
        job_id = int(environ.get("SLURM_JOB_ID", "0"))
        return LaunchEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            master_addr=environ.get("MASTER_ADDR", hosts[0]),
            master_port=int(environ.get("MASTER_PORT", 20000 + job_id % 20000)),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single")


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s picklable object on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_rank0(fn):
    """Run ``fn()`` on global rank 0 only; its result there (None elsewhere). An exception on rank
    0 is re-raised on every rank, so the others fail with it instead of waiting in a collective."""
    result, error = None, None
    if is_rank0():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    error = broadcast_object(error)
    if error is not None:
        raise error
    return result


def picklable_error(error: Exception | None) -> Exception | None:
    """``error`` if it can travel to other ranks, else a RuntimeError with its message."""
    try:
        pickle.dumps(error)
        return error
    except Exception:  # noqa: BLE001 - keep the message, lose the type
        return RuntimeError(repr(error))


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj``, in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (a collective: every rank calls it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int)
    if dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def run_everywhere(fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank; if it raised on any rank, every rank raises (the first error), so
    none is left waiting in the next collective."""
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    errors = [e for e in all_gather_object(picklable_error(error)) if e is not None]
    if errors:
        raise errors[0]
    return result


def device() -> torch.device:
    """This rank's compute device: its GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_process_group(timeout_minutes: float = 30.0) -> LaunchEnv:
    """Initialise torch.distributed (once) from the launch environment."""
    env = detect_launch_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        cpu_backend.enable()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return env


def init_model_parallel(tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1, seed: int = 1234,
                        timeout_minutes: float = 30.0) -> None:
    """Megatron ``parallel_state`` over the initialised world, plus its model-parallel RNG."""
    from megatron.core import parallel_state, tensor_parallel

    cpu_backend.enable()  # no-op with CUDA
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        distributed_timeout_minutes=max(1, math.ceil(timeout_minutes)),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def setup(tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1, seed: int = 1234,
          hang_timeout_minutes: float = 0.0) -> LaunchEnv:
    """Process groups and Megatron's parallel state. Collectives time out after
    ``hang_timeout_minutes`` (the watchdog's setting; 0: torch's default of 30 minutes)."""
    timeout = hang_timeout_minutes or 30.0
    env = init_process_group(timeout)
    watchdog.share_with_peers(dist.distributed_c10d._get_default_store(), env.world_size)
    init_model_parallel(tp, pp, cp, ep, seed, timeout)
    return env


def teardown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
