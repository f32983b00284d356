"""Loaders for the paper's evaluation sets (Table 1) from local files in their published formats.

Each returns PromptRows whose prompt is one user message (the problem, plus the instruction the
policy was trained with) and whose ground truth the math or code verifier grades.

  math500        HuggingFaceH4/MATH-500 jsonl: problem, answer (solution, subject, level, unique_id)
  aime2024       AIME 2024 jsonl/parquet: Problem/problem, Answer/answer (ID, Solution)
  amc            AI-MO AMC validation: problem, answer (a number, possibly 142.0)
  minerva        Minerva Math: problem, solution whose last \\boxed{} is the answer
  olympiadbench  OlympiadBench: question, final_answer (list of "$...$" strings)
  leetcode       call-style rows: a problem text, fn_name / entry_point and tests
                 {"inputs", "outputs"}; or HumanEval-style rows with a ``test`` check function
  livecodebench  livecodebench/code_generation_lite: question_content, public_test_cases and
                 private_test_cases (JSON, or base64+zlib as published), metadata.func_name
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import zlib
from pathlib import Path
from typing import Any, Callable

from megatron_prime.data.schema import DatasetError, PromptRow
from megatron_prime.rewards.math_grader import last_boxed

# Eurus-2 / PRIME's instructions (the policy was RL-trained with these).
MATH_INSTRUCTION = "\n\nPresent the answer in LaTex format: \\boxed{Your answer}"
CODE_INSTRUCTION = (
    "\n\nWrite Python code to solve the problem. Present the code in \n```python\nYour code\n```\n"
    "at the end."
)


def _records(path: Path) -> list[dict]:
    """The file's records; a file that cannot be read as records is one DatasetError naming it."""
    if not path.is_file():
        raise DatasetError([f"{path}: no such file"])
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise DatasetError([f"{path}: not a readable parquet file ({e})"]) from None
    try:
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            records = data if isinstance(data, list) else [data]
        else:
            records = []
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DatasetError([f"{path} line {number}: not valid JSON ({e.msg})"]) from None
    except UnicodeDecodeError:
        raise DatasetError([f"{path}: not UTF-8 text (expected JSON lines, a JSON list or parquet)"]) from None
    except json.JSONDecodeError as e:
        raise DatasetError([f"{path}: not valid JSON ({e.msg}, line {e.lineno})"]) from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DatasetError([f"{path} record {bad + 1}: expected a JSON object, got {type(records[bad]).__name__}"])
    return records


def _field(record: dict, *names: str) -> Any:
    for name in names:
        if record.get(name) is not None:
            return record[name]
    return None


def _number_text(value: Any) -> str:
    # AMC answers are stored as floats (142.0); the verifier should see "142".
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _strip_dollars(text: str) -> str:
    text = text.strip()
    while text.startswith("$") and text.endswith("$") and len(text) > 1:
        text = text[1:-1].strip()
    return text


def _math_row(name: str, i: int, problem: Any, answer: Any, record: dict) -> PromptRow:
    return PromptRow(
        prompt=[{"role": "user", "content": str(problem) + MATH_INSTRUCTION}],
        ground_truth=answer,
        verifier="math",
        data_source=name,
        index=i,
        extra_info={k: v for k, v in record.items() if isinstance(v, (str, int, float, bool))},
    )


def _math500(i, r):
    return _field(r, "problem"), _field(r, "answer")


def _aime(i, r):
    return _field(r, "Problem", "problem", "question"), _number_text(_field(r, "Answer", "answer"))


def _amc(i, r):
    return _field(r, "problem", "Problem", "question"), _number_text(_field(r, "answer", "Answer"))


def _minerva(i, r):
    answer = _field(r, "answer")
    if answer is None and isinstance(r.get("solution"), str):
        answer = last_boxed(r["solution"])[1]
    return _field(r, "problem", "question"), answer


def _olympiadbench(i, r):
    final = _field(r, "final_answer", "answer")
    if isinstance(final, list):
        final = ", ".join(_strip_dollars(str(a)) for a in final) if final else None
    elif isinstance(final, str):
        final = _strip_dollars(final)
    question = _field(r, "question", "problem")
    if question is not None and r.get("context"):
        question = f"{r['context']}\n\n{question}"
    return question, final


_MATH_SETS: dict[str, Callable] = {
    "math500": _math500,
    "aime2024": _aime,
    "amc": _amc,
    "minerva": _minerva,
    "olympiadbench": _olympiadbench,
}


class _OnlyStrings(pickle.Unpickler):
    """LiveCodeBench ships private tests as a pickled JSON *string*; refuse anything else, so a
    tampered file cannot run code while loading."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a test-case blob")


def _lcb_cases(blob: Any) -> list[dict]:
    if not blob:
        return []
    if isinstance(blob, list):
        return blob
    try:
        return json.loads(blob)
    except json.JSONDecodeError:
        raw = zlib.decompress(base64.b64decode(blob))
        return json.loads(_OnlyStrings(io.BytesIO(raw)).load())


def _livecodebench(i, r):
    cases = _lcb_cases(r.get("public_test_cases")) + _lcb_cases(r.get("private_test_cases"))
    metadata = r.get("metadata") or {}
    if isinstance(metadata, str):
        metadata = json.loads(metadata) if metadata.strip() else {}
    tests = {"tests": cases}
    if metadata.get("func_name"):
        tests["fn_name"] = metadata["func_name"]
    problem = _field(r, "question_content", "problem", "question")
    if problem is not None and r.get("starter_code"):
        problem += f"\n\nStart from this code:\n```python\n{r['starter_code']}\n```"
    return problem, json.dumps(tests) if cases else None


def _leetcode(i, r):
    problem = _field(r, "problem", "question", "content", "prompt_sft", "prompt")
    if isinstance(r.get("test"), str) and r.get("entry_point"):
        tests = {"check": r["test"], "entry_point": r["entry_point"]}
    else:
        tests = _field(r, "tests", "input_output")
        if isinstance(tests, str):
            tests = json.loads(tests)
        if isinstance(tests, dict):
            fn_name = _field(r, "fn_name", "entry_point") or tests.get("fn_name")
            tests = dict(tests, fn_name=fn_name) if fn_name else tests
    return problem, json.dumps(tests) if tests else None


_CODE_SETS: dict[str, Callable] = {"leetcode": _leetcode, "livecodebench": _livecodebench}

EVAL_SETS = sorted([*_MATH_SETS, *_CODE_SETS])

# What each set's records must hold, for error messages.
EVAL_SET_FORMATS = {
    "math500": "HuggingFaceH4/MATH-500 rows with 'problem' and 'answer'",
    "aime2024": "AIME 2024 rows with 'Problem'/'problem' and 'Answer'/'answer'",
    "amc": "AI-MO AMC rows with 'problem' and 'answer'",
    "minerva": "Minerva Math rows with 'problem' and 'answer' or a 'solution' ending in \\boxed{}",
    "olympiadbench": "OlympiadBench rows with 'question' and 'final_answer'",
    "leetcode": "LeetCode rows with a problem text and 'tests' {inputs, outputs} + 'fn_name', or a HumanEval 'test' + 'entry_point'",
    "livecodebench": "livecodebench/code_generation_lite rows with 'question_content' and 'public_test_cases'/'private_test_cases'",
}

_ALIASES = {"aime": "aime2024", "aime24": "aime2024", "lcb": "livecodebench", "olympiad": "olympiadbench"}


def eval_set_key(name: str) -> str:
    """The set's canonical name (``aime24`` -> ``aime2024``); ValueError for an unknown name."""
    key = name.lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    if key not in _MATH_SETS and key not in _CODE_SETS:
        raise ValueError(f"unknown evaluation set {name!r}; known: {', '.join(EVAL_SETS)} "
                         f"(aliases: {', '.join(sorted(_ALIASES))})")
    return key


def load_eval_set(name: str, path: str | Path) -> list[PromptRow]:
    """Rows of evaluation set ``name`` (one of EVAL_SETS) read from ``path``."""
    key = eval_set_key(name)
    path = Path(path)
    rows, problems = [], []
    for i, record in enumerate(_records(path)):
        extract = _MATH_SETS.get(key) or _CODE_SETS[key]
        problem, truth = extract(i, record)
        if not problem or not truth:
            problems.append(f"{path} record {i + 1}: expected {EVAL_SET_FORMATS[key]}, "
                            f"got fields {sorted(record)}")
            continue
        if key in _MATH_SETS:
            rows.append(_math_row(key, i, problem, truth, record))
        else:
            rows.append(PromptRow(
                prompt=[{"role": "user", "content": problem + CODE_INSTRUCTION}],
                ground_truth=truth,
                verifier="code",
                data_source=key,
                index=i,
                extra_info={k: v for k, v in record.items() if k in ("question_id", "task_id", "difficulty", "contest_date", "question_title")},
            ))
    if problems:
        raise DatasetError(problems)
    return rows
