"""`megatron-prime data check FILE [FILE...]`: validate prompt datasets before training."""

from __future__ import annotations

import argparse
import sys

from megatron_prime.data.schema import check_dataset, load_prompt_dataset, load_sft_dataset


def cli_check(argv: list[str]) -> int:
    """Check each file; print every problem and a summary line per file. Exit status 1 if any
    file has a problem (training would refuse it with the same messages, or drop the over-long
    rows), else 0."""
    parser = argparse.ArgumentParser(
        prog="megatron-prime data check",
        description="Validate prompt datasets (parquet or jsonl; Eurus-2-RL-Data or plain "
        "{prompt, answer} rows) and report every bad row.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--sft", action="store_true", help='SFT files: {"prompt", "response"} rows')
    parser.add_argument("--tokenizer", help="HF tokenizer (model) dir: also list rows that are too long")
    parser.add_argument("--max-prompt-len", type=int, default=None,
                        help="prompt files: tokens per rendered prompt (data.max_prompt_len)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="SFT files: tokens per prompt + response (data.max_prompt_len + data.max_response_len)")
    args = parser.parse_args(argv)
    limit = args.max_len if args.sft else args.max_prompt_len
    if (args.tokenizer is None) != (limit is None):
        parser.error("--tokenizer and --max-prompt-len (--max-len with --sft) go together")
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    failed = False
    for path in args.files:
        problems = check_dataset(path, "sft" if args.sft else "prompts")
        if not problems and tokenizer is not None:
            problems = [str(o) for o in _overlong(path, args.sft, tokenizer, limit)]
        for problem in problems:
            print(problem)
        if problems:
            failed = True
            print(f"{path}: {len(problems)} problem(s)")
        else:
            print(f"{path}: OK")
    return 1 if failed else 0


def _overlong(path: str, sft: bool, tokenizer, limit: int):
    from megatron_prime.data.lengths import split_overlong_prompts, split_overlong_sft

    if sft:
        return split_overlong_sft(load_sft_dataset(path), tokenizer, limit)[1]
    return split_overlong_prompts(load_prompt_dataset(path), tokenizer, limit)[1]


def main(argv: list[str] | None = None) -> int:
    """Entry point for `megatron-prime data ...` (argv without the leading "data")."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "check":
        print("usage: megatron-prime data check [--tokenizer DIR --max-prompt-len N] FILE [FILE...]",
              file=sys.stderr)
        return 2
    return cli_check(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
