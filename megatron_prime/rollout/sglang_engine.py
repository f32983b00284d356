"""SGLang rollout engine, colocated with training (the production default on GPU).

One ``sglang.Engine`` per group of ``rollout.tp`` trainer ranks, on those ranks' GPUs,
owned by the group's rank 0 (the leader). Weights arrive as CUDA-IPC handles: every rank
of the group flattens each bucket of the bridge's stream on its own GPU, serializes the
IPC handle, and the leader hands the engine one payload per TP rank
(``update_weights_from_tensor(load_format="flattened_bucket")``), inside
``begin_weight_update`` / ``end_weight_update``, then flushes the prefix cache.

Log-probs: SGLang's standard sampling path returns log(softmax(logits / T)) before its
top-k/top-p step (srt/layers/sampler.py; greedy: log_softmax(logits)), which is the
package convention (base.py), as long as SGLANG_RETURN_ORIGINAL_LOGPROB is unset.

Written against SGLang ``SGLANG_VERSION``. The engine itself has not been run (it needs
SGLang's full CUDA stack); ``serialize_bucket``'s payload has been opened on a GPU by
SGLang's own deserializer in another process (tests/rollout/test_gpu.py). Every SGLang
name and keyword used here is listed in the tables below, and
``tests/rollout/test_sglang_contract.py`` checks them against that release's source (and that
this file and ``sglang_remote.py`` use nothing outside the tables). SGLang is imported
lazily, so this module imports without it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from .base import (
    MEMORY_TAGS,
    Response,
    RolloutEngine,
    RolloutError,
    SamplingParams,
    check_prompts,
    describe_request,
)
from .weight_buckets import DEFAULT_BUCKET_BYTES, iter_buckets

SGLANG_VERSION = "0.5.23"

# Every SGLang callable this package uses: "path in the wheel under sglang/:qualified
# name" -> the keyword arguments we pass (we pass everything by keyword: 0.5.18 and
# 0.5.21 inserted parameters mid-signature). Engine.__init__ takes **server_args, so its
# keywords are checked against ServerArgs' fields instead.
SGLANG_API_USED: dict[str, tuple[str, ...]] = {
    "srt/entrypoints/engine.py:Engine.__init__": (
        "model_path", "tp_size", "base_gpu_id", "gpu_id_step", "random_seed",
        "mem_fraction_static", "enable_memory_saver", "dtype", "port", "nccl_port",
        "log_level", "enable_deterministic_inference", "enable_lora", "max_lora_rank", "lora_target_modules",
        "max_loras_per_batch", "enable_return_routed_experts",
    ),
    "srt/entrypoints/engine.py:Engine.generate": ("input_ids", "sampling_params", "return_logprob", "lora_path",
                                                  "return_routed_experts", "routed_experts_start_len"),
    "srt/entrypoints/engine.py:Engine.load_lora_adapter_from_tensors": ("lora_name", "tensors", "config_dict"),
    "srt/entrypoints/engine.py:Engine.unload_lora_adapter": ("lora_name",),
    "srt/entrypoints/engine.py:Engine.begin_weight_update": (),
    "srt/entrypoints/engine.py:Engine.end_weight_update": (),
    "srt/entrypoints/engine.py:Engine.update_weights_from_tensor": ("named_tensors", "load_format", "flush_cache"),
    "srt/entrypoints/engine.py:Engine.flush_cache": (),
    "srt/entrypoints/engine.py:Engine.release_memory_occupation": ("tags",),
    "srt/entrypoints/engine.py:Engine.resume_memory_occupation": ("tags",),
    "srt/entrypoints/engine.py:Engine.shutdown": (),
    "srt/weight_sync/tensor_bucket.py:FlattenedTensorBucket.__init__": ("named_tensors",),
    "srt/weight_sync/tensor_bucket.py:FlattenedTensorBucket.get_flattened_tensor": (),
    "srt/weight_sync/tensor_bucket.py:FlattenedTensorBucket.get_metadata": (),
    "srt/utils/common.py:MultiprocessingSerializer.serialize": ("obj", "output_str"),
    "srt/utils/patch_torch.py:monkey_patch_torch_reductions": (),
}

# Keys of the per-request sampling-params dict (srt/sampling/sampling_params.py
# SamplingParams; over HTTP also api/v1/api_types.py). Unknown keys are a TypeError there.
SGLANG_SAMPLING_PARAMS_USED = (
    "max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "n", "sampling_seed",
)

# Memory tags for release/resume (srt/constants.py GPU_MEMORY_TYPE_*).
SGLANG_MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")

# HTTP routes the remote engine uses (srt/entrypoints/http_server.py), with the request
# class (srt/managers/io_struct.py, or the /generate JSON schema) and the body keys sent.
SGLANG_HTTP_USED: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "/generate": ("POST", "GenerateReqInput", ("input_ids", "sampling_params", "return_logprob",
                                               "return_routed_experts", "routed_experts_start_len")),
    "/health": ("GET", None, ()),
    "/flush_cache": ("POST", None, ()),
    "/begin_weight_update": ("POST", "BeginWeightUpdateReqInput", ()),
    "/end_weight_update": ("POST", "EndWeightUpdateReqInput", ()),
    "/init_weights_update_group": (
        "POST", "InitWeightsUpdateGroupReqInput",
        ("master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"),
    ),
    "/update_weights_from_distributed": (
        "POST", "UpdateWeightsFromDistributedReqInput",
        ("names", "dtypes", "shapes", "group_name", "flush_cache", "load_format"),
    ),
    "/destroy_weights_update_group": ("POST", "DestroyWeightsUpdateGroupReqInput", ("group_name",)),
}


def import_sglang():
    """The pinned SGLang, or a clear error naming the extra to install."""
    try:
        import sglang
    except ImportError as exc:
        raise ImportError(
            f"the sglang rollout engine needs sglang=={SGLANG_VERSION} "
            "(pip install 'megatron-prime[gpu]' on a CUDA machine)"
        ) from exc
    if getattr(sglang, "__version__", SGLANG_VERSION) != SGLANG_VERSION:
        raise ImportError(f"sglang {sglang.__version__} is installed; this adapter is pinned to {SGLANG_VERSION}")
    return sglang


def sglang_sampling_params(sampling: SamplingParams, prompt_index: int, sample_index: int):
    """SGLang's per-request sampling dict for one sample (n is expanded by us, so that
    every sample gets its own seed and the output order is ours). ``sampling_seed`` is
    honoured only by an engine started with ``enable_deterministic_inference``."""
    params = {
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,
        "stop_token_ids": list(sampling.stop_token_ids),
        "n": 1,
    }
    if sampling.seed is not None:
        params["sampling_seed"] = sampling.seed_of(prompt_index, sample_index)
    return params


def expand_requests(prompts: list[list[int]], sampling: SamplingParams):
    """(input_ids, sampling dicts, prompt index per row), rows prompt-major."""
    rows = [(p, j) for p in range(len(prompts)) for j in range(sampling.n)]
    input_ids = [list(prompts[p]) for p, _ in rows]
    params = [sglang_sampling_params(sampling, p, j) for p, j in rows]
    return input_ids, params, [p for p, _ in rows]


def routes_request(sampling: SamplingParams) -> dict:
    """The request keys that ask SGLang for the experts it routed every token to, from position 0
    (``meta_info["routed_experts"]``: positions ``[0, prompt + response - 1)``); none unless asked."""
    return {"return_routed_experts": True, "routed_experts_start_len": 0} if sampling.return_routes else {}


def parse_output(engine: str, request: str, out: dict, prompt_index: int, routes: bool = False) -> Response:
    """One SGLang output dict -> Response. SGLang keeps a matched stop token in
    ``output_ids`` (only the text is trimmed), which is our convention too. ``routes``: the
    request asked for the routed experts, which must be there."""
    meta = out.get("meta_info", {})
    reason = (meta.get("finish_reason") or {}).get("type")
    if reason not in ("stop", "length"):
        raise RolloutError(engine, request, f"a response ended with finish_reason={meta.get('finish_reason')!r}")
    token_ids = [int(t) for t in out["output_ids"]]
    logprobs = [float(entry[0]) for entry in meta.get("output_token_logprobs", [])]
    if len(logprobs) != len(token_ids):
        raise RolloutError(
            engine, request, f"{len(token_ids)} output tokens but {len(logprobs)} log-probs (return_logprob lost?)"
        )
    routed = meta.get("routed_experts")
    if routes and not routed:
        raise RolloutError(engine, request, "no routed_experts in the response: start the SGLang server with "
                                            "--enable-return-routed-experts (algorithm.replay_engine_routes)")
    return Response(prompt_index, token_ids, out.get("text") or "", reason, logprobs, routed if routes else None)


def check_result(engine: str, request: str, result: Any) -> None:
    """SGLang's control calls answer ``(success, message)``; flush answers an object with
    ``.success``; release/resume answer None. Raise on anything that says failure."""
    if result is None:
        return
    if isinstance(result, tuple) and len(result) >= 2:
        success, message = result[0], result[1]
    else:
        success = getattr(result, "success", True)
        message = getattr(result, "message", "") or getattr(result, "error_message", "")
    if not success:
        raise RolloutError(engine, request, f"SGLang answered failure: {message}")


def serialize_bucket(bucket: list[tuple[str, torch.Tensor]]):
    """(flattened bucket, payload) for ``update_weights_from_tensor(load_format=
    "flattened_bucket")``: the payload is SGLang's serialization of the flat tensor (for
    CUDA tensors an IPC handle, not the bytes) and its metadata, as a base64 string. The
    flat tensor must stay alive until the engine has loaded it."""
    from sglang.srt.utils.common import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    # Device indices in CUDA-IPC handles become GPU UUIDs, so the receiving process
    # opens them whatever its CUDA_VISIBLE_DEVICES. (Idempotent.)
    monkey_patch_torch_reductions()
    # The patched reducer handles CUDA tensors only, and IPC is the point: a bucket
    # streamed from CPU is staged on this rank's GPU.
    bucket = [(name, t if t.is_cuda else t.cuda(non_blocking=True)) for name, t in bucket]
    flat = FlattenedTensorBucket(named_tensors=bucket)
    payload = MultiprocessingSerializer.serialize(
        obj={"flattened_tensor": flat.get_flattened_tensor(), "metadata": flat.get_metadata()},
        output_str=True,
    )
    return flat, payload


class SGLangEngine(RolloutEngine):
    """Colocated SGLang engine. Construct it on every rank of the engine's group.

    ``group``: the torch.distributed group of this engine's ``tp_size`` trainer ranks
    (group rank i drives engine TP rank i on GPU ``base_gpu_id + i``); None for a one-GPU
    engine owned by this process. ``generate`` runs on the leader (group rank 0) only;
    ``update_weights``, ``sleep``, ``wake``, ``restart`` and ``shutdown`` are collective
    over the group (every rank calls them; every rank consumes the bridge's stream).
    ``port``/``nccl_port`` must differ between engines sharing a node.
    ``deterministic=True`` starts SGLang with ``enable_deterministic_inference``, which is
    what makes ``SamplingParams.seed`` reproduce samples (slower).
    ``lora_max_rank`` / ``lora_targets`` (HF module names): start with LoRA, for
    ``update_adapter`` (shared-base LoRA PRIME, ``rollout.lora_sync=adapter``): each update loads
    the policy adapter from memory under a new, versioned name (SGLang refuses a name twice),
    unloads the previous one, and later ``generate`` calls ask for it.
    """

    name = "sglang"

    def __init__(
        self,
        model_path: str,
        tp_size: int = 1,
        group=None,
        base_gpu_id: int | None = None,
        mem_fraction_static: float = 0.6,
        seed: int = 0,
        dtype: str = "auto",
        port: int = 30000,
        nccl_port: int | None = None,
        deterministic: bool = False,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        extra_server_args: dict | None = None,
        lora_max_rank: int | None = None,
        lora_targets: Sequence[str] = (),
        return_routes: bool = False,
    ):
        self.group = group
        self.tp_size = tp_size
        group_size = torch.distributed.get_world_size(group) if group is not None else 1
        if group_size != tp_size:
            raise ValueError(f"sglang engine: group has {group_size} ranks but tp_size={tp_size}")
        self.is_leader = group is None or torch.distributed.get_rank(group) == 0
        self.bucket_bytes = bucket_bytes
        self._start_kwargs = dict(
            model_path=model_path,
            tp_size=tp_size,
            base_gpu_id=torch.cuda.current_device() if base_gpu_id is None else base_gpu_id,
            gpu_id_step=1,
            random_seed=seed,
            mem_fraction_static=mem_fraction_static,
            enable_memory_saver=True,  # release/resume_memory_occupation need it
            dtype=dtype,
            port=port,
            nccl_port=nccl_port if nccl_port is not None else port + 1000,
            log_level="error",
            enable_deterministic_inference=deterministic,
            extra=dict(extra_server_args or {}),
        )
        if lora_max_rank is not None:
            self._start_kwargs["extra"].update(enable_lora=True, max_lora_rank=lora_max_rank,
                                               lora_target_modules=list(lora_targets), max_loras_per_batch=1)
        if return_routes:  # the engine captures the routed experts (SamplingParams.return_routes asks for them)
            self._start_kwargs["extra"].update(enable_return_routed_experts=True)
        self.lora = lora_max_rank is not None
        self._adapter_version = 0
        self._adapter_name = None  # the loaded policy adapter's name (what generate asks for)
        self._engine = None
        self._collective("start", self._start)

    def _start(self) -> None:
        sglang = import_sglang()
        kw = self._start_kwargs
        self._engine = sglang.Engine(
            model_path=kw["model_path"],
            tp_size=kw["tp_size"],
            base_gpu_id=kw["base_gpu_id"],
            gpu_id_step=kw["gpu_id_step"],
            random_seed=kw["random_seed"],
            mem_fraction_static=kw["mem_fraction_static"],
            enable_memory_saver=kw["enable_memory_saver"],
            dtype=kw["dtype"],
            port=kw["port"],
            nccl_port=kw["nccl_port"],
            log_level=kw["log_level"],
            enable_deterministic_inference=kw["enable_deterministic_inference"],
            **kw["extra"],
        )
        self._adapter_name = None  # a started engine has none

    # ---- group coordination -------------------------------------------------------------

    def _collective(self, request: str, leader_fn: Callable[[], Any]) -> Any:
        """Run ``leader_fn`` on the leader; every rank of the group learns whether it
        failed and raises the same RolloutError, so no rank is left waiting."""
        error, result = None, None
        if self.is_leader:
            try:
                result = leader_fn()
                check_result(self.name, request, result)
            except RolloutError as exc:
                error = exc.reason
            except Exception as exc:  # the engine died or refused: report, don't hang peers
                error = repr(exc)
        if self.group is not None:
            box = [error]
            src = torch.distributed.get_global_rank(self.group, 0)
            torch.distributed.broadcast_object_list(box, src=src, group=self.group)
            error = box[0]
        if error is not None:
            raise RolloutError(self.name, request, error)
        return result

    def _gather_to_leader(self, payload: str) -> list[str] | None:
        if self.group is None:
            return [payload]
        out = [None] * self.tp_size if self.is_leader else None
        dst = torch.distributed.get_global_rank(self.group, 0)
        torch.distributed.gather_object(payload, out, dst=dst, group=self.group)
        return out

    # ---- interface --------------------------------------------------------------------------

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Response]:
        request = describe_request(prompt_token_ids, sampling)
        check_prompts(self.name, prompt_token_ids)
        if not self.is_leader:
            raise RolloutError(self.name, request, "generate must be called on the engine group's rank 0")
        if self._engine is None:
            raise RolloutError(self.name, request, "engine is not running (shut down or failed to restart)")
        input_ids, params, prompt_of_row = expand_requests(prompt_token_ids, sampling)
        try:
            lora_path = [self._adapter_name] * len(input_ids) if self._adapter_name else None
            outs = self._engine.generate(input_ids=input_ids, sampling_params=params, return_logprob=True,
                                         lora_path=lora_path, **routes_request(sampling))
        except Exception as exc:
            raise RolloutError(self.name, request, repr(exc)) from exc
        if len(outs) != len(input_ids):
            raise RolloutError(self.name, request, f"asked for {len(input_ids)} responses, got {len(outs)}")
        return [parse_output(self.name, request, out, p, sampling.return_routes) for out, p in zip(outs, prompt_of_row)]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Collective over the group. The engine must be idle and its weights resumed
        (``wake(["weights"])``); the KV cache may stay released until after the update."""
        self._collective("begin_weight_update", lambda: self._engine.begin_weight_update())
        for index, bucket in enumerate(iter_buckets(named_tensors, self.bucket_bytes)):
            flat, payload = serialize_bucket(bucket)
            payloads = self._gather_to_leader(payload)
            # The collective doubles as the barrier that keeps `flat` (which the engine
            # maps through IPC) alive on every rank until the engine has loaded it.
            self._collective(
                f"update_weights bucket {index} ({len(bucket)} tensors, first {bucket[0][0]})",
                lambda: self._engine.update_weights_from_tensor(
                    named_tensors=payloads, load_format="flattened_bucket", flush_cache=False
                ),
            )
            del flat
        self._collective("end_weight_update", lambda: self._engine.end_weight_update())
        # Cached prefixes hold keys/values of the old weights.
        self._collective("flush_cache", lambda: self._engine.flush_cache())
        torch.cuda.ipc_collect()

    def update_adapter(self, tensors: dict[str, torch.Tensor], peft_config: dict) -> None:
        """Collective over the group: load the policy adapter (PEFT names, ``adapter_config.json``
        contents) from the leader's tensors under a new name, then unload the previous one."""
        if not self.lora:
            raise RolloutError(self.name, "update_adapter", "the engine was started without LoRA (lora_max_rank)")
        self._adapter_version += 1
        name, previous = f"policy-v{self._adapter_version}", self._adapter_name
        self._collective(f"load_lora_adapter_from_tensors({name})", lambda: self._engine.load_lora_adapter_from_tensors(
            lora_name=name, tensors=tensors, config_dict=peft_config))
        self._adapter_name = name
        if previous is not None:
            self._collective(f"unload_lora_adapter({previous})",
                             lambda: self._engine.unload_lora_adapter(lora_name=previous))

    def sleep(self) -> None:
        """Release all GPU memory (weights, KV cache, CUDA graphs); the engine must be idle."""
        self._collective("sleep", lambda: self._engine.release_memory_occupation(tags=None))

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Resume memory, weights first. "kv_cache" also brings back the CUDA graphs, which
        SGLang releases separately. For the lowest peak the trainer calls
        ``wake(["weights"])``, ``update_weights(...)``, then ``wake(["kv_cache"])``."""
        steps = [["weights"], ["kv_cache"]] if tags is None else [[t for t in MEMORY_TAGS if t in tags]]
        for step in steps:
            sglang_tags = [t for t in step if t != "kv_cache"] + (["kv_cache", "cuda_graph"] if "kv_cache" in step else [])
            self._collective(f"wake(tags={sglang_tags})",
                             lambda tags=sglang_tags: self._engine.resume_memory_occupation(tags=tags))

    def shutdown(self) -> None:
        def stop():
            if self._engine is not None:
                self._engine.shutdown()
            self._engine = None

        self._collective("shutdown", stop)

    def restart(self) -> None:
        """Shut the engine down (ignoring errors from a dead one) and start it again from
        the checkpoint; push the current policy with ``update_weights`` afterwards."""

        def again():
            if self._engine is not None:
                try:
                    self._engine.shutdown()
                except Exception:
                    pass  # it is being replaced because it failed
            self._engine = None
            self._start()

        self._collective("restart", again)
