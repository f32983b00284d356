"""Rollout engines behind one interface (see base.py): generate(), update_weights(stream),
sleep()/wake(), shutdown().

    engine = build_engine("hf", model_dir_or_model=path)            # CPU demo and tests
    engine = build_engine("sglang", model_path=path, tp_size=2, group=pg)
    engine = build_engine("sglang-remote", worker_urls=[...], tp_size=8, ...)
    engine = build_engine("vllm", model_path=path)

The sglang and vllm modules import their engines lazily, so importing this package
needs neither installed.
"""

from __future__ import annotations

import importlib

from .base import Response, RolloutEngine, RolloutError, SamplingParams

# kind -> (module inside this package, class)
ENGINES = {
    "hf": ("hf_engine", "HFEngine"),
    "sglang": ("sglang_engine", "SGLangEngine"),
    "sglang-remote": ("sglang_remote", "SGLangRemoteEngine"),
    "vllm": ("vllm_engine", "VLLMEngine"),
}


def build_engine(kind: str, **kwargs) -> RolloutEngine:
    """Construct the engine registered under ``kind`` with ``kwargs``."""
    if kind not in ENGINES:
        raise ValueError(f"unknown rollout engine '{kind}'; known kinds: {', '.join(sorted(ENGINES))}")
    module_name, class_name = ENGINES[kind]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)(**kwargs)


__all__ = ["ENGINES", "Response", "RolloutEngine", "RolloutError", "SamplingParams", "build_engine"]
