"""Read a Hugging Face ``config.json`` into the few numbers a Megatron GPT model needs.

Plain JSON (no transformers import) so config validation stays cheap. Handles both the
transformers 4 layout (``rope_theta`` / ``rope_scaling``) and the 5 layout (``rope_parameters``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from megatron_prime.errors import UserError


class ModelConfigError(UserError):
    """A Hugging Face config that we cannot build a model from."""


# architecture -> family
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}
MOE_FAMILIES = ("qwen3_moe", "mixtral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class HFArch:
    architecture: str
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str = "default"
    rope_params: dict = field(default_factory=dict)  # factor, low/high_freq_factor, ...
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    # mixture of experts (every layer's MLP; 0 experts: a dense model)
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0  # one expert's MLP width
    moe_topk: int = 0  # experts per token
    # softmax over all experts before the top-k, without renormalising the k weights (Qwen3-MoE with
    # norm_topk_prob=false); else the softmax of the k chosen logits (Mixtral, Qwen3-MoE's default)
    moe_pre_softmax: bool = False

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def _require(cfg: dict, key: str, path: str):
    if key not in cfg:
        raise ModelConfigError(f"{path}: missing field '{key}'")
    return cfg[key]


def arch_from_dict(cfg: dict, path: str = "config.json") -> HFArch:
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ModelConfigError(
            f"{path}: architectures={archs!r} is not supported; supported: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
        )
    family = SUPPORTED_ARCHITECTURES[arch]
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelConfigError(f"{path}: hidden_act={act!r} is not supported; expected 'silu'")
    if cfg.get("use_sliding_window"):
        raise ModelConfigError(f"{path}: use_sliding_window=true is not supported")

    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"{path}: rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )

    hidden = int(_require(cfg, "hidden_size", path))
    heads = int(_require(cfg, "num_attention_heads", path))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ModelConfigError(
            f"{path}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    moe = _moe_fields(cfg, family, path) if family in MOE_FAMILIES else {}
    return HFArch(
        architecture=arch,
        family=family,
        num_layers=int(_require(cfg, "num_hidden_layers", path)),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=int(_require(cfg, "intermediate_size", path)),
        vocab_size=int(_require(cfg, "vocab_size", path)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_type=rope_type,
        rope_params=rope,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Llama and Qwen3 only with attention_bias=true.
        qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        **moe,
    )


def _moe_fields(cfg: dict, family: str, path: str) -> dict:
    """The expert layout of a Qwen3-MoE or Mixtral config; what we cannot build is refused."""
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    if experts < 2:
        raise ModelConfigError(f"{path}: a {family} model needs num_experts (or num_local_experts) >= 2")
    if family == "qwen3_moe":
        if int(cfg.get("decoder_sparse_step", 1)) != 1 or cfg.get("mlp_only_layers"):
            raise ModelConfigError(f"{path}: dense layers between the MoE layers (decoder_sparse_step != 1 or "
                                   "mlp_only_layers) are not supported: every layer must be a MoE layer")
        if cfg.get("shared_expert_intermediate_size"):
            raise ModelConfigError(f"{path}: shared experts are not supported")
        ffn, pre_softmax = int(_require(cfg, "moe_intermediate_size", path)), not cfg.get("norm_topk_prob", False)
    else:
        if cfg.get("router_jitter_noise"):
            raise ModelConfigError(f"{path}: router_jitter_noise={cfg['router_jitter_noise']} is not supported "
                                   "(routing must be deterministic)")
        if cfg.get("sliding_window"):
            raise ModelConfigError(f"{path}: sliding_window={cfg['sliding_window']} is not supported")
        ffn, pre_softmax = int(_require(cfg, "intermediate_size", path)), False
    topk = int(_require(cfg, "num_experts_per_tok", path))
    if not 1 <= topk <= experts:
        raise ModelConfigError(f"{path}: num_experts_per_tok={topk}: expected 1 to num_experts ({experts})")
    if topk == 1 and not pre_softmax:
        # renormalised over one expert its weight is 1.0; megatron-core's top-1 router weighs it by its
        # softmax probability over all experts instead
        field = "norm_topk_prob=true" if family == "qwen3_moe" else "a Mixtral router (always renormalised)"
        raise ModelConfigError(f"{path}: num_experts_per_tok=1 with {field} is not supported: the chosen "
                               "expert's weight would differ from transformers'")
    return {"num_experts": experts, "moe_ffn_hidden_size": ffn, "moe_topk": topk, "moe_pre_softmax": pre_softmax}


def read_hf_config(hf_dir: str) -> HFArch:
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ModelConfigError(f"{path}: file not found (expected a Hugging Face checkpoint dir)") from None
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path}: not valid JSON ({e})") from None
    return arch_from_dict(cfg, path)
