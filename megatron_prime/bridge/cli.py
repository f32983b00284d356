"""Shared command-line plumbing for the conversion scripts: launch, layout, clean errors."""

from __future__ import annotations

import argparse
import sys

from megatron_prime.bridge.hf_io import CheckpointError
from megatron_prime.models.hf_config import ModelConfigError


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (run under torchrun for >1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    return p


def run(main, args) -> int:
    """Set up process groups for ``args.tp``/``args.pp``, run ``main(args)``, turn known
    errors into one line on stderr and exit code 2."""
    from megatron_prime.platform import distributed

    try:
        distributed.setup(tp=args.tp, pp=args.pp)
        code = main(args) or 0
    except (CheckpointError, ModelConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    distributed.teardown()
    return code
