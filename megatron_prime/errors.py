"""Bad input from the user, and how a command reports it.

Every error that means "the user's input is wrong" (a config value, a dataset row, a checkpoint or
model directory, a report's files) derives from ``UserError``: commands print it as one line and
exit with code 2, never with a stack trace from deep inside. Like ``config``, this module imports
nothing of ours.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(ValueError):
    """The user's input is wrong; the message names the file, key or row and what was expected."""


def exit_code(command: Callable[[], int | None]) -> int:
    """Run ``command()``; a ``UserError`` becomes one line on stderr and exit code 2."""
    try:
        return command() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
