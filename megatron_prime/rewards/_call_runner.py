"""Runs one call-style (LeetCode / APPS ``fn_name``) test case *inside* the sandbox.

Usage: python -I call_runner.py SOLUTION_PATH FN_NAME [--check], with the JSON list of arguments
on stdin, or with --check (HumanEval-style tests) the test code defining ``check(candidate)``.
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


def _resolve(namespace, fn_name):
    solution_class = namespace.get("Solution")
    if isinstance(solution_class, type) and hasattr(solution_class, fn_name):
        return getattr(solution_class(), fn_name)
    if fn_name in namespace:
        return namespace[fn_name]
    return eval(fn_name, namespace)  # entry points such as "Solution().twoSum"


def main():
    solution_path, fn_name = sys.argv[1], sys.argv[2]
    check_mode = sys.argv[3:] == ["--check"]
    stdin_text = sys.stdin.read()
    result_out = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        namespace = {"__name__": "solution"}
        exec(compile(PREAMBLE, "<preamble>", "exec"), namespace)
        with open(solution_path) as f:
            exec(compile(f.read(), "solution.py", "exec"), namespace)
        target = _resolve(namespace, fn_name)
        if check_mode:
            tests = {"__name__": "tests"}
            exec(compile(PREAMBLE + stdin_text, "tests.py", "exec"), tests)
            tests["check"](target)  # raises AssertionError on a failed case
            payload = {"ok": True, "result": True}
        else:
            payload = {"ok": True, "result": _plain(target(*json.loads(stdin_text)))}
    except BaseException as exc:  # the solution's failure is a failed test, never ours
        payload = {"ok": False, "result": type(exc).__name__}
    result_out.write(json.dumps(payload) + "\n")
    result_out.flush()


if __name__ == "__main__":
    main()
