"""Benchmark the policy -> rollout-engine weight sync of a ~0.5B Qwen2 at TP=2 on CPU.

Two gloo ranks (spawned by this script, or launched by torchrun) build the Megatron model at TP=2
from a locally created HF checkpoint (see bench_convert.py for the model; bf16, random init). Rank 0
also holds an ``HFEngine`` (transformers model) of the same checkpoint. In one run, alternating
over ``--repeats`` rounds, it times on rank 0:

* baseline: ``param.copy_`` of every engine parameter from a prepared state dict holding the
  same tensors the sync delivers (same names, shapes, dtype, bytes),
* ``engine.update_weights`` fed from that prepared dict (the engine's own overhead),
* floors of what the sync must do beyond the baseline: gloo point-to-point of the bytes rank 0
  receives from rank 1 (into a buffer already in use; and both ways at once, as in the export
  to every rank), and filling fresh tensors with the synced bytes (``torch.empty`` + ``copy_``:
  the first touch of new memory, page faults included),
* ``export_hf_weights(model, arch, bucket_bytes)`` alone, consumed and dropped (TP gathers +
  HF layout: QKV split, gate/up split, vocabulary un-padding),
* the same export to every rank (``to_all_ranks``, what colocated engines fed by every rank
  receive),
* the real sync: export streamed into ``engine.update_weights`` (what the rollout fleet's ``sync``
  does for a remote engine on rank 0),

for each bucket size, and reports times as ratios to the baseline.

The rounds run twice: first with glibc's default allocator settings (what a training process
runs with: freed blocks up to 32 MiB are reused, larger ones returned to the OS), then with a
fixed mmap threshold (``--mmap-threshold``, default 64 KiB: every tensor above it is fresh memory
from the OS and is returned on free), which makes resident memory track live tensor bytes. The
second pass also reports the PEAK EXTRA RESIDENT MEMORY on rank 0 during each operation (VmRSS
sampled every ~1 ms by a thread, minus VmRSS at the start), next to the bound stated in
transfer.py: one bucket + the largest tensor (B+L); its times show what fresh memory costs.

    python tools/benchmarks/bench_weight_sync.py [--buckets-mb 64 512] [--repeats 3] [--hf HF_DIR]
    torchrun --nproc-per-node 2 tools/benchmarks/bench_weight_sync.py [...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    add_model_args,
    count_params,
    fmt_bytes,
    make_qwen2_checkpoint,
    measure_on_every_rank,
    print_table,
    quiet,
)

from megatron_prime.platform.distributed import free_port  # noqa: E402

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
                        help="glibc mmap threshold (bytes) of the second, memory-measuring pass, so freed "
                             "tensors go back to the OS at once and RSS tracks live bytes (default 65536)")
    return parser.parse_args(argv)


# ---- the measurements (every rank runs the same sequence; only rank 0 times) ------------------


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
        weights_dtype = next(unwrap(model).parameters()).dtype
        if rank == 0:
            from megatron_prime.rollout.hf_engine import HFEngine

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

        # The floors. Bytes rank 0 receives from rank 1 in the sync: half of every TP-split
        # (2-D) tensor; the norms are replicated.
        received = sum(t.numel() for t in prepared.values() if t.dim() > 1) // TP if rank == 0 else 0
        received = int(broadcast_numel(received))
        wire = torch.empty(received, dtype=weights_dtype)
        wire.zero_()  # memory in use, as a receiving engine's would be

        wire_in = torch.empty_like(wire)
        wire_in.zero_()

        def p2p_floor(both_ways: bool):
            """Rank 1 -> rank 0 (both ways with ``both_ways``), in messages of the sizes the
            export sends, all posted at once as the export posts a bucket's."""
            def fn():
                chunk = 4 * 2**20 // wire.element_size()
                ops = []
                for start in range(0, received, chunk):
                    peer = 1 - rank
                    if rank == 1 or both_ways:
                        ops.append(dist.P2POp(dist.isend, wire[start: start + chunk], peer))
                    if rank == 0 or both_ways:
                        ops.append(dist.P2POp(dist.irecv, wire_in[start: start + chunk], peer))
                for request in dist.batch_isend_irecv(ops):
                    request.wait()
            return fn

        def fresh_fill():
            if rank == 0:
                for tensor in prepared.values():
                    torch.empty_like(tensor).copy_(tensor)

        cases = [("baseline: param.copy_ from prepared dict", None, plain_copy),
                 ("engine.update_weights(prepared dict)", None, engine_from_dict),
                 ("floor: gloo send/recv of the bytes rank 0 receives", None, p2p_floor(False)),
                 ("floor: the same both ways at once (every rank receives)", None, p2p_floor(True)),
                 ("floor: fill fresh tensors with the synced bytes", None, fresh_fill)]
        for mb in args.buckets_mb:
            cases.append((f"export_hf_weights only, bucket {mb} MiB", mb, export_only(mb * 2**20)))
            cases.append((f"export to every rank (colocated engines), bucket {mb} MiB", mb,
                          export_only(mb * 2**20, to_all_ranks=True)))
            cases.append((f"sync = export -> update_weights, bucket {mb} MiB", mb, sync(mb * 2**20)))

        def rounds(label: str, trim_first: bool) -> dict[str, list[tuple[float, int]]]:
            if rank == 0:
                print(f"{label}: warm-up round ...", flush=True)
            for _, _, fn in cases:  # first touches of every page, lazy init
                measure_on_every_rank(fn, interval, trim_first)
            results: dict[str, list[tuple[float, int]]] = {name: [] for name, _, _ in cases}
            for r in range(args.repeats):
                if rank == 0:
                    print(f"{label}: round {r + 1}/{args.repeats} ...", flush=True)
                order = cases if r % 2 == 0 else cases[::-1]  # alternate order against drift
                for name, _, fn in order:
                    results[name].append(measure_on_every_rank(fn, interval, trim_first))
            return results

        default_alloc = rounds("glibc default allocator", trim_first=False)
        set_mmap_threshold(args.mmap_threshold)
        fixed_threshold = rounds(f"mmap threshold {args.mmap_threshold} B", trim_first=True)

        # Check the sync really delivered the model: the engine now equals the prepared tensors.
        if rank == 0:
            wrong = [n for n, t in prepared.items() if not torch.equal(params[n], t)]
            if wrong:
                raise RuntimeError(f"sync left {len(wrong)} engine tensors different, e.g. {wrong[:3]}")
            report(args, hf_dir, arch, prepared, received * wire.element_size(), cases, default_alloc,
                   fixed_threshold)
    finally:
        dist.barrier()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        distributed.teardown()


def broadcast_numel(n: int) -> int:
    box = torch.tensor([n], dtype=torch.int64)
    dist.broadcast(box, src=0)
    return box.item()


def set_mmap_threshold(nbytes: int) -> None:
    """glibc's M_MMAP_THRESHOLD from now on (fixed: its dynamic adjustment stops)."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    if not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes):
        raise RuntimeError(f"mallopt(M_MMAP_THRESHOLD, {nbytes}) failed")


def report(args, hf_dir, arch, prepared, received_bytes, cases, default_alloc, fixed_threshold) -> None:
    total_bytes = sum(t.numel() * t.element_size() for t in prepared.values())
    largest_name, largest = max(prepared.items(), key=lambda kv: kv[1].numel() * kv[1].element_size())
    largest_bytes = largest.numel() * largest.element_size()
    base = statistics.median(s for s, _ in default_alloc[cases[0][0]])
    base_fixed = statistics.median(s for s, _ in fixed_threshold[cases[0][0]])
    dtype = str(largest.dtype).replace("torch.", "")

    print()
    print(f"bench_weight_sync: Qwen2 {arch.num_layers} layers, hidden {arch.hidden_size}, "
          f"{arch.num_heads}/{arch.num_kv_heads} heads, vocab {arch.vocab_size}: "
          f"{count_params(hf_dir) / 1e6:.1f}M parameters, {dtype}, {len(prepared)} HF tensors, "
          f"{total_bytes / 2**20:.0f} MiB per sync, of which rank 0 receives {received_bytes / 2**20:.0f} MiB")
    print(f"Megatron TP={TP} on 2 gloo ranks (CPU, 1 thread each) -> HFEngine on rank 0; "
          f"median of {args.repeats} rounds after a warm-up round, per allocator setting")
    print(f"largest tensor: {largest_name} {list(largest.shape)} = {largest_bytes / 2**20:.1f} MiB")
    print(f"times are ratios to the baseline measured in the same pass: {base:.3f} s with glibc's default "
          f"allocator, {base_fixed:.3f} s with the mmap threshold at {args.mmap_threshold} B (every tensor "
          f"fresh memory); memory = peak VmRSS growth on rank 0 in the second pass, sampled every "
          f"{args.interval_ms:g} ms\n")
    rows = []
    for label, mb, _ in cases:
        seconds = statistics.median(s for s, _ in default_alloc[label])
        fresh = statistics.median(s for s, _ in fixed_threshold[label])
        peak = max(m for _, m in fixed_threshold[label])
        bounds = ["", ""]
        if mb is not None:
            b_l = mb * 2**20 + largest_bytes
            bounds = [fmt_bytes(b_l), f"{peak / b_l:.2f}"]
        rows.append([label, f"{seconds:.3f}", f"{seconds / base:.2f}x", f"{fresh:.3f}", f"{fresh / base_fixed:.2f}x",
                     fmt_bytes(peak), *bounds])
    print_table(["operation (rank 0)", "seconds", "vs baseline", "fresh-memory s", "vs baseline",
                 "peak extra RSS", "B+L", "peak/(B+L)"], rows)
    print("\nB = bucket size, L = largest tensor. Peak extra RSS: the max over the timed rounds of the second"
          " pass (warm-up excluded). The floors are not lower bounds of the sync one by one: it receives"
          " while it copies.")


# ---- launching -------------------------------------------------------------------------------

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

    mp.spawn(_spawned, args=(free_port(), args), nprocs=TP, join=True)


if __name__ == "__main__":
    main()
