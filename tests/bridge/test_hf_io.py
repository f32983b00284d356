"""The memory-mapped safetensors reader: the same tensors as safetensors' own loader, views of
the file, and one clear error for a file that is cut short."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_prime.bridge.hf_io import CheckpointError, SafetensorsFile


def test_every_dtype_reads_as_safetensors_loads_it(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "f32": torch.randn(5, 7),
        "bf16": torch.randn(3, 4).to(torch.bfloat16),
        "f16": torch.randn(6).to(torch.float16),
        "i64": torch.arange(-4, 5),
        "u8": torch.arange(11, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
    }
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path)
    reference = load_file(path)
    file = SafetensorsFile(path)
    assert sorted(file.keys()) == sorted(tensors)
    for name, want in reference.items():
        got = file.tensor(name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
        assert file.shape(name) == tuple(want.shape)


def _handmade(path, entries: list[tuple[str, str, list[int], bytes]], cut: int = 0) -> None:
    """A safetensors file written by hand from the format (header length, JSON header, data)."""
    header, data = {}, b""
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    blob = json.dumps(header).encode()
    content = struct.pack("<Q", len(blob)) + blob + data
    with open(path, "wb") as f:
        f.write(content[: len(content) - cut])


def test_a_tensor_at_an_unaligned_offset_is_read_correctly(tmp_path):
    # The format does not promise alignment: a 1-byte tensor pushes the next one to an odd offset.
    values = torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16)
    path = str(tmp_path / "odd.safetensors")
    _handmade(path, [("flag", "U8", [1], b"\x07"),
                     ("w", "BF16", [3], values.view(torch.uint8).numpy().tobytes())])
    file = SafetensorsFile(path)
    assert torch.equal(file.tensor("w"), values)
    assert file.tensor("flag").tolist() == [7]


def test_a_file_cut_short_names_the_file_and_the_tensor(tmp_path):
    path = str(tmp_path / "cut.safetensors")
    _handmade(path, [("a", "F32", [4], bytes(16)), ("b", "F32", [4], bytes(16))], cut=5)
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: tensor 'b' .*truncated"):
        SafetensorsFile(path)


def test_a_header_cut_short_is_one_clear_error(tmp_path):
    path = str(tmp_path / "head.safetensors")
    _handmade(path, [("a", "F32", [4], bytes(16))], cut=30)
    with pytest.raises(CheckpointError, match=r"head\.safetensors: not a readable safetensors file"):
        SafetensorsFile(path)
