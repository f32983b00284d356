"""Helpers shared by the benchmark scripts in this folder: a locally created ~0.5B Qwen2
checkpoint, timing, resident-memory sampling and table printing.

Not a benchmark itself; the scripts import it as a sibling module.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

# Close to Qwen2.5-0.5B (hidden 896, 14 heads, 2 KV heads, 24 layers, tied embeddings), with a
# head count that divides by TP=2 and 8.
QWEN2_HALF_B = dict(hidden=1024, layers=24, heads=16, kv_heads=2, intermediate=2816, vocab=151936)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("benchmark model (random init, created locally with transformers)")
    g.add_argument("--hidden", type=int, default=QWEN2_HALF_B["hidden"])
    g.add_argument("--layers", type=int, default=QWEN2_HALF_B["layers"])
    g.add_argument("--heads", type=int, default=QWEN2_HALF_B["heads"])
    g.add_argument("--kv-heads", type=int, default=QWEN2_HALF_B["kv_heads"])
    g.add_argument("--intermediate", type=int, default=QWEN2_HALF_B["intermediate"])
    g.add_argument("--vocab", type=int, default=QWEN2_HALF_B["vocab"])
    g.add_argument("--untied", action="store_true", help="separate lm_head (default: tied, as Qwen2.5-0.5B)")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="weight dtype (default bf16)")
    g.add_argument("--hf", default=None,
                   help="use this existing HF checkpoint dir instead of creating one (the model flags are ignored)")


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def make_qwen2_checkpoint(args: argparse.Namespace, out_dir: str, seed: int = 0) -> str:
    """Create a randomly initialised Qwen2ForCausalLM with the sizes in ``args`` and
    ``save_pretrained`` it (one safetensors file) into ``out_dir``."""
    import torch
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=not args.untied,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype(args.dtype))  # build straight in the target dtype (no fp32 copy)
    try:
        model = transformers.Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out_dir, max_shard_size="100GB")
    del model
    return out_dir


def dir_bytes(path: str, suffix: str = "") -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(suffix))
    return total


def count_params(hf_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(hf_dir, name), framework="pt") as f:
                for key in f.keys():
                    shape = f.get_slice(key).get_shape()
                    n = 1
                    for s in shape:
                        n *= s
                    total += n
    return total


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def print_table(header: list[str], rows: list[list[str]], title: str | None = None) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join("-" * w for w in widths)
    if title:
        print(title)
    print("  ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(header, widths))))
    print(line)
    for row in rows:
        print("  ".join(f"{str(c):<{w}}" if i == 0 else f"{str(c):>{w}}" for i, (c, w) in enumerate(zip(row, widths))))


# ---- resident memory ---------------------------------------------------------------------

def rss_bytes() -> int:
    """This process's resident set size (VmRSS), read from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


class PeakRSS:
    """``with PeakRSS() as peak: ...`` then ``peak.extra``: the largest RSS growth over the RSS at
    entry, sampled by a background thread every ``interval_s`` (plus once at exit).

    RSS is what the OS sees: tensors above glibc's mmap threshold are returned on free, smaller
    freed blocks may stay resident, so this is an upper bound on live extra tensor bytes."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def measure_on_every_rank(fn, interval_s: float, trim_first: bool = True) -> tuple[float, int]:
    """Run ``fn`` on every rank between barriers; return (seconds, peak extra RSS) of this rank.
    ``trim_first``: return freed heap memory to the OS first, for a clean RSS baseline."""
    import torch.distributed as dist

    if trim_first:
        trim()
    dist.barrier()
    with PeakRSS(interval_s) as peak:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    dist.barrier()
    return seconds, peak.extra


def trim() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def quiet() -> None:
    """Silence deprecation warnings and progress bars that would bury the table."""
    from megatron_prime.metrics import quiet_console

    quiet_console()
