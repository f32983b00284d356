"""Per-GPU memory of a PRIME run, phase by phase, and the layouts that fit.

PRIME keeps three models on every rank (policy and implicit PRM trained, reference frozen) in one
TP/PP/DP layout, and in colocated mode shares the GPUs with the rollout engine. With shared-base
LoRA (``model.lora``) they are one frozen base and two adapters, each with its own gradients and
optimizer state (``state_memory.lora_parameters``). A step goes
through phases whose peaks differ (``training/prime_step.py``):

    rollout          all parameters + the engine's share (``rollout.mem_fraction`` of the GPU:
                     its weights and KV cache); with ``train.offload`` the gradients and the
                     half-precision optimizer states are released for it
    log-prob passes  all parameters and states + a forward's working set (one layer, the logits)
    PRM update       all parameters + the PRM's states, activations and logits (+ the policy's
                     states unless offloaded)
    policy update    the same for the policy

Each adds ``RESERVE_GIB`` for what the arithmetic does not see (CUDA context, NCCL buffers,
allocator fragmentation, the sleeping engine's leftovers). The state bytes are exact
(``state_memory``); activations and logits are the estimates of ``activations``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from megatron_prime.config import Config, ConfigError, validate
from megatron_prime.models.hf_config import HFArch
from megatron_prime.planner.activations import MicroBatch, layer_activation_bytes, logits_bytes, model_activation_bytes
from megatron_prime.planner.state_memory import (
    DTYPE_BYTES,
    StateBytes,
    frozen_state_bytes,
    lora_parameters,
    num_parameters,
    stage_parameters,
    trainable_state_bytes,
)

GIB = 2 ** 30
RESERVE_GIB = 4.0
MAX_NODES = 64  # how far the search for a fitting GPU count goes


@dataclass(frozen=True)
class Layout:
    gpus: int
    gpus_per_node: int
    tp: int
    pp: int
    micro_batch_tokens: int
    ep: int = 1  # expert parallelism (mixture-of-experts models): splits the DP ranks

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    def describe(self) -> str:
        nodes = -(-self.gpus // self.gpus_per_node)
        ep = f" EP={self.ep}" if self.ep > 1 else ""
        return (f"TP={self.tp} PP={self.pp} DP={self.dp}{ep} on {self.gpus} GPUs ({nodes} node{'s' * (nodes > 1)}), "
                f"micro_batch_tokens={self.micro_batch_tokens}")


@dataclass
class ModelMemory:
    """One model's bytes on the planned rank."""

    state: StateBytes
    activations: int = 0  # one training pass, micro-batches in flight included
    activations_recompute: int = 0  # the same with full recompute
    logits_training: int = 0
    logits_forward: int = 0


@dataclass
class EngineMemory:
    share: int  # bytes of the GPU the engine takes while awake (mem_fraction x GPU)
    weights: int
    kv_cache: int
    kv_bytes_per_token: int
    engines: int


@dataclass
class Plan:
    layout: Layout
    gpu_mem: int
    stage: int  # the pipeline stage whose peak is highest
    models: dict[str, ModelMemory]
    engine: EngineMemory | None
    phases: dict[str, int]  # peak bytes per phase on that stage
    phases_recompute: dict[str, int]
    offload_frees: dict[str, int]
    alternatives: list["Plan"] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak(self) -> int:
        return self.phases[self.peak_phase]

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_mem and (self.engine is None or self.engine.kv_cache > 0)


def _micro_batch(cfg: Config, tokens: int) -> MicroBatch:
    seq = cfg.data.max_prompt_len + cfg.data.max_response_len
    return MicroBatch(sequences=max(1, tokens // seq), seq_len=seq)


def _engine_memory(cfg: Config, arch: HFArch, gpu_mem: int, gpus: int) -> EngineMemory | None:
    r = cfg.rollout
    if r.mode != "colocated" or r.engine == "hf":
        return None  # remote servers are not on these GPUs; the hf engine is for CPU debugging
    B = DTYPE_BYTES[cfg.model.dtype]
    share = int(r.mem_fraction * gpu_mem)
    weights = num_parameters(arch) * B // r.tp
    kv_heads = max(1, arch.num_kv_heads // r.tp)  # fewer KV groups than GPUs: each GPU keeps one
    kv_per_token = 2 * arch.num_layers * kv_heads * arch.head_dim * B
    return EngineMemory(share=share, weights=weights, kv_cache=share - weights, kv_bytes_per_token=kv_per_token,
                        engines=gpus // r.tp)


def _worst_over_dp(params, *, dtype: str, dp: int, distributed_optimizer: bool, ep: int = 1) -> StateBytes:
    states = [trainable_state_bytes(params, dtype=dtype, dp=dp, dp_rank=r, distributed_optimizer=distributed_optimizer,
                                    ep=ep)
              for r in range(dp if distributed_optimizer else 1)]
    return max(states, key=lambda s: s.total)


def plan_layout(cfg: Config, arch: HFArch, layout: Layout, *, gpu_mem_gib: float, uses_prm: bool,
                uses_reference: bool, spec: str = "te") -> Plan:
    """The per-GPU plan of one layout (the pipeline stage with the highest peak)."""
    dtype, tp, pp, dp = cfg.model.dtype, layout.tp, layout.pp, layout.dp
    sp = cfg.parallel.sequence_parallel and tp > 1
    gpu_mem = int(gpu_mem_gib * GIB)
    reserve = int(RESERVE_GIB * GIB)
    mb = _micro_batch(cfg, layout.micro_batch_tokens)
    # Micro-batches of one optimizer step per DP rank.
    micro_batches = {"policy": math.ceil(cfg.train.mini_batch_responses // dp / mb.sequences),
                     "prm": math.ceil(cfg.train.prm_responses_per_update // dp / mb.sequences)}
    half = DTYPE_BYTES[dtype] < 4
    offload = cfg.train.offload
    engine = _engine_memory(cfg, arch, gpu_mem, layout.gpus)
    best = None
    lora = cfg.model.lora
    for stage in range(pp):
        first, last = stage == 0, stage == pp - 1
        params = stage_parameters(arch, tp=tp, pp=pp, pp_rank=stage, vocab_pad_multiple=cfg.model.vocab_pad_multiple,
                                  ep=layout.ep)
        trained = ["policy"] + (["prm"] if uses_prm else [])
        models = {}
        if lora.enabled:  # one frozen base (the reference too) carrying the adapters
            models["base"] = ModelMemory(state=frozen_state_bytes(params, dtype=dtype))
        for name in trained:
            if lora.enabled:  # the adapter alone; its optimizer whole on every DP rank (passes.trainable)
                adapter = lora_parameters(arch, rank=lora.ranks[name], targets=lora.targets, tp=tp, pp=pp)
                state = trainable_state_bytes(adapter, dtype=dtype, dp=dp, dp_rank=0, distributed_optimizer=False)
            else:
                state = _worst_over_dp(params, dtype=dtype, dp=dp, ep=layout.ep,
                                       distributed_optimizer=cfg.parallel.distributed_optimizer)
            in_flight = min(pp - stage, micro_batches[name])
            act = dict(dtype=dtype, tp=tp, sequence_parallel=sp, layers=arch.num_layers // pp, first_stage=first,
                       last_stage=last, spec=spec)
            models[name] = ModelMemory(
                state=state,
                activations=in_flight * model_activation_bytes(arch, mb, **act),
                activations_recompute=in_flight * model_activation_bytes(arch, mb, recompute=True, **act),
                logits_training=logits_bytes(arch, mb.tokens, dtype=dtype, tp=tp, training=True,
                                             vocab_pad_multiple=cfg.model.vocab_pad_multiple) if last else 0,
                logits_forward=logits_bytes(arch, mb.tokens, dtype=dtype, tp=tp, training=False,
                                            vocab_pad_multiple=cfg.model.vocab_pad_multiple) if last else 0,
            )
        if uses_reference and not lora.enabled:
            models["reference"] = ModelMemory(state=frozen_state_bytes(params, dtype=dtype))
        all_params = sum(m.state.params for m in models.values())
        states = {n: models[n].state.grads + models[n].state.optimizer for n in trained}
        offloadable = {n: models[n].state.grads + (models[n].state.optimizer if half else 0) for n in trained}
        kept = {n: states[n] - (offloadable[n] if offload else 0) for n in trained}
        forward = layer_activation_bytes(arch, mb, dtype=dtype, tp=tp, sequence_parallel=sp, spec=spec) \
            + models["policy"].logits_forward

        def phases(recompute: bool) -> dict[str, int]:
            out = {"rollout": all_params + sum(kept.values()) + (engine.share if engine else 0) + reserve,
                   "log-prob passes": all_params + sum(states.values()) + forward + reserve}
            for name in reversed(trained):
                m = models[name]
                others = sum(kept[o] for o in trained if o != name)
                act = m.activations_recompute if recompute else m.activations
                out[f"{name} update"] = all_params + states[name] + others + act + m.logits_training + reserve
            return out

        frees = {"rollout": sum(offloadable.values()) if offload else 0}
        for name in trained:
            frees[f"{name} update"] = sum(offloadable[o] for o in trained if o != name) if offload else 0
        candidate = Plan(layout=layout, gpu_mem=gpu_mem, stage=stage, models=models, engine=engine,
                         phases=phases(False), phases_recompute=phases(True), offload_frees=frees)
        if best is None or candidate.peak > best.peak:
            best = candidate
    return best


def _accepts(cfg: Config, arch: HFArch, layout: Layout) -> bool:
    """Whether ``validate`` takes this layout (batches split over DP, engines fit a node, ...)."""
    trial = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tp=layout.tp, pp=layout.pp, ep=layout.ep,
                                                                   sequence_parallel=cfg.parallel.sequence_parallel
                                                                   and layout.tp > 1),
                                train=dataclasses.replace(cfg.train, micro_batch_tokens=layout.micro_batch_tokens))
    try:
        validate(trial, layout.gpus, gpus_per_node=layout.gpus_per_node, model_shape=arch)
    except ConfigError:
        return False
    return True


def candidate_layouts(cfg: Config, arch: HFArch, gpus: int, gpus_per_node: int) -> list[Layout]:
    """TP (dividing heads and KV groups, within a node) x PP (dividing the layers) x EP (a
    mixture-of-experts model: dividing the experts and DP) x micro-batch token budgets (the
    configured one and full sequences x powers of two below it)."""
    seq = cfg.data.max_prompt_len + cfg.data.max_response_len
    budgets = {cfg.train.micro_batch_tokens} | {seq * 2 ** k for k in range(12) if seq * 2 ** k < cfg.train.micro_batch_tokens}
    heads = math.gcd(arch.num_heads, arch.num_kv_heads)
    out = []
    for tp in (t for t in range(1, min(heads, gpus_per_node) + 1) if heads % t == 0):
        for pp in (p for p in range(1, arch.num_layers + 1) if arch.num_layers % p == 0):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            eps = [e for e in range(1, dp + 1) if dp % e == 0 and arch.num_experts % e == 0] if arch.is_moe else [1]
            for ep in eps:
                for budget in sorted(budgets, reverse=True):
                    layout = Layout(gpus, gpus_per_node, tp, pp, budget, ep)
                    if _accepts(cfg, arch, layout):
                        out.append(layout)
    return out


def fitting_layouts(cfg: Config, arch: HFArch, *, gpus: int, gpus_per_node: int, gpu_mem_gib: float,
                    uses_prm: bool, uses_reference: bool, limit: int = 3) -> list[Plan]:
    """The best fitting layouts on ``gpus`` GPUs, else on the fewest more nodes that have one:
    the least model parallelism, then the largest micro-batches, then TP (inside a node) over PP."""
    counts = [gpus] + [n * gpus_per_node for n in range(1, MAX_NODES + 1) if n * gpus_per_node > gpus]
    for count in counts:
        plans = [plan_layout(cfg, arch, layout, gpu_mem_gib=gpu_mem_gib, uses_prm=uses_prm,
                             uses_reference=uses_reference)
                 for layout in candidate_layouts(cfg, arch, count, gpus_per_node)]
        fitting = [p for p in plans if p.fits]
        if fitting:
            fitting.sort(key=lambda p: (p.layout.tp * p.layout.pp, -p.layout.micro_batch_tokens, -p.layout.tp,
                                        p.layout.ep, p.peak))
            return fitting[:limit]
    return []


# ---------------------------------------------------------------------------------------------
# report


def gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def format_plan(plan: Plan, cfg: Config, arch: HFArch) -> str:
    lay = plan.layout
    mb = _micro_batch(cfg, lay.micro_batch_tokens)
    lines = [f"per GPU, pipeline stage {plan.stage} of {lay.pp} (the fullest), GiB:",
             f"  {'':50}" + "".join(f"{name:>11}" for name in plan.models)]

    def row(label, values):
        lines.append(f"  {label:50}" + "".join(f"{v:>11}" for v in values))

    ms = list(plan.models.values())
    row(f"parameters ({cfg.model.dtype})", [gib(m.state.params) for m in ms])
    row("gradients (fp32 buffer)", [gib(m.state.grads) for m in ms])
    lora = cfg.model.lora
    if lora.enabled:
        lines.insert(0, f"LoRA: policy and PRM are adapters (rank {lora.ranks['policy']}"
                        + (f" / {lora.ranks['prm']}" if "prm" in plan.models else "")
                        + f", on {', '.join(lora.targets)}) on one frozen base, which is also the reference")
    where = f"sharded over DP={lay.dp}" if cfg.parallel.distributed_optimizer and not lora.enabled else "replicated"
    row(f"optimizer (Adam{' + fp32 main' if DTYPE_BYTES[cfg.model.dtype] < 4 else ''}, {where})",
        [gib(m.state.optimizer) for m in ms])
    row(f"activations ({mb.sequences} x {mb.seq_len} tokens, in flight)", [gib(m.activations) for m in ms])
    row("activations with full recompute (not a setting yet)", [gib(m.activations_recompute) for m in ms])
    row("logits, training pass", [gib(m.logits_training) for m in ms])
    row("logits, log-prob pass", [gib(m.logits_forward) for m in ms])
    if plan.engine:
        e = plan.engine
        seq = cfg.data.max_prompt_len + cfg.data.max_response_len
        tokens = max(0, e.kv_cache) // e.kv_bytes_per_token
        lines.append(f"rollout engine ({cfg.rollout.engine}, {e.engines} x TP={cfg.rollout.tp}, colocated): "
                     f"{cfg.rollout.mem_fraction:g} of the GPU = {gib(e.share)} GiB: weights {gib(e.weights)}, "
                     f"KV cache {gib(e.kv_cache)} = {tokens:,} tokens ({tokens // seq} sequences of {seq}) per GPU")
    elif cfg.rollout.mode == "remote":
        lines.append(f"rollout engine: remote SGLang servers ({len(cfg.rollout.remote_urls)}), not on these GPUs")
    lines.append(f"phase peaks (train.offload={'on' if cfg.train.offload else 'off'}; "
                 f"+{RESERVE_GIB:g} GiB reserve each), GiB:")
    for name, value in plan.phases.items():
        frees = plan.offload_frees.get(name, 0)
        note = f"   (offloading frees {gib(frees)})" if frees else ""
        lines.append(f"  {name:20}{gib(value):>8}   with full recompute {gib(plan.phases_recompute[name]):>6}{note}")
    return "\n".join(lines)


def verdict(plan: Plan) -> str:
    where = f"{plan.peak_phase}, stage {plan.stage}"
    if plan.fits:
        return (f"FITS: peak {gib(plan.peak)} of {gib(plan.gpu_mem)} GiB per GPU ({where}) "
                f"with {plan.layout.describe()}")
    why = "no room left for the KV cache" if plan.engine and plan.engine.kv_cache <= 0 else \
        f"needs {gib(plan.peak)} GiB per GPU ({where})"
    return f"DOES NOT FIT on {gib(plan.gpu_mem)} GiB GPUs: {why} with {plan.layout.describe()}"
