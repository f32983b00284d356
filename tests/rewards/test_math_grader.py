"""Math verifier: answer extraction, math-verify equivalence, hard time limit, worker pool."""

import time

import pytest

from megatron_prime.rewards import (
    MathGraderPool,
    extract_final_answer,
    grade_math,
    score_batch,
)

B = "\\boxed"

# (response, ground truth, expected score). Responses are shaped like model outputs.
TABLE = [
    # integers and plain numbers
    (f"So the total is {B}{{42}}.", "42", 1.0),
    (f"{B}{{42}}", "43", 0.0),
    (f"{B}{{-7}}", "-7", 1.0),
    (f"{B}{{7}}", "-7", 0.0),
    (f"{B}{{1,000}}", "1000", 1.0),
    (f"{B}{{1{{,}}000}}", "1000", 1.0),
    (f"{B}{{10^{{10}}}}", "10000000000", 1.0),
    (f"{B}{{3.0}}", "3", 1.0),
    (f"{B}{{3.01}}", "3", 0.0),
    # fractions and decimals
    (f"{B}{{\\frac{{1}}{{2}}}}", "0.5", 1.0),
    (f"{B}{{\\dfrac12}}", "1/2", 1.0),
    (f"{B}{{\\tfrac{{3}}{{4}}}}", "\\frac{3}{4}", 1.0),
    (f"{B}{{-1/3}}", "-\\frac{1}{3}", 1.0),
    (f"{B}{{0.333}}", "\\frac{1}{3}", 0.0),
    (f"{B}{{\\frac{{2}}{{4}}}}", "\\frac{1}{2}", 1.0),
    (f"{B}{{\\frac{{1}}{{3}}}}", "\\frac{1}{2}", 0.0),
    # percentages
    (f"{B}{{50\\%}}", "50", 1.0),
    (f"{B}{{0.5}}", "50\\%", 1.0),
    (f"{B}{{25\\%}}", "50\\%", 0.0),
    # radicals, pi, symbolic expressions
    (f"{B}{{\\sqrt{{8}}}}", "2\\sqrt{2}", 1.0),
    (f"{B}{{\\frac{{1}}{{2}}\\sqrt{{3}}}}", "\\frac{\\sqrt{3}}{2}", 1.0),
    (f"{B}{{\\sqrt{{3}}}}", "\\sqrt{2}", 0.0),
    (f"{B}{{\\frac{{\\pi}}{{2}}}}", "\\pi/2", 1.0),
    (f"{B}{{(x+1)^2}}", "x^2+2x+1", 1.0),
    (f"{B}{{(x-1)^2}}", "x^2+2x+1", 0.0),
    (f"{B}{{2\\left(a+b\\right)}}", "2a+2b", 1.0),
    # units, degrees, dollars, text wrappers
    (f"{B}{{90^\\circ}}", "90", 1.0),
    (f"{B}{{5\\text{{ cm}}}}", "5", 1.0),
    (f"{B}{{\\$5}}", "5", 1.0),
    (f"{B}{{\\text{{12}}}}", "12", 1.0),
    # equations and assignments
    (f"{B}{{x=3}}", "3", 1.0),
    (f"{B}{{3}}", "x=3", 1.0),
    (f"{B}{{x=4}}", "3", 0.0),
    # intervals
    (f"{B}{{[1,2)}}", "[1,2)", 1.0),
    (f"{B}{{(1,2]}}", "[1,2)", 0.0),
    (f"{B}{{(-\\infty, 3]}}", "(-\\infty,3]", 1.0),
    (f"{B}{{(-\\infty,3)}}", "(-\\infty,3]", 0.0),
    # sets and lists of answers
    (f"{B}{{\\{{3,2,1\\}}}}", "\\{1,2,3\\}", 1.0),
    (f"{B}{{\\{{1,2\\}}}}", "\\{1,2,3\\}", 0.0),
    (f"{B}{{2, 1}}", "1, 2", 1.0),
    # tuples / points
    (f"{B}{{(1,2)}}", "(1,2)", 1.0),
    # matrices
    (f"{B}{{\\begin{{bmatrix}}1&2\\\\3&4\\end{{bmatrix}}}}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", 1.0),
    (f"{B}{{\\begin{{pmatrix}}1&2\\\\4&3\\end{{pmatrix}}}}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", 0.0),
    # multiple choice letters
    (f"{B}{{B}}", "B", 1.0),
    (f"{B}{{(B)}}", "B", 1.0),
    (f"{B}{{\\text{{(C)}}}}", "C", 1.0),
    (f"{B}{{C}}", "B", 0.0),
    (f"{B}{{A}}", "(A)", 1.0),
    # nested braces, several boxes (the last one counts), \fbox
    (f"{B}{{\\frac{{\\sqrt{{2}}}}{{2}}}}", "\\frac{\\sqrt{2}}{2}", 1.0),
    (f"First {B}{{3}}, corrected: {B}{{5}}", "5", 1.0),
    (f"First {B}{{5}}, corrected: {B}{{3}}", "5", 0.0),
    ("\\fbox{12}", "12", 1.0),
    (f"{B} 7", "7", 1.0),
    # inline math delimiters around the box
    (f"$$ {B}{{\\frac{{3}}{{2}}}} $$", "1.5", 1.0),
    (f"\\[{B}{{2^{{10}}}}\\]", "1024", 1.0),
    # fallbacks without a box
    ("The answer is 17.", "17", 1.0),
    ("Therefore, the final answer is $\\frac{2}{3}$. I hope it is correct.", "\\frac{2}{3}", 1.0),
    ("Final Answer: 8", "8", 1.0),
    ("**Answer:** 12", "12", 1.0),
    ("The answer is (D)", "D", 1.0),
    ("The answer is 16.", "17", 0.0),
    # malformed responses
    ("", "5", 0.0),
    ("I think it is 5 but I am not sure", "5", 0.0),
    (f"{B}{{5", "5", 0.0),
    (f"{B}{{}}", "5", 0.0),
    (f"{B}{{   }}", "0", 0.0),
    (f"{B}{{\\frac{{1}}{{2}}", "\\frac{1}{2}", 0.0),
    (f"{B}{{5}} and then {B}{{", "5", 0.0),
    ("}}}}{{{{ \\boxed", "5", 0.0),
    (f"{B}{{\\frac{{}}{{}}}}", "1", 0.0),
    # ground truth given as a full solution with a box (Minerva style)
    (f"{B}{{9}}", "Adding gives $\\boxed{9}$.", 1.0),
]


def test_table_is_large_and_balanced():
    assert len(TABLE) >= 60
    assert sum(s == 1.0 for *_, s in TABLE) >= 25 and sum(s == 0.0 for *_, s in TABLE) >= 25


def test_table_through_score_batch():
    items = [("math", response, truth) for response, truth, _ in TABLE]
    scores = score_batch(items, num_workers=2)
    wrong = [(r, t, want, got) for (r, t, want), got in zip(TABLE, scores) if got != want]
    assert not wrong, "\n".join(f"{r!r} vs {t!r}: want {w}, got {g}" for r, t, w, g in wrong)


@pytest.mark.parametrize(
    "response, answer",
    [
        (f"x {B}{{\\frac{{a}}{{b_{{1}}}}}} y", "\\frac{a}{b_{1}}"),
        (f"{B}{{1}} then {B}{{2}}", "2"),
        (f"{B}{{ 3 }}", "3"),
        (f"{B}{{\\{{1\\}}}}", "\\{1\\}"),  # escaped braces do not close the box
        (f"{B}{{4", None),
        (f"{B}{{}}", None),
        ("The answer is 5. Next, we check it.", "5"),
        ("The answer is $x^2$ since ...", "x^2"),
        ("Answer: 2.5.", "2.5"),
        ("no answer here", None),
        ("", None),
    ],
)
def test_extract_final_answer(response, answer):
    assert extract_final_answer(response) == answer


def test_grade_math_single_call():
    assert grade_math("so $\\boxed{\\frac{6}{8}}$", "0.75") == 1.0
    assert grade_math("so $\\boxed{0.7}$", "0.75") == 0.0


def test_hung_answer_is_killed_and_pool_keeps_working():
    # A tower of exponents keeps sympy busy for seconds; with math-verify's own (soft) limit set
    # above the hard limit, only killing the worker can stop it.
    slow = ("\\boxed{1}", "9^{9^{9}}")
    with MathGraderPool(num_workers=2) as pool:
        pool.grade([("\\boxed{1}", "1")])  # workers started
        start = time.monotonic()
        scores = pool.grade([slow, ("\\boxed{2}", "2"), slow, ("\\boxed{3}", "3")], timeout_s=1.0, soft_timeout_s=30)
        elapsed = time.monotonic() - start
        assert scores == [0.0, 1.0, 0.0, 1.0]
        assert pool.timeouts == 2
        # Two kills after 1 s each plus worker restarts (~1 s each, more on a busy machine);
        # without the hard limit the two answers would run for at least their 30 s soft limits.
        assert elapsed < 20.0, elapsed
        assert pool.grade([("\\boxed{4}", "4")] * 4) == [1.0] * 4


def test_worker_that_dies_mid_answer_scores_zero_and_is_replaced():
    import signal
    import threading

    with MathGraderPool(num_workers=1) as pool:
        pool.grade([("\\boxed{1}", "1")])
        victim = pool._workers[0].proc
        # Kill the worker (as the OOM killer would) while it is busy with a slow answer.
        threading.Timer(0.5, victim.send_signal, (signal.SIGKILL,)).start()
        start = time.monotonic()
        assert pool.grade([("\\boxed{1}", "9^{9^{9}}")], timeout_s=20, soft_timeout_s=20) == [0.0]
        assert time.monotonic() - start < 5.0
        assert pool.crashes == 1 and pool.timeouts == 0
        assert pool._workers[0].proc is not victim
        assert pool.grade([("\\boxed{7}", "7")]) == [1.0]
