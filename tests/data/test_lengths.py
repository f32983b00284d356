"""Over-long prompts and SFT rows are found once, when the data is loaded: dropped and counted by the
trainer (instead of stopping a run mid-way, and again on resume), dropped (not cut) by SFT, and
listed by ``megatron-prime data check --tokenizer``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_prime.config import load_config
from megatron_prime.data import DatasetError, load_prompt_dataset, load_sft_dataset, render_prompt
from megatron_prime.data.lengths import split_overlong_prompts, split_overlong_sft


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    import transformers

    from megatron_prime.data import build_toy_task

    root = tmp_path_factory.mktemp("lengths")
    task = build_toy_task(root / "toy", num_sft=1, num_rl=1, num_eval=1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(task.tokenizer))
    prompts = root / "prompts.jsonl"  # character tokenizer: a prompt of n characters is n tokens
    with open(prompts, "w") as f:
        for text in ("1+2*3=", "12+34*56+78*9=", "1+1=", "123+456*7+890*1+23="):
            f.write(json.dumps({"prompt": text, "answer": "0"}) + "\n")
    sft = root / "sft.jsonl"
    with open(sft, "w") as f:
        for prompt, response in (("1+1=", "1*1=1;1+1=2;\\boxed{2}"), ("1+1=", "2" * 40), ("2+2=", "\\boxed{4}")):
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return {"tokenizer": tokenizer, "tokenizer_dir": str(task.tokenizer), "prompts": str(prompts), "sft": str(sft)}


def test_overlong_prompts_are_split_off_with_where_they_are(toy):
    rows = load_prompt_dataset(toy["prompts"])
    kept, overlong = split_overlong_prompts(rows, toy["tokenizer"], 10, render_prompt)
    assert [r.prompt for r in kept] == ["1+2*3=", "1+1="]
    assert [(o.where, o.tokens) for o in overlong] == [(f"{toy['prompts']} line 2", 14), (f"{toy['prompts']} line 4", 19)]
    assert str(overlong[0]) == f"{toy['prompts']} line 2: 14 tokens > 10"


def test_overlong_sft_rows_are_dropped_not_cut(toy):
    kept, overlong = split_overlong_sft(load_sft_dataset(toy["sft"]), toy["tokenizer"], 30, render_prompt)
    assert [r.response for r in kept] == ["1*1=1;1+1=2;\\boxed{2}", "\\boxed{4}"]
    assert [o.where for o in overlong] == [f"{toy['sft']} line 2"] and overlong[0].tokens == 4 + 40 + 1  # + eos


def test_trainer_drops_and_reports_overlong_prompts(toy, capsys):
    from megatron_prime.training.trainer import load_prompts

    cfg = load_config(None, [f"data.train_files=[{toy['prompts']}]", "data.max_prompt_len=10",
                             "train.prompts_per_step=2"])
    sampler = load_prompts(cfg, toy["tokenizer"], render_prompt)
    assert len(sampler.rows) == 2
    out = capsys.readouterr().out
    assert "dropped 2 of 4 prompts longer than data.max_prompt_len=10" in out and "line 2: 14 tokens > 10" in out

    cfg.data.max_prompt_len = 3
    with pytest.raises(DatasetError, match="every prompt is longer than data.max_prompt_len=3"):
        load_prompts(cfg, toy["tokenizer"], render_prompt)


def test_data_check_lists_overlong_rows(toy, capsys):
    from megatron_prime.data.cli import main

    def check(*args) -> tuple[int, str]:  # in this process: each command would import transformers again
        code = main(["check", *args])
        return code, capsys.readouterr().out

    code, out = check("--tokenizer", toy["tokenizer_dir"], "--max-prompt-len", "10", toy["prompts"])
    assert code == 1
    assert f"{toy['prompts']} line 2: 14 tokens > 10" in out and "2 problem(s)" in out
    code, out = check("--sft", "--tokenizer", toy["tokenizer_dir"], "--max-len", "30", toy["sft"])
    assert code == 1 and f"{toy['sft']} line 2: 45 tokens > 30" in out
    assert check("--tokenizer", toy["tokenizer_dir"], "--max-prompt-len", "20", toy["prompts"])[0] == 0
    # The command itself, as a user runs it.
    usage = subprocess.run([sys.executable, "-m", "megatron_prime.cli", "data", "check", "--tokenizer",
                            toy["tokenizer_dir"], toy["prompts"]], capture_output=True, text=True, timeout=300)
    assert usage.returncode == 2 and "go together" in usage.stderr
