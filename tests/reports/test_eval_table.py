"""``megatron-prime eval``: benchmark files in their published formats, a real tiny model on the hf
engine (one engine, then two under two gloo ranks), the real math and code verifiers, the table in
the paper's layout, resume after a crash, and one line per benchmark that cannot be loaded.

The model is trained (plain PyTorch, a few seconds) to answer every prompt with ANSWER, a response
that is right for some rows and wrong for others: math rows whose answer is 4 (math-verify also
accepts \\frac{8}{2}) and code rows whose program must print 4. So every expected number in the
table is known by hand.
"""

from __future__ import annotations

import dataclasses
import json
import os
from itertools import combinations

import pytest
import torch

from megatron_prime.reports import commands, eval_table
from megatron_prime.reports.benchmarks import PAPER_ROWS, load_benchmarks
from megatron_prime.reports.files import read_jsonl
from megatron_prime.reports.pass_at_k import pass_at_k, powers_of_two_through
from megatron_prime.rewards import score_batch
from tests.helpers import run_distributed

pytestmark = [pytest.mark.multi_rank, pytest.mark.slow]

ANSWER = "```python\nprint(4)\n```\n\\boxed{4}"


def _byte_tokenizer():
    """One token per byte (a byte-level BPE without merges): the Qwen2 tokenizer class that
    transformers loads beside a Qwen2 config keeps it as it is, whitespace included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *alphabet])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def _jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def write_benchmarks(root) -> dict:
    """Small benchmark files in their published formats (and some broken ones)."""
    data = root / "bench"
    data.mkdir()
    _jsonl(data / "math500.jsonl", [
        {"problem": "What is 2+2?", "solution": "$\\boxed{4}$", "answer": "4", "subject": "Prealgebra",
         "level": 1, "unique_id": "test/prealgebra/1.json"},
        {"problem": "Simplify 8/2.", "solution": "...", "answer": "\\frac{8}{2}", "subject": "Algebra",
         "level": 1, "unique_id": "test/algebra/2.json"},
        {"problem": "What is 2+3?", "solution": "...", "answer": "5", "subject": "Prealgebra",
         "level": 1, "unique_id": "test/prealgebra/3.json"},
    ])
    _jsonl(data / "aime24.jsonl", [
        {"ID": "2024-I-1", "Problem": "Find the number of sides of a square.", "Solution": "...", "Answer": 4},
        {"ID": "2024-I-2", "Problem": "Find m+n.", "Solution": "...", "Answer": 204},
    ])
    _jsonl(data / "livecodebench.jsonl", [
        {"question_title": "Four", "question_content": "Print 4.", "platform": "atcoder", "question_id": "a1",
         "contest_date": "2024-08-01T00:00:00", "starter_code": "", "difficulty": "easy", "metadata": "{}",
         "public_test_cases": json.dumps([{"input": "", "output": "4\n", "testtype": "stdin"}]),
         "private_test_cases": "[]"},
        {"question_title": "Five", "question_content": "Print 5.", "platform": "atcoder", "question_id": "a2",
         "contest_date": "2024-08-02T00:00:00", "starter_code": "", "difficulty": "easy", "metadata": "{}",
         "public_test_cases": json.dumps([{"input": "", "output": "5\n", "testtype": "stdin"}]),
         "private_test_cases": "[]"},
    ])
    _jsonl(data / "leetcode.jsonl", [
        {"task_id": "square", "problem": "Square x.", "fn_name": "square",
         "tests": {"inputs": [[2], [3]], "outputs": [4, 9]}},
    ])
    # Minerva's file holds LeetCode rows: the wrong format. AMC has no file at all.
    _jsonl(data / "minerva.jsonl", [{"task_id": "x", "fn_name": "f", "tests": {"inputs": [], "outputs": []}}] * 3)
    toy = _jsonl(root / "toy.jsonl", [{"prompt": "2+2=", "answer": "4", "data_source": "toy_arith"},
                                      {"prompt": "1+2*1=", "answer": "3", "data_source": "toy_arith"}])
    return {"data_dir": str(data), "toy": toy}


def train_answering_model(out_dir: str, prompts: list[str]) -> str:
    """A tiny Qwen2 that answers each of ``prompts`` with ANSWER (trained until greedy decoding does)."""
    import transformers

    torch.manual_seed(0)
    tokenizer = _byte_tokenizer()
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)  # as the engine will load it
    answer = tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(p) for p in encoded) + len(answer)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(encoded):
        seq = p + answer
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(p):len(seq)] = torch.tensor(answer)
        mask[i, :len(seq)] = 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains faster on one thread than on two that contend
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(300):  # about 100 steps
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 1e-2:  # every answer token is then the argmax
            break
    torch.set_num_threads(threads)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_prime.data import render_prompt

    root = tmp_path_factory.mktemp("eval")
    files = write_benchmarks(root)
    benchmarks = load_benchmarks(["math500", "aime24", "livecodebench", "leetcode"], files["data_dir"],
                                 [f"toy={files['toy']}"])
    tokenizer = _byte_tokenizer()
    prompts = [render_prompt(tokenizer, row.prompt) for b in benchmarks for row in b.rows]
    model = train_answering_model(str(root / "model"), prompts)
    return {"root": root, "model": model, **files}


ALL = "math500,aime24,amc,minerva,leetcode,livecodebench,gsm9k"


def eval_args(setup, out, *extra, benchmarks=ALL):
    return ["--model", setup["model"], "--data-dir", setup["data_dir"], "--label", "tiny",
            "--benchmarks", benchmarks, "--data", f"toy={setup['toy']}", "--max-new-tokens", "48",
            "--out", str(out), *extra]


def test_pass_at_k_is_the_chance_that_k_of_n_draws_hold_a_correct_one():
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                draws = list(combinations(outcomes, k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))
    assert powers_of_two_through(8) == [1, 2, 4, 8] and powers_of_two_through(6) == [1, 2, 4, 6]
    assert powers_of_two_through(1) == [1]
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_paper_rows_and_table_layout():
    rows = eval_table.paper_rows("paper")
    seven = eval_table.merge_columns([[k, t] for k, t in eval_table.PAPER_COLUMNS])
    table = eval_table.format_table(seven, rows).splitlines()
    assert [c.strip() for c in table[0].split("|")[1:-1]] == [
        "model", "AIME 2024", "AMC", "MATH-500", "Minerva Math", "OlympiadBench", "LeetCode", "LiveCodeBench", "Avg."]
    assert [c.strip() for c in table[3].split("|")[1:-1]] == [
        "Eurus-2-7B-PRIME (paper)", "26.7", "57.8", "79.2", "38.6", "42.1", "33.3", "28.6", "43.9"]
    # The SFT row: only its published average is recorded.
    assert [c.strip() for c in table[2].split("|")[1:-1]] == ["Eurus-2-7B-SFT (paper)", *["–"] * 7, "28.8"]
    assert PAPER_ROWS["prime"].average == 43.9
    # With fewer columns the published average does not apply.
    few = eval_table.format_table([("math500", "MATH-500")], rows).splitlines()
    assert [c.strip() for c in few[3].split("|")[1:-1]] == ["Eurus-2-7B-PRIME (paper)", "79.2", "–"]
    with pytest.raises(eval_table.ReportError, match="unknown paper row"):
        eval_table.paper_rows("paper:rloo")


def test_greedy_table_json_and_one_line_per_bad_benchmark(setup, capsys):
    out = setup["root"] / "greedy" / "tiny.json"
    assert commands.evaluate(eval_args(setup, out, "--compare", "paper:prime")) == 1  # some benchmarks missing
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    data_dir = setup["data_dir"]
    assert errors == [
        f"error: benchmark amc: no file in {data_dir} (looked for amc.jsonl, amc.json, amc.parquet); "
        "expected AI-MO AMC rows with 'problem' and 'answer'",
        f"error: benchmark minerva: {data_dir}/minerva.jsonl record 1: expected Minerva Math rows with 'problem' "
        "and 'answer' or a 'solution' ending in \\boxed{}, got fields ['fn_name', 'task_id', 'tests'] "
        "(and 2 more problems); expected Minerva Math rows with 'problem' and 'answer' or a 'solution' ending "
        "in \\boxed{}",
        "error: benchmark gsm9k: unknown evaluation set 'gsm9k'; known: aime2024, amc, leetcode, livecodebench, "
        "math500, minerva, olympiadbench (aliases: aime, aime24, lcb, olympiad)",
    ]
    doc = json.loads(out.read_text())
    # Every response is the trained answer, and its verdict is the real verifiers' (graded again here).
    responses = doc["responses"]
    assert len(responses) == 3 + 2 + 1 + 2 + 2 and all(len(r["responses"]) == 1 for r in responses)
    assert {r["responses"][0]["text"] for r in responses} == {ANSWER}
    benchmarks = {b.name: b for b in load_benchmarks(["math500", "aime24", "livecodebench", "leetcode"], data_dir,
                                                     [f"toy={setup['toy']}"])}
    regraded = score_batch([(r["verifier"], r["responses"][0]["text"],
                             benchmarks[r["benchmark"]].rows[r["position"]].ground_truth) for r in responses])
    assert [r["responses"][0]["score"] for r in responses] == regraded
    accuracy = {name: m["greedy"] for name, m in doc["benchmarks"].items()}
    assert accuracy == {"aime2024": 0.5, "math500": pytest.approx(2 / 3), "leetcode": 0.0, "livecodebench": 0.5,
                        "toy": 0.5}
    assert set(doc["missing"]) == {"amc", "minerva", "gsm9k"}
    table = (out.parent / "tiny.md").read_text().splitlines()
    assert table == doc["table"].splitlines() and table[0] in captured.out
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in table[2:4]}
    # The paper's seven (the paper row brings OlympiadBench), Avg. (of the four this run has), then
    # the columns outside the paper's table.
    assert [c.strip() for c in table[0].split("|")[1:-1]][-3:] == ["Avg.", "gsm9k", "toy"]
    assert cells["tiny (greedy)"] == ["50.0", "missing", "66.7", "missing", "–", "0.0", "50.0", "41.7*",
                                      "missing", "50.0"]
    assert cells["Eurus-2-7B-PRIME (paper)"] == ["26.7", "57.8", "79.2", "38.6", "42.1", "33.3", "28.6", "43.9",
                                                 "–", "–"]
    assert not os.path.exists(f"{out}.partial.jsonl")
    # --compare alone prints the table of earlier results.
    assert commands.evaluate(["--compare", str(out)]) == 0
    assert "| tiny (greedy)" in capsys.readouterr().out


def test_bad_inputs_are_one_line(setup, capsys, tmp_path):
    assert commands.evaluate(["--model", setup["model"], "--benchmarks", "amc", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: none of the 1 benchmarks could be loaded (see above)" and len(err) == 2
    assert commands.evaluate(["--model", setup["model"], "--data", setup["toy"], "--samples", "4",
                              "--temperature", "0"]) == 2
    assert "--temperature 0 would repeat one greedy response" in capsys.readouterr().err
    not_json = tmp_path / "x.json"
    not_json.write_text("{}")
    assert commands.evaluate(["--compare", str(not_json)]) == 2
    assert "not a megatron-prime eval result" in capsys.readouterr().err


def _two_engine_eval(rank, world_size, args):
    code = commands.evaluate(args)
    return code, (json.loads(open(args[args.index("--out") + 1]).read()) if rank == 0 else None)


def test_sampled_run_resumes_after_a_crash_and_matches_two_engines(setup, capsys):
    """avg@4 / pass@k from K=4 samples at T=1; a run killed after two chunks (plus a line cut off
    mid-write) resumes and gives exactly the uninterrupted run's samples, as do two engines."""
    from megatron_prime.reports.engines import start_fleet

    sampled = ("--samples", "4", "--temperature", "1.0", "--seed", "3")
    math = "math500,aime24"  # the code verifier is covered above; its sandbox runs cost seconds here

    def args(out, *extra):
        return eval_args(setup, out, *sampled, *extra, benchmarks=math)

    full = setup["root"] / "full" / "tiny.json"
    assert commands.evaluate(args(full)) == 0
    doc = json.loads(full.read_text())
    assert doc["metric_names"] == ["avg@4", "pass@4"]
    for name, metrics in doc["benchmarks"].items():
        correct = [sum(s["correct"] for s in r["responses"]) for r in doc["responses"] if r["benchmark"] == name]
        assert metrics["avg@4"] == pytest.approx(sum(correct) / (4 * len(correct)))
        for k in (1, 2, 4):
            assert metrics[f"pass@{k}"] == pytest.approx(sum(pass_at_k(4, c, k) for c in correct) / len(correct))
        assert metrics["pass@1"] == pytest.approx(metrics["avg@4"])

    # The interrupted run: the same settings, stopped by an error after its second chunk (AIME's two
    # prompts: the paper's benchmarks run in the paper's order).
    crashed = setup["root"] / "crashed" / "tiny.json"
    benchmarks = load_benchmarks(math.split(","), setup["data_dir"], [f"toy={setup['toy']}"])
    settings = eval_table.EvalSettings(model=os.path.abspath(setup["model"]), samples=4, temperature=1.0,
                                       max_new_tokens=48, seed=3)
    progress = []

    def crash_after_two(line):
        progress.append(line)
        if len(progress) == 2:
            raise KeyboardInterrupt("killed")

    fleet, tokenizer = start_fleet(setup["model"])
    with pytest.raises(KeyboardInterrupt):
        eval_table.run_benchmarks(fleet, tokenizer, benchmarks, settings, f"{crashed}.partial.jsonl", 1,
                                  log=crash_after_two)
    fleet.shutdown()
    with open(f"{crashed}.partial.jsonl", "a") as f:
        f.write('{"benchmark": "math500", "posi')  # the line being written when the process died
    records, torn = read_jsonl(f"{crashed}.partial.jsonl")
    assert torn and len(records) == 1 + 2  # the settings, then the two finished prompts
    done = eval_table._resume(f"{crashed}.partial.jsonl", settings, [b for b in benchmarks if b.rows])
    assert sorted(done["aime2024"]) == [0, 1] and read_jsonl(f"{crashed}.partial.jsonl") == (records, False)
    capsys.readouterr()
    assert commands.evaluate(args(crashed, "--chunk", "1")) == 0
    assert "[eval] aime2024: 2 of 2 prompts already graded" in capsys.readouterr().out
    resumed = json.loads(crashed.read_text())
    assert resumed["responses"] == doc["responses"] and resumed["benchmarks"] == doc["benchmarks"]

    # Other settings do not silently mix with the partial file.
    other = setup["root"] / "other" / "tiny.json"
    other.parent.mkdir()
    greedy_settings = dict(dataclasses.asdict(settings), samples=1, temperature=0.0)
    with open(f"{other}.partial.jsonl", "w") as f:
        f.write(json.dumps({"settings": greedy_settings}) + "\n")
    assert commands.evaluate(args(other)) == 2
    assert "holds a run with other settings" in capsys.readouterr().err

    # Two ranks, two hf engines, each a shard of every benchmark: the same samples.
    two = setup["root"] / "two" / "tiny.json"
    code, two_doc = run_distributed(_two_engine_eval, args(two))
    assert code == 0 and two_doc["responses"] == doc["responses"]
