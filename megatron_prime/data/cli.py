"""`megatron-prime data check FILE [FILE...]`: validate prompt datasets before training."""

from __future__ import annotations

import argparse
import sys

from megatron_prime.data.schema import check_dataset


def cli_check(argv: list[str]) -> int:
    """Check each file; print every problem and a summary line per file. Exit status 1 if any
    file has a problem (training would refuse it with the same messages), else 0."""
    parser = argparse.ArgumentParser(
        prog="megatron-prime data check",
        description="Validate prompt datasets (parquet or jsonl; Eurus-2-RL-Data or plain "
        "{prompt, answer} rows) and report every bad row.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--sft", action="store_true", help='SFT files: {"prompt", "response"} rows')
    args = parser.parse_args(argv)
    failed = False
    for path in args.files:
        problems = check_dataset(path, "sft" if args.sft else "prompts")
        for problem in problems:
            print(problem)
        if problems:
            failed = True
            print(f"{path}: {len(problems)} problem(s)")
        else:
            print(f"{path}: OK")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `megatron-prime data ...` (argv without the leading "data")."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "check":
        print("usage: megatron-prime data check FILE [FILE...]", file=sys.stderr)
        return 2
    return cli_check(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
