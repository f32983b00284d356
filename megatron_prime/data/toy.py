"""The synthetic toy task of the CPU demo: multi-step arithmetic.

A problem is ``a+b*c=`` (default) and its solution is written step by step, products first, then
the running sum, ending in the boxed answer::

    23+4*17=   ->   4*17=68;23+68=91;\\boxed{91}

Difficulty knobs: the number of operations (2: a+b*c, 3: a+b*c+d, 4: a+b*c+d*e, ...), the range
of addends / right factors and the range of left factors. The default (a, c < 50, b < 10) is the
demo's setting: a 0.8M-parameter model reaches ~50% greedy accuracy after 100 s of SFT, inside
PRIME's useful band; fewer operations or smaller ranges make it easier, more operations or larger
ranges harder.

The ``multistep`` preset chains six operations on single digits with every intermediate result
written out, so a solution is about twice as long and one wrong step (a product or a sum) makes the
answer wrong, at a place in the response that a process reward model can learn to find::

    3+4*7+3*2+5*9=   ->   4*7=28;3*2=6;5*9=45;3+28=31;31+6=37;37+45=82;\\boxed{82}

``build_toy_task`` writes sft.jsonl, rl.jsonl, eval.jsonl (disjoint prompts, all seeded) and a
character-level tokenizer built locally with the ``tokenizers`` library (no download).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

DATA_SOURCE = "toy_arith"

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
# Every character a prompt or solution can contain; the vocabulary is fixed so that all
# difficulties share one tokenizer.
CHARACTERS = "0123456789+*=;\\boxed{}"


@dataclass(frozen=True)
class ToyDifficulty:
    num_ops: int = 2  # operations per problem: "+" and "*" alternate, starting with "+"
    max_operand: int = 50  # addends and right factors lie in [0, max_operand)
    max_multiplier: int = 10  # left factors of "*" lie in [0, max_multiplier)

    def __post_init__(self):
        if self.num_ops < 1 or self.max_operand < 1 or self.max_multiplier < 1:
            raise ValueError(f"invalid toy difficulty {self}")

    @property
    def ops(self) -> list[str]:
        return ["+" if k % 2 == 0 else "*" for k in range(self.num_ops)]

    def operand_ranges(self) -> list[int]:
        ops = self.ops
        return [
            self.max_multiplier if i < len(ops) and ops[i] == "*" else self.max_operand
            for i in range(self.num_ops + 1)
        ]

    def num_problems(self) -> int:
        return math.prod(self.operand_ranges())


PRESETS = {
    "easy": ToyDifficulty(num_ops=2, max_operand=20, max_multiplier=5),
    "default": ToyDifficulty(),
    "hard": ToyDifficulty(num_ops=4, max_operand=50, max_multiplier=10),
    # a+b*c+d*e+f*g on single digits: seven written steps, the credit-assignment task of the README's
    # comparison (its greedy accuracy after the demo's SFT is about that of the default task's)
    "multistep": ToyDifficulty(num_ops=6, max_operand=10, max_multiplier=10),
}


def _difficulty(value: ToyDifficulty | str | dict | None) -> ToyDifficulty:
    if value is None:
        return ToyDifficulty()
    if isinstance(value, ToyDifficulty):
        return value
    if isinstance(value, str):
        if value not in PRESETS:
            raise ValueError(f"unknown toy difficulty {value!r}; presets: {sorted(PRESETS)}")
        return PRESETS[value]
    return ToyDifficulty(**value)


def format_prompt(operands: tuple[int, ...], difficulty: ToyDifficulty) -> str:
    text = str(operands[0])
    for op, x in zip(difficulty.ops, operands[1:]):
        text += f"{op}{x}"
    return text + "="


def solve(operands: tuple[int, ...], difficulty: ToyDifficulty) -> tuple[str, int]:
    """(step-by-step solution, answer): products left to right, then the running sum."""
    ops = difficulty.ops
    steps, terms = [], [operands[0]]
    i = 0
    while i < len(ops):
        if i + 1 < len(ops) and ops[i + 1] == "*":
            left, right = operands[i + 1], operands[i + 2]
            steps.append(f"{left}*{right}={left * right}")
            terms.append(left * right)
            i += 2
        else:
            terms.append(operands[i + 1])
            i += 1
    total = terms[0]
    for term in terms[1:]:
        steps.append(f"{total}+{term}={total + term}")
        total += term
    return ";".join(steps + [f"\\boxed{{{total}}}"]), total


def sample_problems(count: int, difficulty: ToyDifficulty, seed: int) -> list[tuple[int, ...]]:
    """``count`` distinct problems in a seeded order."""
    ranges = difficulty.operand_ranges()
    space = difficulty.num_problems()
    if count > space:
        raise ValueError(f"asked for {count} distinct problems but {difficulty} has only {space}")
    rng = random.Random(seed)
    if space <= 4 * count:  # dense: enumerate and draw without replacement
        return rng.sample(list(itertools.product(*(range(r) for r in ranges))), count)
    seen: dict[tuple[int, ...], None] = {}
    while len(seen) < count:
        seen.setdefault(tuple(rng.randrange(r) for r in ranges))
    return list(seen)


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast``: no chat template, eos/pad/bos set, and no
    special tokens added automatically (the trainer appends eos to SFT targets)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *CHARACTERS])}
    assert len(vocab) == len(SPECIAL_TOKENS) + len(CHARACTERS), "duplicate characters"
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one char per token
    core.decoder = decoders.Fuse()  # decode without spaces between characters
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


@dataclass
class ToyTask:
    sft: Path
    rl: Path
    eval: Path
    tokenizer: Path
    meta: Path


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_toy_task(
    out_dir: str | Path,
    seed: int = 0,
    num_sft: int = 10_000,
    num_rl: int = 4_000,
    num_eval: int = 500,
    difficulty: ToyDifficulty | str | dict | None = None,
) -> ToyTask:
    """Write the toy task's splits and tokenizer under ``out_dir``.

    The three splits are drawn from one seeded stream of distinct problems (eval first, then rl,
    then sft), so they never share a prompt and the eval split does not change with num_sft.
    """
    difficulty = _difficulty(difficulty)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    problems = sample_problems(num_eval + num_rl + num_sft, difficulty, seed)
    solved = [(format_prompt(p, difficulty), *solve(p, difficulty)) for p in problems]
    eval_rows = solved[:num_eval]
    rl_rows = solved[num_eval : num_eval + num_rl]
    sft_rows = solved[num_eval + num_rl :]
    task = ToyTask(out / "sft.jsonl", out / "rl.jsonl", out / "eval.jsonl", out / "tokenizer", out / "toy_task.json")
    _write_jsonl(task.sft, [{"prompt": p, "response": s, "answer": str(a)} for p, s, a in sft_rows])
    for path, rows in ((task.rl, rl_rows), (task.eval, eval_rows)):
        _write_jsonl(path, [{"prompt": p, "answer": str(a), "data_source": DATA_SOURCE} for p, _, a in rows])
    build_tokenizer().save_pretrained(task.tokenizer)
    longest = max(len(p) + len(s) for p, s, _ in solved) if solved else 0
    meta = {
        "seed": seed,
        "difficulty": asdict(difficulty),
        "num_sft": num_sft,
        "num_rl": num_rl,
        "num_eval": num_eval,
        "max_prompt_chars": max((len(p) for p, _, _ in solved), default=0),
        "max_response_chars": max((len(s) for _, s, _ in solved), default=0),
        "max_sequence_chars": longest,  # prompt + solution, one token per character (+ eos)
        "vocab_size": len(SPECIAL_TOKENS) + len(CHARACTERS),
    }
    task.meta.write_text(json.dumps(meta, indent=2) + "\n")
    return task
