"""``megatron-prime convert hf-to-mcore | mcore-to-hf | verify``: checkpoint conversion and logit
verification at any TP/PP (under torchrun for more than one rank). The scripts in
``checkpoints_convert/`` of a checkout call these too."""

from __future__ import annotations

import argparse
import sys

from megatron_prime.errors import exit_code

COMMANDS = ("hf-to-mcore", "mcore-to-hf", "verify")


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (run under torchrun for >1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (mixture-of-experts models)")
    return p


def run(main, args) -> int:
    """Set up process groups for ``args.tp``/``args.pp``, run ``main(args)``, turn known
    errors into one line on stderr and exit code 2."""
    from megatron_prime.platform import distributed

    def command():
        distributed.setup(tp=args.tp, pp=args.pp, ep=args.ep)
        return main(args)

    code = exit_code(command)
    distributed.teardown()
    return code


def hf_to_mcore(argv: list[str]) -> int:
    p = parser("megatron-prime convert hf-to-mcore",
               "Hugging Face checkpoint -> Megatron distributed checkpoint (torch_dist, reshardable on load)")
    p.add_argument("--hf", required=True, help="Hugging Face checkpoint dir")
    p.add_argument("--out", required=True, help="output Megatron checkpoint dir")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="dtype to store (auto: the HF weights' dtype, bit-exact)")

    def main(args):
        from megatron_prime.bridge.convert import hf_to_mcore as convert

        convert(args.hf, args.out, dtype=args.dtype)

    return run(main, p.parse_args(argv))


def mcore_to_hf(argv: list[str]) -> int:
    p = parser("megatron-prime convert mcore-to-hf",
               "Megatron checkpoint (from hf-to-mcore or the trainer) -> Hugging Face checkpoint")
    p.add_argument("--mcore", required=True, help="Megatron checkpoint dir")
    p.add_argument("--out", required=True, help="output Hugging Face dir")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])

    def main(args):
        from megatron_prime.bridge.convert import mcore_to_hf as convert

        convert(args.mcore, args.out, dtype=args.dtype)

    return run(main, p.parse_args(argv))


def verify(argv: list[str]) -> int:
    p = parser("megatron-prime convert verify",
               "Compare a Megatron checkpoint's logits with the Hugging Face model's on the same prompts: "
               "prints the max absolute logit difference and top-1 agreement; exits 1 above tolerance")
    p.add_argument("--hf", required=True)
    p.add_argument("--mcore", required=True)
    p.add_argument("--tol", type=float, default=1e-4, help="max allowed |logit difference|")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)

    def main(args):
        import torch.distributed as dist

        from megatron_prime.bridge.convert import verify as compare

        stats = compare(args.hf, args.mcore, num_prompts=args.prompts, seq_len=args.seq_len)
        ok = stats["max_abs_diff"] <= args.tol
        if dist.get_rank() == 0:
            print(f"max_abs_diff={stats['max_abs_diff']:.3e} top1_agreement={stats['top1_agreement']:.4f} "
                  f"mean_abs_logit={stats['mean_abs_logit']:.3f} tol={args.tol:g} -> {'OK' if ok else 'FAIL'}")
        return 0 if ok else 1

    return run(main, p.parse_args(argv))


def main(argv: list[str]) -> int:
    """``convert SUBCOMMAND ARGS...``"""
    commands = {"hf-to-mcore": hf_to_mcore, "mcore-to-hf": mcore_to_hf, "verify": verify}
    if not argv or argv[0] not in commands:
        print(f"usage: megatron-prime convert {{{'|'.join(COMMANDS)}}} ARGS...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])
