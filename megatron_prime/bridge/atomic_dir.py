"""Directories that appear complete or not at all: every rank writes into a temporary sibling,
which replaces the final directory in one rename once everything in it is on stable storage.

Used for Megatron checkpoints, trainer checkpoints and HF exports, in one process or on all ranks.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

import torch.distributed as dist

from megatron_prime.platform.distributed import (
    all_gather_object,
    broadcast_object,
    is_rank0,
    on_rank0,
    picklable_error,
    run_everywhere,
)


class DistributedAtomicDir:
    """``with DistributedAtomicDir(final) as tmp:``: every rank (or the one process) writes into
    ``tmp``, a hidden sibling of ``final``. When the block has succeeded on every rank, the files
    and directories are fsynced and rank 0 renames ``tmp`` to ``final`` (replacing an older
    ``final``) and fsyncs the parent, so after a crash or power loss the directory is the previous
    one or the complete new one. When the block raises on any rank, every rank raises (the
    failing rank its own error, the others the first rank's), ``tmp`` is removed and ``final`` is
    left as it was; no rank is left waiting for another.

    Each file is fsynced once, by one rank (files are dealt out over the ranks); where ranks on
    several nodes share a filesystem this is durable as far as that filesystem is coherent across
    clients (NFS flushes a file to its server when the writer closes it).
    """

    def __init__(self, final_dir: str):
        self.final_dir = os.path.abspath(final_dir)
        self.parent = os.path.dirname(self.final_dir)
        self.name = os.path.basename(self.final_dir)

    def __enter__(self) -> str:
        def make_tmp():
            os.makedirs(self.parent, exist_ok=True)
            return tempfile.mkdtemp(prefix=f".{self.name}.tmp-", dir=self.parent)

        self.tmp = broadcast_object(on_rank0(make_tmp))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        errors = [e for e in all_gather_object(picklable_error(exc)) if e is not None]
        if errors:
            if is_rank0():
                shutil.rmtree(self.tmp, ignore_errors=True)
            if exc is None:
                raise errors[0]
            return False  # this rank's own error propagates
        try:
            files = broadcast_object(_tree_files(self.tmp) if is_rank0() else None)
            rank = dist.get_rank() if dist.is_initialized() else 0
            world = dist.get_world_size() if dist.is_initialized() else 1
            run_everywhere(lambda: [_fsync(path) for path in files[rank::world]])
            on_rank0(self._publish)
        except BaseException:
            if is_rank0():
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False

    def _publish(self) -> None:
        """(rank 0) Durable directories, then ``tmp`` -> ``final`` in one rename."""
        for root, _, _ in sorted(os.walk(self.tmp), key=lambda entry: -entry[0].count(os.sep)):
            _fsync(root)
        if not os.path.exists(self.final_dir):
            os.rename(self.tmp, self.final_dir)
            _fsync(self.parent)
            return
        trash = tempfile.mkdtemp(prefix=f".{self.name}.old-", dir=self.parent)
        os.rename(self.final_dir, os.path.join(trash, self.name))
        try:
            os.rename(self.tmp, self.final_dir)
        except BaseException:
            os.rename(os.path.join(trash, self.name), self.final_dir)
            raise
        _fsync(self.parent)
        shutil.rmtree(trash, ignore_errors=True)


def _tree_files(root: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names)


def _fsync(path: str) -> None:
    """Flush a file's or directory's contents (a directory's: its entries) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems cannot fsync a directory (EINVAL); their renames are as durable as
        # they get without it.
        if not (e.errno == errno.EINVAL and os.path.isdir(path)):
            raise
    finally:
        os.close(fd)
