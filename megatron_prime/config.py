"""One typed config tree for every command: YAML file + dotted command-line overrides.

    cfg = load_config("examples/configs/tiny_cpu.yaml", ["parallel.tp=2", "algorithm.beta=0.1"])

Every value is type-checked on load and the tree is validated up front (``validate``), with
errors that name the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args, get_origin, get_type_hints

import yaml

from megatron_prime.errors import UserError


class ConfigError(UserError):
    """A config key holds a value that is not allowed."""


# The linear layers a LoRA adapter can sit on (megatron-core's names; the PEFT export splits the fused
# ones back: linear_qkv -> q/k/v_proj, linear_fc1 -> gate/up_proj, linear_proj -> o_proj, linear_fc2 -> down_proj)
LoRATarget = Literal["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


@dataclass
class LoRAConfig:
    """Shared-base LoRA PRIME: the policy and the implicit PRM as two adapters on one frozen base
    (model.hf_path), which is also the reference (adapters off). rank 0: full fine-tuning (the paper)."""

    rank: int = 0
    prm_rank: Optional[int] = None  # the implicit PRM's adapter rank (null: the same as rank)
    alpha: float = 32.0  # the adapters add (alpha / rank) * B A
    targets: list[LoRATarget] = field(default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1",
                                                               "linear_fc2"])

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def ranks(self) -> dict[str, int]:
        """Adapter name -> rank (``policy`` and ``prm``)."""
        return {"policy": self.rank, "prm": self.prm_rank if self.prm_rank is not None else self.rank}


@dataclass
class ModelConfig:
    hf_path: str = ""  # Hugging Face checkpoint dir: config.json, *.safetensors, tokenizer
    mcore_path: str = ""  # optional Megatron checkpoint to start the policy from instead of hf_path's weights
    prm_hf_path: str = ""  # optional separate starting point for the implicit PRM (same architecture)
    prm_mcore_path: str = ""  # ... as a Megatron checkpoint (e.g. a trainer checkpoint's step_N/prm)
    ref_path: str = ""  # reference model (HF or Megatron dir); default: where the policy's run started
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    fp8: Optional[Literal["e4m3", "hybrid"]] = None  # needs Transformer Engine on Hopper
    transformer_engine: Literal["auto", "on", "off"] = "auto"
    vocab_pad_multiple: int = 128  # vocab is padded to a multiple of this x TP
    # config.json that gives the model's shape to `megatron-prime plan` and dry runs while
    # hf_path does not exist yet (e.g. examples/models/Qwen2.5-Math-7B/config.json)
    shape_from: str = ""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # mixture-of-experts bases: the routers' load-balancing loss coefficient (0: off, as RL usually has it)
    moe_aux_loss_coef: float = 0.0


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    max_prompt_len: int = 1024
    max_response_len: int = 3072
    seed: int = 0


@dataclass
class RolloutConfig:
    engine: Literal["hf", "sglang", "vllm"] = "hf"
    mode: Literal["colocated", "remote"] = "colocated"
    remote_urls: list[str] = field(default_factory=list)
    n: int = 4  # K responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    tp: int = 1  # GPUs per engine (colocated: consecutive ranks; remote: per server); hf: 1
    mem_fraction: float = 0.6
    bucket_mb: int = 512  # weight-sync bucket size
    max_restarts: int = 1  # restarts of a failed engine (then resync, retry the request) per request
    # 0: generate, then train, every step (the paper's loop); 1: the next batch is generated while this
    # one trains (one-step-off: every group from one policy version, at most one step old; remote mode)
    max_staleness: int = 0
    # shared-base LoRA (model.lora.rank > 0): what the engines receive after each update, "merged"
    # (the full weights W0 + scale * B A, every engine) or "adapter" (the policy adapter only: vllm, sglang)
    lora_sync: Literal["merged", "adapter"] = "merged"
    base_port: int = 30000  # colocated sglang: engine i listens on base_port + 100 * i
    router_url: str = ""  # remote: sglang-router in front of remote_urls (for /generate)
    weight_sync_address: str = ""  # remote: rank 0's address the servers reach (default: its hostname)
    weight_sync_port: int = 29650  # remote: rendezvous port of the weight-broadcast group


@dataclass
class AlgorithmConfig:
    beta: float = 0.05  # implicit PRM reward scale (paper Eq. 3)
    estimator: str = "prime_rloo"  # see megatron_prime.algorithm registry; "rloo" = outcome-only
    gamma: float = 1.0
    # the return of the process rewards: "sum" (paper Eq. 5) or "min" (PURE's min-form credit assignment)
    process_return: Literal["sum", "min"] = "sum"
    process_coef: float = 1.0
    outcome_coef: float = 1.0
    whiten: bool = False
    filter_low: float = 0.2
    filter_high: float = 0.8
    filter_truncated: bool = False
    prm_update: Literal["single", "double", "none"] = "single"
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: Optional[float] = None  # dual-clip PPO bound (> 1) for negative advantages; veRL uses 3
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k3"] = "k3"
    entropy_coef: float = 0.0
    # Importance weights exp(old - rollout) on the policy-gradient term, for the engine/trainer
    # mismatch and the one-step lag (algorithm/rollout_correction.py): none, token_tis (clamp),
    # icepop (zero outside), seq_mask (drop a response whose geometric mean lies outside)
    rollout_correction: Literal["none", "token_tis", "icepop", "seq_mask"] = "none"
    # [low, high]; null: the mode's default (token_tis [0, 2], icepop [0.5, 5], seq_mask [0.999, 1.001])
    rollout_correction_bounds: Optional[list[float]] = None
    ppo_epochs: int = 1
    # mixture-of-experts bases: the policy update replays the experts its old-log-prob pass chose for every
    # token (R2), so that the PPO ratio compares the same experts; the PRM and the reference route freely
    routing_replay: bool = True
    # R3 (rollout routing replay): the routes the engine took while sampling (SGLang returns them) are
    # replayed in the old-log-prob pass and the update, instead of the old pass's own (needs routing_replay)
    replay_engine_routes: bool = False
    compile_kernels: bool = False  # fuse Eq. 3/5 and the losses' elementwise kernels with torch.compile


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class OptimConfig:
    policy: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=5e-7))
    prm: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-6))


@dataclass
class TrainConfig:
    steps: int = 592
    prompts_per_step: int = 256
    mini_batch_responses: int = 256  # responses per policy update
    prm_mini_batch_responses: int = 0  # responses per implicit-PRM update (0: mini_batch_responses)
    micro_batch_tokens: int = 16384  # token budget per micro-batch (dynamic batch size)
    max_rollout_rounds: int = 8  # rollout rounds per step to fill the filtered batch
    offload: bool = True  # free grads/optimizer state around rollout and the other model's phase (GPU)
    eval_every: int = 0  # greedy accuracy on data.eval_files every N steps (0: start and end only)
    eval_limit: int = 0  # evaluate on the first N eval prompts (0: all)
    warn_verify_timeout_frac: float = 0.01  # warn when more answers than this hit the grader's time limit
    # warn when more responses than this (mean over 10 steps) get an advantage against their outcome
    warn_advantage_flip_frac: float = 0.1
    exit_after_minutes: float = 0.0  # checkpoint and exit 0 at the first step boundary after this (0: off)
    # A rank that makes no progress (micro-batch, weight bucket, rollout round, checkpoint) for this long
    # writes its phase and every thread's stack and exits non-zero; the process groups' timeouts follow
    # it (0: off, and process groups time out after 30 minutes).
    hang_timeout_minutes: float = 30.0
    # After SIGTERM/SIGUSR1, a rank that makes no progress for this long is stuck (e.g. in a collective a
    # peer never joins): stacks and a non-zero exit instead of waiting for SIGKILL. Keep it below the time
    # the scheduler leaves between the signal and SIGKILL (the sbatch scripts: USR1 600 s before).
    stop_grace_minutes: float = 5.0
    seed: int = 1234

    @property
    def prm_responses_per_update(self) -> int:
        """Responses per implicit-PRM optimizer step: ``prm_mini_batch_responses``, 0 meaning the
        policy's mini-batch (as veRL's PRIME recipe)."""
        return self.prm_mini_batch_responses or self.mini_batch_responses


@dataclass
class SFTConfig:
    train_file: str = ""  # jsonl rows {"prompt", "response"}
    steps: int = 200
    batch_size: int = 64
    optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5, lr_schedule="cosine"))
    output_dir: str = "outputs/sft"  # checkpoints/, then the Megatron checkpoint (mcore/) + HF export (hf/)
    log_every: int = 10
    checkpoint_interval: int = 100  # resumable checkpoint every N steps (0: only at the end)


@dataclass
class CheckpointConfig:
    dir: str = "outputs/checkpoints"
    interval: int = 50
    keep_last: int = 3
    resume: str = "latest"  # "latest", "none", or a checkpoint dir
    export_hf: bool = True
    export_dir: str = "outputs/hf"  # final HF exports: export_dir/policy, export_dir/prm


@dataclass
class LoggingConfig:
    dir: str = "outputs/logs"
    tensorboard: bool = True
    wandb: bool = False
    sample_every: int = 10
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------
# loading


def _describe(tp) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(f"{key}[{i}]", v, get_args(tp)[0]) for i, v in enumerate(value)]
        if isinstance(value, str):  # a single path on the command line
            return [value]
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}': got {value!r}, expected {_describe(tp)}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"parallel.tp=2"`` -> ``("parallel.tp", 2)``; values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. parallel.tp=2")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def config_from_dict(data: dict, overrides: list[str] = ()) -> Config:
    data = json.loads(json.dumps(data or {}))  # deep copy
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return _build(Config, data, "")


# The example configs and model shapes ship inside the package (megatron_prime/examples/; a checkout's
# top-level examples/ links to them), so "examples/..." paths work wherever the package is installed.
SHIPPED_EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples")


def shipped_path(path: str) -> str:
    """``path`` itself if it exists; else, for a path under ``examples/`` (e.g.
    ``examples/configs/tiny_cpu.yaml``), the copy shipped in the installed package."""
    parts = os.path.normpath(path).split(os.sep)
    if os.path.exists(path) or len(parts) < 2 or parts[0] != "examples":
        return path
    return os.path.join(SHIPPED_EXAMPLES, *parts[1:])


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """The config of YAML file ``path`` (``examples/...`` also from the installed package) with
    dotted ``overrides``, type-checked."""
    data = {}
    if path:
        path = shipped_path(path)
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# validation


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is not allowed: {allowed}")


class ModelShape(typing.Protocol):
    """What validation needs of a model's shape (``models.hf_config.HFArch`` has it)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int


def validate_parallel(parallel: ParallelConfig, *, num_layers: int | None = None, num_heads: int | None = None,
                      num_kv_heads: int | None = None, num_experts: int | None = None,
                      world_size: int | None = None) -> None:
    """Check the parallel layout against the model's shape and the number of ranks, where known."""
    for name in ("tp", "pp", "cp", "ep"):
        _check(getattr(parallel, name) >= 1, f"parallel.{name}", getattr(parallel, name), "must be >= 1")
    tp, pp = parallel.tp, parallel.pp
    if num_heads is not None:
        _check(num_heads % tp == 0, "parallel.tp", tp,
               f"must divide the number of attention heads ({num_heads}); try {_divisors(num_heads, num_kv_heads)}")
    if num_kv_heads is not None:
        _check(num_kv_heads % tp == 0, "parallel.tp", tp,
               f"must divide the number of KV groups ({num_kv_heads}); try {_divisors(num_kv_heads, num_heads)}")
    if num_layers is not None:
        _check(num_layers % pp == 0, "parallel.pp", pp,
               f"must divide the number of layers ({num_layers}); try {_divisors(num_layers)}")
    ep = parallel.ep
    if num_experts is not None:
        _check(ep == 1 or num_experts > 0, "parallel.ep", ep,
               "must be 1 for a dense model (expert parallelism splits a mixture-of-experts model's experts)")
        _check(num_experts == 0 or num_experts % ep == 0, "parallel.ep", ep,
               f"must divide the number of experts ({num_experts}); try {_divisors(num_experts)}")
    if world_size is not None:
        model_parallel = tp * pp * parallel.cp
        _check(world_size % model_parallel == 0, "parallel", f"tp={tp} pp={pp} cp={parallel.cp}",
               f"tp*pp*cp = {model_parallel} must divide the world size ({world_size})")
        dp = world_size // model_parallel
        _check(dp % ep == 0, "parallel.ep", ep,
               f"expert parallelism splits the data-parallel ranks: must divide DP = {dp} (world size {world_size} "
               f"/ (tp {tp} x pp {pp})); try {_divisors(dp)}")


def _validate_lora(cfg: Config) -> None:
    lora, m, r = cfg.model.lora, cfg.model, cfg.rollout
    _check(lora.rank >= 0, "model.lora.rank", lora.rank, "must be >= 0 (0: full fine-tuning)")
    _check(lora.prm_rank is None or lora.prm_rank >= 1, "model.lora.prm_rank", lora.prm_rank,
           "must be >= 1 (or null: the same as model.lora.rank)")
    _check(lora.prm_rank is None or lora.enabled, "model.lora.prm_rank", lora.prm_rank,
           "needs model.lora.rank > 0 (the policy and the PRM share one base only when both are adapters)")
    _check(lora.alpha > 0, "model.lora.alpha", lora.alpha, "must be > 0")
    _check(len(lora.targets) > 0 and len(set(lora.targets)) == len(lora.targets), "model.lora.targets",
           lora.targets, "must name each target layer once, at least one")
    _check(r.lora_sync == "merged" or lora.enabled, "rollout.lora_sync", r.lora_sync,
           "'adapter' sends a LoRA adapter: it needs model.lora.rank > 0")
    _check(r.lora_sync == "merged" or r.engine in ("vllm", "sglang"), "rollout.lora_sync", r.lora_sync,
           f"the {r.engine} engine takes full weights only: use rollout.lora_sync=merged, or rollout.engine=vllm "
           "or sglang")
    _check(r.lora_sync == "merged" or r.mode == "colocated", "rollout.lora_sync", r.lora_sync,
           "'adapter' reaches colocated engines only (the remote servers take weights over the broadcast group): "
           "use rollout.lora_sync=merged with rollout.mode=remote")
    if lora.enabled:
        for key in ("mcore_path", "prm_hf_path", "prm_mcore_path", "ref_path"):
            _check(not getattr(m, key), f"model.{key}", getattr(m, key),
                   "must be unset with model.lora.rank > 0: the policy, the implicit PRM and the reference "
                   "all start from the one shared base, model.hf_path (a LoRA run resumes from its "
                   "checkpoint.dir)")


def _divisors(n: int, also_divides: int | None = None) -> str:
    ok = [d for d in range(1, n + 1) if n % d == 0 and (also_divides is None or also_divides % d == 0)]
    return "one of " + ", ".join(map(str, ok))


def _multiples_dividing(unit: int, total: int, limit: int = 4) -> str:
    """Up to ``limit`` multiples of ``unit`` that divide ``total`` (for 'what would work')."""
    ok = [m for m in range(unit, total + 1, unit) if total % m == 0][:limit]
    return ", ".join(map(str, ok)) if ok else f"none: change the batch to a multiple of {unit}"


def validate(cfg: Config, world_size: int | None = None, *, model_shape: ModelShape | None = None,
             estimators: typing.Collection[str] | None = None, gpus_per_node: int | None = None,
             stage: Literal["train", "sft"] = "train") -> None:
    """Validate the whole tree up front, before any process group or model is built.

    The facts config does not own come in as arguments (config imports nothing of ours):
    ``model_shape`` (layers, heads, KV groups; ``models.hf_config.read_hf_config``), the advantage
    ``estimators`` the algorithm registry knows, the ranks (``world_size``) and ``gpus_per_node``.
    A check whose fact is not given is skipped; ``training.validation.validate_run`` gathers them
    all. ``stage`` says which batch settings must split over data parallelism (PRIME's or SFT's).
    """
    a, r, t = cfg.algorithm, cfg.rollout, cfg.train
    _check(a.beta > 0, "algorithm.beta", a.beta, "must be > 0")
    _check(0.0 <= a.filter_low <= a.filter_high <= 1.0, "algorithm.filter_low/filter_high",
           (a.filter_low, a.filter_high), "need 0 <= filter_low <= filter_high <= 1")
    _check(0.0 <= a.gamma <= 1.0, "algorithm.gamma", a.gamma, "must be in [0, 1]")
    _check(a.clip_low >= 0 and a.clip_high >= 0, "algorithm.clip_low/clip_high",
           (a.clip_low, a.clip_high), "must be >= 0")
    _check(a.ppo_epochs >= 1, "algorithm.ppo_epochs", a.ppo_epochs, "must be >= 1")
    _check(a.clip_ratio_c is None or a.clip_ratio_c > 1, "algorithm.clip_ratio_c", a.clip_ratio_c,
           "must be > 1 (or null: no dual-clip)")
    _check(r.n >= 1, "rollout.n", r.n, "must be >= 1")
    _check(r.temperature >= 0, "rollout.temperature", r.temperature, "must be >= 0")
    _check(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "must be in (0, 1]")
    _check(r.mode == "colocated" or r.remote_urls, "rollout.remote_urls", r.remote_urls,
           "remote mode needs at least one server URL")
    _check(r.mode == "colocated" or r.engine == "sglang", "rollout.engine", r.engine,
           "remote mode (rollout.mode=remote) talks to SGLang servers: use rollout.engine=sglang")
    _check(r.tp >= 1, "rollout.tp", r.tp, "must be >= 1")
    _check(r.engine != "hf" or r.tp == 1, "rollout.tp", r.tp,
           "the hf engine runs on one device (one engine per rank); use 1")
    _check(r.max_restarts >= 0, "rollout.max_restarts", r.max_restarts, "must be >= 0")
    _check(r.max_staleness in (0, 1), "rollout.max_staleness", r.max_staleness,
           "must be 0 (generate, then train) or 1 (the next batch generated while this one trains)")
    _check(r.max_staleness == 0 or r.mode == "remote" or stage == "sft", "rollout.max_staleness", r.max_staleness,
           "one-step-off rollouts need engines that do not share the trainer's devices: rollout.mode=remote "
           "(the demo starts a local server for it)")
    bounds = a.rollout_correction_bounds
    _check(bounds is None or (len(bounds) == 2 and 0 <= bounds[0] <= bounds[1]), "algorithm.rollout_correction_bounds",
           bounds, "must be [low, high] with 0 <= low <= high (or null: the mode's default)")
    if world_size is not None and r.mode == "colocated":
        _check(world_size % r.tp == 0, "rollout.tp", r.tp,
               f"colocated engines take rollout.tp consecutive ranks each: must divide the world size ({world_size})")
    _check(a.estimator not in ("gae", "ppo"), "algorithm.estimator", a.estimator,
           "PPO with a learned value model (GAE) is not offered: the trainer builds no critic; use prime_rloo, "
           "prime_rloo_k_scaled, prime_official, rloo, grpo, reinforce or reinforce_pp")
    if estimators is not None:
        _check(a.estimator in estimators, "algorithm.estimator", a.estimator, f"one of {', '.join(sorted(estimators))}")
    _check(a.process_return == "sum" or a.gamma == 1.0, "algorithm.process_return", a.process_return,
           f"the min-form return has no discount: it needs algorithm.gamma=1 (got {a.gamma})")
    _check(t.prompts_per_step >= 1, "train.prompts_per_step", t.prompts_per_step, "must be >= 1")
    _check(t.max_rollout_rounds >= 1, "train.max_rollout_rounds", t.max_rollout_rounds, "must be >= 1")
    _check(t.exit_after_minutes >= 0, "train.exit_after_minutes", t.exit_after_minutes, "must be >= 0 (0: off)")
    _check(t.hang_timeout_minutes >= 0, "train.hang_timeout_minutes", t.hang_timeout_minutes, "must be >= 0 (0: off)")
    _check(t.stop_grace_minutes > 0, "train.stop_grace_minutes", t.stop_grace_minutes, "must be > 0")
    _check(0 <= t.warn_advantage_flip_frac <= 1, "train.warn_advantage_flip_frac", t.warn_advantage_flip_frac,
           "must be in [0, 1]")
    _check(t.warn_verify_timeout_frac >= 0, "train.warn_verify_timeout_frac", t.warn_verify_timeout_frac,
           "must be >= 0")
    _check(cfg.sft.checkpoint_interval >= 0, "sft.checkpoint_interval", cfg.sft.checkpoint_interval,
           "must be >= 0 (0: only at the end)")
    _check(t.mini_batch_responses >= 1 and (t.prompts_per_step * r.n) % t.mini_batch_responses == 0,
           "train.mini_batch_responses", t.mini_batch_responses,
           f"must divide prompts_per_step * rollout.n = {t.prompts_per_step * r.n}")
    prm_mb = t.prm_responses_per_update
    _check(t.prm_mini_batch_responses >= 0 and (t.prompts_per_step * r.n) % prm_mb == 0,
           "train.prm_mini_batch_responses", t.prm_mini_batch_responses,
           f"must be 0 (the policy's mini-batch) or divide prompts_per_step * rollout.n = {t.prompts_per_step * r.n}")
    _check(t.micro_batch_tokens >= cfg.data.max_prompt_len + cfg.data.max_response_len,
           "train.micro_batch_tokens", t.micro_batch_tokens,
           "must hold at least one full sequence (data.max_prompt_len + data.max_response_len)")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", cfg.checkpoint.keep_last, "must be >= 1")
    _check(cfg.model.moe_aux_loss_coef >= 0, "model.moe_aux_loss_coef", cfg.model.moe_aux_loss_coef, "must be >= 0")
    _check(cfg.model.vocab_pad_multiple >= 1, "model.vocab_pad_multiple", cfg.model.vocab_pad_multiple,
           "must be >= 1")
    _check(cfg.checkpoint.interval >= 1, "checkpoint.interval", cfg.checkpoint.interval,
           "must be >= 1 (a checkpoint every N steps; the last step is always saved)")
    # Refused rather than half-supported: each would build and run, and train the wrong thing.
    _check(cfg.model.fp8 is None, "model.fp8", cfg.model.fp8,
           "FP8 training has not run on a GPU yet (Transformer Engine FP8 needs an FP8 recipe and "
           "micro-batch token counts divisible by 16, which the trainer does not arrange): leave "
           "model.fp8 unset (null) and train in model.dtype=bf16")
    _check(cfg.parallel.cp == 1, "parallel.cp", cfg.parallel.cp,
           "must be 1: the trainer does not split sequences over context-parallel ranks (every rank "
           "would see whole sequences and the attention would be wrong); use parallel.tp/parallel.pp")
    _validate_lora(cfg)
    if cfg.parallel.sequence_parallel:
        _check(cfg.parallel.tp > 1, "parallel.sequence_parallel", True, "needs parallel.tp > 1")
    shape = dict(num_layers=model_shape.num_layers, num_heads=model_shape.num_heads,
                 num_kv_heads=model_shape.num_kv_heads, num_experts=model_shape.num_experts) if model_shape is not None else {}
    if model_shape is not None and model_shape.num_experts and cfg.model.lora.enabled:
        mlp = [t for t in cfg.model.lora.targets if t in ("linear_fc1", "linear_fc2")]
        _check(not mlp, "model.lora.targets", cfg.model.lora.targets,
               f"a mixture-of-experts model's MLPs are its experts, which take no LoRA adapters here: leave out "
               f"{', '.join(mlp)} (e.g. model.lora.targets=[linear_qkv,linear_proj])")
    if cfg.algorithm.replay_engine_routes:
        _check(cfg.rollout.engine == "sglang", "algorithm.replay_engine_routes", True,
               f"needs rollout.engine=sglang (SGLang returns the experts it routed to; vLLM only with its "
               f"model runner V2 on CUDA, not wired here; the {cfg.rollout.engine} engine does not)")
        _check(cfg.algorithm.routing_replay, "algorithm.replay_engine_routes", True,
               "needs algorithm.routing_replay=true (the engine's routes are replayed in the policy's passes)")
        _check(model_shape is None or bool(model_shape.num_experts), "algorithm.replay_engine_routes", True,
               "is for mixture-of-experts models; this model is dense")
    if model_shape is not None and model_shape.num_experts and cfg.parallel.tp > 1:
        _check(cfg.parallel.sequence_parallel, "parallel.sequence_parallel", False,
               f"must be true for a mixture-of-experts model at parallel.tp={cfg.parallel.tp}: megatron-core's "
               "MoE layer trains with tensor parallelism only under sequence parallelism")
    validate_parallel(cfg.parallel, world_size=world_size, **shape)
    if world_size is not None:
        p = cfg.parallel
        dp = world_size // (p.tp * p.pp * p.cp)
        layout = f"world size {world_size} / (tp {p.tp} x pp {p.pp})"
        if stage == "train":
            rows = t.prompts_per_step * r.n
            _check(rows % dp == 0, "train.prompts_per_step", t.prompts_per_step,
                   f"prompts_per_step x rollout.n = {rows} responses must split evenly over the "
                   f"{dp} data-parallel ranks ({layout}); try prompts_per_step a multiple of "
                   f"{dp // math.gcd(dp, r.n)}")
            _check(t.mini_batch_responses % dp == 0, "train.mini_batch_responses", t.mini_batch_responses,
                   f"must split evenly over the {dp} data-parallel ranks ({layout}); "
                   f"try {_multiples_dividing(dp, rows)}")
            _check(prm_mb % dp == 0, "train.prm_mini_batch_responses", t.prm_mini_batch_responses,
                   f"{prm_mb} responses per PRM update must split evenly over the {dp} data-parallel "
                   f"ranks ({layout}); try {_multiples_dividing(dp, rows)}")
        else:
            _check(cfg.sft.batch_size % dp == 0, "sft.batch_size", cfg.sft.batch_size,
                   f"must split evenly over the {dp} data-parallel ranks ({layout}); "
                   f"try a multiple of {dp}")
    colocated_engines = r.mode == "colocated" and r.engine != "hf"
    if gpus_per_node is not None and colocated_engines:
        _check(r.tp <= gpus_per_node and gpus_per_node % r.tp == 0, "rollout.tp", r.tp,
               f"a colocated engine runs on rollout.tp GPUs of one node: must divide the GPUs per node "
               f"({gpus_per_node}); try {_divisors(gpus_per_node)}")
