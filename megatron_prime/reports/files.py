"""Reading and writing the reports' files: JSON lines that a running (or crashed) process may be
appending to, and atomic writes of finished results."""

from __future__ import annotations

import json
import os
import tempfile

from megatron_prime.errors import UserError


class ReportError(UserError):
    """A user error in a report command: one line naming the file and what was expected."""


def read_jsonl(path: str) -> tuple[list[dict], bool]:
    """The records of a JSON-lines file and whether its last line was cut off (a writer still
    appending, or one that died mid-line: that line is dropped). A bad line anywhere else is an
    error naming it."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    torn = lines[-1] != ""  # every complete record ends with a newline
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and torn:
                break
            raise ReportError(f"{path} line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ReportError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    else:
        torn = False  # the unterminated last line parsed: complete, only its newline is missing
    return records, torn


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # what open() would have given (mkstemp makes it private)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_jsonl(path: str, records: list[dict]) -> None:
    """Append whole lines and sync them: after a crash the file holds every record appended
    before it (at most the line being written is cut off, and ``read_jsonl`` drops it)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
