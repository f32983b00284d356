"""``megatron-prime score``: best-of-N with the implicit PRM on the toy task.

The reference is a tiny random Qwen2; the PRM is that model fine-tuned on the toy task's correct
solutions (plain PyTorch, a few seconds), so it is genuinely different and should prefer correct
responses. Rewards are checked against the paper's Eq. 3 worked by an independent forward per
response; the selection strategies against hand-worked cases.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from megatron_prime.reports import commands
from megatron_prime.reports.best_of_n import (
    Candidate,
    best_of_n_curve,
    pairwise_accuracy,
    pick_by_majority,
    subsets,
    verdict,
)

pytestmark = pytest.mark.slow

BETA = 0.05


def test_strategies_on_a_hand_worked_prompt():
    # Two correct responses (answer "1"), two wrong ones (answer "2"); the PRM ranks A > D > B > C.
    a, b, c, d = (Candidate(True, 0.9, "1"), Candidate(False, 0.5, "2"), Candidate(False, 0.1, "2"),
                  Candidate(True, 0.7, "1"))
    curve = best_of_n_curve([[a, b, c, d]])
    assert curve[1] == {"prm": 0.5, "majority": 0.5, "random": 0.5, "oracle": 0.5}
    # N=2, subsets AB AC AD BC BD CD: the PRM picks A A A B D D; majority ties except AD and BC.
    assert curve[2] == pytest.approx({"prm": 5 / 6, "majority": 0.5, "random": 0.5, "oracle": 5 / 6})
    assert curve[4] == {"prm": 1.0, "majority": 0.5, "random": 0.5, "oracle": 1.0}
    # Ties in reward: the mean of the tied; responses without an answer do not vote.
    assert best_of_n_curve([[Candidate(True, 0.0, None), Candidate(False, 0.0, "3")]])[2]["prm"] == 0.5
    assert pick_by_majority([Candidate(True, 0, "7"), Candidate(False, 0, None), Candidate(False, 0, None)]) == 1.0
    assert pairwise_accuracy([[a, b, c, d]]) == (1.0, 4)
    sentence, diff, se = verdict([[a, b, c, d]] * 3, 2)
    assert diff == pytest.approx(5 / 6 - 0.5) and se == pytest.approx(0.0)
    assert sentence.startswith("best-of-2 by PRM score is better than random choice: +33.3 points")
    flipped = [Candidate(x.correct, -x.reward, x.answer) for x in (a, b, c, d)]
    assert "worse than random choice" in verdict([flipped] * 3, 2)[0]
    drawn = subsets(10, 5, 10, random.Random(0))
    assert len(drawn) == len(set(drawn)) == 10 and all(len(s) == 5 for s in drawn)
    assert len(subsets(10, 5, 256, random.Random(0))) == 252  # all of them


def _toy_responses(problem: str, answer: int) -> list[str]:
    """The correct solution and three wrong ones: the box does not repeat the sum, the sum does not
    repeat the product, a broken format. (A small model learns to copy long before it learns to
    add, so a PRM fine-tuned on correct solutions can tell these apart.)"""
    a, rest = problem.rstrip("=").split("+")
    b, c = rest.split("*")
    a, b, c = int(a), int(b), int(c)
    product = b * c
    return [
        f"{b}*{c}={product};{a}+{product}={answer};\\boxed{{{answer}}}",
        f"{b}*{c}={product};{a}+{product}={answer};\\boxed{{{answer + 11}}}",
        f"{b}*{c}={product};{a}+{product + 7}={answer + 7};\\boxed{{{answer + 7}}}",
        f"\\boxed{{{answer + 3}}};;{b}{c}",
    ]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    import transformers

    from megatron_prime.data import build_toy_task, load_sft_dataset

    root = tmp_path_factory.mktemp("score")
    task = build_toy_task(root / "data", seed=0, num_sft=1024, num_rl=16, num_eval=48)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(task.tokenizer))
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(config)
    ref_dir, prm_dir = str(root / "ref"), str(root / "prm")
    model.save_pretrained(ref_dir)
    tokenizer.save_pretrained(ref_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ref_dir)  # as the score command loads it
    # The PRM: the reference fine-tuned on correct solutions.
    rows = load_sft_dataset(task.sft)
    seqs = [tokenizer(r.prompt + r.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for r in rows]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains faster on one thread than on two that contend
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = torch.randint(0, len(seqs), (64,), generator=gen)
        loss = model(input_ids=ids[batch], attention_mask=(labels[batch] != -100).long(), labels=labels[batch]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.save_pretrained(prm_dir)
    tokenizer.save_pretrained(prm_dir)
    problems = [json.loads(line) for line in open(task.eval)]
    responses = root / "responses.jsonl"
    with open(responses, "w") as f:
        for i, p in enumerate(problems):
            for text in _toy_responses(p["prompt"], int(p["answer"])):
                f.write(json.dumps({"index": i, "response": text}) + "\n")
    return {"root": root, "ref": ref_dir, "prm": prm_dir, "eval": str(task.eval), "responses": str(responses),
            "tokenizer": tokenizer}


def _independent_rewards(toy, models, prompt: str, response: str) -> list[float]:
    """beta * (log pi_prm - log pi_ref) per response token, one unpadded forward per model."""
    tok = toy["tokenizer"]
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + r])
    per_model = []
    for model in models:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        per_model.append([logp[len(p) - 1 + t, r[t]].item() for t in range(len(r))])
    return [BETA * (a - b) for a, b in zip(*per_model)]


def test_best_of_n_with_a_trained_prm_on_the_toy_task(toy, capsys):
    out = toy["root"] / "score.json"
    args = ["--prm", toy["prm"], "--ref", toy["ref"], "--data", toy["eval"], "--responses", toy["responses"],
            "--samples", "4", "--beta", str(BETA), "--out", str(out)]
    assert commands.score(args) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    responses = doc["responses"]
    assert len(responses) == 48 * 4
    assert [r["correct"] for r in responses[:4]] == [True, False, False, False]  # the real math verifier
    import transformers

    problems = [json.loads(line) for line in open(toy["eval"])]
    models = [transformers.AutoModelForCausalLM.from_pretrained(toy[m]).float().eval() for m in ("prm", "ref")]
    for r in responses[::13]:
        expected = _independent_rewards(toy, models, problems[r["prompt_index"]]["prompt"], r["response"])
        assert r["token_rewards"] == pytest.approx(expected, abs=1e-5)
        assert r["sequence_reward"] == pytest.approx(sum(expected), abs=1e-5)
    curve = {int(n): row for n, row in doc["curve"].items()}
    assert sorted(curve) == [1, 2, 4]
    assert curve[1]["prm"] == curve[1]["random"] == pytest.approx(0.25)
    assert curve[4]["random"] == pytest.approx(0.25) and curve[4]["oracle"] == 1.0
    # The fine-tuned PRM prefers the consistent solution: better than random choice.
    assert curve[4]["prm"] >= 0.55 and doc["pairwise_accuracy"] > 0.75  # measured: 0.65, 0.85
    assert doc["verdict"].startswith("best-of-4 by PRM score is better than random choice")
    assert doc["verdict"] in printed and "| N | prm | majority | random | oracle |" in printed


def test_a_prm_equal_to_the_reference_is_reported_no_better_than_random(toy, capsys):
    out = toy["root"] / "same.json"
    assert commands.score(["--prm", toy["ref"], "--ref", toy["ref"], "--data", toy["eval"], "--responses",
                           toy["responses"], "--samples", "4", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {r["sequence_reward"] for r in doc["responses"]} == {0.0}
    assert all(row["prm"] == pytest.approx(row["random"]) for row in doc["curve"].values())
    assert doc["verdict"].startswith("best-of-4 by PRM score is no better than random choice: +0.0 points")
    assert doc["verdict"] in capsys.readouterr().out


def test_sampling_from_a_policy_and_bad_inputs(toy, capsys, tmp_path):
    out = tmp_path / "policy.json"
    assert commands.score(["--prm", toy["prm"], "--ref", toy["ref"], "--policy", toy["prm"], "--data", toy["eval"],
                           "--samples", "2", "--limit", "3", "--max-new-tokens", "24", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["prompt_index"] for r in doc["responses"]] == [0, 0, 1, 1, 2, 2]
    from megatron_prime.rewards import score_batch

    problems = [json.loads(line) for line in open(toy["eval"])]
    assert [r["score"] for r in doc["responses"]] == score_batch(
        [("math", r["response"], problems[r["prompt_index"]]["answer"]) for r in doc["responses"]])
    assert "[score] sampled and graded 3/3 prompts x 2" in capsys.readouterr().out

    short = tmp_path / "short.jsonl"
    short.write_text('{"index": 0, "response": "1"}\n')
    base = ["--prm", toy["prm"], "--ref", toy["ref"], "--data", toy["eval"], "--samples", "2"]
    assert commands.score([*base, "--responses", str(short)]) == 2
    assert f"{short}: prompt row 0 has 1 responses, --samples 2 needs 2" in capsys.readouterr().err
    short.write_text('{"index": 99, "response": "1"}\n')
    assert commands.score([*base, "--responses", str(short)]) == 2
    assert f"{short} record 1: expected" in capsys.readouterr().err


def test_a_lora_prm_adapter_is_applied_to_its_base(toy, tmp_path):
    """A shared-base LoRA run's PRM comes as a PEFT adapter of the reference (export_dir/prm_adapter):
    scored like the whole PRM it stands for; a --ref that is not its base is refused."""
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(toy["ref"])
    adapted = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                        init_lora_weights=False))  # random, nonzero B
    adapter_dir = str(tmp_path / "prm_adapter")
    adapted.save_pretrained(adapter_dir)
    config = json.loads(open(os.path.join(adapter_dir, "adapter_config.json")).read())
    config["base_model_name_or_path"] = toy["ref"]
    open(os.path.join(adapter_dir, "adapter_config.json"), "w").write(json.dumps(config))
    out = tmp_path / "lora.json"
    args = ["--prm", adapter_dir, "--ref", toy["ref"], "--data", toy["eval"], "--responses", toy["responses"],
            "--samples", "4", "--beta", str(BETA), "--limit", "4", "--out", str(out)]
    assert commands.score(args) == 0
    problems = [json.loads(line) for line in open(toy["eval"])]
    reference = transformers.AutoModelForCausalLM.from_pretrained(toy["ref"]).float().eval()
    adapted.eval()
    responses = json.loads(out.read_text())["responses"]
    for r in responses[::3]:
        expected = _independent_rewards(toy, [adapted, reference], problems[r["prompt_index"]]["prompt"], r["response"])
        assert max(abs(x) for x in expected) > 1e-3
        assert r["token_rewards"] == pytest.approx(expected, abs=1e-5)
    assert commands.score([*args[:2], "--ref", toy["prm"], *args[4:]]) == 2  # not the adapter's base
