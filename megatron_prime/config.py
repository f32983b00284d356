"""One typed config tree for every command: YAML file + dotted command-line overrides.

    cfg = load_config("examples/configs/tiny_cpu.yaml", ["parallel.tp=2", "algorithm.beta=0.1"])

Every value is type-checked on load and the tree is validated up front (``validate``), with
errors that name the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config key holds a value that is not allowed."""


@dataclass
class ModelConfig:
    hf_path: str = ""  # Hugging Face checkpoint dir: config.json, *.safetensors, tokenizer
    mcore_path: str = ""  # optional Megatron checkpoint to start from instead of hf_path's weights
    prm_hf_path: str = ""  # optional separate starting point for the implicit PRM (same architecture)
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    fp8: Optional[Literal["e4m3", "hybrid"]] = None  # needs Transformer Engine on Hopper
    transformer_engine: Literal["auto", "on", "off"] = "auto"
    vocab_pad_multiple: int = 128  # vocab is padded to a multiple of this x TP


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
    base_port: int = 30000  # colocated sglang: engine i listens on base_port + 100 * i
    router_url: str = ""  # remote: sglang-router in front of remote_urls (for /generate)
    weight_sync_address: str = ""  # remote: rank 0's address the servers reach (default: its hostname)
    weight_sync_port: int = 29650  # remote: rendezvous port of the weight-broadcast group


@dataclass
class AlgorithmConfig:
    beta: float = 0.05  # implicit PRM reward scale (paper Eq. 3)
    estimator: str = "prime_rloo"  # see megatron_prime.algorithm registry; "rloo" = outcome-only
    gamma: float = 1.0
    lam: float = 1.0  # GAE lambda
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
    tis_cap: Optional[float] = None  # truncated importance sampling vs rollout log-probs
    ppo_epochs: int = 1


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
    micro_batch_tokens: int = 16384  # token budget per micro-batch (dynamic batch size)
    max_rollout_rounds: int = 8  # rollout rounds per step to fill the filtered batch
    offload: bool = True  # free grads/optimizer state around rollout and the other model's phase (GPU)
    eval_every: int = 0  # greedy accuracy on data.eval_files every N steps (0: start and end only)
    eval_limit: int = 0  # evaluate on the first N eval prompts (0: all)
    seed: int = 1234


@dataclass
class SFTConfig:
    train_file: str = ""  # jsonl rows {"prompt", "response"}
    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    output_dir: str = "outputs/sft"  # Megatron checkpoint + HF export (output_dir/hf)
    log_every: int = 10


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


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    data = {}
    if path:
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


def validate_parallel(parallel: ParallelConfig, *, num_layers: int, num_heads: int, num_kv_heads: int,
                      world_size: int | None = None) -> None:
    """Check the parallel layout against the model's shape (and the number of ranks, if known)."""
    for name in ("tp", "pp", "cp", "ep"):
        _check(getattr(parallel, name) >= 1, f"parallel.{name}", getattr(parallel, name), "must be >= 1")
    tp, pp = parallel.tp, parallel.pp
    _check(num_heads % tp == 0, "parallel.tp", tp,
           f"must divide the number of attention heads ({num_heads})")
    _check(num_kv_heads % tp == 0, "parallel.tp", tp,
           f"must divide the number of KV groups ({num_kv_heads})")
    _check(num_layers % pp == 0, "parallel.pp", pp, f"must divide the number of layers ({num_layers})")
    if world_size is not None:
        model_parallel = tp * pp * parallel.cp
        _check(world_size % model_parallel == 0, "parallel", f"tp={tp} pp={pp} cp={parallel.cp}",
               f"tp*pp*cp must divide the world size ({world_size})")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Validate the whole tree up front, before any model is built."""
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
    if world_size is not None and r.mode == "colocated":
        _check(world_size % r.tp == 0, "rollout.tp", r.tp,
               f"colocated engines take rollout.tp consecutive ranks each: must divide the world size ({world_size})")
    from megatron_prime.algorithm import ADVANTAGE_ESTIMATORS  # torch only

    _check(a.estimator in ADVANTAGE_ESTIMATORS, "algorithm.estimator", a.estimator,
           f"one of {', '.join(sorted(ADVANTAGE_ESTIMATORS))}")
    _check(a.estimator != "gae", "algorithm.estimator", a.estimator,
           "GAE needs a value model, which the trainer does not build; use prime_rloo, rloo, grpo, "
           "reinforce or reinforce_pp")
    _check(t.prompts_per_step >= 1, "train.prompts_per_step", t.prompts_per_step, "must be >= 1")
    _check(t.mini_batch_responses >= 1 and (t.prompts_per_step * r.n) % t.mini_batch_responses == 0,
           "train.mini_batch_responses", t.mini_batch_responses,
           f"must divide prompts_per_step * rollout.n = {t.prompts_per_step * r.n}")
    _check(t.micro_batch_tokens >= cfg.data.max_prompt_len + cfg.data.max_response_len,
           "train.micro_batch_tokens", t.micro_batch_tokens,
           "must hold at least one full sequence (data.max_prompt_len + data.max_response_len)")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", cfg.checkpoint.keep_last, "must be >= 1")
    _check(cfg.model.vocab_pad_multiple >= 1, "model.vocab_pad_multiple", cfg.model.vocab_pad_multiple,
           "must be >= 1")
    if cfg.model.fp8 is not None:
        _check(cfg.model.transformer_engine != "off", "model.fp8", cfg.model.fp8,
               "FP8 needs Transformer Engine (model.transformer_engine must not be 'off')")
    if cfg.parallel.sequence_parallel:
        _check(cfg.parallel.tp > 1, "parallel.sequence_parallel", True, "needs parallel.tp > 1")
    if cfg.model.hf_path:
        config_path = os.path.join(cfg.model.hf_path, "config.json")
        if os.path.exists(config_path):
            from megatron_prime.models.hf_config import read_hf_config  # no torch.distributed

            arch = read_hf_config(cfg.model.hf_path)
            validate_parallel(cfg.parallel, num_layers=arch.num_layers, num_heads=arch.num_heads,
                              num_kv_heads=arch.num_kv_heads, world_size=world_size)
            return
    validate_parallel(cfg.parallel, num_layers=cfg.parallel.pp, num_heads=cfg.parallel.tp,
                      num_kv_heads=cfg.parallel.tp, world_size=world_size)
