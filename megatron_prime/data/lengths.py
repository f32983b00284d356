"""Token lengths of prompts and SFT rows, checked once when a dataset is loaded.

A prompt longer than ``data.max_prompt_len`` cannot be generated from; found at generation time it
would stop the run mid-way, and a resumed run would meet it again (the sampler is deterministic).
So over-long rows are dropped and counted when the data is loaded (veRL filters the same way) and
``megatron-prime data check --tokenizer DIR --max-prompt-len N`` lists them beforehand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from megatron_prime.data.chat import render_prompt


@dataclass
class Overlong:
    where: str  # "FILE line N"
    tokens: int
    limit: int

    def __str__(self) -> str:
        return f"{self.where}: {self.tokens} tokens > {self.limit}"


def token_counts(texts: Sequence[str], tokenizer: Any, batch: int = 1024) -> list[int]:
    """Tokens of each text as the trainer tokenizes it (no special tokens added)."""
    counts: list[int] = []
    for start in range(0, len(texts), batch):
        ids = tokenizer(list(texts[start:start + batch]), add_special_tokens=False)["input_ids"]
        counts += [len(x) for x in ids]
    return counts


def split_overlong_prompts(rows: Sequence, tokenizer: Any, max_prompt_len: int,
                           render: Callable = render_prompt) -> tuple[list, list[Overlong]]:
    """(rows whose rendered prompt fits ``max_prompt_len`` tokens, the others as ``Overlong``)."""
    counts = token_counts([render(tokenizer, row.prompt) for row in rows], tokenizer)
    kept, overlong = [], []
    for row, n in zip(rows, counts):
        if n <= max_prompt_len:
            kept.append(row)
        else:
            overlong.append(Overlong(row.where, n, max_prompt_len))
    return kept, overlong


def split_overlong_sft(rows: Sequence, tokenizer: Any, max_len: int,
                       render: Callable = render_prompt) -> tuple[list, list[Overlong]]:
    """(SFT rows whose prompt + response + eos fit ``max_len`` tokens, the others). A row cut to
    fit would teach the model to stop without its answer or eos, so it is dropped instead."""
    prompts = token_counts([render(tokenizer, row.prompt) for row in rows], tokenizer)
    responses = token_counts([row.response for row in rows], tokenizer)
    eos = 1 if getattr(tokenizer, "eos_token_id", None) is not None else 0
    kept, overlong = [], []
    for row, p, r in zip(rows, prompts, responses):
        if p + r + eos <= max_len:
            kept.append(row)
        else:
            overlong.append(Overlong(row.where, p + r + eos, max_len))
    return kept, overlong


def describe_dropped(what: str, overlong: Sequence[Overlong], total: int, setting: str, sft: bool = False) -> str:
    """One line for the log: how many rows were dropped, the first few, and how to list them all."""
    shown = "; ".join(str(o) for o in overlong[:3])
    more = f"; ... {len(overlong) - 3} more" if len(overlong) > 3 else ""
    check = "--sft --max-len N" if sft else "--max-prompt-len N"
    return (f"data: dropped {len(overlong)} of {total} {what} longer than {setting} ({shown}{more}); "
            f"`megatron-prime data check --tokenizer DIR {check} FILE` lists them")
