"""Launch a function on N real gloo ranks (torch.multiprocessing spawn) from a test.

Each rank runs ``fn(rank, world_size, *args)`` inside an initialised process group (gloo).
Starting processes costs seconds (imports), so put many checks into one launched function.
Whatever rank 0 returns is handed back to the test (it must be picklable).
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_prime.platform.distributed import free_port


def _worker(rank, world_size, port, result_path, backend, fn, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            torch.save(result, result_path)
    except Exception:
        # mp.spawn reports the exception, but print the full rank-tagged trace for humans.
        print(f"[rank {rank}]\n{traceback.format_exc()}", flush=True)
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, *args, world_size: int = 2, backend: str = "gloo", timeout_s: float = 900.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks (gloo, or nccl for GPU tests);
    return rank 0's result. Ranks still running after ``timeout_s`` are killed and the test fails
    (a deadlock must fail the test, not hang the suite)."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.pt")
        context = mp.start_processes(
            _worker,
            args=(world_size, free_port(), result_path, backend, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world_size} ranks still running after "
                                   f"{timeout_s:.0f} s: killed (a deadlock?)")
        if os.path.exists(result_path):
            return torch.load(result_path, weights_only=False)
        return None
