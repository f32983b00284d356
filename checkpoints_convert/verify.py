"""``megatron-prime convert verify`` as a script, for ``python`` and ``torchrun`` from a checkout:

    python checkpoints_convert/verify.py --help
"""

import sys

from megatron_prime.bridge.cli import verify

if __name__ == "__main__":
    sys.exit(verify(sys.argv[1:]))
