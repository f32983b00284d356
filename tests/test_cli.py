"""The command line: user errors give one line naming the problem and exit code 2."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from megatron_prime.config import TrainConfig
from tests.helpers import make_trainer_fixture, overrides


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_prime.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_help_lists_commands():
    proc = cli("--help")
    assert proc.returncode == 0
    for command in ("train", "sft", "eval", "demo", "convert", "data"):
        assert command in proc.stdout


def test_unknown_config_key_is_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  stpes: 3\n")
    proc = cli("train", str(config))
    assert proc.returncode == 2
    allowed = ", ".join(sorted(f.name for f in dataclasses.fields(TrainConfig)))
    assert proc.stderr.strip().splitlines() == [
        f"error: {config}: unknown config key 'train.stpes'; allowed keys here: {allowed}"
    ]


def test_training_refuses_a_bad_dataset_with_the_data_check_message(tmp_path):
    fixture = make_trainer_fixture(str(tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    check = cli("data", "check", str(bad))
    assert check.returncode == 1
    problem = f"{bad} line 2: field 'answer'"
    assert problem in check.stdout
    train = cli("train", "/dev/null", *overrides(fixture, str(tmp_path / "run"), f"data.train_files=[{bad}]"))
    assert train.returncode == 2, train.stderr[-2000:]
    assert "Traceback" not in train.stderr
    assert problem in train.stderr
