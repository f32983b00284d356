"""Reading and writing Hugging Face checkpoints: sliced safetensors reads, sharded safetensors writes."""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_prime.models.hf_config import HFArch
from megatron_prime.bridge.mapping import expected_hf_shape, hf_param_names

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


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated or does not match the model config."""


class SafetensorsSource:
    """Reads (slices of) named tensors from an HF checkpoint dir without loading whole files."""

    def __init__(self, hf_dir: str, arch: HFArch | None = None):
        self.hf_dir = hf_dir
        self.arch = arch
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
        self._handles = {}

    @staticmethod
    def _open(path: str):
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: file not found (listed in the checkpoint index)")
        try:
            return safe_open(path, framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated?): {e}") from None

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(f"{self.hf_dir}: tensor '{name}' is missing from the checkpoint")
        path = os.path.join(self.hf_dir, self.weight_map[name])
        if path not in self._handles:
            self._handles[path] = self._open(path)
        return self._handles[path], path

    def shape(self, name: str) -> tuple[int, ...]:
        handle, _ = self._handle(name)
        return tuple(handle.get_slice(name).get_shape())

    def check_shapes(self) -> None:
        """Every tensor the model needs is present with the shape the config implies."""
        for name in hf_param_names(self.arch):
            handle, path = self._handle(name)
            got = tuple(handle.get_slice(name).get_shape())
            want = expected_hf_shape(self.arch, name)
            if got != want:
                raise CheckpointError(
                    f"{path}: tensor '{name}' has shape {list(got)}, but config.json implies {list(want)}"
                )

    def read(self, name, dim=None, start=0, stop=None) -> torch.Tensor:
        handle, path = self._handle(name)
        try:
            sl = handle.get_slice(name)
            if dim is None:
                return sl[:]
            index = [slice(None)] * len(sl.get_shape())
            index[dim] = slice(start, stop)
            return sl[tuple(index)]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read tensor '{name}' (truncated file?): {e}") from None


class DictSource:
    """The same interface over an in-memory ``{hf_name: tensor}`` (e.g. a transformers state dict)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def read(self, name, dim=None, start=0, stop=None):
        t = self.tensors[name]
        return t if dim is None else t.narrow(dim, start, (stop or t.shape[dim]) - start)


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
