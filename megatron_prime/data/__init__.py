"""Prompt datasets, chat rendering, evaluation sets and the synthetic toy task.

Imports neither torch.distributed nor Megatron (transformers/tokenizers only where needed).
"""

from megatron_prime.data.chat import has_chat_template, render_prompt
from megatron_prime.data.cli import cli_check
from megatron_prime.data.cli import main as cli_main
from megatron_prime.data.eval_sets import EVAL_SETS, load_eval_set
from megatron_prime.data.sampler import PromptSampler
from megatron_prime.data.schema import (
    DatasetError,
    PromptRow,
    SFTRow,
    check_dataset,
    load_prompt_dataset,
    load_sft_dataset,
)
from megatron_prime.data.toy import ToyDifficulty, ToyTask, build_toy_task

__all__ = [
    "DatasetError",
    "EVAL_SETS",
    "PromptRow",
    "PromptSampler",
    "SFTRow",
    "ToyDifficulty",
    "ToyTask",
    "build_toy_task",
    "check_dataset",
    "cli_check",
    "cli_main",
    "has_chat_template",
    "load_eval_set",
    "load_prompt_dataset",
    "load_sft_dataset",
    "render_prompt",
]
