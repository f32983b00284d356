"""The toy task: splits, solutions graded by the math verifier, tokenizer, difficulty knobs,
and chat rendering (with and without a template)."""

import json
import re

import pytest
from transformers import AutoTokenizer

from megatron_prime.data import ToyDifficulty, build_toy_task, load_prompt_dataset, load_sft_dataset, render_prompt
from megatron_prime.data.toy import format_prompt, sample_problems, solve
from megatron_prime.rewards import score_batch


def read(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return build_toy_task(tmp_path_factory.mktemp("toy"), seed=0, num_sft=600, num_rl=200, num_eval=100)


def test_default_problem_and_solution_format(task):
    sft = read(task.sft)
    assert len(sft) == 600
    for row in sft:
        a, b, c = map(int, re.fullmatch(r"(\d+)\+(\d+)\*(\d+)=", row["prompt"]).groups())
        assert a < 50 and b < 10 and c < 50
        assert row["response"] == f"{b}*{c}={b * c};{a}+{b * c}={a + b * c};\\boxed{{{a + b * c}}}"
    assert solve((23, 4, 17), ToyDifficulty()) == ("4*17=68;23+68=91;\\boxed{91}", 91)


def test_splits_are_disjoint_seeded_and_valid(task, tmp_path):
    prompts = [{r["prompt"] for r in read(p)} for p in (task.sft, task.rl, task.eval)]
    assert [len(p) for p in prompts] == [600, 200, 100]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    again = build_toy_task(tmp_path / "again", seed=0, num_sft=50, num_rl=200, num_eval=100)
    assert read(again.eval) == read(task.eval) and read(again.rl) == read(task.rl)
    other = build_toy_task(tmp_path / "other", seed=1, num_sft=50, num_rl=20, num_eval=100)
    assert read(other.eval) != read(task.eval)
    rl = load_prompt_dataset(task.rl)
    assert {r.verifier for r in rl} == {"math"} and rl[0].data_source == "toy_arith"
    assert len(load_prompt_dataset(task.eval)) == 100
    sft = load_sft_dataset(task.sft)
    assert len(sft) == 600 and sft[0].response.endswith("}")


def test_solutions_pass_and_wrong_answers_fail_the_math_verifier(task):
    sft = read(task.sft)[:20]
    items = [("math", r["response"], r["answer"]) for r in sft]
    items += [("math", r["response"].replace("{", "{1"), r["answer"]) for r in sft]
    assert score_batch(items, num_workers=2) == [1.0] * 20 + [0.0] * 20


def test_tokenizer_loads_offline_and_round_trips(task):
    tok = AutoTokenizer.from_pretrained(task.tokenizer)
    assert len(tok) < 64
    assert tok.eos_token == "<eos>" and tok.pad_token == "<pad>"
    assert tok.eos_token_id != tok.pad_token_id
    assert not getattr(tok, "chat_template", None)
    row = read(task.sft)[0]
    text = row["prompt"] + row["response"]
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, nothing added
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text


def test_difficulty_knobs():
    hard = ToyDifficulty(num_ops=4, max_operand=20, max_multiplier=5)
    problem = sample_problems(1, hard, seed=0)[0]
    prompt = format_prompt(problem, hard)
    a, b, c, d, e = map(int, re.fullmatch(r"(\d+)\+(\d+)\*(\d+)\+(\d+)\*(\d+)=", prompt).groups())
    solution, answer = solve(problem, hard)
    assert answer == a + b * c + d * e
    assert solution.count(";") == 4 and solution.endswith(f"\\boxed{{{answer}}}")
    assert solve((1, 2, 3, 4), ToyDifficulty(num_ops=3)) == ("2*3=6;1+6=7;7+4=11;\\boxed{11}", 11)
    assert solve((5, 6), ToyDifficulty(num_ops=1)) == ("5+6=11;\\boxed{11}", 11)
    tiny = ToyDifficulty(num_ops=1, max_operand=3)
    assert tiny.num_problems() == 9
    assert len(set(sample_problems(9, tiny, seed=0))) == 9
    with pytest.raises(ValueError, match="only 9"):
        sample_problems(10, tiny, seed=0)


def test_multistep_preset_writes_every_intermediate_result(tmp_path):
    from megatron_prime.data.toy import PRESETS

    multi = PRESETS["multistep"]
    assert format_prompt((3, 4, 7, 3, 2, 5, 9), multi) == "3+4*7+3*2+5*9="
    # products first, then the running sum: 7 written steps, one per operation
    assert solve((3, 4, 7, 3, 2, 5, 9), multi) == ("4*7=28;3*2=6;5*9=45;3+28=31;31+6=37;37+45=82;\\boxed{82}", 82)
    task = build_toy_task(tmp_path, seed=0, num_sft=200, num_rl=20, num_eval=20, difficulty="multistep")
    rows = read(task.sft)
    assert all(re.fullmatch(r"\d\+\d\*\d\+\d\*\d\+\d\*\d=", r["prompt"]) for r in rows)
    default = build_toy_task(tmp_path / "default", seed=0, num_sft=200, num_rl=20, num_eval=20)
    ratio = (sum(len(r["response"]) for r in rows) / sum(len(r["response"]) for r in read(default.sft)))
    assert 1.8 < ratio < 2.5  # responses about twice the default task's
    tok = AutoTokenizer.from_pretrained(task.tokenizer)
    assert all(tok.unk_token_id not in tok(r["prompt"] + r["response"])["input_ids"] for r in rows)
    # one wrong step (here the middle sum, carried on consistently) makes the answer wrong
    wrong = "4*7=28;3*2=6;5*9=45;3+28=31;31+6=38;38+45=83;\\boxed{83}"
    items = [("math", r["response"], r["answer"]) for r in rows[:20]] + [("math", wrong, "82")]
    assert score_batch(items, num_workers=2) == [1.0] * 20 + [0.0]


def test_render_prompt_with_and_without_template(task):
    tok = AutoTokenizer.from_pretrained(task.tokenizer)
    assert render_prompt(tok, "12+3*4=") == "12+3*4="
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1="}]
    assert render_prompt(tok, messages) == "System: Be brief.\n\nUser: 1+1=\n\nAssistant:"
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert render_prompt(tok, messages) == "<system>Be brief.<user>1+1=<assistant>"
    assert render_prompt(tok, "2+2=") == "<user>2+2=<assistant>"
