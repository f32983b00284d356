"""Opt-in contract test for the vllm adapter (set MEGATRON_PRIME_VLLM_CONTRACT=1): the
vLLM wheel is ~340 MB, too much to fetch on every CI run for an optional extra. It checks
``vllm_engine.VLLM_API_USED`` / ``VLLM_FIELDS_READ`` against the pinned release's source,
and that vllm_engine.py calls nothing of vLLM outside the table."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from megatron_prime.rollout import vllm_engine
from megatron_prime.rollout.vllm_engine import VLLM_API_USED, VLLM_FIELDS_READ, VLLM_VERSION
from tests.test_sglang_contract import Release, check_api_table, class_fields, fetch_wheel, parameters

pytestmark = pytest.mark.skipif(
    os.environ.get("MEGATRON_PRIME_VLLM_CONTRACT") != "1", reason="opt-in: MEGATRON_PRIME_VLLM_CONTRACT=1"
)


@pytest.fixture(scope="module")
def release() -> Release:
    return Release(fetch_wheel("vllm", VLLM_VERSION), "vllm")


def test_table_against_release(release):
    engine_args = class_fields(release.find("engine/arg_utils.py", "EngineArgs"))
    problems = check_api_table(release, VLLM_API_USED, {"entrypoints/llm.py:LLM.__init__": engine_args})
    assert problems == []
    for key, attrs in VLLM_FIELDS_READ.items():
        path, name = key.split(":")
        cls = release.find(path, name)
        init = next((c for c in cls.body if isinstance(c, ast.FunctionDef) and c.name == "__init__"), None)
        known = class_fields(cls) | (parameters(init)[0] if init else set())
        assert set(attrs) <= known, f"{key} lacks {set(attrs) - known}"
    exports = release.text("__init__.py")
    assert '"LLM": ".entrypoints.llm:LLM"' in exports
    assert '"SamplingParams": ".sampling_params:SamplingParams"' in exports


def test_module_calls_only_listed_api():
    tree = ast.parse(Path(vllm_engine.__file__).read_text())
    calls: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner, attr = node.func.value, node.func.attr
        if isinstance(owner, ast.Name) and owner.id == "vllm":
            key = {"LLM": "entrypoints/llm.py:LLM.__init__", "SamplingParams": "sampling_params.py:SamplingParams"}[attr]
        elif isinstance(owner, ast.Attribute) and owner.attr == "_llm":
            key = f"entrypoints/llm.py:LLM.{attr}"
        else:
            continue
        assert not node.args, f"line {node.lineno}: {key} called with positional arguments"
        calls.setdefault(key, set()).update(k.arg for k in node.keywords if k.arg is not None)
    assert set(calls) == set(VLLM_API_USED)
    for key, keywords in calls.items():
        assert keywords <= set(VLLM_API_USED[key]), f"{key}: unlisted keywords {keywords - set(VLLM_API_USED[key])}"
