"""``megatron-prime score``: the trained implicit PRM as a best-of-N reward model.

N responses per prompt are sampled from a policy (the rollout fleet) or read from a JSON-lines
file, graded by the verifiers, and scored by the implicit PRM (``implicit_prm.py``); best-of-N
accuracy by PRM score is reported against majority vote, random choice and the oracle
(``best_of_n.py``), with a verdict on whether the PRM beats random choice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from megatron_prime.reports.best_of_n import (
    STRATEGIES,
    Candidate,
    best_of_n_curve,
    pairwise_accuracy,
    verdict,
)
from megatron_prime.reports.eval_table import is_correct
from megatron_prime.reports.files import ReportError, read_jsonl, write_atomic

RESULT_FORMAT = "megatron-prime/score"


@dataclass
class Scored:
    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    score: float
    answer: str | None
    token_rewards: list[float] | None = None

    @property
    def reward(self) -> float:
        return sum(self.token_rewards)


def final_answer(verifier: str, text: str) -> str | None:
    """What majority voting compares: the math answer, the code block, else the whole text."""
    from megatron_prime.rewards import extract_code, extract_final_answer

    if verifier == "math":
        return extract_final_answer(text)
    if verifier == "code":
        code = extract_code(text)
        return None if code is None else "\n".join(line.rstrip() for line in code.strip().splitlines())
    return text.strip() or None


def read_responses(path: str, num_rows: int, n: int, used: int | None = None) -> list[list[str]]:
    """The first ``n`` responses of each of the first ``used`` prompts (default all ``num_rows``)
    from ``{"index": ROW, "response": TEXT}`` lines (ROW: the 0-based row of the prompt file)."""
    try:
        records, torn = read_jsonl(path)
    except FileNotFoundError:
        raise ReportError(f"--responses {path}: no such file") from None
    if torn:
        raise ReportError(f"{path}: the last line is cut off (a writer still running?)")
    per_prompt: list[list[str]] = [[] for _ in range(num_rows)]
    for number, record in enumerate(records, 1):
        index, text = record.get("index"), record.get("response")
        if not isinstance(index, int) or not 0 <= index < num_rows or not isinstance(text, str):
            raise ReportError(f"{path} record {number}: expected {{\"index\": 0..{num_rows - 1} (the prompt's row), "
                              f"\"response\": text}}, got {json.dumps(record)[:200]}")
        per_prompt[index].append(text)
    per_prompt = per_prompt[:used]
    short = [i for i, texts in enumerate(per_prompt) if len(texts) < n]
    if short:
        raise ReportError(f"{path}: prompt row {short[0]} has {len(per_prompt[short[0]])} responses, --samples {n} "
                          f"needs {n} for every prompt ({len(short)} prompts short)")
    return [texts[:n] for texts in per_prompt]


def responses_from_file(path: str, rows, tokenizer, n: int, max_prompt_len: int,
                        num_rows: int | None = None) -> list[list[Scored]]:
    """Responses for ``rows`` (the first rows of a file of ``num_rows``) read from ``path``."""
    from megatron_prime.data import render_prompt
    from megatron_prime.rewards import score_batch
    from megatron_prime.fleet.collect import tokenize_prompts

    texts = read_responses(path, num_rows or len(rows), n, used=len(rows))
    prompts = tokenize_prompts(rows, tokenizer, max_prompt_len, render_prompt)
    values = score_batch([(row.verifier, t, row.ground_truth) for row, ts in zip(rows, texts) for t in ts])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for i, (row, ts) in enumerate(zip(rows, texts)):
        # A finished response ends in eos, as the trainer's responses do (the PRM was trained on them).
        out.append([Scored(i, prompts[i][0], tokenizer(t, add_special_tokens=False)["input_ids"] + eos, t,
                           values[i * n + j], final_answer(row.verifier, t)) for j, t in enumerate(ts)])
    return out


def responses_from_policy(policy: str, rows, n: int, *, temperature: float, max_new_tokens: int,
                          max_prompt_len: int, seed: int, cache_dir: str, chunk: int = 64,
                          log=print) -> list[list[Scored]]:
    from megatron_prime.data import render_prompt
    from megatron_prime.reports.engines import start_fleet
    from megatron_prime.fleet.grading import fleet_graded_responses, sampling_params

    fleet, tokenizer = start_fleet(policy, seed=seed, cache_dir=cache_dir)
    groups = []
    try:
        sampling = sampling_params(fleet, n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        for start in range(0, len(rows), chunk):
            groups += fleet_graded_responses(fleet, rows[start:start + chunk], tokenizer, render_prompt, sampling,
                                             max_prompt_len=max_prompt_len, prompt_offset=start)
            log(f"[score] sampled and graded {len(groups)}/{len(rows)} prompts x {n}")
    finally:
        fleet.shutdown()
    return [[Scored(i, g.prompt_ids, g.response.token_ids, g.response.text, g.score,
                    final_answer(row.verifier, g.response.text)) for g in group]
            for i, (row, group) in enumerate(zip(rows, groups))]


def add_prm_rewards(scored: list[list[Scored]], prm_dir: str, ref_dir: str, beta: float, device) -> None:
    """Fill in every response's per-token implicit rewards (PRM and reference loaded in turn)."""
    from megatron_prime.reports.implicit_prm import load_model, response_logprobs, token_rewards

    flat = [s for group in scored for s in group]
    logprobs = {}
    for role, path in (("prm", prm_dir), ("ref", ref_dir)):
        model = load_model(path, device, base=ref_dir)
        logprobs[role] = response_logprobs(model, [s.prompt_ids for s in flat], [s.response_ids for s in flat])
        del model
    for s, rewards in zip(flat, token_rewards(logprobs["prm"], logprobs["ref"], beta)):
        s.token_rewards = rewards


def summarize(scored: list[list[Scored]]) -> dict:
    prompts = [[Candidate(is_correct(s.score), s.reward, s.answer) for s in group] for group in scored]
    curve = best_of_n_curve(prompts)
    largest = max(curve)
    sentence, diff, se = verdict(prompts, largest)
    pairwise, pairs = pairwise_accuracy(prompts)
    return {"curve": curve, "verdict": sentence, "difference": diff, "standard_error": se,
            "pairwise_accuracy": pairwise, "pairs": pairs}


def format_curve(curve: dict[int, dict[str, float]]) -> str:
    header = "| N | " + " | ".join(STRATEGIES) + " |"
    rule = "|---:|" + "|".join("---:" for _ in STRATEGIES) + "|"
    lines = [f"| {n} | " + " | ".join(f"{100 * row[s]:.1f}" for s in STRATEGIES) + " |" for n, row in curve.items()]
    return "\n".join([header, rule, *lines])


def report_text(summary: dict, num_prompts: int, n: int) -> str:
    pairwise = summary["pairwise_accuracy"]
    pair_line = (f"a correct response outscores an incorrect one of the same prompt in {100 * pairwise:.1f}% "
                 f"of {summary['pairs']} pairs" if summary["pairs"] else
                 "no prompt has both correct and incorrect responses: the PRM's ranking is not tested")
    return "\n".join([
        f"best-of-N accuracy (%) over {num_prompts} prompts, {n} responses each:",
        format_curve(summary["curve"]),
        summary["verdict"],
        pair_line,
    ])


def write_score_results(out_path: str, settings: dict, summary: dict, scored: list[list[Scored]], rows) -> None:
    doc = {
        "format": RESULT_FORMAT, "version": 1, "settings": settings,
        **{k: v for k, v in summary.items() if k != "curve"},
        "curve": {str(n): row for n, row in summary["curve"].items()},
        "responses": [{"prompt_index": s.prompt_index, "data_index": rows[s.prompt_index].index, "response": s.text,
                       "score": s.score, "correct": is_correct(s.score), "answer": s.answer,
                       "sequence_reward": s.reward, "token_rewards": s.token_rewards}
                      for group in scored for s in group],
    }
    write_atomic(out_path, json.dumps(doc) + "\n")


def default_out(data: str) -> str:
    return os.path.join("outputs", "score", os.path.splitext(os.path.basename(data))[0] + ".json")
