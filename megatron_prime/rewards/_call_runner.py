"""Runs one call-style (LeetCode / APPS ``fn_name``) test case *inside* the sandbox.

Usage: python -I call_runner.py SOLUTION_PATH FN_NAME, with the JSON list of arguments on stdin.
Writes one JSON line {"ok": bool, "result": ...} to the original stdout; whatever the solution
prints goes to /dev/null so that it cannot be mistaken for the return value.
"""

import json
import os
import sys

# LeetCode's judge pre-imports these; generated solutions rely on names such as List, Optional,
# defaultdict or heapq without importing them.
PREAMBLE = (
    "from typing import *\n"
    "import collections, heapq, bisect, itertools, functools, math, string, re, sys\n"
    "from collections import *\n"
    "from functools import *\n"
    "from itertools import *\n"
    "from heapq import *\n"
    "from bisect import *\n"
    "from math import *\n"
)


def _plain(value):
    # Tuples compare equal to the lists JSON gives back in the expected outputs.
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=repr)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def main():
    solution_path, fn_name = sys.argv[1], sys.argv[2]
    args = json.loads(sys.stdin.read())
    result_out = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        namespace = {"__name__": "solution"}
        exec(compile(PREAMBLE, "<preamble>", "exec"), namespace)
        with open(solution_path) as f:
            exec(compile(f.read(), "solution.py", "exec"), namespace)
        if isinstance(namespace.get("Solution"), type) and hasattr(namespace["Solution"], fn_name):
            target = getattr(namespace["Solution"](), fn_name)
        else:
            target = namespace[fn_name]
        payload = {"ok": True, "result": _plain(target(*args))}
    except BaseException as exc:  # the solution's failure is a failed test, never ours
        payload = {"ok": False, "result": type(exc).__name__}
    result_out.write(json.dumps(payload) + "\n")
    result_out.flush()


if __name__ == "__main__":
    main()
