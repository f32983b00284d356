"""Compare a Megatron checkpoint's logits with the Hugging Face model's on the same prompts.

    python checkpoints_convert/verify.py --hf HF_DIR --mcore MCORE_DIR [--tp N --pp M] [--tol 1e-4]

Prints the max absolute logit difference and top-1 agreement; exits 1 above tolerance.
"""

import sys

import torch.distributed as dist

from megatron_prime.bridge import cli
from megatron_prime.bridge.convert import verify


def main(args):
    stats = verify(args.hf, args.mcore, num_prompts=args.prompts, seq_len=args.seq_len)
    ok = stats["max_abs_diff"] <= args.tol
    if dist.get_rank() == 0:
        print(
            f"max_abs_diff={stats['max_abs_diff']:.3e} top1_agreement={stats['top1_agreement']:.4f} "
            f"mean_abs_logit={stats['mean_abs_logit']:.3f} tol={args.tol:g} -> {'OK' if ok else 'FAIL'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("--hf", required=True)
    p.add_argument("--mcore", required=True)
    p.add_argument("--tol", type=float, default=1e-4, help="max allowed |logit difference|")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    sys.exit(cli.run(main, p.parse_args()))
