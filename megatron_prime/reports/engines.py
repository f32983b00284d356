"""Rollout engines for the report commands: the trainer's fleet, started from a checkpoint on
disk (one hf engine per rank on CPU; sglang or vllm engines of ``tp`` GPUs each under torchrun).

A Megatron checkpoint (the trainer's ``step_*/policy`` or ``hf_to_mcore.py``'s output) is first
written out as a Hugging Face checkpoint beside the results, since engines load HF weights.
"""

from __future__ import annotations

import hashlib
import os

from megatron_prime.reports.files import ReportError

MCORE_META = "megatron_prime.json"


def is_hf_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def hf_checkpoint(model_dir: str, cache_dir: str) -> str:
    """``model_dir`` itself if it is a Hugging Face checkpoint; for a Megatron checkpoint, its
    HF conversion under ``cache_dir`` (made once, reused by later runs). Every rank calls this."""
    if is_hf_checkpoint(model_dir):
        return model_dir
    if not os.path.isfile(os.path.join(model_dir, MCORE_META)):
        raise ReportError(f"{model_dir}: neither a Hugging Face checkpoint (config.json) nor a Megatron "
                          f"checkpoint ({MCORE_META})")
    from megatron_prime.platform import distributed

    # Every trainer step's model dir is called policy/ or prm/: name the conversion by the full path.
    source = os.path.abspath(model_dir)
    tag = hashlib.sha1(source.encode()).hexdigest()[:10]
    out = os.path.join(cache_dir, f"{os.path.basename(source)}-{tag}-hf")
    # Rank 0 decides, so that no rank skips the conversion's collectives.
    if distributed.broadcast_object(not is_hf_checkpoint(out)):
        from megatron_prime.bridge.convert import mcore_to_hf

        distributed.setup()
        mcore_to_hf(model_dir, out)
    return out


def start_fleet(model_dir: str, *, engine: str = "hf", tp: int = 1, mem_fraction: float = 0.6, seed: int = 1,
                cache_dir: str = "."):
    """(fleet, tokenizer) for ``model_dir``: every rank of the launch starts its part."""
    from transformers import AutoTokenizer

    from megatron_prime.config import Config
    from megatron_prime.models.hf_config import read_hf_config
    from megatron_prime.platform import distributed
    from megatron_prime.fleet.fleet import build_fleet

    if not os.path.isdir(model_dir):
        raise ReportError(f"{model_dir}: no such checkpoint directory")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        distributed.init_process_group()
    hf_dir = hf_checkpoint(model_dir, cache_dir)
    cfg = Config()
    cfg.model.hf_path = hf_dir
    cfg.rollout.engine = engine
    cfg.rollout.tp = tp
    cfg.rollout.mem_fraction = mem_fraction
    cfg.train.seed = seed
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    # No Megatron policy: the engines keep the weights they loaded (nothing calls fleet.sync()).
    return build_fleet(cfg, tokenizer, None, read_hf_config(hf_dir)), tokenizer
