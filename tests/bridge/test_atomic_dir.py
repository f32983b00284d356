"""The all-ranks atomic directory (checkpoints, conversions, HF exports): a failure on any rank
makes every rank raise at once and publishes nothing; a success is fsynced before the rename."""

from __future__ import annotations

import json
import os
import time

import pytest

from megatron_prime.bridge.atomic_dir import DistributedAtomicDir
from tests.helpers import run_distributed

pytestmark = pytest.mark.multi_rank

PEER_DEADLINE_S = 30.0  # far above a few gloo collectives, far below the process-group timeout


def _wait_for_peer(root: str, attempt: str, rank: int) -> bool:
    """Tell the other rank this one has left the block; wait until it has too. False if it did
    not come back within the deadline (it is stuck in a collective)."""
    import torch.distributed as dist

    open(os.path.join(root, f".done-{attempt}-{rank}"), "w").close()
    peer = os.path.join(root, f".done-{attempt}-{1 - rank}")
    deadline = time.monotonic() + PEER_DEADLINE_S
    while not os.path.exists(peer):
        if time.monotonic() > deadline:
            dist.barrier()  # release a peer waiting in a barrier, so the test ends
            return False
        time.sleep(0.05)
    return True


def _two_ranks(rank, world_size, root):
    out = {}
    final = os.path.join(root, "ckpt")
    with DistributedAtomicDir(final) as tmp:
        with open(os.path.join(tmp, f"rank{rank}.txt"), "w") as f:
            f.write("v1")
    out["written"] = sorted(os.listdir(final))  # visible on every rank once the block is left

    for attempt, target in [("replace", final), ("fresh", os.path.join(root, "fresh"))]:
        start = time.monotonic()
        error = None
        try:
            with DistributedAtomicDir(target) as tmp:
                with open(os.path.join(tmp, f"rank{rank}.txt"), "w") as f:
                    f.write("v2")
                if rank == 1:
                    raise ValueError("disk full on rank 1")
        except Exception as e:  # noqa: BLE001 - recorded and checked by the test
            error = f"{type(e).__name__}: {e}"
        out[attempt] = {"error": error, "seconds": time.monotonic() - start,
                        "peer_back": _wait_for_peer(root, attempt, rank)}
    out["final_after"] = {n: open(os.path.join(final, n)).read() for n in sorted(os.listdir(final))}
    out["fresh_exists"] = os.path.exists(os.path.join(root, "fresh"))
    with open(os.path.join(root, f".result-{rank}.json"), "w") as f:
        json.dump(out, f)
    return out


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("atomic")
    run_distributed(_two_ranks, str(root), world_size=2)
    results = [json.loads((root / f".result-{r}.json").read_text()) for r in range(2)]
    leftovers = [n for n in os.listdir(root) if n.startswith(".ckpt") or n.startswith(".fresh")]
    return results, leftovers


def test_every_rank_writes_into_one_directory(two_rank_results):
    results, _ = two_rank_results
    for r in results:
        assert r["written"] == ["rank0.txt", "rank1.txt"]


@pytest.mark.parametrize("attempt", ["replace", "fresh"])
def test_failure_on_one_rank_raises_on_every_rank_promptly(two_rank_results, attempt):
    results, _ = two_rank_results
    for rank, r in enumerate(results):
        outcome = r[attempt]
        assert outcome["error"] == "ValueError: disk full on rank 1", (rank, outcome)
        assert outcome["peer_back"], f"rank {1 - rank} was still waiting {PEER_DEADLINE_S} s later"
        assert outcome["seconds"] < PEER_DEADLINE_S, outcome


def test_failure_publishes_nothing_and_keeps_the_previous_directory(two_rank_results):
    results, leftovers = two_rank_results
    for r in results:
        assert r["final_after"] == {"rank0.txt": "v1", "rank1.txt": "v1"}
        assert not r["fresh_exists"]
    assert leftovers == [], "temporary directories left behind"


def _spy_on_fsync_and_rename(monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", os.path.abspath(src), os.path.abspath(dst)))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    return events


@pytest.mark.parametrize("replace", [False, True])
def test_files_and_directories_are_fsynced_before_the_rename(tmp_path, monkeypatch, replace):
    final = tmp_path / "out"
    if replace:
        final.mkdir()
        (final / "old.txt").write_text("old")
    events = _spy_on_fsync_and_rename(monkeypatch)
    with DistributedAtomicDir(str(final)) as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
        for rel in ("a.bin", "sub/b.bin"):
            with open(os.path.join(tmp, rel), "wb") as f:
                f.write(b"x" * 1000)
    renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[1] == tmp]
    assert len(renames) == 1 and events[renames[0]][2] == str(final)
    before = {e[1] for e in events[: renames[0]] if e[0] == "fsync"}
    after = {e[1] for e in events[renames[0]:] if e[0] == "fsync"}
    for rel in ("a.bin", "sub/b.bin", "sub", ""):
        assert os.path.normpath(os.path.join(tmp, rel)) in before, (rel, events)
    assert str(tmp_path) in after, "the parent directory (the rename itself) was not fsynced"
    assert sorted(os.listdir(final)) == ["a.bin", "sub"]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_failure_in_one_process_keeps_the_previous_directory(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with DistributedAtomicDir(str(final)) as tmp:
            (tmp_path / os.path.basename(tmp) / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert os.listdir(final) == ["old.txt"]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


KILLED_WHILE_REPLACING = """
import os, sys
sys.path.insert(0, {root!r})
from megatron_prime.bridge.atomic_dir import DistributedAtomicDir
renames = []
real_rename = os.rename
def rename(src, dst):
    renames.append(src)
    if len(renames) == 2:  # the old step is moved aside, the new one not yet in place
        os._exit(9)
    real_rename(src, dst)
os.rename = rename
with DistributedAtomicDir({final!r}) as tmp:
    open(os.path.join(tmp, "new.txt"), "w").close()
"""


def test_a_save_killed_while_replacing_a_step_leaves_it_restorable(tmp_path):
    """A process killed between the two renames of a replacement leaves the previous step only
    inside its ``.old`` directory; the trainer's start-up clean-up puts it back, never deletes it."""
    import subprocess
    import sys

    from megatron_prime.training.checkpoint import remove_leftovers

    final = tmp_path / "step_00000004"
    final.mkdir()
    (final / "old.txt").write_text("old")
    from tests.helpers import ROOT

    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_REPLACING.format(root=ROOT, final=str(final))])
    assert proc.returncode == 9 and not final.exists()
    assert sorted(n.split("-")[0] for n in os.listdir(tmp_path)) == [".step_00000004.old", ".step_00000004.tmp"]
    removed = remove_leftovers(str(tmp_path))
    assert len(removed) == 2
    assert os.listdir(tmp_path) == ["step_00000004"] and os.listdir(final) == ["old.txt"]
