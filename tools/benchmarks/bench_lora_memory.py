"""Benchmark the training state of full PRIME against shared-base LoRA PRIME (``model.lora``): the
bytes of parameters, gradients and optimizer state that megatron-core really allocates on one rank
for a ~0.5B Qwen2-shaped model (bf16, CPU), measured from the tensors themselves (unique storages),
next to the planner's figures for the same shape.

Full PRIME: the policy and the implicit PRM trained (DDP buffers, Adam + fp32 main copies), the
reference frozen; each built, stepped once (Adam allocates its moments) and measured, one at a
time. LoRA PRIME: one frozen base (also the reference) with two adapters, each with its own DDP
buffer and optimizer. Prints a table and, last, ``full / LoRA training state: R`` (the ratio of
the totals) and the same ratio by the planner.

    python tools/benchmarks/bench_lora_memory.py [--rank 32] [--prm-rank 32] [model flags]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_model_args, print_table, quiet  # noqa: E402

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def step_once(trainable) -> None:
    trainable.zero_grad()
    trainable.step()  # zero gradients: Adam allocates its state, the weights do not move


def measure(arch, dtype: str, ranks: dict[str, int]) -> dict[str, dict]:
    from megatron_prime.config import OptimizerConfig
    from megatron_prime.models.gpt import ModelOptions
    from megatron_prime.models.lora import LoRASettings
    from megatron_prime.passes.trainable import build_frozen, build_shared_base, build_trainable
    from megatron_prime.planner.measured import storage_bytes, trainable_bytes

    opts = ModelOptions(dtype=dtype)
    out = {}
    for role in ("policy", "prm"):
        tm = build_trainable(arch, opts, OptimizerConfig(), total_steps=1, distributed_optimizer=True)
        step_once(tm)
        out[f"full {role}"] = trainable_bytes(tm)
        del tm
        gc.collect()
    reference = build_frozen(arch, opts)
    out["full reference"] = {"params": storage_bytes(list(reference.parameters())), "grads": 0, "optimizer": 0}
    del reference
    gc.collect()
    settings = LoRASettings(ranks=ranks, alpha=2.0 * ranks["policy"], targets=TARGETS)
    trainables, base = build_shared_base(arch, opts, settings, {r: (OptimizerConfig(), 1) for r in ranks},
                                         distributed_optimizer=False, seed=0)
    frozen = [p for p in base.parameters() if not getattr(p, "is_lora", False)]
    out["LoRA base (+ reference)"] = {"params": storage_bytes(frozen), "grads": 0, "optimizer": 0}
    for role, tm in trainables.items():
        step_once(tm)
        out[f"LoRA {role} adapter"] = trainable_bytes(tm, list(tm.model.buffers[0].params))
    return out


def planned(arch, dtype: str, ranks: dict[str, int]) -> dict[str, int]:
    """The planner's totals (``planner.state_memory``) for the same shape on one rank."""
    from megatron_prime.planner.state_memory import (
        frozen_state_bytes,
        lora_parameters,
        stage_parameters,
        trainable_state_bytes,
    )

    params = stage_parameters(arch, tp=1, pp=1, pp_rank=0, vocab_pad_multiple=128)
    full = 2 * trainable_state_bytes(params, dtype=dtype, dp=1, dp_rank=0, distributed_optimizer=True).total
    full += frozen_state_bytes(params, dtype=dtype).total
    lora = frozen_state_bytes(params, dtype=dtype).total + sum(
        trainable_state_bytes(lora_parameters(arch, rank=r, targets=TARGETS, tp=1, pp=1), dtype=dtype, dp=1,
                              dp_rank=0, distributed_optimizer=False).total for r in ranks.values())
    return {"full": full, "lora": lora}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32, help="the policy adapter's rank")
    parser.add_argument("--prm-rank", type=int, default=None, help="the PRM adapter's rank (default: --rank)")
    add_model_args(parser)
    args = parser.parse_args()
    quiet()
    from megatron_prime.models.hf_config import arch_from_dict
    from megatron_prime.platform import distributed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(distributed.free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    distributed.setup()
    arch = arch_from_dict(dict(architectures=["Qwen2ForCausalLM"], hidden_size=args.hidden, num_hidden_layers=args.layers,
                               num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                               intermediate_size=args.intermediate, vocab_size=args.vocab, max_position_embeddings=4096,
                               tie_word_embeddings=not args.untied))
    ranks = {"policy": args.rank, "prm": args.prm_rank or args.rank}
    rows = measure(arch, args.dtype, ranks)
    gib = 2 ** 30

    def total(prefix: str) -> int:
        return sum(sum(v.values()) for k, v in rows.items() if k.startswith(prefix))

    table = [[name, f"{v['params'] / gib:.3f}", f"{v['grads'] / gib:.3f}", f"{v['optimizer'] / gib:.3f}",
              f"{sum(v.values()) / gib:.3f}"] for name, v in rows.items()]
    print(f"{args.dtype} Qwen2 shape: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; LoRA ranks {ranks} "
          f"on {', '.join(TARGETS)}; one rank (TP=PP=DP=1), GiB")
    print_table(["model", "parameters", "gradients", "optimizer", "total"], table)
    full, lora = total("full"), total("LoRA")
    plan = planned(arch, args.dtype, ranks)
    print(f"measured: full PRIME {full / gib:.2f} GiB, LoRA PRIME {lora / gib:.2f} GiB")
    print(f"planner:  full PRIME {plan['full'] / gib:.2f} GiB, LoRA PRIME {plan['lora'] / gib:.2f} GiB "
          f"(ratio {plan['full'] / plan['lora']:.2f})")
    print(f"full / LoRA training state: {full / lora:.2f}")


if __name__ == "__main__":
    main()
