"""Prompt datasets: both schemas, parquet and jsonl, every bad row reported, CLI, registry."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_prime.data import DatasetError, PromptRow, check_dataset, cli_check, load_prompt_dataset
from megatron_prime.rewards import UnknownVerifierError, verifier_for

CODE_TESTS = json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]})


def eurus(i, source="numina_olympiads", ability="math", truth="42"):
    return {
        "data_source": source,
        "prompt": [{"role": "system", "content": "Think."}, {"role": "user", "content": f"Problem {i}"}],
        "ability": ability,
        "reward_model": {"ground_truth": truth, "style": "rule"},
        "extra_info": {"index": 100 + i, "split": "train"},
    }


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_eurus_jsonl_and_parquet_load_identically(tmp_path):
    rows = [eurus(0), eurus(1, "taco", "code", CODE_TESTS), eurus(2, "numina_cn_k12", None)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet):
        loaded = load_prompt_dataset(path)
        assert [r.verifier for r in loaded] == ["math", "code", "math"]
        assert loaded[0] == PromptRow(
            prompt=rows[0]["prompt"],
            ground_truth="42",
            verifier="math",
            data_source="numina_olympiads",
            index=100,
            extra_info={"index": 100, "split": "train"},
        )
        assert loaded[1].ground_truth == CODE_TESTS
        assert check_dataset(path) == []


def test_plain_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "1+1=", "answer": "2"},
        {"prompt": "2+2=", "answer": 4},
        "",  # blank lines are allowed
        {"prompt": "add", "answer": {"inputs": ["1 2"], "outputs": ["3"]}, "verifier": "code"},
    ])
    rows = load_prompt_dataset(path)
    assert [(r.prompt, r.ground_truth, r.verifier, r.index) for r in rows[:2]] == [
        ("1+1=", "2", "math", 0), ("2+2=", "4", "math", 1)]
    assert rows[2].verifier == "code" and json.loads(rows[2].ground_truth)["outputs"] == ["3"]


def test_every_bad_row_is_reported_with_file_line_field_and_expectation(tmp_path):
    bad_prompt = eurus(1)
    bad_prompt["prompt"] = "not messages"
    bad_truth = eurus(2)
    bad_truth["reward_model"] = {"style": "rule"}
    bad_role = eurus(3)
    bad_role["prompt"][1]["role"] = "robot"
    bad_code = eurus(4, "taco", "code", "print(1)")
    unknown = eurus(5, "chess_puzzles", "chess")
    path = write_jsonl(tmp_path / "bad.jsonl", [
        eurus(0), bad_prompt, bad_truth, "{not json", bad_role, bad_code, unknown,
        {"prompt": "x", "answer": ""}, {"question": "?"}, [1, 2],
    ])
    problems = check_dataset(path)
    expected = [
        (2, "field 'prompt': expected a non-empty list of chat messages"),
        (3, "field 'reward_model.ground_truth': expected a non-empty string, got nothing (missing)"),
        (4, "expected one JSON object per line"),
        (5, "field 'prompt[1].role': expected one of ['system', 'user', 'assistant'], got 'robot'"),
        (6, "field 'reward_model.ground_truth': expected test cases in JSON"),
        (7, "field 'ability': expected a known ability or data_source"),
        (8, "field 'answer': expected a non-empty string (or a number), got ''"),
        (9, "field '(row)': expected Eurus-2 fields"),
        (10, "field '(row)': expected a JSON object, got [1, 2]"),
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for problem, (line, text) in zip(problems, expected):
        assert problem.startswith(f"{path} line {line}: "), problem
        assert text in problem, problem
    with pytest.raises(DatasetError) as info:
        load_prompt_dataset(path)
    assert info.value.problems == problems
    assert f"{path} line 3: field 'reward_model.ground_truth'" in str(info.value)


def test_parquet_rows_are_numbered(tmp_path):
    rows = [eurus(0), eurus(1)]
    rows[1]["reward_model"] = {"ground_truth": "", "style": "rule"}
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert check_dataset(path) == [
        f"{path} row 2: field 'reward_model.ground_truth': expected a non-empty string, got ''"
    ]


def test_file_level_problems(tmp_path):
    assert check_dataset(tmp_path / "missing.jsonl") == [f"{tmp_path / 'missing.jsonl'}: file not found"]
    (tmp_path / "d.csv").write_text("a,b\n")
    assert "expected a .parquet or .jsonl file" in check_dataset(tmp_path / "d.csv")[0]
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "empty" in check_dataset(tmp_path / "empty.jsonl")[0]
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 nonsense")
    assert "cannot be read" in check_dataset(tmp_path / "broken.parquet")[0]


def test_cli_check(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [eurus(0)])
    bad = write_jsonl(tmp_path / "bad.jsonl", [eurus(0), {"prompt": "x"}])
    assert cli_check([str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: OK\n"
    assert cli_check([str(good), str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{good}: OK",
        f"{bad} line 2: field 'answer': expected a non-empty string (or a number), got nothing (missing)",
        f"{bad}: 1 problem(s)",
    ]


def test_verifier_registry():
    assert verifier_for("numina_amc_aime", "math") == "math"
    assert verifier_for("codecontests", "code") == "code"
    assert verifier_for("taco", None) == "code"
    assert verifier_for("numina_synthetic_math", "") == "math"
    assert verifier_for("anything", "coding") == "code"
    assert verifier_for("toy_arith", None) == "math"
    with pytest.raises(UnknownVerifierError, match="data_source='chess'"):
        verifier_for("chess", "strategy")


def test_sft_files(tmp_path, capsys):
    from megatron_prime.data import SFTRow, load_sft_dataset

    good = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "1+1=", "response": "\\boxed{2}"},
        {"prompt": [{"role": "user", "content": "hi"}], "response": "hello"},
    ])
    assert load_sft_dataset(good) == [
        SFTRow("1+1=", "\\boxed{2}"), SFTRow([{"role": "user", "content": "hi"}], "hello")]
    bad = write_jsonl(tmp_path / "bad_sft.jsonl", [{"prompt": "1+1="}])
    assert check_dataset(bad, "sft") == [
        f"{bad} line 1: field 'response': expected a non-empty string, got nothing (missing)"]
    with pytest.raises(DatasetError, match="line 1: field 'response'"):
        load_sft_dataset(bad)
    assert cli_check(["--sft", str(good)]) == 0
    assert cli_check(["--sft", str(bad)]) == 1
