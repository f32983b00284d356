"""Code verifier: run the response's last Python block against test cases; score = pass fraction.

Test formats accepted (a dict, or its JSON string as stored in Eurus-2-RL-Data's
``reward_model.ground_truth``):
  * APPS / CodeContests / TACO / Eurus-2 stdin-stdout: ``{"inputs": [str], "outputs": [str]}``
    (an input or output may also be a list of lines);
  * call style (APPS ``fn_name``, LeetCode): ``{"fn_name": name, "inputs": [[args...]],
    "outputs": [value]}``; the solution defines ``name`` or ``class Solution`` with that method;
  * LiveCodeBench: a list of ``{"input", "output", "testtype": "stdin"|"functional"}`` plus
    ``fn_name`` (``{"fn_name": ..., "tests": [...]}``), functional inputs being one JSON value
    per line;
  * HumanEval-style (LeetCode sets derived from it): ``{"check": test code defining
    check(candidate), "entry_point": name}``, one all-or-nothing case.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass

from megatron_prime.rewards.sandbox import SandboxLimits, run_tests

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"", "python", "python3", "py", "py3"}

DEFAULT_TIMEOUT_S = 5.0
FLOAT_TOLERANCE = 1e-6  # CodeContests / APPS checkers accept answers within 1e-6


class InvalidTestsError(ValueError):
    """The ground truth is not a test specification we understand."""


@dataclass
class CodeTests:
    mode: str  # "stdio", "call" or "check"
    inputs: list
    outputs: list
    fn_name: str | None = None


def extract_code(response: str) -> str | None:
    """The last fenced code block tagged as Python (or untagged); None if there is none."""
    blocks = [body for tag, body in _FENCE.findall(response) if tag.lower() in _PYTHON_TAGS]
    if not blocks or not blocks[-1].strip():
        return None
    return blocks[-1]


def parse_tests(tests: dict | list | str) -> CodeTests:
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as exc:
            raise InvalidTestsError(f"test cases are not valid JSON: {exc}") from exc
    if isinstance(tests, list):
        tests = {"tests": tests}
    if not isinstance(tests, dict):
        raise InvalidTestsError(f"expected a dict of test cases, got {type(tests).__name__}")
    if "tests" in tests:
        return _livecodebench(tests["tests"], tests.get("fn_name"))
    if "check" in tests:
        if not isinstance(tests["check"], str) or not tests.get("entry_point"):
            raise InvalidTestsError("HumanEval-style tests need 'check' code and an 'entry_point'")
        return CodeTests("check", [tests["check"]], [True], tests["entry_point"])
    if "inputs" not in tests or "outputs" not in tests:
        raise InvalidTestsError(f"test cases need 'inputs' and 'outputs', got keys {sorted(tests)}")
    inputs, outputs = tests["inputs"], tests["outputs"]
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        raise InvalidTestsError("'inputs' and 'outputs' must be lists of the same length")
    fn_name = tests.get("fn_name")
    if fn_name:
        # APPS stores each call's arguments as a list; a bare value means one argument.
        args = [a if isinstance(a, list) else [a] for a in inputs]
        return CodeTests("call", args, outputs, fn_name)
    return CodeTests("stdio", [_as_text(i) for i in inputs], [_as_text(o) for o in outputs])


def _as_text(value) -> str:
    if isinstance(value, list):
        return "\n".join(str(v) for v in value) + "\n"
    return str(value)


def _livecodebench(cases: list, fn_name: str | None) -> CodeTests:
    if not cases:
        raise InvalidTestsError("no test cases")
    types = {c.get("testtype", "stdin") for c in cases}
    if types == {"stdin"}:
        return CodeTests("stdio", [c["input"] for c in cases], [c["output"] for c in cases])
    if types == {"functional"}:
        if not fn_name:
            raise InvalidTestsError("functional test cases need fn_name")
        args = [[json.loads(line) for line in c["input"].splitlines() if line.strip()] for c in cases]
        return CodeTests("call", args, [json.loads(c["output"]) for c in cases], fn_name)
    raise InvalidTestsError(f"mixed or unknown testtype values: {sorted(types)}")


# ---------------------------------------------------------------------------------------------
# Output comparison.


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _tokens_match(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        # Integers must match exactly (a float compare would let 10**18 + 1 pass).
        int(a), int(b)
        return False
    except ValueError:
        pass
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE)


def stdout_matches(actual: str, expected: str) -> bool:
    """Equal up to trailing whitespace on lines and trailing blank lines; otherwise equal token
    by token with floats within 1e-6 (how APPS / CodeContests answers are judged)."""
    if _lines(actual) == _lines(expected):
        return True
    got, want = actual.split(), expected.split()
    return len(got) == len(want) and all(_tokens_match(a, b) for a, b in zip(got, want))


def _values_match(actual, expected) -> bool:
    if isinstance(actual, bool) or isinstance(expected, bool):  # JSON true is not 1
        return type(actual) is type(expected) and actual == expected
    if isinstance(actual, (int, float)) and isinstance(expected, (int, float)):
        return actual == expected or math.isclose(
            actual, expected, rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE
        )
    if isinstance(actual, list) and isinstance(expected, list):
        return len(actual) == len(expected) and all(map(_values_match, actual, expected))
    if isinstance(actual, dict) and isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(
            _values_match(actual[k], expected[k]) for k in actual
        )
    return actual == expected


def call_result_matches(actual, expected) -> bool:
    # APPS wraps many call-style outputs in a one-element list: accept either form.
    if _values_match(actual, expected):
        return True
    return isinstance(expected, list) and len(expected) == 1 and _values_match(actual, expected[0])


# ---------------------------------------------------------------------------------------------


def grade_code(
    response: str,
    tests: dict | list | str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    limits: SandboxLimits | None = None,
    unsafe: bool | None = None,
) -> float:
    """Fraction of test cases the last Python block in ``response`` passes (0.0 without code).

    Every run happens in the sandbox (see megatron_prime.rewards.sandbox); ``timeout_s`` is the
    per-test-case limit and overrides ``limits.timeout_s``. Raises InvalidTestsError for unusable test cases and
    SandboxUnavailableError if the sandbox cannot run.
    """
    spec = parse_tests(tests)
    if not spec.inputs:
        raise InvalidTestsError("no test cases")
    code = extract_code(response)
    if code is None:
        return 0.0
    limits = dataclasses.replace(limits or SandboxLimits(), timeout_s=timeout_s)
    results = run_tests(
        code, spec.inputs, mode=spec.mode, fn_name=spec.fn_name, limits=limits, unsafe=unsafe
    )
    passed = 0
    for result, expected in zip(results, spec.outputs):
        if result.status != "ok":
            continue
        if spec.mode == "stdio":
            passed += stdout_matches(result.stdout, expected)
            continue
        try:
            payload = json.loads(result.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            continue
        if payload.get("ok") is True:
            passed += spec.mode == "check" or call_result_matches(payload.get("result"), expected)
    return passed / len(spec.outputs)
