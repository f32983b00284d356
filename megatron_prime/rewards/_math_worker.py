"""A math grading worker process (started by MathGraderPool, not by hand).

Protocol over pipes, one JSON object per line:
  out: {"ready": true} once math-verify is imported
  in:  {"i": id, "r": response, "g": ground_truth, "t": soft_timeout_s}
  out: {"i": id, "s": score}
"""

import json
import logging
import os
import sys


def main() -> None:
    # Keep the protocol channel private: anything printed by libraries goes to stderr.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    # Timeouts are expected and counted by the pool; math-verify would warn on each one.
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    from megatron_prime.rewards.math_grader import grade_math_inprocess

    # The first grading compiles parsers lazily (~0.1 s, far more on a loaded machine); pay for
    # it before reporting ready, so no real answer's deadline is charged for it.
    grade_math_inprocess("\\boxed{1}", "1")
    channel.write('{"ready": true}\n')
    for line in sys.stdin:
        job = json.loads(line)
        try:
            score = grade_math_inprocess(job["r"], job["g"], soft_timeout_s=job["t"])
        except Exception:  # any failure inside sympy/math-verify is a wrong answer, not a crash
            score = 0.0
        channel.write(json.dumps({"i": job["i"], "s": score}) + "\n")


if __name__ == "__main__":
    main()
