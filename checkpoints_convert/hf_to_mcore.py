"""``megatron-prime convert hf-to-mcore`` as a script, for ``python`` and ``torchrun`` from a checkout:

    python checkpoints_convert/hf_to_mcore.py --help
"""

import sys

from megatron_prime.bridge.cli import hf_to_mcore

if __name__ == "__main__":
    sys.exit(hf_to_mcore(sys.argv[1:]))
