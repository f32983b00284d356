"""Evaluation-set loaders on small files written in each set's published format; the loaded
ground truths are graded by the real verifiers."""

import base64
import json
import pickle
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_prime.data import DatasetError, load_eval_set
from megatron_prime.rewards import grade_code, score_batch


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def math_truths(rows):
    return [r.ground_truth for r in rows]


def test_math500(tmp_path):
    path = jsonl(tmp_path / "test.jsonl", [{
        "problem": "Convert $(0,3)$ to polar coordinates.",
        "solution": "... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$",
        "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
        "subject": "Precalculus", "level": 2, "unique_id": "test/precalculus/807.json",
    }])
    [row] = load_eval_set("math500", path)
    assert row.verifier == "math" and row.data_source == "math500"
    assert row.prompt[0]["role"] == "user" and row.prompt[0]["content"].startswith("Convert $(0,3)$")
    assert "\\boxed{" in row.prompt[0]["content"]  # the answer-format instruction
    assert row.extra_info["unique_id"] == "test/precalculus/807.json"
    assert score_batch([("math", "$\\boxed{(3, \\pi/2)}$", row.ground_truth)], num_workers=1) == [1.0]


def test_aime_amc_minerva_olympiadbench(tmp_path):
    aime = jsonl(tmp_path / "aime.jsonl", [{"ID": "2024-I-1", "Problem": "Find x.", "Solution": "...", "Answer": 204}])
    amc = tmp_path / "amc.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": 0, "problem": "How many?", "answer": 142.0, "url": "u"}]), amc)
    minerva = jsonl(tmp_path / "minerva.jsonl", [{
        "problem": "Compute the rate.", "solution": "The rate is $\\boxed{2.5 \\times 10^{3}}$ per s.",
        "type": "Physical Chemistry (5.61 Fall 2017)", "idx": 0,
    }])
    olympiad = jsonl(tmp_path / "ob.jsonl", [
        {"id": 1, "question": "Solve it.", "final_answer": ["$\\frac{1}{2}$"], "context": None, "unit": None},
        {"id": 2, "question": "All n?", "final_answer": ["$1$", "$3$"], "is_multiple_answer": True},
    ])
    assert math_truths(load_eval_set("AIME-2024", aime)) == ["204"]
    assert math_truths(load_eval_set("amc", amc)) == ["142"]
    assert math_truths(load_eval_set("minerva", minerva)) == ["2.5 \\times 10^{3}"]
    ob = load_eval_set("olympiadbench", olympiad)
    assert math_truths(ob) == ["\\frac{1}{2}", "1, 3"]
    items = [("math", "\\boxed{204}", "204"), ("math", "\\boxed{2500}", "2.5 \\times 10^{3}"),
             ("math", "\\boxed{0.5}", ob[0].ground_truth), ("math", "\\boxed{3, 1}", ob[1].ground_truth)]
    assert score_batch(items, num_workers=1) == [1.0] * 4


def test_missing_answers_are_reported(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b"}])
    with pytest.raises(DatasetError, match="record 2"):
        load_eval_set("math500", path)
    with pytest.raises(ValueError, match="unknown evaluation set"):
        load_eval_set("gsm9k", path)


SQUARE = "```python\nclass Solution:\n    def square(self, x):\n        return x * x\n```"


def test_leetcode_call_style_and_humaneval_style(tmp_path):
    path = jsonl(tmp_path / "leetcode.jsonl", [
        {"task_id": "square", "problem": "Square x.", "fn_name": "square",
         "tests": {"inputs": [[2], [3]], "outputs": [4, 9]}},
        {"task_id": "square-2", "prompt": "Square x.", "entry_point": "Solution().square",
         "test": "def check(candidate):\n    assert candidate(4) == 16\n    assert candidate(5) == 25\n"},
    ])
    rows = load_eval_set("leetcode", path)
    assert [r.verifier for r in rows] == ["code", "code"]
    assert "```python" in rows[0].prompt[0]["content"]
    assert [grade_code(SQUARE, r.ground_truth) for r in rows] == [1.0, 1.0]
    wrong = SQUARE.replace("x * x", "x + x")
    assert [grade_code(wrong, r.ground_truth) for r in rows] == [0.5, 0.0]  # 2+2 == 2*2


def test_livecodebench_public_and_compressed_private_tests(tmp_path):
    private = [{"input": "5\n", "output": "10\n", "testtype": "stdin"}]
    blob = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(private)))).decode()
    path = jsonl(tmp_path / "lcb.jsonl", [{
        "question_title": "Double", "question_content": "Print 2n.", "platform": "atcoder",
        "question_id": "abc001_a", "contest_date": "2024-01-01T00:00:00", "starter_code": "",
        "difficulty": "easy", "metadata": "{}",
        "public_test_cases": json.dumps([{"input": "1\n", "output": "2\n", "testtype": "stdin"}]),
        "private_test_cases": blob,
    }, {
        "question_title": "Sum", "question_content": "Return a+b.", "platform": "leetcode",
        "question_id": "1", "starter_code": "class Solution:\n    def add(self, a: int, b: int) -> int:\n        ",
        "metadata": json.dumps({"func_name": "add"}),
        "public_test_cases": json.dumps([{"input": "1\n2", "output": "3", "testtype": "functional"}]),
        "private_test_cases": "[]",
    }])
    double, add = load_eval_set("livecodebench", path)
    assert len(json.loads(double.ground_truth)["tests"]) == 2
    assert "Start from this code" in add.prompt[0]["content"]
    assert grade_code("```python\nprint(2 * int(input()))\n```", double.ground_truth) == 1.0
    assert grade_code("```python\nprint(2)\n```", double.ground_truth) == 0.5
    add_code = "```python\nclass Solution:\n    def add(self, a, b):\n        return a + b\n```"
    assert grade_code(add_code, add.ground_truth) == 1.0


def test_livecodebench_blob_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    blob = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    path = jsonl(tmp_path / "lcb.jsonl", [{"question_content": "x", "public_test_cases": "[]", "private_test_cases": blob}])
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_eval_set("livecodebench", path)
