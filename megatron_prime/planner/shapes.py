"""Where the planner gets the model's shape: ``model.hf_path``'s config.json when it is there,
else ``model.shape_from`` (e.g. the example bases' config.json files under ``examples/models/``,
shipped with the package), so planning and dry runs work before anything is downloaded."""

from __future__ import annotations

import os

from megatron_prime.config import Config, ConfigError, shipped_path
from megatron_prime.models.hf_config import HFArch, arch_from_dict


def _read(path: str) -> HFArch:
    import json

    with open(path) as f:
        return arch_from_dict(json.load(f), path)


def model_shape(cfg: Config) -> tuple[HFArch, str]:
    """The model's shape and the config.json it came from."""
    if cfg.model.hf_path:
        path = os.path.join(cfg.model.hf_path, "config.json")
        if os.path.exists(path):
            return _read(path), path
    if cfg.model.shape_from:
        path = shipped_path(cfg.model.shape_from)  # examples/models/... ship with the package
        if os.path.exists(path):
            return _read(path), path
        raise ConfigError(f"config key 'model.shape_from' = {cfg.model.shape_from!r}: file not found (paths are "
                          "relative to the working directory; examples/models/... also in the installed package)")
    raise ConfigError(f"config key 'model.hf_path' = {cfg.model.hf_path!r}: no config.json there; set "
                      "model.shape_from to a config.json with the model's shape (e.g. "
                      "examples/models/Qwen2.5-Math-7B/config.json) to plan before downloading it")
