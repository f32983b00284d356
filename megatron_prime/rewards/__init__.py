"""Outcome verifiers (paper §2 step 1): math answer equivalence and sandboxed code tests.

Imports neither torch.distributed nor Megatron; safe to use from any process.
"""

from megatron_prime.rewards.code_grader import InvalidTestsError, extract_code, grade_code, parse_tests
from megatron_prime.rewards.math_grader import extract_final_answer, grade_math_inprocess
from megatron_prime.rewards.math_pool import MathGraderPool, MathWorkerError
from megatron_prime.rewards.registry import (
    UnknownVerifierError,
    known_verifiers,
    register_data_source,
    register_verifier,
    verifier_for,
)
from megatron_prime.rewards.sandbox import (
    UNSAFE_ENV,
    SandboxLimits,
    SandboxUnavailableError,
    check_sandbox,
    run_tests,
)
from megatron_prime.rewards.scoring import close_shared_pool, grade_math, score_batch, shared_math_pool

__all__ = [
    "MathGraderPool",
    "MathWorkerError",
    "SandboxLimits",
    "SandboxUnavailableError",
    "InvalidTestsError",
    "UNSAFE_ENV",
    "UnknownVerifierError",
    "check_sandbox",
    "close_shared_pool",
    "extract_code",
    "extract_final_answer",
    "grade_code",
    "grade_math",
    "grade_math_inprocess",
    "known_verifiers",
    "parse_tests",
    "register_data_source",
    "register_verifier",
    "run_tests",
    "score_batch",
    "shared_math_pool",
    "verifier_for",
]
