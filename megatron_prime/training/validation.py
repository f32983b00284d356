"""Validate a run up front, before any process group or model is built: the config tree plus the
facts ``config`` does not own (it imports nothing of ours), gathered here: the model's shape, the
algorithm's estimators, and the ranks of the launch."""

from __future__ import annotations

import os
import re
from typing import Literal

from megatron_prime.algorithm import ADVANTAGE_ESTIMATORS
from megatron_prime.config import Config, validate
from megatron_prime.models.hf_config import HFArch, read_hf_config


def gpus_per_node(environ=os.environ) -> int | None:
    """Ranks per node of this launch: torchrun's LOCAL_WORLD_SIZE, or SLURM's tasks per node
    (``SLURM_NTASKS_PER_NODE``, else the first count of ``SLURM_TASKS_PER_NODE`` such as
    ``"8(x4)"``); None when neither launcher says."""
    if "LOCAL_WORLD_SIZE" in environ:
        return int(environ["LOCAL_WORLD_SIZE"])
    if "SLURM_NTASKS_PER_NODE" in environ:
        return int(environ["SLURM_NTASKS_PER_NODE"])
    match = re.match(r"(\d+)", environ.get("SLURM_TASKS_PER_NODE", ""))
    return int(match.group(1)) if match else None


def model_arch(cfg: Config) -> HFArch | None:
    """The model's shape from ``model.hf_path``'s config.json, when it is there."""
    if cfg.model.hf_path and os.path.exists(os.path.join(cfg.model.hf_path, "config.json")):
        return read_hf_config(cfg.model.hf_path)
    return None


def validate_run(cfg: Config, world_size: int | None, *, stage: Literal["train", "sft"] = "train",
                 arch: HFArch | None = None, ranks_per_node: int | None = None) -> None:
    """``config.validate`` with everything it can check: ``arch`` defaults to ``model.hf_path``'s,
    ``ranks_per_node`` to the launch environment's."""
    validate(cfg, world_size, model_shape=arch or model_arch(cfg), estimators=ADVANTAGE_ESTIMATORS,
             gpus_per_node=ranks_per_node or gpus_per_node(), stage=stage)
