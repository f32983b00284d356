"""Benchmark checkpoint conversion of a ~0.5B Qwen2 (HF <-> Megatron) against plain safetensors I/O.

Creates a randomly initialised Qwen2 close to Qwen2.5-0.5B (hidden 1024, 24 layers, 16 heads,
2 KV heads, intermediate 2816, vocab 151936, tied embeddings, bf16; 420M parameters, 0.78 GiB) with transformers
in a temporary directory, then times, in one process and one run:

* baseline: ``safetensors.torch.load_file`` + ``save_file`` of the same checkpoint bytes,
* durable baseline: the same plus an ``fsync`` of the written file. Both conversions write
  durably (megatron-core fsyncs its checkpoint files; the output directory is fsynced before it
  is renamed into place), so on a disk, where an fsync costs what writing the bytes back does,
  this is the baseline that does the same work; on tmpfs (``--workdir /dev/shm/...``) an fsync
  is free and the two baselines agree,
* HF -> Megatron: ``megatron_prime.bridge.convert.hf_to_mcore`` (build model, sliced read, torch_dist save),
* Megatron -> HF: ``megatron_prime.bridge.convert.mcore_to_hf`` (build model, dist load, streamed export),
* for reference: building the empty Megatron model alone (part of both conversions).

Every time is also printed as a ratio to both baselines measured in the same run (the mean of
each baseline's medians of 3 before and after the conversions: the machine is shared and noisy).
All files are hot in the page cache (a warm-up read runs first): apart from the fsyncs these are
CPU/memory-bound numbers.

    python tools/benchmarks/bench_convert.py [--repeats 3] [--threads 2] [--workdir DIR] [--hf HF_DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    add_model_args,
    count_params,
    dir_bytes,
    make_qwen2_checkpoint,
    print_table,
    quiet,
    timed,
)


def safetensors_roundtrip(src_dir: str, out_dir: str, durable: bool = False) -> None:
    """The baseline: load every safetensors file of ``src_dir`` fully and write it to ``out_dir``
    (and fsync it, if ``durable``)."""
    from safetensors.torch import load_file, save_file

    os.makedirs(out_dir, exist_ok=True)
    for name in sorted(os.listdir(src_dir)):
        if name.endswith(".safetensors"):
            tensors = load_file(os.path.join(src_dir, name))
            path = os.path.join(out_dir, name)
            save_file(tensors, path, metadata={"format": "pt"})
            del tensors
            if durable:
                fd = os.open(path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    add_model_args(parser)
    parser.add_argument("--repeats", type=int, default=3,
                        help="conversion repeats (each timed; the median is reported; default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--workdir", default=None, help="where to write checkpoints (default: a temp dir, removed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet()

    from megatron_prime.bridge.convert import hf_to_mcore, mcore_to_hf, model_options
    from megatron_prime.models.gpt import build_gpt_model
    from megatron_prime.models.hf_config import read_hf_config
    from megatron_prime.platform import distributed

    distributed.setup()  # one process: TP=PP=1
    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert-")
    os.makedirs(work, exist_ok=True)
    try:
        hf_dir = args.hf
        if hf_dir is None:
            hf_dir = os.path.join(work, "hf")
            print(f"creating the benchmark model in {hf_dir} ...", flush=True)
            t = timed(make_qwen2_checkpoint, args, hf_dir)
            print(f"  created in {t:.1f} s", flush=True)
        weight_bytes = dir_bytes(hf_dir, ".safetensors")
        params = count_params(hf_dir)
        arch = read_hf_config(hf_dir)
        dtype = "bf16" if weight_bytes < params * 3 else "fp32"

        def baseline(durable: bool = False) -> float:
            out = os.path.join(work, "baseline_out")
            t = timed(safetensors_roundtrip, hf_dir, out, durable)
            shutil.rmtree(out)
            return t

        def baselines() -> tuple[float, float]:
            """Medians of 3 of the plain and the durable baseline, alternating."""
            runs = [(baseline(), baseline(durable=True)) for _ in range(3)]
            return statistics.median(p for p, _ in runs), statistics.median(d for _, d in runs)

        def build_only() -> float:
            def build():
                model = build_gpt_model(arch, model_options(dtype))
                del model
            return timed(build)

        mcore_dir, hf_out = os.path.join(work, "mcore"), os.path.join(work, "hf_out")
        print("warm-up: page cache, and one conversion each way of a tiny model (one-time costs) ...", flush=True)
        baseline()
        tiny = argparse.Namespace(**{**vars(args), "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2,
                                     "intermediate": 128, "vocab": 512})
        tiny_dir = make_qwen2_checkpoint(tiny, os.path.join(work, "warmup_hf"))
        hf_to_mcore(tiny_dir, os.path.join(work, "warmup_mcore"))
        mcore_to_hf(os.path.join(work, "warmup_mcore"), os.path.join(work, "warmup_hf_out"))
        for d in ("warmup_hf", "warmup_mcore", "warmup_hf_out"):
            shutil.rmtree(os.path.join(work, d))
        base_before, durable_before = baselines()
        to_mcore, to_hf, build = [], [], []
        for i in range(args.repeats):
            print(f"repeat {i + 1}/{args.repeats}: hf_to_mcore", flush=True)
            to_mcore.append(timed(hf_to_mcore, hf_dir, mcore_dir))
            print(f"repeat {i + 1}/{args.repeats}: mcore_to_hf", flush=True)
            to_hf.append(timed(mcore_to_hf, mcore_dir, hf_out))
            build.append(build_only())
            shutil.rmtree(hf_out)
            if i + 1 < args.repeats:
                shutil.rmtree(mcore_dir)
        mcore_bytes = dir_bytes(mcore_dir)
        base_after, durable_after = baselines()
        base = (base_before + base_after) / 2
        durable = (durable_before + durable_after) / 2

        print()
        print(f"bench_convert: Qwen2 {arch.num_layers} layers, hidden {arch.hidden_size}, "
              f"{arch.num_heads} heads / {arch.num_kv_heads} KV heads, vocab {arch.vocab_size}, "
              f"tied={arch.tie_embeddings}: {params / 1e6:.1f}M parameters, {dtype}, "
              f"{weight_bytes / 2**30:.2f} GiB safetensors (Megatron checkpoint {mcore_bytes / 2**30:.2f} GiB); "
              f"1 process, {torch.get_num_threads()} thread(s), median of {args.repeats}")
        print(f"baseline = safetensors load_file + save_file of the same bytes (median of 3): before {base_before:.2f} s, "
              f"after {base_after:.2f} s, mean {base:.2f} s = 1.00x")
        print(f"durable baseline = the same + fsync of the written file: before {durable_before:.2f} s, "
              f"after {durable_after:.2f} s, mean {durable:.2f} s = {durable / base:.2f}x the baseline "
              f"(workdir {work})\n")
        rows = []
        for label, times in [("HF -> Megatron (hf_to_mcore)", to_mcore),
                             ("Megatron -> HF (mcore_to_hf)", to_hf),
                             ("  of each: build empty GPTModel", build)]:
            t = statistics.median(times)
            rate = f"{weight_bytes / 2**20 / t:.0f}" if times is not build else "-"
            rows.append([label, f"{t:.2f}", f"{t / base:.2f}x", f"{t / durable:.2f}x", rate])
        rows.append(["baseline: safetensors load + save", f"{base:.2f}", "1.00x", f"{base / durable:.2f}x",
                     f"{weight_bytes / 2**20 / base:.0f}"])
        rows.append(["durable baseline: + fsync", f"{durable:.2f}", f"{durable / base:.2f}x", "1.00x",
                     f"{weight_bytes / 2**20 / durable:.0f}"])
        print_table(["operation", "seconds", "vs baseline", "vs durable", "MiB/s"], rows)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        distributed.teardown()


if __name__ == "__main__":
    main()
