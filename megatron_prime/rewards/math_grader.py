"""Math verifier: extract the final answer, decide equivalence with math-verify.

Extraction is ours (it decides *which* answer a response commits to); equivalence is entirely
math-verify's (fractions, decimals, percentages, intervals, sets, matrices, LaTeX variants,
multiple-choice letters).

``grade_math_inprocess`` runs in the calling process and only has math-verify's own
SIGALRM-based soft limit (main thread only; sympy stuck inside C code ignores it).
``grade_math`` (in __init__) goes through ``MathGraderPool``, whose worker processes are killed
when an answer exceeds the hard limit; that is what the trainer uses.
"""

from __future__ import annotations

import re
import threading

_BOX_START = re.compile(r"\\(?:boxed|fbox)\b\s*")
_ANSWER_PHRASE = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(?P<ans>[^\n]+)", re.IGNORECASE
)


def _balanced_group(text: str, start: int) -> str | None:
    """Contents of the brace group opening at text[start] == '{', or None if it never closes."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # an escaped brace \{ \} does not open or close a group
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> tuple[bool, str | None]:
    """(found, content) for the last \\boxed / \\fbox. A last box that is malformed (unbalanced,
    e.g. a truncated response) gives (True, None): it is the answer attempt, and it is broken;
    we do not fall back to an earlier, intermediate box."""
    starts = list(_BOX_START.finditer(text))
    if not starts:
        return False, None
    end = starts[-1].end()
    if end < len(text) and text[end] == "{":
        content = _balanced_group(text, end)
    else:  # "\boxed 5": one token
        match = re.match(r"[^\s$]+", text[end:])
        content = match.group(0) if match else None
    return True, content


def _clean_phrase_answer(ans: str) -> str:
    ans = ans.strip().strip("*").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if ans.startswith(left) and right in ans[len(left) :]:
            return ans[len(left) : ans.index(right, len(left))].strip()
    # Plain text: the answer ends with its sentence ("is 42. Next we ..."), or at the line end.
    ans = re.split(r"\.(?:\s|$)", ans, maxsplit=1)[0]
    return ans.strip().strip("*").strip()


def extract_final_answer(response: str) -> str | None:
    """The answer a response commits to: the last \\boxed{...} (nested braces allowed), else the
    last "The answer is ..." / "Final answer: ..." / "Answer: ..." phrase; None if neither."""
    found, content = last_boxed(response)
    if found:
        return content.strip() if content and content.strip() else None
    matches = list(_ANSWER_PHRASE.finditer(response))
    if not matches:
        return None
    ans = _clean_phrase_answer(matches[-1].group("ans"))
    return ans or None


def _ground_truth_answer(ground_truth: str) -> str | None:
    # Some sources store a whole solution ("... so \boxed{7}") as the ground truth.
    found, content = last_boxed(ground_truth)
    if found:
        return content.strip() if content else None
    return ground_truth.strip() or None


_mv = None


def _math_verify():
    global _mv
    if _mv is None:
        import math_verify  # ~0.3 s; imported on first use so workers and tools stay light

        _mv = math_verify
    return _mv


def _parse(mv, answer: str, timeout: int | None):
    config = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
    return mv.parse("\\boxed{" + answer + "}", extraction_config=config, parsing_timeout=timeout)


def grade_math_inprocess(response: str, ground_truth: str, soft_timeout_s: int = 5) -> float:
    """1.0 if the response's final answer is equivalent to the ground truth, else 0.0."""
    answer = extract_final_answer(response)
    gold = _ground_truth_answer(ground_truth)
    if answer is None or gold is None:
        return 0.0
    # math-verify's limit uses SIGALRM, which only the main thread may set.
    timeout = soft_timeout_s if threading.current_thread() is threading.main_thread() else None
    mv = _math_verify()
    gold_parsed = _parse(mv, gold, timeout)
    answer_parsed = _parse(mv, answer, timeout)
    if not gold_parsed or not answer_parsed:
        return 0.0
    return 1.0 if mv.verify(gold_parsed, answer_parsed, timeout_seconds=timeout) else 0.0
