"""Argument parsing for ``megatron-prime train | sft | demo``."""

from __future__ import annotations

import argparse

from megatron_prime.config import load_config
from megatron_prime.data.toy import PRESETS as TOY_PRESETS
from megatron_prime.errors import exit_code


def _config_args(argv, prog, description):
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("config", help="YAML config (see examples/configs)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2")
    args = p.parse_args(argv)
    return load_config(args.config, args.overrides)


def train(argv) -> int:
    def run():
        cfg = _config_args(argv, "megatron-prime train", "PRIME RL training")
        from megatron_prime.training.trainer import train as run_train

        run_train(cfg)

    return exit_code(run)


def sft(argv) -> int:
    def run():
        cfg = _config_args(argv, "megatron-prime sft", "supervised fine-tuning")
        from megatron_prime.training.sft import sft as run_sft

        result = run_sft(cfg)
        print(f"SFT done: Megatron checkpoint {result['mcore']}, HF checkpoint {result['hf']}")

    return exit_code(run)


def demo(argv) -> int:
    p = argparse.ArgumentParser(prog="megatron-prime demo", description="the tiny CPU demo")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--config", default=None, help="default: the tiny CPU config shipped with the package "
                   "(examples/configs/tiny_cpu.yaml)")
    p.add_argument("--task", default="default", choices=sorted(TOY_PRESETS),
                   help="the toy task's preset (multistep: a+b*c-d*e+f*g, every intermediate result written)")
    p.add_argument("--moe", action="store_true", help="a tiny mixture-of-experts model (Qwen3-MoE: 4 experts, 2 per "
                   "token) instead of the dense Qwen2")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    def run():
        from megatron_prime.training.demo import run_demo

        run_demo(args.out, args.seed, args.config, args.overrides, args.task, args.moe)

    return exit_code(run)
