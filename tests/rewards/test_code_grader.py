"""Code verifier: extraction, both test styles, partial credit, output tolerance, batching."""

import json
import time

import pytest

from megatron_prime.rewards import InvalidTestsError, extract_code, grade_code, parse_tests, score_batch
from megatron_prime.rewards.code_grader import call_result_matches, stdout_matches


def fenced(code: str, tag: str = "python") -> str:
    return f"Here is my solution.\n```{tag}\n{code}\n```\nIt reads the input and prints the sum."


STDIO_TESTS = {"inputs": ["1 2\n", "5 7\n", "-3 3\n", "100 1\n"], "outputs": ["3\n", "12\n", "0\n", "101\n"]}
SUM_OK = "a, b = map(int, input().split())\nprint(a + b)"
SUM_WRONG = "a, b = map(int, input().split())\nprint(a - b)"
# Correct only when both numbers are positive: passes 3 of the 4 cases.
SUM_PARTIAL = "a, b = map(int, input().split())\nprint(a + b if a > 0 else 1)"

CALL_TESTS = {"fn_name": "twoSum", "inputs": [[[2, 7, 11, 15], 9], [[3, 2, 4], 6], [[3, 3], 6]], "outputs": [[0, 1], [1, 2], [0, 1]]}
TWO_SUM_OK = """
class Solution:
    def twoSum(self, nums: List[int], target: int) -> List[int]:
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i
"""
TWO_SUM_PARTIAL = """
class Solution:
    def twoSum(self, nums, target):
        return [0, 1]
"""


def test_stdio_correct_wrong_partial():
    assert grade_code(fenced(SUM_OK), STDIO_TESTS) == 1.0
    assert grade_code(fenced(SUM_WRONG), STDIO_TESTS) == 0.0
    assert grade_code(fenced(SUM_PARTIAL), STDIO_TESTS) == 0.75


def test_call_style_correct_wrong_partial():
    assert grade_code(fenced(TWO_SUM_OK), CALL_TESTS) == 1.0
    assert grade_code(fenced(TWO_SUM_PARTIAL), CALL_TESTS) == pytest.approx(2 / 3)
    assert grade_code(fenced("class Solution:\n    def twoSum(self, a, t):\n        return []"), CALL_TESTS) == 0.0


def test_call_style_plain_function_and_apps_wrapped_outputs():
    # APPS call-based data wraps expected values in a one-element list.
    tests = json.dumps({"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [[3], [7]]})
    assert grade_code(fenced("def add(a, b):\n    return a + b"), tests) == 1.0
    assert grade_code(fenced("def add(a, b):\n    raise ValueError"), tests) == 0.0


def test_json_string_ground_truth_and_list_lines():
    tests = json.dumps({"inputs": [["2", "3 4"]], "outputs": [["7"]]})
    code = "input()\nprint(sum(map(int, input().split())))"
    assert grade_code(fenced(code), tests) == 1.0


def test_livecodebench_style_tests():
    stdin_cases = [{"input": "3\n", "output": "6\n", "testtype": "stdin"}]
    assert grade_code(fenced("print(2 * int(input()))"), stdin_cases) == 1.0
    functional = {
        "fn_name": "maxOf",
        "tests": [
            {"input": "[1, 5, 2]\n1", "output": "6", "testtype": "functional"},
            {"input": "[4]\n0", "output": "4", "testtype": "functional"},
        ],
    }
    code = "class Solution:\n    def maxOf(self, xs, k):\n        return max(xs) + k"
    assert grade_code(fenced(code), functional) == 1.0


def test_runtime_error_and_no_code_score_zero():
    assert grade_code(fenced("raise SystemExit(3)"), STDIO_TESTS) == 0.0
    assert grade_code("I would add the numbers.", STDIO_TESTS) == 0.0
    assert grade_code(fenced(SUM_OK, tag="cpp"), STDIO_TESTS) == 0.0


def test_extract_code_takes_last_python_block():
    text = "```python\nprint(1)\n```\nbetter:\n```py\nprint(2)\n```\n```text\noutput\n```"
    assert extract_code(text).strip() == "print(2)"
    assert extract_code("```\nprint(3)\n```").strip() == "print(3)"
    assert extract_code("```python\n```") is None
    assert extract_code("no code") is None


@pytest.mark.parametrize(
    "actual, expected, ok",
    [
        ("3\n", "3", True),
        ("3   \n\n\n", "3\n", True),
        ("1 2 \n3\n", "1 2\n3\n", True),
        ("0.3333333\n", "0.333333333\n", True),
        ("1e-7\n", "0\n", True),
        ("0.5\n", "0.6\n", False),
        ("1000000000000000001\n", "1000000000000000000\n", False),
        ("YES\n", "yes\n", False),
        ("1 2\n", "1 2 3\n", False),
        ("", "0\n", False),
        ("1\r\n2\r\n", "1\n2\n", True),
    ],
)
def test_stdout_tolerance(actual, expected, ok):
    assert stdout_matches(actual, expected) == ok


def test_call_result_comparison():
    assert call_result_matches([1, 2], [1, 2])
    assert call_result_matches([1, 2], [[1, 2]])
    assert call_result_matches(0.1 + 0.2, 0.3)
    assert not call_result_matches(True, 1)
    assert not call_result_matches([1, 2], [2, 1])


def test_bad_test_specs_raise():
    with pytest.raises(InvalidTestsError):
        parse_tests("{not json")
    with pytest.raises(InvalidTestsError):
        parse_tests({"inputs": ["1"]})
    with pytest.raises(InvalidTestsError):
        parse_tests({"inputs": ["1"], "outputs": []})
    with pytest.raises(InvalidTestsError):
        grade_code(fenced(SUM_OK), {"inputs": [], "outputs": []})


def test_per_test_timeout_gives_partial_credit():
    code = "n = int(input())\nwhile n == 0: pass\nprint(n)"
    tests = {"inputs": ["1\n", "0\n", "2\n"], "outputs": ["1\n", "0\n", "2\n"]}
    start = time.monotonic()
    assert grade_code(fenced(code), tests, timeout_s=1.0) == pytest.approx(2 / 3)
    assert time.monotonic() - start < 4.0


def test_score_batch_mixes_math_and_code_in_order():
    items = [
        ("code", fenced(SUM_OK), json.dumps(STDIO_TESTS)),
        ("math", "\\boxed{4}", "4"),
        ("code", fenced(SUM_PARTIAL), json.dumps(STDIO_TESTS)),
        ("math", "\\boxed{5}", "4"),
        ("code", fenced(TWO_SUM_OK), json.dumps(CALL_TESTS)),
    ]
    assert score_batch(items, num_workers=2) == [1.0, 1.0, 0.75, 0.0, 1.0]
    with pytest.raises(ValueError, match="unknown verifier"):
        score_batch([("chess", "e4", "e4")])


def test_custom_verifier_through_the_registry():
    from megatron_prime.rewards import register_data_source, register_verifier, verifier_for

    register_verifier("exact_text", lambda response, truth: float(response.strip() == truth))
    register_data_source("my_exact_", "exact_text")
    assert verifier_for("my_exact_set", None) == "exact_text"
    items = [("exact_text", " yes ", "yes"), ("math", "\\boxed{2}", "2"), ("exact_text", "no", "yes")]
    assert score_batch(items, num_workers=2) == [1.0, 1.0, 0.0]
