"""Benchmark the policy -> rollout-engine weight sync of a ~0.5B Qwen2 at TP=2 on CPU.

Two gloo ranks (spawned by this script, or launched by torchrun) build the Megatron model at TP=2
from a locally created HF checkpoint (see bench_convert.py for the model; bf16, random init). Rank 0
also holds an ``HFEngine`` (transformers model) of the same checkpoint. In one run, alternating
over ``--repeats`` rounds, it times on rank 0:

* baseline: ``param.copy_`` of every engine parameter from a prepared state dict holding the
  same tensors the sync delivers (same names, shapes, dtype, bytes),
* ``engine.update_weights`` fed from that prepared dict (the engine's own overhead),
* ``export_hf_weights(model, arch, bucket_bytes)`` alone, consumed and dropped (TP gathers +
  HF layout: QKV split, gate/up split, vocabulary un-padding),
* the same export to every rank (``to_all_ranks``: TP all-gather, what colocated engines fed by
  every rank receive),
* the real sync: export streamed into ``engine.update_weights`` (what the rollout fleet's ``sync`` does for a remote engine on rank 0),

for each bucket size, and reports times as ratios to the baseline, plus the PEAK EXTRA RESIDENT
MEMORY on rank 0 during each (VmRSS sampled every ~1 ms by a thread, minus VmRSS at the start),
next to the bound stated in transfer.py: one bucket + the largest tensor (B+L). The export to every
rank all-gathers, and gloo's all-gather stages its output in a second buffer of the same size, so
on CPU that case peaks near B+2L (NCCL writes in place).

    python tools/benchmarks/bench_weight_sync.py [--buckets-mb 64 512] [--repeats 3] [--hf HF_DIR]
    torchrun --nproc-per-node 2 tools/benchmarks/bench_weight_sync.py [...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    PeakRSS,
    add_model_args,
    count_params,
    fmt_bytes,
    make_qwen2_checkpoint,
    print_table,
    quiet,
    trim,
)

TP = 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    add_model_args(parser)
    parser.add_argument("--buckets-mb", type=int, nargs="+", default=[64, 512],
                        help="export bucket sizes in MiB (default: 64 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (medians are reported)")
    parser.add_argument("--interval-ms", type=float, default=1.0, help="RSS sampling interval")
    parser.add_argument("--mmap-threshold", type=int, default=65536,
                        help="set MALLOC_MMAP_THRESHOLD_ (bytes) for the spawned ranks, so glibc returns freed "
                             "tensors to the OS at once and RSS tracks live bytes; 0 = leave glibc's dynamic "
                             "threshold (default 65536; under torchrun, set the variable yourself)")
    return parser.parse_args(argv)


# ---- the measurements (every rank runs the same sequence; only rank 0 times) ------------------

def measure(fn, interval_s: float) -> tuple[float, int]:
    """Run ``fn`` on every rank between barriers; return (seconds, peak extra RSS) of this rank."""
    trim()
    dist.barrier()
    with PeakRSS(interval_s) as peak:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    dist.barrier()
    return seconds, peak.extra


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # two ranks on a 2-core box
    quiet()
    from megatron_prime.bridge.convert import build_from_hf
    from megatron_prime.bridge.transfer import export_hf_weights, iter_hf_tensors
    from megatron_prime.models.wrappers import unwrap
    from megatron_prime.platform import distributed

    distributed.setup(tp=TP)
    rank = dist.get_rank()
    if dist.get_world_size() != TP:
        raise SystemExit(f"bench_weight_sync needs exactly {TP} ranks, got {dist.get_world_size()}")

    box = [args.hf]
    workdir = None
    if args.hf is None:
        if rank == 0:
            workdir = tempfile.mkdtemp(prefix="bench_weight_sync-")
            box[0] = os.path.join(workdir, "hf")
            print(f"creating the benchmark model in {box[0]} ...", flush=True)
            make_qwen2_checkpoint(args, box[0])
        dist.broadcast_object_list(box, src=0)
    hf_dir = box[0]
    try:
        model, arch = build_from_hf(hf_dir)
        engine = params = prepared = None
        if rank == 0:
            from megatron_prime.rollout.hf_engine import HFEngine

            weights_dtype = next(unwrap(model).parameters()).dtype
            engine = HFEngine(hf_dir, dtype=weights_dtype)
            params = dict(engine.model.named_parameters(remove_duplicate=False))
        # The prepared state dict: exactly the tensors the sync delivers, materialised once.
        exported = [(n, t.clone()) for bucket in export_hf_weights(model, arch) for n, t in bucket]
        if rank == 0:
            prepared = dict(exported)
        del exported
        interval = args.interval_ms / 1000

        def plain_copy():
            if rank == 0:
                with torch.no_grad():
                    for name, tensor in prepared.items():
                        params[name].copy_(tensor)

        def engine_from_dict():
            if rank == 0:
                engine.update_weights(prepared.items())

        def export_only(bucket_bytes, to_all_ranks=False):
            def fn():
                for bucket in export_hf_weights(model, arch, bucket_bytes, to_all_ranks):
                    del bucket
            return fn

        def sync(bucket_bytes):
            def fn():
                tensors = iter_hf_tensors(model, arch, bucket_bytes)
                if rank == 0:
                    engine.update_weights(tensors)
                else:
                    for _ in tensors:
                        pass
            return fn

        cases = [("baseline: param.copy_ from prepared dict", None, plain_copy),
                 ("engine.update_weights(prepared dict)", None, engine_from_dict)]
        for mb in args.buckets_mb:
            cases.append((f"export_hf_weights only, bucket {mb} MiB", mb, export_only(mb * 2**20)))
            cases.append((f"export to every rank (colocated engines), bucket {mb} MiB", mb,
                          export_only(mb * 2**20, to_all_ranks=True)))
            cases.append((f"sync = export -> update_weights, bucket {mb} MiB", mb, sync(mb * 2**20)))

        if rank == 0:
            print("warm-up round ...", flush=True)
        for _, _, fn in cases:  # first touches of every page, lazy init
            measure(fn, interval)
        results: dict[str, list[tuple[float, int]]] = {label: [] for label, _, _ in cases}
        for r in range(args.repeats):
            if rank == 0:
                print(f"round {r + 1}/{args.repeats} ...", flush=True)
            order = cases if r % 2 == 0 else cases[::-1]  # alternate order against drift
            for label, _, fn in order:
                results[label].append(measure(fn, interval))

        # Check the sync really delivered the model: the engine now equals the prepared tensors.
        if rank == 0:
            wrong = [n for n, t in prepared.items() if not torch.equal(params[n], t)]
            if wrong:
                raise RuntimeError(f"sync left {len(wrong)} engine tensors different, e.g. {wrong[:3]}")
            report(args, hf_dir, arch, prepared, cases, results)
    finally:
        dist.barrier()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        distributed.teardown()


def report(args, hf_dir, arch, prepared, cases, results) -> None:
    total_bytes = sum(t.numel() * t.element_size() for t in prepared.values())
    largest_name, largest = max(prepared.items(), key=lambda kv: kv[1].numel() * kv[1].element_size())
    largest_bytes = largest.numel() * largest.element_size()
    base_time = statistics.median(s for s, _ in results[cases[0][0]])
    dtype = str(largest.dtype).replace("torch.", "")

    print()
    print(f"bench_weight_sync: Qwen2 {arch.num_layers} layers, hidden {arch.hidden_size}, "
          f"{arch.num_heads}/{arch.num_kv_heads} heads, vocab {arch.vocab_size}: "
          f"{count_params(hf_dir) / 1e6:.1f}M parameters, {dtype}, {len(prepared)} HF tensors, "
          f"{total_bytes / 2**20:.0f} MiB per sync")
    print(f"Megatron TP={TP} on 2 gloo ranks (CPU, 1 thread each) -> HFEngine on rank 0; "
          f"median of {args.repeats} rounds after a warm-up round")
    print(f"largest tensor: {largest_name} {list(largest.shape)} = {largest_bytes / 2**20:.1f} MiB")
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    print(f"times are ratios to the baseline measured in the same run ({base_time:.3f} s); "
          f"memory = peak VmRSS growth on rank 0, sampled every {args.interval_ms:g} ms, "
          + (f"MALLOC_MMAP_THRESHOLD_={threshold}\n" if threshold else "glibc's dynamic mmap threshold\n"))
    rows = []
    for label, mb, _ in cases:
        seconds = statistics.median(s for s, _ in results[label])
        peak = max(m for _, m in results[label])
        bounds = ["", ""]
        if mb is not None:
            b_l = mb * 2**20 + largest_bytes
            bounds = [fmt_bytes(b_l), f"{peak / b_l:.2f}"]
        rows.append([label, f"{seconds:.3f}", f"{seconds / base_time:.2f}x",
                     f"{total_bytes / 2**20 / seconds:.0f}", fmt_bytes(peak), *bounds])
    print_table(["operation (rank 0)", "seconds", "vs baseline", "MiB/s", "peak extra RSS",
                 "B+L", "peak/(B+L)"], rows)
    print("\nB = bucket size, L = largest tensor. Peak extra RSS: the max over the timed rounds (warm-up"
          " excluded); without a fixed mmap threshold RSS also counts freed blocks that glibc keeps"
          " (an upper bound on live extra tensor bytes).")


# ---- launching -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(TP), LOCAL_RANK=str(rank))
    run(args)


def main() -> None:
    args = parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / srun already launched us
        run(args)
        return
    import torch.multiprocessing as mp

    if args.mmap_threshold > 0:  # read by glibc when each spawned rank starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    mp.spawn(_spawned, args=(_free_port(), args), nprocs=TP, join=True)


if __name__ == "__main__":
    main()
