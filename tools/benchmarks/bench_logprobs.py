"""Benchmark the memory and time of the Megatron log-prob passes (``passes.forward_backward.run_pass``).

A Qwen2-shaped GPT with the real Qwen2.5 vocabulary (151,936) and a small hidden size is built
in Megatron (random weights, fp32) at TP=1 (one rank) and TP=2 (two gloo ranks, spawned by this
script), and one ragged rollout batch (one micro-batch) goes through

* a log-prob pass (forward only: what the reference, PRM and old-policy passes do), and
* a policy-loss pass (forward + backward of ``policy_loss`` with the entropy, as the policy update),

each timed (median of ``--repeats``) and measured for PEAK EXTRA RESIDENT MEMORY on each rank
(VmRSS sampled every ~1 ms by a thread, minus VmRSS at the start of the pass; glibc is told to
return freed tensors at once, so RSS tracks live bytes). Memory is printed as a ratio to the
FLOOR: one fp32 copy of the response tokens' logits on this rank (valid response tokens x
vocabulary shard x 4 bytes), what a pass that materialises those logits once needs.

    python tools/benchmarks/bench_logprobs.py [--tp 1 2] [--hidden 64] [--rows 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import measure_on_every_rank, print_table, quiet  # noqa: E402

from megatron_prime.platform.distributed import free_port  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes (default 1 2)")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary (default: Qwen2.5's 151,936)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8, help="responses in the batch")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[32, 96], help="prompt length range")
    parser.add_argument("--response-len", type=int, nargs=2, default=[64, 192], help="response length range")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (medians are reported)")
    parser.add_argument("--interval-ms", type=float, default=1.0, help="RSS sampling interval")
    parser.add_argument("--mmap-threshold", type=int, default=65536,
                        help="MALLOC_MMAP_THRESHOLD_ (bytes) for the spawned ranks (0: glibc's dynamic default)")
    return parser.parse_args(argv)


def make_batch(args, seed: int = 0):
    from megatron_prime.passes.batch import build_rollout_batch

    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for _ in range(args.rows):
        p = int(torch.randint(args.prompt_len[0], args.prompt_len[1] + 1, (), generator=g))
        r = int(torch.randint(args.response_len[0], args.response_len[1] + 1, (), generator=g))
        prompts.append(torch.randint(0, args.vocab, (p,), generator=g).tolist())
        responses.append(torch.randint(0, args.vocab, (r,), generator=g).tolist())
    batch = build_rollout_batch(prompts, responses, outcomes=[1.0] * args.rows, rollout_logprobs=None,
                                truncated=[False] * args.rows, group_size=1)
    batch.extras["advantages"] = torch.randn(batch.response_mask.shape, generator=g) * batch.response_mask
    return batch


def run(args: argparse.Namespace, tp: int) -> list | None:
    torch.set_num_threads(1)  # two ranks on a 2-core box
    quiet()
    from megatron_prime.algorithm import policy_loss
    from megatron_prime.config import OptimizerConfig
    from megatron_prime.models.gpt import ModelOptions
    from megatron_prime.models.hf_config import HFArch
    from megatron_prime.platform import distributed
    from megatron_prime.passes.trainable import build_trainable
    from megatron_prime.passes.forward_backward import run_pass

    distributed.setup(tp=tp)
    heads = max(2, args.hidden // 16)
    arch = HFArch(architecture="Qwen2ForCausalLM", family="qwen2", num_layers=args.layers,
                  hidden_size=args.hidden, num_heads=heads, num_kv_heads=2, head_dim=args.hidden // heads,
                  ffn_hidden_size=2 * args.hidden, vocab_size=args.vocab, max_position_embeddings=4096,
                  rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True)
    torch.manual_seed(0)
    trainable = build_trainable(arch, ModelOptions(tp=tp), OptimizerConfig(), total_steps=1,
                                distributed_optimizer=False)
    model = trainable.model
    g = torch.Generator().manual_seed(0)  # built to be loaded: give it weights (the same on every rank)
    with torch.no_grad():
        for p in model.module.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    batch = make_batch(args)
    shard = trainable.model.module.vocab_size // tp  # padded vocabulary / tp
    valid_tokens = int(batch.response_mask.sum())
    floor = valid_tokens * shard * 4
    pass_args = dict(temperature=args.temperature, token_budget=batch.input_ids.numel())  # one micro-batch

    def logprob_pass():
        run_pass(model, batch, **pass_args)

    batch.extras["old_logprobs"] = run_pass(model, batch, **pass_args).logprobs

    def loss_fn(mb, logprobs, entropy):
        loss, metrics = policy_loss(logprobs, mb.extras["old_logprobs"] - 0.01, mb.extras["advantages"],
                                    mb.response_mask, loss_normalizer=valid_tokens, entropy=entropy)
        return loss, int(mb.response_mask.sum()), metrics

    def policy_pass():
        trainable.zero_grad()
        run_pass(model, batch, loss_fn=loss_fn, with_entropy=True, **pass_args)

    rows = []
    for name, fn in (("log-prob pass (forward)", logprob_pass), ("policy-loss pass (fwd+bwd)", policy_pass)):
        fn()  # warm-up: lazy buffers, allocator
        results = [measure_on_every_rank(fn, args.interval_ms / 1e3) for _ in range(args.repeats)]
        seconds = statistics.median(s for s, _ in results)
        peak = max(p for _, p in results)
        rows.append((name, seconds, peak))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rows)
    summary = None
    if dist.get_rank() == 0:
        summary = dict(tp=tp, floor=floor, valid_tokens=valid_tokens, shard=shard, rows=everyone)
    distributed.teardown()
    return summary


def _spawned(rank: int, port: int, args: argparse.Namespace, tp: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(tp), LOCAL_RANK=str(rank))
    summary = run(args, tp)
    if summary is not None:
        torch.save(summary, result_path)


def report(args, summaries: list[dict]) -> None:
    print(f"bench_logprobs: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, {args.rows} responses "
          f"(prompts {args.prompt_len[0]}-{args.prompt_len[1]}, responses {args.response_len[0]}-"
          f"{args.response_len[1]} tokens), fp32, temperature {args.temperature}, median of {args.repeats}")
    table = []
    for s in summaries:
        floor_mib = s["floor"] / 2**20
        for i, (name, _seconds, _peak) in enumerate(s["rows"][0]):
            peaks = [rank_rows[i][2] for rank_rows in s["rows"]]
            times = [rank_rows[i][1] for rank_rows in s["rows"]]
            table.append([f"TP={s['tp']} {name}", f"{max(times) * 1e3:.0f}", f"{max(peaks) / 2**20:.0f}",
                          f"{floor_mib:.0f}", f"{max(peaks) / s['floor']:.2f}x"])
    print_table(["pass", "time ms", "peak extra MiB (max over ranks)", "floor MiB", "peak / floor"], table,
                title=f"floor = valid response tokens x vocabulary shard x 4 bytes "
                      f"({summaries[0]['valid_tokens']} tokens)")


def main() -> None:
    args = parse_args()
    import tempfile

    import torch.multiprocessing as mp

    if args.mmap_threshold > 0:  # read by glibc when each spawned rank starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    summaries = []
    with tempfile.TemporaryDirectory() as tmp:
        for tp in args.tp:
            path = os.path.join(tmp, f"tp{tp}.pt")
            mp.spawn(_spawned, args=(free_port(), args, tp, path), nprocs=tp, join=True)
            summaries.append(torch.load(path, weights_only=False))
    report(args, summaries)


if __name__ == "__main__":
    main()
