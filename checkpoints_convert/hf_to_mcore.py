"""Hugging Face checkpoint -> Megatron distributed checkpoint (torch_dist, reshardable on load).

    python checkpoints_convert/hf_to_mcore.py --hf HF_DIR --out MCORE_DIR
    torchrun --nproc-per-node 8 checkpoints_convert/hf_to_mcore.py --hf HF_DIR --out MCORE_DIR --tp 8
"""

import sys

from megatron_prime.bridge import cli
from megatron_prime.bridge.convert import hf_to_mcore


def main(args):
    hf_to_mcore(args.hf, args.out, dtype=args.dtype)


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("--hf", required=True, help="Hugging Face checkpoint dir")
    p.add_argument("--out", required=True, help="output Megatron checkpoint dir")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="dtype to store (auto: the HF weights' dtype, bit-exact)")
    sys.exit(cli.run(main, p.parse_args()))
