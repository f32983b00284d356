"""Reading and writing Hugging Face checkpoints: sliced safetensors reads, sharded safetensors writes."""

from __future__ import annotations

import json
import math
import os
import shutil

import torch
from safetensors.torch import save_file

from megatron_prime.bridge.mapping import expected_hf_shape, hf_param_names
from megatron_prime.errors import UserError
from megatron_prime.models.hf_config import HFArch

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


class CheckpointError(UserError):
    """A checkpoint file that is missing, truncated or does not match the model config."""


# safetensors dtype names (the file header's "dtype") -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile:
    """One memory-mapped safetensors file: tensors are zero-copy views of its bytes (paged in from
    the page cache when read), so loading a parameter is one copy from the file into it.

    The format: an 8-byte little-endian header length, a JSON header mapping each name to its
    ``dtype``, ``shape`` and ``data_offsets`` (relative to the end of the header), then the data.
    """

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: file not found (listed in the checkpoint index)")
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if size < 8 or header_len > size - 8:
                    raise ValueError(f"header of {header_len} bytes, but the file has {size}")
                header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated?): {e}") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries = header
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {entry['dtype']}")
            nbytes = math.prod(entry["shape"]) * dtype.itemsize
            if end - begin != nbytes or self.data_start + end > size:
                raise CheckpointError(
                    f"{path}: tensor '{name}' needs bytes {self.data_start + begin}..{self.data_start + end} "
                    f"({nbytes} bytes), but the file has {size} bytes (truncated?)"
                )
        self.data = torch.from_file(path, shared=False, size=size, dtype=torch.uint8) if size else None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def tensor(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        raw = self.data[self.data_start + begin: self.data_start + end]
        if (self.data_start + begin) % dtype.itemsize:
            raw = raw.clone()  # not aligned for a view (the format does not promise alignment)
        return raw.view(dtype).view(entry["shape"])


class SafetensorsSource:
    """Reads (slices of) named tensors from an HF checkpoint dir without loading whole files:
    ``read`` returns views of the memory-mapped files, for the caller to copy where they belong."""

    def __init__(self, hf_dir: str, arch: HFArch | None = None):
        self.hf_dir = hf_dir
        self.arch = arch
        self._files: dict[str, SafetensorsFile] = {}
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            single = os.path.join(hf_dir, "model.safetensors")
            if not os.path.exists(single):
                raise CheckpointError(
                    f"{hf_dir}: no model.safetensors or model.safetensors.index.json found"
                )
            weight_map = {name: "model.safetensors" for name in self._open(single).keys()}
        self.weight_map = weight_map

    def _open(self, path: str) -> SafetensorsFile:
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
        return self._files[path]

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.hf_dir}: tensor '{name}' is missing from the checkpoint")
        file = self._open(os.path.join(self.hf_dir, self.weight_map[name]))
        if name not in file.entries:
            raise CheckpointError(f"{file.path}: tensor '{name}' is missing (the index lists it in this file)")
        return file

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def check_shapes(self) -> None:
        """Every tensor the model needs is present with the shape the config implies."""
        for name in hf_param_names(self.arch):
            got = self.shape(name)
            want = expected_hf_shape(self.arch, name)
            if got != want:
                raise CheckpointError(
                    f"{self._file(name).path}: tensor '{name}' has shape {list(got)}, but config.json "
                    f"implies {list(want)}"
                )

    def read(self, name, dim=None, start=0, stop=None) -> torch.Tensor:
        """The tensor ``name`` (``[start, stop)`` along ``dim`` if given), a view of the file."""
        tensor = self._file(name).tensor(name)
        if dim is None:
            return tensor
        stop = tensor.shape[dim] if stop is None else stop
        return tensor.narrow(dim, start, stop - start)


class ShardedSafetensorsWriter:
    """Writes named tensors into ``model-0000i-of-0000n.safetensors`` files of bounded size."""

    def __init__(self, out_dir: str, max_shard_bytes: int = 5 * 2**30):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += nbytes

    def _flush(self) -> None:
        index = len(self._files)
        save_file(self._pending, os.path.join(self.out_dir, f"shard-{index}.tmp"), metadata={"format": "pt"})
        self._files.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        if self._pending or not self._files:
            self._flush()
        n = len(self._files)
        weight_map = {}
        for i, names in enumerate(self._files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(self.out_dir, f"shard-{i}.tmp"), os.path.join(self.out_dir, final))
            weight_map.update({name: final for name in names})
        if n > 1:
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


def copy_hf_metadata(src_dir: str, dst_dir: str) -> None:
    """config.json and tokenizer files from an HF dir (weights excluded)."""
    for name in ("config.json", *TOKENIZER_FILES):
        path = os.path.join(src_dir, name)
        if os.path.exists(path):
            shutil.copy2(path, os.path.join(dst_dir, name))
