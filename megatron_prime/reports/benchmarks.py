"""The benchmarks of the paper's Table 1, where their files are, and the paper's published rows.

A benchmark is named on the command line as ``NAME`` (its file is looked up in ``--data-dir``) or
``NAME=PATH``; extra columns come from prompt files in the training format (``--data
[NAME=]FILE``, e.g. the toy task's eval split). A benchmark that cannot be loaded gives one line
naming the file and the format expected, and the table marks its column missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_prime.data.eval_sets import EVAL_SET_FORMATS, eval_set_key, load_eval_set
from megatron_prime.data.schema import DatasetError, PromptRow, load_prompt_dataset

# Paper Table 1's columns, in its order: (eval set, column title).
PAPER_COLUMNS = (
    ("aime2024", "AIME 2024"),
    ("amc", "AMC"),
    ("math500", "MATH-500"),
    ("minerva", "Minerva Math"),
    ("olympiadbench", "OlympiadBench"),
    ("leetcode", "LeetCode"),
    ("livecodebench", "LiveCodeBench"),
)
COLUMN_TITLES = dict(PAPER_COLUMNS)
PAPER_BENCHMARKS = ",".join(key for key, _ in PAPER_COLUMNS)

# File names tried in --data-dir for each set, besides its canonical name.
_FILE_NAMES = {
    "aime2024": ("aime24", "aime"),
    "olympiadbench": ("olympiad",),
    "livecodebench": ("lcb",),
    "math500": ("math-500", "math_500"),
}
_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class PaperRow:
    label: str
    values: dict  # eval set -> accuracy in percent; None where the paper's number is not recorded here
    average: float  # the paper's published average over its seven benchmarks


# Cui et al. 2025 (arXiv 2502.01456), Table 1. The SFT model's per-benchmark numbers are not
# recorded here (not checked against the paper); its published average is.
PAPER_ROWS = {
    "prime": PaperRow("Eurus-2-7B-PRIME (paper)", {
        "aime2024": 26.7, "amc": 57.8, "math500": 79.2, "minerva": 38.6, "olympiadbench": 42.1,
        "leetcode": 33.3, "livecodebench": 28.6}, 43.9),
    "sft": PaperRow("Eurus-2-7B-SFT (paper)", {key: None for key, _ in PAPER_COLUMNS}, 28.8),
}


@dataclass
class Benchmark:
    name: str  # the column's key: an eval set's canonical name, or a prompt file's name
    title: str
    path: str | None
    rows: list[PromptRow] | None = None
    problem: str | None = None  # why it could not be loaded (one line)


def _one_line(name: str, path: str, error: DatasetError, expected: str) -> str:
    first = error.problems[0]
    more = f" (and {len(error.problems) - 1} more problems)" if len(error.problems) > 1 else ""
    return f"benchmark {name}: {first}{more}; expected {expected}"


def _find_file(data_dir: str, key: str, given: str) -> str | None:
    for stem in dict.fromkeys((given, key, *_FILE_NAMES.get(key, ()))):
        for suffix in _SUFFIXES:
            path = os.path.join(data_dir, stem + suffix)
            if os.path.isfile(path):
                return path
    return None


def eval_set_benchmark(spec: str, data_dir: str | None) -> Benchmark:
    """``NAME`` or ``NAME=PATH`` of one of the paper's evaluation sets, loaded."""
    name, _, path = spec.partition("=")
    name = name.strip()
    try:
        key = eval_set_key(name)
    except ValueError as e:
        return Benchmark(name, name, path or None, problem=f"benchmark {name}: {e}")
    expected = EVAL_SET_FORMATS[key]
    if not path:
        if not data_dir:
            return Benchmark(key, COLUMN_TITLES[key], None,
                             problem=f"benchmark {name}: no file given (use --data-dir DIR or {name}=PATH); "
                                     f"expected {expected}")
        path = _find_file(data_dir, key, name)
        if path is None:
            looked = ", ".join(f"{name}{s}" for s in _SUFFIXES)
            return Benchmark(key, COLUMN_TITLES[key], None,
                             problem=f"benchmark {name}: no file in {data_dir} (looked for {looked}); "
                                     f"expected {expected}")
    try:
        rows = load_eval_set(key, path)
    except DatasetError as e:
        return Benchmark(key, COLUMN_TITLES[key], path, problem=_one_line(name, path, e, expected))
    if not rows:
        return Benchmark(key, COLUMN_TITLES[key], path, problem=f"benchmark {name}: {path} has no records; "
                                                                 f"expected {expected}")
    return Benchmark(key, COLUMN_TITLES[key], path, rows)


def prompt_file_benchmark(spec: str) -> Benchmark:
    """``[NAME=]FILE`` of prompts in the training format (plain or Eurus-2), loaded."""
    name, _, path = spec.rpartition("=")
    name = name or os.path.splitext(os.path.basename(path))[0]
    expected = "prompt rows in the training format ({\"prompt\", \"answer\"} or Eurus-2)"
    try:
        rows = load_prompt_dataset(path)
    except DatasetError as e:
        return Benchmark(name, name, path, problem=_one_line(name, path, e, expected))
    return Benchmark(name, name, path, rows)


def load_benchmarks(benchmarks: list[str], data_dir: str | None, prompt_files: list[str],
                    limit: int = 0) -> list[Benchmark]:
    """Every requested benchmark (its first ``limit`` rows, if given), the paper's first in the
    paper's order; failures carry their line."""
    order = {key: i for i, (key, _) in enumerate(PAPER_COLUMNS)}
    sets = [eval_set_benchmark(spec, data_dir) for spec in benchmarks if spec.strip()]
    sets.sort(key=lambda b: order.get(b.name, len(order)))
    loaded = sets + [prompt_file_benchmark(spec) for spec in prompt_files]
    if limit:
        for b in loaded:
            b.rows = b.rows[:limit] if b.rows else b.rows
    return loaded
