"""``megatron-prime`` command line: train | sft | eval | score | inspect | demo | plan | convert | data.

Each subcommand imports its module lazily so ``--help`` and ``data check`` stay fast.
"""

from __future__ import annotations

import sys


def _convert(argv: list[str]) -> int:
    from megatron_prime.bridge import cli

    return cli.main(argv)


def _data(argv: list[str]) -> int:
    from megatron_prime.data import cli_main

    return cli_main(argv)


def _plan(argv: list[str]) -> int:
    from megatron_prime.algorithm import OUTCOME_ONLY_ESTIMATORS
    from megatron_prime.planner.command import plan_command
    from megatron_prime.training.validation import validate_run

    return plan_command(argv, validate_run=validate_run, outcome_only=OUTCOME_ONLY_ESTIMATORS)


def _training_command(name: str):
    def run(argv: list[str]) -> int:
        from megatron_prime.training import entrypoints

        return getattr(entrypoints, name)(argv)

    return run


def _reports_command(name: str):
    def run(argv: list[str]) -> int:
        from megatron_prime.reports import commands

        return getattr(commands, name)(argv)

    return run


COMMANDS = {
    "train": (_training_command("train"), "PRIME RL training: megatron-prime train CONFIG [key=value ...]"),
    "sft": (_training_command("sft"), "supervised fine-tuning: megatron-prime sft CONFIG [key=value ...]"),
    "eval": (_reports_command("evaluate"), "benchmark table in the paper's layout (greedy, avg@K, pass@k)"),
    "score": (_reports_command("score"), "best-of-N with the trained implicit PRM vs majority vote, random, oracle"),
    "inspect": (_reports_command("inspect"), "HTML page of a run: token-level process rewards and scalars"),
    "demo": (_training_command("demo"), "the tiny CPU demo: toy task, SFT, PRIME, before/after accuracy"),
    "plan": (_plan, "memory and layout plan: megatron-prime plan CONFIG --gpus N --gpu-mem 80"),
    "convert": (_convert, "checkpoint conversion: hf-to-mcore | mcore-to-hf | verify"),
    "data": (_data, "dataset tools: data check FILE"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: megatron-prime COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]][0](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
