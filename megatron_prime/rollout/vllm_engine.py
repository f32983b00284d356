"""vLLM rollout engine (optional extra), colocated with training.

Written against vLLM ``VLLM_VERSION`` (read in that release's source: ``vllm.LLM``,
``SamplingParams``, ``CompletionOutput``, the V1 external-launcher executor) and run on
no GPU here. vLLM is imported lazily, so this module imports without it.

Layout: under torchrun with more than one rank, every trainer rank builds its own
``vllm.LLM`` with ``distributed_executor_backend="external_launcher"``: the model runs
in-process, ``tensor_parallel_size`` consecutive ranks form one engine (they must call
``generate`` with the same prompts, SPMD), and each group of them is one vLLM data-
parallel replica. With one process, ``LLM`` runs on its own.

Weights: the model lives in this process, so ``update_weights`` hands the bridge's full
HF tensors straight to the model's ``load_weights`` (which splits them for TP and fuses
QKV / gate-up itself) via ``LLM.apply_model`` and then resets the prefix cache. That
suits dense unquantized models; quantized ones need vLLM's layerwise-reload protocol.
Memory: ``enable_sleep_mode=True``; ``sleep()`` is ``LLM.sleep(level=1)`` (weights to
CPU, KV cache dropped), ``wake()`` restores weights, then the KV cache.

Log-probs: the engine starts with ``logprobs_mode="processed_logprobs"``, i.e. after
temperature and after top-k/top-p truncation. With top_k=-1 and top_p=1 that is exactly
the package convention (base.py); with truncation active the returned numbers are those
of the truncated distribution (vLLM offers no untruncated-but-scaled mode).
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

from .base import (
    Response,
    RolloutEngine,
    RolloutError,
    SamplingParams,
    check_prompts,
    describe_request,
)

VLLM_VERSION = "0.33.0"

# What this module uses of vLLM: "path in the wheel under vllm/:qualified name" -> the
# keywords we pass (all calls are by keyword). LLM.__init__ forwards **kwargs to
# EngineArgs, so keywords it does not name itself are checked against EngineArgs' fields;
# SamplingParams is a struct whose fields are its keywords. The opt-in test
# tests/test_rollout_vllm_contract.py checks this table against the release source.
VLLM_API_USED: dict[str, tuple[str, ...]] = {
    "entrypoints/llm.py:LLM.__init__": (
        "model", "tensor_parallel_size", "dtype", "seed", "gpu_memory_utilization", "enforce_eager",
        "enable_sleep_mode", "logprobs_mode", "distributed_executor_backend", "data_parallel_size",
    ),
    "entrypoints/llm.py:LLM.generate": ("prompts", "sampling_params", "use_tqdm"),
    "entrypoints/llm.py:LLM.apply_model": ("func",),
    "entrypoints/llm.py:LLM.reset_prefix_cache": (),
    "entrypoints/llm.py:LLM.sleep": ("level",),
    "entrypoints/llm.py:LLM.wake_up": ("tags",),
    "sampling_params.py:SamplingParams": (
        "n", "temperature", "top_p", "top_k", "max_tokens", "stop_token_ids", "seed", "logprobs",
    ),
}
# Result attributes we read.
VLLM_FIELDS_READ: dict[str, tuple[str, ...]] = {
    "outputs.py:RequestOutput": ("outputs",),
    "outputs.py:CompletionOutput": ("token_ids", "text", "finish_reason", "logprobs"),
    "logprobs.py:Logprob": ("logprob",),
}


def import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            f"the vllm rollout engine needs vllm=={VLLM_VERSION} (pip install 'megatron-prime[vllm]')"
        ) from exc
    return vllm


class VLLMEngine(RolloutEngine):
    name = "vllm"
    generate_on_every_group_rank = True  # the external launcher is SPMD over the engine's ranks

    def __init__(
        self,
        model_path: str,
        tp_size: int = 1,
        seed: int = 0,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        enforce_eager: bool = False,
        extra_llm_args: dict | None = None,
    ):
        self.model_path = model_path
        self.tp_size = tp_size
        self.seed = seed
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enforce_eager = enforce_eager
        self.extra_llm_args = dict(extra_llm_args or {})
        self._llm = None
        self._start()

    def _start(self) -> None:
        vllm = import_vllm()
        spmd = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        parallel = {}
        if spmd:
            world = torch.distributed.get_world_size()
            if world % self.tp_size:
                raise ValueError(f"vllm engine: world size {world} is not a multiple of tp_size={self.tp_size}")
            # The external launcher runs this rank's shard of the engine in this process,
            # on torchrun's env:// ranks.
            parallel = dict(distributed_executor_backend="external_launcher", data_parallel_size=world // self.tp_size)
        elif self.tp_size > 1:
            raise ValueError("vllm engine: tp_size > 1 needs one process per GPU (launch with torchrun)")
        # Keep the engine core in this process: update_weights passes the model a Python
        # iterator, which cannot cross a process boundary.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            self._llm = vllm.LLM(
                model=self.model_path,
                tensor_parallel_size=self.tp_size,
                dtype=self.dtype,
                seed=self.seed,
                gpu_memory_utilization=self.gpu_memory_utilization,
                enforce_eager=self.enforce_eager,
                enable_sleep_mode=True,
                logprobs_mode="processed_logprobs",
                **parallel,
                **self.extra_llm_args,
            )
        except Exception as exc:
            raise RolloutError(self.name, f"start({self.model_path}, tp={self.tp_size})", repr(exc)) from exc

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Response]:
        vllm = import_vllm()
        request = describe_request(prompt_token_ids, sampling)
        check_prompts(self.name, prompt_token_ids)
        if self._llm is None:
            raise RolloutError(self.name, request, "engine is not running")
        rows = [(p, j) for p in range(len(prompt_token_ids)) for j in range(sampling.n)]
        prompts = [{"prompt_token_ids": list(prompt_token_ids[p])} for p, _ in rows]
        # n is expanded here (one request per sample) so each sample gets its own seed.
        params = [
            vllm.SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else 0,
                max_tokens=sampling.max_new_tokens,
                stop_token_ids=list(sampling.stop_token_ids),
                seed=sampling.seed_of(p, j),
                logprobs=0,  # only the sampled token's log-prob
            )
            for p, j in rows
        ]
        try:
            outs = self._llm.generate(prompts=prompts, sampling_params=params, use_tqdm=False)
        except Exception as exc:
            raise RolloutError(self.name, request, repr(exc)) from exc
        responses = []
        for out, (p, _) in zip(outs, rows):
            completion = out.outputs[0]
            if completion.finish_reason not in ("stop", "length"):
                raise RolloutError(self.name, request, f"a response ended with finish_reason={completion.finish_reason!r}")
            token_ids = [int(t) for t in completion.token_ids]
            positions = completion.logprobs or []
            if len(positions) != len(token_ids):
                raise RolloutError(self.name, request, f"{len(token_ids)} tokens but {len(positions)} log-prob positions")
            logprobs = [float(pos[t].logprob) for pos, t in zip(positions, token_ids)]
            responses.append(Response(p, token_ids, completion.text, completion.finish_reason, logprobs))
        return responses

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the stream into the in-process model (call after ``wake`` has restored at
        least the weights). Every rank of the engine calls this with the full tensors."""
        stream = iter(named_tensors)

        def load(model):
            model.load_weights(stream)

        try:
            self._llm.apply_model(func=load)
            # Cached prefixes hold keys/values computed with the old weights.
            self._llm.reset_prefix_cache()
        except Exception as exc:
            raise RolloutError(self.name, "update_weights", repr(exc)) from exc

    def sleep(self) -> None:
        try:
            self._llm.sleep(level=1)
        except Exception as exc:
            raise RolloutError(self.name, "sleep(level=1)", repr(exc)) from exc

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Default: weights first, then the KV cache (scheduling resumes once all memory is
        back). ``wake(["weights"])`` alone lets weights be updated before the KV cache
        returns."""
        try:
            for step in ([tags] if tags is not None else [["weights"], ["kv_cache"]]):
                self._llm.wake_up(tags=step)
        except Exception as exc:
            raise RolloutError(self.name, f"wake(tags={tags})", repr(exc)) from exc

    def shutdown(self) -> None:
        # LLM has no public close; dropping it lets vLLM's finalizers release the GPU.
        self._llm = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def restart(self) -> None:
        self.shutdown()
        self._start()
