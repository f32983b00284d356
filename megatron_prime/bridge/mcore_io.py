"""Megatron distributed checkpoints (torch_dist) of one model, written atomically.

Layout of a model checkpoint directory::

    MCORE_DIR/            megatron-core dist_checkpointing files (reshardable to any TP/PP)
    MCORE_DIR/hf/         config.json + tokenizer files of the HF model it came from
    MCORE_DIR/megatron_prime.json   what wrote it

The directory appears in one rename when every rank has finished writing, so a crash leaves
either the previous checkpoint or none, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle

import torch
from megatron.core import dist_checkpointing

from megatron_prime.bridge.atomic_dir import DistributedAtomicDir
from megatron_prime.bridge.hf_io import CheckpointError, copy_hf_metadata
from megatron_prime.models.hf_config import HFArch, read_hf_config
from megatron_prime.models.wrappers import unwrap
from megatron_prime.platform.distributed import is_rank0

META_FILE = "megatron_prime.json"


def save_model(model, out_dir: str, hf_meta_dir: str, extra_meta: dict | None = None) -> None:
    """Write ``model`` (all ranks call this) as a torch_dist checkpoint plus its HF metadata."""
    sharded = unwrap(model).sharded_state_dict()
    with DistributedAtomicDir(out_dir) as tmp, without_crc32():
        dist_checkpointing.save(sharded, tmp)
        if is_rank0():
            write_model_metadata(tmp, hf_meta_dir, extra_meta or {})


@contextlib.contextmanager
def without_crc32():
    """``torch.save`` (which torch_dist checkpoints use for every tensor) without its per-record
    CRC32: computing it is a pass over every byte, and ``torch.load`` never checks it."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def write_model_metadata(ckpt_dir: str, hf_meta_dir: str, meta: dict) -> None:
    """The HF config/tokenizer (``hf/``) and ``META_FILE`` that make a dist checkpoint directory a
    megatron-prime model checkpoint (rank 0, after the tensors are written)."""
    os.makedirs(os.path.join(ckpt_dir, "hf"))
    copy_hf_metadata(hf_meta_dir, os.path.join(ckpt_dir, "hf"))
    with open(os.path.join(ckpt_dir, META_FILE), "w") as f:
        json.dump({"format": "megatron-prime/torch_dist", "version": 1, **meta}, f)


def load_plain_data(path: str):
    """A file of plain data written with ``torch.save`` (tensors, numbers, strings, lists, dicts),
    read with ``weights_only=True``: a crafted pickle cannot run code, it is refused naming the file."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: refused: it holds more than plain data (tensors, numbers, strings, lists, "
                              f"dicts), which loading could run as code ({reason})") from None


# Everything torch's distributed-checkpoint metadata pickles reference (torch 2.6 - 2.13): its own
# dataclasses and enums, torch's sizes, dtypes and layouts, paths. Constructing any of them runs
# no code of the file's choosing (whole modules are not allowed: they also hold functions).
_DCP = "torch.distributed.checkpoint."
_DCP_METADATA_GLOBALS = {
    *((_DCP + "metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    *((_DCP + "planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem", "LoadItemType")),
    (_DCP + "filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    *(("torch", name) for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16",
                                   "int8", "uint8", "bool", "float8_e4m3fn", "float8_e5m2", "complex64")),
}


class _MetadataOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}")


def check_dcp_metadata(ckpt_dir: str) -> None:
    """torch reads a distributed checkpoint's ``.metadata`` with plain pickle, which would run any
    code a crafted file names: read it first with an unpickler that knows only the checkpoint
    metadata types, and refuse the directory otherwise (one line, naming the file)."""
    path = os.path.join(ckpt_dir, ".metadata")
    if not os.path.exists(path):
        return  # dist_checkpointing reports a missing file itself
    try:
        with open(path, "rb") as f:
            _MetadataOnly(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: refused: not plain distributed-checkpoint metadata ({e})") from None


def read_meta(mcore_dir: str) -> dict:
    path = os.path.join(mcore_dir, META_FILE)
    if not os.path.exists(path):
        raise CheckpointError(
            f"{mcore_dir}: not a megatron-prime checkpoint ({META_FILE} missing; incomplete write?)"
        )
    with open(path) as f:
        return json.load(f)


def read_arch(mcore_dir: str) -> HFArch:
    read_meta(mcore_dir)
    return read_hf_config(os.path.join(mcore_dir, "hf"))


def load_model(model, mcore_dir: str) -> None:
    """Load a checkpoint written at any TP/PP into this rank's shards of ``model``."""
    read_arch(mcore_dir)
    lora = read_meta(mcore_dir).get("lora")
    if lora:
        raise CheckpointError(
            f"{mcore_dir}: holds only the LoRA adapter '{lora['adapter']}' (rank {lora['rank']}) of the base "
            f"{lora['base']}, not a whole model: a LoRA run resumes from its checkpoint.dir, and exports the "
            "merged model and the PEFT adapter when it ends (checkpoint.export_dir)")
    check_dcp_metadata(mcore_dir)
    inner = unwrap(model)
    requested = inner.sharded_state_dict()
    try:
        state = dist_checkpointing.load(requested, mcore_dir)
    except Exception as e:  # dist_checkpointing raises many types; name the dir
        raise CheckpointError(f"{mcore_dir}: cannot load Megatron checkpoint: {e}") from e
    # A trainer checkpoint's common state (optimizer param groups, ...) comes back too: keep the model.
    state = {k: v for k, v in state.items() if k in requested}
    # dist_checkpointing reads most tensors straight into the parameters: copy only the others
    # (e.g. fc1, which it reassembles from its gate and up halves).
    own = inner.state_dict(keep_vars=True)
    in_place = {k for k, v in state.items() if k in own and _same_memory(v, own[k])}
    missing, unexpected = inner.load_state_dict({k: v for k, v in state.items() if k not in in_place}, strict=False)
    missing = [k for k in missing if k not in in_place]
    if missing or unexpected:
        raise CheckpointError(f"{mcore_dir}: state does not fit the model: missing {missing}, unexpected {unexpected}")


def _same_memory(a, b) -> bool:
    return (torch.is_tensor(a) and torch.is_tensor(b) and a.data_ptr() == b.data_ptr()
            and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype)
