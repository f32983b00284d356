"""Contract test: what megatron_prime.rollout uses of SGLang exists, with those parameters,
in the pinned release's source. Runs without a GPU and without installing SGLang: the
wheel is fetched with ``pip download --no-deps`` (cached) and read as a zip.

Both directions are checked: every entry of the tables in ``sglang_engine.py`` exists in
the release, and every SGLang call, import, route and request key in our modules is in
the tables (so the tables cannot drift from the code). No PyPI means failure, not a skip.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from megatron_prime.rollout import sglang_engine, sglang_remote
from megatron_prime.rollout.sglang_engine import (
    SGLANG_API_USED,
    SGLANG_HTTP_USED,
    SGLANG_MEMORY_TAGS,
    SGLANG_SAMPLING_PARAMS_USED,
    SGLANG_VERSION,
)

WHEEL_CACHE = Path(os.environ.get("MEGATRON_PRIME_WHEEL_CACHE", "~/.cache/megatron-prime/wheels")).expanduser()
OUR_MODULES = [Path(sglang_engine.__file__), Path(sglang_remote.__file__)]


# ---- reading a release from its wheel --------------------------------------------------


def fetch_wheel(package: str, version: str) -> Path:
    """The cached wheel, or download it (no dependencies, no install)."""
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    found = sorted(WHEEL_CACHE.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{package}=={version}", "-d", str(WHEEL_CACHE), "--quiet"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        found = sorted(WHEEL_CACHE.glob(pattern))
        if proc.returncode != 0 or not found:
            pytest.fail(f"could not download {package}=={version} (PyPI needed):\n{proc.stderr[-2000:]}")
    return found[-1]


class Release:
    """Python sources of one package release, parsed on demand from its wheel."""

    def __init__(self, wheel: Path, package: str):
        self.zip = zipfile.ZipFile(wheel)
        self.package = package
        self._trees: dict[str, ast.Module] = {}

    def text(self, path: str) -> str:
        try:
            return self.zip.read(f"{self.package}/{path}").decode()
        except KeyError:
            raise AssertionError(f"{self.package}/{path} is not in the {self.package} release") from None

    def tree(self, path: str) -> ast.Module:
        if path not in self._trees:
            self._trees[path] = ast.parse(self.text(path))
        return self._trees[path]

    def glob(self, prefix: str) -> list[str]:
        start = f"{self.package}/{prefix}"
        return [n[len(self.package) + 1 :] for n in self.zip.namelist() if n.startswith(start) and n.endswith(".py")]

    def find(self, path: str, qualname: str) -> ast.AST:
        """The class / function / assignment ``qualname`` (dotted) defined in ``path``."""
        node: ast.AST = self.tree(path)
        for part in qualname.split("."):
            match = None
            for child in getattr(node, "body", []):
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and child.name == part:
                    match = child
                elif isinstance(child, ast.Assign) and any(getattr(t, "id", None) == part for t in child.targets):
                    match = child
            assert match is not None, f"{qualname} is not defined in {self.package}/{path}"
            node = match
        return node


def parameters(fn: ast.AST) -> tuple[set[str], bool]:
    """(parameter names a caller may pass by keyword, whether **kwargs is accepted)."""
    assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)), f"{getattr(fn, 'name', fn)} is not a function"
    args = fn.args
    names = {a.arg for a in args.args + args.kwonlyargs} - {"self", "cls"}
    return names, args.kwarg is not None


def class_fields(cls: ast.ClassDef) -> set[str]:
    return {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}


def check_api_table(release: Release, table: dict[str, tuple[str, ...]], kwargs_fields: dict[str, set[str]]) -> list[str]:
    """Problems with ``table`` ("path:Qual.name" -> keywords) against ``release``.
    ``kwargs_fields`` gives, for callables taking ``**kwargs`` that we fill, the names
    those kwargs accept."""
    problems = []
    for key, keywords in table.items():
        path, qualname = key.split(":")
        try:
            fn = release.find(path, qualname)
        except AssertionError as exc:
            problems.append(str(exc))
            continue
        if isinstance(fn, ast.ClassDef):  # a constructor: its __init__, or a struct's fields
            init = next((c for c in fn.body if isinstance(c, ast.FunctionDef) and c.name == "__init__"), None)
            names, has_kwargs = parameters(init) if init else (class_fields(fn), False)
        else:
            names, has_kwargs = parameters(fn)
        for kw in keywords:
            if kw in names:
                continue
            if has_kwargs and key in kwargs_fields and kw in kwargs_fields[key]:
                continue
            problems.append(f"{key} has no parameter '{kw}' (has {sorted(names)})")
    return problems


# ---- what our modules call ---------------------------------------------------------------


def our_sglang_calls(paths: list[Path], release: Release) -> tuple[dict[str, set[str]], list[str]]:
    """Walk our modules: every call into SGLang as "path:Qual.name" -> keywords used,
    plus problems (positional arguments, unknown imports)."""
    calls: dict[str, set[str]] = {}
    problems: list[str] = []
    for path in paths:
        tree = ast.parse(path.read_text())
        imported: dict[str, str] = {}  # local name -> "file:Name"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sglang."):
                file = node.module.removeprefix("sglang.").replace(".", "/") + ".py"
                for alias in node.names:
                    imported[alias.asname or alias.name] = f"{file}:{alias.name}"
                    try:
                        release.find(file, alias.name)
                    except AssertionError as exc:
                        problems.append(f"{path.name}: import {node.module}.{alias.name}: {exc}")

        def is_class(ref: str) -> bool:
            file, name = ref.split(":")
            return isinstance(release.find(file, name), ast.ClassDef)

        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            instances: dict[str, str] = {}  # local var -> class ref, from `x = Class(...)`
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                    func = node.value.func
                    if isinstance(func, ast.Name) and func.id in imported and is_class(imported[func.id]):
                        for target in node.targets:
                            if isinstance(target, ast.Name):
                                instances[target.id] = imported[func.id]
            for node in ast.walk(fn):
                if not isinstance(node, ast.Call):
                    continue
                target = resolve_call(node.func, imported, instances, is_class)
                if target is None:
                    continue
                if node.args:
                    problems.append(f"{path.name}:{node.lineno}: {target} called with positional arguments")
                calls.setdefault(target, set()).update(k.arg for k in node.keywords if k.arg is not None)
    return calls, problems


def resolve_call(func: ast.AST, imported, instances, is_class) -> str | None:
    engine = "srt/entrypoints/engine.py:Engine"
    if isinstance(func, ast.Name) and func.id in imported:  # Class(...) or function(...)
        ref = imported[func.id]
        return f"{ref}.__init__" if is_class(ref) else ref
    if not isinstance(func, ast.Attribute):
        return None
    owner = func.value
    if isinstance(owner, ast.Name) and owner.id == "sglang":  # sglang.Engine(...)
        assert func.attr == "Engine", f"unexpected sglang.{func.attr}"
        return f"{engine}.__init__"
    if isinstance(owner, ast.Attribute) and owner.attr == "_engine":  # self._engine.method(...)
        return f"{engine}.{func.attr}"
    if isinstance(owner, ast.Name) and owner.id in imported:  # Class.staticmethod(...)
        return f"{imported[owner.id]}.{func.attr}"
    if isinstance(owner, ast.Name) and owner.id in instances:  # instance.method(...)
        return f"{instances[owner.id]}.{func.attr}"
    if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id in imported:
        return f"{imported[owner.func.id]}.{func.attr}"  # Class(...).method(...)
    return None


def dict_keys(node: ast.AST, local_dicts: dict[str, ast.Dict]) -> set[str] | None:
    if isinstance(node, ast.Name):
        node = local_dicts.get(node.id)
    if isinstance(node, ast.Dict):
        return {k.value for k in node.keys if isinstance(k, ast.Constant)}
    return None


def our_http_usage(path: Path) -> tuple[dict[str, set[str]], set[str]]:
    """Routes named in ``path`` -> body keys sent with them, and every route-like string."""
    tree = ast.parse(path.read_text())
    routes: dict[str, set[str]] = {}
    route_re = re.compile(r"^/[a-z_]+$")
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        local_dicts = {
            t.id: n.value
            for n in ast.walk(fn)
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
            args = list(call.args)
            named = [a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            for route in (r for r in named if route_re.match(r)):
                keys = set()
                for a in args:
                    keys |= dict_keys(a, local_dicts) or set()
                routes.setdefault(route, set()).update(keys)
    return routes, {s for s in strings if route_re.match(s)}


# ---- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def release() -> Release:
    return Release(fetch_wheel("sglang", SGLANG_VERSION), "sglang")


def server_args_fields(release: Release) -> set[str]:
    fields = set()
    for path in release.glob("srt/arg_groups/fields/"):
        for node in ast.walk(release.tree(path)):
            if isinstance(node, ast.ClassDef):
                fields |= class_fields(node)
    return fields


def test_pinned_release_is_the_wheel(release):
    assert any(n.startswith(f"sglang-{SGLANG_VERSION}.dist-info/") for n in release.zip.namelist())
    # sglang.Engine, as we reach it, is the class in srt/entrypoints/engine.py.
    assert 'Engine = LazyImport("sglang.srt.entrypoints.engine", "Engine")' in release.text("__init__.py")


def test_every_api_we_list_exists_with_our_keywords(release):
    kwargs_fields = {"srt/entrypoints/engine.py:Engine.__init__": server_args_fields(release)}
    assert len(kwargs_fields["srt/entrypoints/engine.py:Engine.__init__"]) > 100  # found ServerArgs
    assert check_api_table(release, SGLANG_API_USED, kwargs_fields) == []


def test_our_modules_call_only_what_the_table_lists(release):
    calls, problems = our_sglang_calls(OUR_MODULES, release)
    assert problems == []
    unlisted = {k: v for k, v in calls.items() if k not in SGLANG_API_USED}
    assert unlisted == {}, "calls missing from SGLANG_API_USED"
    extra_kw = {k: v - set(SGLANG_API_USED[k]) for k, v in calls.items() if v - set(SGLANG_API_USED[k])}
    assert extra_kw == {}, "keywords missing from SGLANG_API_USED"
    assert set(SGLANG_API_USED) - set(calls) == set(), "table entries no module uses"


def test_sampling_params_keys(release):
    srt_fields = class_fields(release.find("srt/sampling/sampling_params.py", "SamplingParams"))
    assert set(SGLANG_SAMPLING_PARAMS_USED) <= srt_fields
    schema = release.find("api/v1/api_types.py", "_FIELDS_SamplingParams")  # the HTTP JSON schema
    assert set(SGLANG_SAMPLING_PARAMS_USED) <= set(ast.literal_eval(schema.value))
    # Our builder writes only listed keys.
    fn = next(
        n for n in ast.walk(ast.parse(OUR_MODULES[0].read_text()))
        if isinstance(n, ast.FunctionDef) and n.name == "sglang_sampling_params"
    )
    written = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Dict):
            written |= {k.value for k in node.keys}
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
            written.add(node.slice.value)
    assert written == set(SGLANG_SAMPLING_PARAMS_USED)


def test_memory_tags(release):
    tags = {
        node.value.value
        for node in release.tree("srt/constants.py").body
        if isinstance(node, ast.Assign) and node.targets[0].id.startswith("GPU_MEMORY_TYPE_")
    }
    assert set(SGLANG_MEMORY_TAGS) <= tags


def http_routes(release: Release) -> dict[str, set[str]]:
    """route -> HTTP methods, from the FastAPI decorators of the http server."""
    routes: dict[str, set[str]] = {}
    for node in ast.walk(release.tree("srt/entrypoints/http_server.py")):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)):
                continue
            if not (isinstance(dec.func.value, ast.Name) and dec.func.value.id == "app") or not dec.args:
                continue
            if not isinstance(dec.args[0], ast.Constant):
                continue
            verb = dec.func.attr
            if verb == "api_route":
                methods = next((ast.literal_eval(k.value) for k in dec.keywords if k.arg == "methods"), ["GET"])
            else:
                methods = [verb.upper()]
            routes.setdefault(dec.args[0].value, set()).update(methods)
    return routes


def test_http_routes_and_bodies_exist(release):
    routes = http_routes(release)
    for route, (method, request_class, keys) in SGLANG_HTTP_USED.items():
        assert route in routes, f"{route} is not served by SGLang {SGLANG_VERSION}"
        assert method in routes[route], f"{route} does not accept {method} (accepts {routes[route]})"
        if request_class is not None:
            fields = class_fields(release.find("srt/managers/io_struct.py", request_class))
            assert set(keys) <= fields, f"{request_class} lacks {set(keys) - fields}"
    # /generate first checks the body against the v1 JSON schema, then FastAPI parses it into
    # GenerateReqInput (checked above). A key the schema does not list (return_routed_experts in
    # 0.5.23) gets through only because the schema ignores unknown keys: check that it says so.
    schema = release.find("api/v1/api_types.py", "GenerateRequest")
    unlisted = set(SGLANG_HTTP_USED["/generate"][2]) - class_fields(schema)
    assert unlisted <= {"return_routed_experts"}, f"/generate keys outside the v1 schema: {unlisted}"
    assert not unlisted or "unknown keys ignored" in (ast.get_docstring(schema) or "")


def test_our_remote_module_uses_only_listed_routes_and_keys():
    used, route_strings = our_http_usage(Path(sglang_remote.__file__))
    assert route_strings == set(SGLANG_HTTP_USED), "route strings in sglang_remote.py vs SGLANG_HTTP_USED"
    for route, keys in used.items():
        assert keys <= set(SGLANG_HTTP_USED[route][2]), f"{route} body sends unlisted keys {keys}"


def _source(release: Release, path: str, qualname: str) -> str:
    return ast.unparse(release.find(path, qualname))


def test_broadcast_group_is_formed_as_we_mirror_it(release):
    """``sglang_remote.join_broadcast_group`` mirrors the server's side of the weight group."""
    server = _source(release, "srt/utils/common.py", "init_custom_process_group")
    assert "rendezvous(init_method, rank, world_size" in server
    assert "PrefixStore(group_name, store)" in server
    assert "_new_process_group_helper(world_size, rank, []" in server
    assert "_world.pg_group_ranks[pg] = {i: i for i in range(world_size)}" in server
    # Each server TP rank joins as rank_offset + its TP rank; we send from rank 0.
    join = _source(release, "srt/model_executor/model_runner_components/weight_updater.py",
                   "WeightUpdater.init_weights_update_group")
    assert "rank = rank_offset + self.tp_rank" in join
    assert "init_method=na.to_tcp()" in join


def test_flattened_bucket_layout_is_ours(release):
    """The server allocates a received bucket as the tensors' bytes back to back, in the order
    of ``names``, and receives it with one broadcast from rank 0: ``flatten_bucket``'s layout."""
    receive = _source(release, "srt/model_executor/model_runner_components/weight_updater.py",
                      "WeightUpdater._receive_bucketed_weights_from_distributed")
    assert "FlattenedTensorBucket.empty(names, dtypes, shapes" in receive
    assert "torch.distributed.broadcast(flattened_tensor, src=0" in receive
    empty = _source(release, "srt/weight_sync/tensor_bucket.py", "FlattenedTensorBucket.empty")
    assert "size = shape.numel() * dtype.itemsize" in empty
    assert "FlattenedTensorMetadata(name, shape, dtype, offset, offset + size, size)" in empty
    assert "offset += size" in empty
    assert "torch.empty(offset, dtype=torch.uint8" in empty
