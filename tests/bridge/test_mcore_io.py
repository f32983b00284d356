"""Loading a checkpoint runs no code from it: our own files (trainer state, lr schedules, RNG
states) are read as plain data, and a distributed checkpoint's ``.metadata`` (which torch reads
with plain pickle) may name nothing but torch's checkpoint metadata types. A file with a
code-running payload is refused with one line naming it, and the payload never runs."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from megatron_prime.bridge.hf_io import CheckpointError
from megatron_prime.bridge.mcore_io import check_dcp_metadata, load_plain_data


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_plain_data_loads_and_a_payload_is_refused(tmp_path):
    good = tmp_path / "trainer_state.pt"
    state = {"step": 3, "sampler": {"epoch": 0, "position": 5}, "buffer": {"prompts": [{"prompt": "1+1=", "index": 2}]},
             "rng": torch.get_rng_state()}
    torch.save(state, good)
    loaded = load_plain_data(str(good))
    assert loaded["buffer"] == state["buffer"] and torch.equal(loaded["rng"], state["rng"])

    marker = tmp_path / "payload_ran"
    bad = tmp_path / "scheduler.pt"
    torch.save({"max_lr": 1e-6, "x": Payload(str(marker))}, bad)
    with pytest.raises(CheckpointError) as error:
        load_plain_data(str(bad))
    message = str(error.value)
    assert message.startswith(f"{bad}: refused") and "\n" not in message
    assert not marker.exists()


def test_distributed_checkpoint_metadata_with_a_payload_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    good = tmp_path / "good"
    dcp.save({"w": torch.ones(3, 2), "step": torch.tensor(1)}, checkpoint_id=str(good), no_dist=True)
    check_dcp_metadata(str(good))  # real metadata passes

    marker = tmp_path / "payload_ran"
    bad = tmp_path / "bad"
    bad.mkdir()
    with open(bad / ".metadata", "wb") as f:
        pickle.dump(Payload(str(marker)), f)
    with pytest.raises(CheckpointError) as error:
        check_dcp_metadata(str(bad))
    message = str(error.value)
    assert message.startswith(f"{bad / '.metadata'}: refused") and "posix.system" in message and "\n" not in message
    assert not marker.exists()
