"""Prompt datasets: load and validate parquet / jsonl files in two schemas.

Eurus-2-RL-Data (the paper's training data)::

    {"data_source": "numina_olympiads", "prompt": [{"role": "user", "content": "..."}],
     "ability": "math", "reward_model": {"ground_truth": "...", "style": "rule"},
     "extra_info": {"index": 7, ...}}

Plain jsonl::

    {"prompt": "23+4*17=", "answer": "91"}  (optional: data_source, ability, verifier)

SFT files (``load_sft_dataset``) hold ``{"prompt", "response"}`` rows, the prompt again a string
or chat messages. Every prompt row gets its verifier from the registry (ability, else data_source). A bad row is never
skipped: ``check_dataset`` lists every problem as "FILE line N: field 'F': expected E, got G"
(parquet: "row N") and ``load_prompt_dataset`` raises ``DatasetError`` with the same lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from megatron_prime.errors import UserError
from megatron_prime.rewards.code_grader import InvalidTestsError, parse_tests
from megatron_prime.rewards.registry import UnknownVerifierError, verifier_for

ROLES = ("system", "user", "assistant")
PLAIN_DATA_SOURCE = "plain"
_MAX_REPORTED = 20  # problems quoted in a DatasetError message (check_dataset returns all)


@dataclass
class PromptRow:
    prompt: list[dict[str, str]] | str  # chat messages, or a plain string
    ground_truth: str  # math: the answer; code: test cases as JSON
    verifier: str  # "math", "code", ... (megatron_prime.rewards.verifier_for)
    data_source: str
    index: int
    extra_info: dict = field(default_factory=dict)
    where: str = field(default="", compare=False)  # "FILE line N" / "FILE row N", for reports


class DatasetError(UserError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:_MAX_REPORTED]
        more = len(problems) - len(shown)
        tail = f"\n... and {more} more (run `megatron-prime data check FILE`)" if more else ""
        super().__init__("invalid dataset:\n" + "\n".join(shown) + tail)

    def __reduce__(self):  # picklable, so rank 0 can hand it to the other ranks
        return DatasetError, (self.problems,)


class _Missing:
    def __repr__(self) -> str:
        return "nothing (missing)"


MISSING = _Missing()


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _RowChecker:
    """Collects problems for one row; ``where`` is e.g. "data.jsonl line 3"."""

    def __init__(self, where: str):
        self.where = where
        self.problems: list[str] = []

    def bad(self, field_name: str, expected: str, got: Any) -> None:
        self.problems.append(f"{self.where}: field '{field_name}': expected {expected}, got {_describe(got)}")

    def text(self, row: dict, key: str, name: str | None = None, required: bool = True) -> str | None:
        name = name or key
        if key not in row or row[key] is None:
            if required:
                self.bad(name, "a non-empty string", MISSING)
            return None
        value = row[key]
        if not isinstance(value, str) or not value.strip():
            self.bad(name, "a non-empty string", value)
            return None
        return value


def _check_messages(check: _RowChecker, prompt: Any) -> list[dict[str, str]] | None:
    expected = 'a non-empty list of chat messages {"role", "content"}'
    if not isinstance(prompt, list) or not prompt:
        check.bad("prompt", expected, prompt)
        return None
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict):
            check.bad(f"prompt[{i}]", 'a message {"role", "content"}', message)
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            check.bad(f"prompt[{i}].role", f"one of {list(ROLES)}", role)
        if not isinstance(content, str):
            check.bad(f"prompt[{i}].content", "a string", content)
        messages.append({"role": role, "content": content})
    return messages


def _check_ground_truth(check: _RowChecker, name: str, verifier: str, truth: str) -> None:
    if verifier == "code":
        try:
            spec = parse_tests(truth)
            if not spec.inputs:
                raise InvalidTestsError("no test cases")
        except InvalidTestsError as exc:
            check.bad(name, f"test cases in JSON ({exc})", truth)


def _verifier(check: _RowChecker, data_source: str | None, ability: str | None, field_name: str) -> str | None:
    try:
        return verifier_for(data_source, ability)
    except UnknownVerifierError as exc:
        check.bad(field_name, "a known ability or data_source", f"{data_source!r}/{ability!r} ({exc})")
        return None


def _eurus_row(check: _RowChecker, row: dict, number: int) -> PromptRow | None:
    data_source = check.text(row, "data_source")
    messages = _check_messages(check, row.get("prompt", MISSING))
    ability = row.get("ability")
    if ability is not None and not isinstance(ability, str):
        check.bad("ability", "a string", ability)
        ability = None
    reward_model = row.get("reward_model", MISSING)
    truth = None
    if not isinstance(reward_model, dict):
        check.bad("reward_model", 'a dict {"ground_truth", "style"}', reward_model)
    else:
        truth = check.text(reward_model, "ground_truth", "reward_model.ground_truth")
        style = reward_model.get("style")
        if style is not None and not isinstance(style, str):
            check.bad("reward_model.style", "a string such as 'rule'", style)
    extra_info = row.get("extra_info") or {}
    if not isinstance(extra_info, dict):
        check.bad("extra_info", "a dict (or nothing)", extra_info)
        extra_info = {}
    verifier = _verifier(check, data_source, ability, "ability")
    if verifier and truth is not None:
        _check_ground_truth(check, "reward_model.ground_truth", verifier, truth)
    if check.problems:
        return None
    index = extra_info.get("index")
    return PromptRow(
        prompt=messages,
        ground_truth=truth,
        verifier=verifier,
        data_source=data_source,
        index=index if isinstance(index, int) and not isinstance(index, bool) else number - 1,
        extra_info=extra_info,
    )


def _plain_row(check: _RowChecker, row: dict, number: int) -> PromptRow | None:
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        prompt = _check_messages(check, prompt)
    else:
        prompt = check.text(row, "prompt")
    data_source = row.get("data_source", PLAIN_DATA_SOURCE)
    if not isinstance(data_source, str):
        check.bad("data_source", "a string", data_source)
        data_source = PLAIN_DATA_SOURCE
    verifier = row.get("verifier") or row.get("ability") or "math"
    verifier = _verifier(check, data_source, verifier, "verifier")
    answer = row.get("answer", MISSING)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)  # GSM8K-style numeric answers
    elif verifier == "code" and isinstance(answer, (dict, list)):
        answer = json.dumps(answer)  # test cases written inline rather than as a JSON string
    elif not isinstance(answer, str) or not answer.strip():
        check.bad("answer", "a non-empty string (or a number)", answer)
        answer = None
    if verifier and answer is not None:
        _check_ground_truth(check, "answer", verifier, answer)
    if check.problems:
        return None
    extra = {k: v for k, v in row.items() if k not in ("prompt", "answer", "data_source", "verifier", "ability")}
    return PromptRow(prompt, answer, verifier, data_source, number - 1, extra)


def _parse_row(where: str, row: Any, number: int) -> tuple[PromptRow | None, list[str]]:
    check = _RowChecker(where)
    if not isinstance(row, dict):
        check.bad("(row)", "a JSON object", row)
        return None, check.problems
    if "reward_model" in row or isinstance(row.get("prompt"), list) and "answer" not in row:
        parsed = _eurus_row(check, row, number)
    elif "prompt" in row or "answer" in row:
        parsed = _plain_row(check, row, number)
    else:
        check.bad(
            "(row)",
            "Eurus-2 fields (data_source, prompt, ability, reward_model, extra_info) or plain "
            "{prompt, answer}",
            sorted(row),
        )
        return None, check.problems
    return parsed, check.problems


def _raw_rows(path: Path) -> Iterator[tuple[str, int, Any, str | None]]:
    """(where, number, row, problem) for each record; ``problem`` set when it cannot be read."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    yield where, number, json.loads(line), None
                except json.JSONDecodeError as exc:
                    yield where, number, None, f"{where}: expected one JSON object per line ({exc.msg})"
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path} row {number}", number, row, None
    else:
        raise DatasetError([f"{path}: expected a .parquet or .jsonl file"])


@dataclass
class SFTRow:
    prompt: list[dict[str, str]] | str
    response: str
    where: str = field(default="", compare=False)  # "FILE line N" / "FILE row N", for reports


def _parse_sft_row(where: str, row: Any, number: int) -> tuple[SFTRow | None, list[str]]:
    check = _RowChecker(where)
    if not isinstance(row, dict):
        check.bad("(row)", "a JSON object", row)
        return None, check.problems
    prompt = row.get("prompt", MISSING)
    prompt = _check_messages(check, prompt) if isinstance(prompt, list) else check.text(row, "prompt")
    response = check.text(row, "response")
    return (None if check.problems else SFTRow(prompt, response)), check.problems


_PARSERS = {"prompts": _parse_row, "sft": _parse_sft_row}


def _read(path: str | Path, kind: str = "prompts") -> tuple[list, list[str]]:
    parse = _PARSERS[kind]
    path = Path(path)
    if not path.is_file():
        return [], [f"{path}: file not found"]
    rows, problems = [], []
    try:
        for where, number, raw, problem in _raw_rows(path):
            if problem:
                problems.append(problem)
                continue
            row, row_problems = parse(where, raw, number)
            problems += row_problems
            if row is not None:
                row.where = where
                rows.append(row)
    except DatasetError as exc:
        return [], exc.problems
    except Exception as exc:  # unreadable parquet, bad encoding: still a report, not a traceback
        return [], [f"{path}: cannot be read ({type(exc).__name__}: {exc})"]
    if not rows and not problems:
        problems.append(f"{path}: expected at least one row, the file is empty")
    return rows, problems


def check_dataset(path: str | Path, kind: str = "prompts") -> list[str]:
    """Every problem in the file (empty list: the file is valid). ``kind`` is "prompts" (RL and
    evaluation prompts) or "sft" ({"prompt", "response"} rows)."""
    if kind not in _PARSERS:
        raise ValueError(f"kind must be one of {sorted(_PARSERS)}, got {kind!r}")
    return _read(path, kind)[1]


def load_prompt_dataset(path: str | Path) -> list[PromptRow]:
    """All rows of a parquet/jsonl prompt file; DatasetError if any row is invalid."""
    rows, problems = _read(path)
    if problems:
        raise DatasetError(problems)
    return rows


def load_sft_dataset(path: str | Path) -> list[SFTRow]:
    """(prompt, response) rows for supervised fine-tuning; DatasetError if any row is invalid."""
    rows, problems = _read(path, "sft")
    if problems:
        raise DatasetError(problems)
    return rows
