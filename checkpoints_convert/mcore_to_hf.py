"""Megatron checkpoint (written by hf_to_mcore.py or the trainer) -> Hugging Face checkpoint.

    python checkpoints_convert/mcore_to_hf.py --mcore MCORE_DIR --out HF_DIR
"""

import sys

from megatron_prime.bridge import cli
from megatron_prime.bridge.convert import mcore_to_hf


def main(args):
    mcore_to_hf(args.mcore, args.out, dtype=args.dtype)


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("--mcore", required=True, help="Megatron checkpoint dir")
    p.add_argument("--out", required=True, help="output Hugging Face dir")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    sys.exit(cli.run(main, p.parse_args()))
