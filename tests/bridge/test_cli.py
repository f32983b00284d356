"""Bad checkpoints give a one-line error naming the file and tensor, and leave no output dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, make_tiny_hf


def convert(hf_dir, out_dir):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "checkpoints_convert", "hf_to_mcore.py"),
         "--hf", hf_dir, "--out", out_dir],
        capture_output=True, text=True, timeout=300,
    )
    error_lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    return proc.returncode, error_lines, proc.stderr


@pytest.fixture
def hf_dir(tmp_path):
    path = tmp_path / "hf"
    make_tiny_hf("qwen2", str(path))
    return path


def _assert_clean_failure(code, errors, stderr, out_dir, *must_contain):
    assert code == 2, stderr
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    for text in must_contain:
        assert text in errors[0], errors[0]
    parent = os.path.dirname(out_dir)
    assert not os.path.exists(out_dir)
    assert not [p for p in os.listdir(parent) if p.startswith(".out")], "temporary dir left behind"


def test_missing_safetensors(hf_dir, tmp_path):
    os.remove(hf_dir / "model.safetensors")
    out = str(tmp_path / "out")
    _assert_clean_failure(*convert(str(hf_dir), out), out, str(hf_dir), "model.safetensors")


def test_truncated_safetensors(hf_dir, tmp_path):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out = str(tmp_path / "out")
    _assert_clean_failure(*convert(str(hf_dir), out), out, "model.safetensors", "truncated")


def test_unknown_architecture(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    out = str(tmp_path / "out")
    _assert_clean_failure(*convert(str(hf_dir), out), out, "config.json", "GPTNeoXForCausalLM",
                          "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def test_shape_mismatch(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 128  # weights were made with 96
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    out = str(tmp_path / "out")
    _assert_clean_failure(*convert(str(hf_dir), out), out, "model.safetensors",
                          "model.layers.0.mlp.gate_proj.weight", "[96, 64]", "[128, 64]")


def test_failed_conversion_keeps_previous_output(hf_dir, tmp_path):
    out = tmp_path / "out"
    code, _, stderr = convert(str(hf_dir), str(out))
    assert code == 0, stderr
    before = sorted(os.listdir(out))
    os.remove(hf_dir / "model.safetensors")
    code, errors, stderr = convert(str(hf_dir), str(out))
    assert code == 2 and errors, stderr
    assert sorted(os.listdir(out)) == before  # the last good checkpoint is intact
