"""The rollout fleet: which trainer ranks drive which rollout engine, how a batch of prompts is
spread over the engines, and how new policy weights reach every engine.

Colocated (``rollout.mode=colocated``): the world splits into groups of ``rollout.tp``
consecutive ranks (the hf engine: one rank each), one engine per group on those ranks' devices.
Every rank feeds its engine the full HF tensors (the bridge exports to all ranks). A batch is cut
into one contiguous shard per engine; each engine generates its shard and the group leader
post-processes it (verification), so generation and verification run in parallel over engines.
Per-sample seeds use the global prompt index (``SamplingParams.prompt_offset``), so the samples
do not depend on how many engines there are.

Shared-base LoRA: the policy reaches the engines merged (``rollout.lora_sync=merged``: the export
yields ``W0 + scale * B A``, computed from the untouched base each time) or as its adapter alone
(``adapter``: engines started with LoRA keep the base they loaded and take the adapter in PEFT's
layout, ~1% of the bytes).

Remote (``rollout.mode=remote``): one engine handle, on global rank 0, for SGLang servers on
other nodes; only rank 0 receives full tensors, which it broadcasts to the servers.

An engine that fails during generation or a weight sync (a dead process, a remote server that went
away) is restarted (``rollout.max_restarts`` times per request), every engine is resynced from the
current policy, and the request is retried; after that every rank raises the engine's error,
naming the engine and the request.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_prime.bridge.lora_export import adapter_hf_tensors, hf_modules, peft_config
from megatron_prime.bridge.mapping import hf_param_names
from megatron_prime.bridge.transfer import iter_hf_tensors
from megatron_prime.config import Config
from megatron_prime.models.hf_config import HFArch
from megatron_prime.models.wrappers import unwrap
from megatron_prime.platform import distributed
from megatron_prime.platform.distributed import all_gather_object, picklable_error, run_everywhere
from megatron_prime.rollout import RolloutEngine, RolloutError, build_engine
from megatron_prime.rollout.base import MEMORY_TAGS, SamplingParams, end_token_ids

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # the engine computes in the trainer's dtype


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def engine_groups(world_size: int, ranks_per_engine: int) -> list[list[int]]:
    """Consecutive ranks per engine (consecutive ranks share a node, so an engine's GPUs do)."""
    return [list(range(start, start + ranks_per_engine)) for start in range(0, world_size, ranks_per_engine)]


def shard_of(num_items: int, num_shards: int, index: int) -> slice:
    """Contiguous, balanced shard ``index`` of ``num_items`` (the first shards one longer)."""
    base, extra = divmod(num_items, num_shards)
    start = index * base + min(index, extra)
    return slice(start, start + base + (1 if index < extra else 0))


@dataclass
class RolloutFleet:
    groups: list[list[int]]  # global ranks of each engine, its leader first
    engine: RolloutEngine | None  # this rank's handle on its engine (None: it feeds none)
    policy: Any  # the (wrapped) Megatron policy whose weights the engines receive
    arch: HFArch
    export_to_all_ranks: bool  # every rank feeds an engine (colocated) or rank 0 only (remote)
    end_tokens: tuple[int, ...] = ()  # what every response stops at (``rollout.base.end_token_ids``)
    bucket_bytes: int = 512 * 2**20
    max_restarts: int = 1
    lora_sync: str = "merged"  # a LoRA policy: full merged weights, or its adapter alone ("adapter")
    base_dir: str = ""  # the HF base the engines loaded (named in the adapter's PEFT config)
    released: list[str] = field(default_factory=list)  # memory tags the engines released

    @property
    def engine_index(self) -> int | None:
        return self._engine_of(_world()[0])

    @property
    def is_leader(self) -> bool:
        index = self.engine_index
        return index is not None and self.groups[index][0] == _world()[0]

    # ---- memory ------------------------------------------------------------------------------

    def sleep(self) -> None:
        """Release every engine's accelerator memory while Megatron trains."""
        run_everywhere(lambda: self.engine.sleep() if self.engine is not None else None)
        self.released = list(MEMORY_TAGS)

    def _wake(self, tags: list[str]) -> None:
        tags = [t for t in tags if t in self.released]
        if tags:
            run_everywhere(lambda: self.engine.wake(tags) if self.engine is not None else None)
            self.released = [t for t in self.released if t not in tags]

    # ---- failures ------------------------------------------------------------------------------

    def _with_restarts(self, what: str, attempt: Callable[[], Any], after_restart: Callable[[], None]) -> Any:
        """``attempt()`` on every rank. If an engine failed on any rank, every rank learns it: the
        failed engines are restarted, ``after_restart()`` runs, and the attempt is repeated
        (``max_restarts`` times). Other errors, and the last failure, are raised on every rank."""
        for tries in range(self.max_restarts + 1):
            result, failure = None, None
            try:
                result = attempt()
            except Exception as exc:  # noqa: BLE001 - reported to every rank below
                failure = exc
            failures = {rank: f for rank, f in enumerate(all_gather_object(picklable_error(failure))) if f is not None}
            if not failures:
                return result
            fatal = [f for f in failures.values() if not isinstance(f, RolloutError)]
            if fatal:  # not an engine failure (a bug, a bad verifier): restarting won't help
                raise fatal[0]
            first = next(iter(failures.values()))
            if tries == self.max_restarts:
                raise first
            failed = sorted({self._engine_of(rank) for rank in failures})
            if self.engine is not None and self.engine.restarts_together:  # their groups span every rank
                failed = list(range(len(self.groups)))
            if _world()[0] == 0:
                print(f"rollout: engine(s) {failed} failed during {what} ({first}); restarting them", flush=True)
            index = self.engine_index
            run_everywhere(lambda: self.engine.restart() if index in failed else None)
            self.released = []  # restarted engines are awake, the others were woken by the attempt
            after_restart()
        raise AssertionError("unreachable")

    def _engine_of(self, rank: int) -> int | None:
        """The engine ``rank`` feeds (None: it feeds none, e.g. remote mode's other ranks)."""
        return next((i for i, g in enumerate(self.groups) if rank in g), None)

    # ---- weights ------------------------------------------------------------------------------

    def sync(self) -> None:
        """Stream the current policy into every engine. Weights are woken first and the KV cache
        stays released, so the training state and the engine's KV cache never share the GPU."""
        self._wake(["weights"])
        self._with_restarts("the weight sync", self._push_weights, after_restart=lambda: None)

    def _push_weights(self) -> None:
        # Remote: only data-parallel replica 0 exports (its rank 0 sends to the servers), unless the
        # experts of a mixture-of-experts model are spread over the data-parallel ranks (EP).
        if (not self.export_to_all_ranks and parallel_state.get_data_parallel_rank() != 0
                and parallel_state.get_expert_model_parallel_world_size() == 1):
            return
        adapter = getattr(self.policy, "lora_adapter", None)
        if adapter is not None and self.lora_sync == "adapter":
            self._push_adapter(adapter)
            return
        stream = iter_hf_tensors(self.policy, self.arch, self.bucket_bytes, self.export_to_all_ranks, adapter=adapter)
        if self.engine is None:
            for _ in stream:  # take part in the export's collectives
                pass
            return
        sent: list[str] = []
        try:
            self.engine.update_weights((sent.append(name) or (name, t)) for name, t in stream)
        finally:
            for _ in stream:  # an engine that failed mid-way must not leave peers in a collective
                pass
        missing = set(hf_param_names(self.arch)) - set(sent)
        if missing or len(sent) != len(set(sent)):
            raise RuntimeError(f"weight sync sent {len(sent)} tensors; missing {sorted(missing)[:5]}, "
                               f"duplicates {len(sent) - len(set(sent))}: the rollout engine would be stale")

    def _push_adapter(self, adapter: str) -> None:
        settings = unwrap(self.policy).lora_settings
        tensors = adapter_hf_tensors(self.policy, self.arch, settings, adapter)  # collective: every rank
        if self.engine is not None:
            self.engine.update_adapter(tensors, peft_config(self.arch, settings, adapter, self.base_dir))

    # ---- work over the engines -------------------------------------------------------------

    def map_shards(self, items: list, generate: Callable[[RolloutEngine, list, int], Any],
                   finish: Callable[[list, int, Any], Any]) -> list | None:
        """Cut ``items`` into one contiguous shard per engine. ``generate(engine, shard,
        offset)`` runs where the engine generates, ``finish(shard, offset, generated)`` on the
        group leader; returns every engine's ``finish`` result in engine order on global rank 0
        (None elsewhere). Every rank must call this with the same ``items``. A failed engine is
        restarted and every engine resynced before the retry."""
        result = self._with_restarts(f"generation ({len(items)} items)",
                                     lambda: self._run_shard(items, generate, finish), after_restart=self.sync)
        self.released = []  # every engine is awake now
        rank, world = _world()
        gathered = [result]
        if world > 1:
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(result, gathered, dst=0)
        if rank != 0:
            return None
        return [gathered[group[0]] for group in self.groups]

    def _run_shard(self, items, generate, finish):
        """This rank's part of ``map_shards``: wake the engine, generate and finish its shard."""
        index = self.engine_index
        if self.released and self.engine is not None:  # every rank of a group wakes its part
            self.engine.wake(list(self.released))
        if index is None or not (self.is_leader or self.engine.generate_on_every_group_rank):
            return None
        shard = shard_of(len(items), len(self.groups), index)
        part = items[shard]
        if not part:
            if self.engine.restarts_together:  # data-parallel replicas step together: join with nothing
                self.engine.generate([], SamplingParams())
            return None
        generated = generate(self.engine, part, shard.start)
        return finish(part, shard.start, generated) if self.is_leader else None

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def build_fleet(cfg: Config, tokenizer, policy, arch: HFArch) -> RolloutFleet:
    """Start this rank's engine (collective: every rank calls it) and describe the fleet."""
    r = cfg.rollout
    rank, world = _world()
    end_tokens = end_token_ids(cfg.model.hf_path, tokenizer)
    if r.mode == "remote":
        groups = [[0]]

        def start():
            if rank != 0:
                return None
            engine = build_engine(
                "sglang-remote", worker_urls=r.remote_urls, tp_size=r.tp,
                router_url=r.router_url or None,
                master_address=r.weight_sync_address or socket.getfqdn(),
                master_port=r.weight_sync_port, bucket_bytes=r.bucket_mb * 2**20,
            )
            engine.wait_ready()
            return engine

        return RolloutFleet(groups, run_everywhere(start), policy, arch, export_to_all_ranks=False,
                            end_tokens=end_tokens, bucket_bytes=r.bucket_mb * 2**20, max_restarts=r.max_restarts)

    lora = {}
    if cfg.model.lora.enabled and r.lora_sync == "adapter":
        lora["lora_max_rank"] = cfg.model.lora.rank
    ranks_per_engine = 1 if r.engine == "hf" else r.tp
    groups = engine_groups(world, ranks_per_engine)
    index = rank // ranks_per_engine
    group_pg = None
    if ranks_per_engine > 1:
        for ranks in groups:  # every rank creates every group, in the same order
            pg = dist.new_group(ranks)
            if rank in ranks:
                group_pg = pg

    def start():
        if r.engine == "hf":
            return build_engine("hf", model_dir_or_model=cfg.model.hf_path, device=distributed.device(),
                                tokenizer=tokenizer)
        if r.engine == "sglang":
            group_rank = rank - groups[index][0]
            return build_engine(
                "sglang", model_path=cfg.model.hf_path, tp_size=ranks_per_engine, group=group_pg,
                base_gpu_id=torch.cuda.current_device() - group_rank, mem_fraction_static=r.mem_fraction,
                seed=cfg.train.seed, port=r.base_port + 100 * index, nccl_port=r.base_port + 100 * index + 50,
                bucket_bytes=r.bucket_mb * 2**20, **lora,
                lora_targets=[m.rsplit(".", 1)[-1] for t in cfg.model.lora.targets for m in hf_modules(arch, t)],
                return_routes=cfg.algorithm.replay_engine_routes,
            )
        # CUDA graphs pay off on GPU; on CPU, compiling costs 20-40 s per start and restart.
        return build_engine("vllm", model_path=cfg.model.hf_path, tp_size=ranks_per_engine, seed=cfg.train.seed,
                            dtype=VLLM_DTYPES[cfg.model.dtype], gpu_memory_utilization=r.mem_fraction,
                            enforce_eager=not torch.cuda.is_available(),
                            max_model_len=cfg.data.max_prompt_len + cfg.data.max_response_len, **lora)

    return RolloutFleet(groups, run_everywhere(start), policy, arch, export_to_all_ranks=True,
                        end_tokens=end_tokens, bucket_bytes=r.bucket_mb * 2**20, max_restarts=r.max_restarts,
                        lora_sync=r.lora_sync, base_dir=cfg.model.hf_path)
