"""``megatron-prime convert mcore-to-hf`` as a script, for ``python`` and ``torchrun`` from a checkout:

    python checkpoints_convert/mcore_to_hf.py --help
"""

import sys

from megatron_prime.bridge.cli import mcore_to_hf

if __name__ == "__main__":
    sys.exit(mcore_to_hf(sys.argv[1:]))
