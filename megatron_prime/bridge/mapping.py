"""Hugging Face <-> Megatron parameter names and layouts, for one tensor-parallel shard at a time.

Megatron fuses and shards differently from HF:

* ``linear_qkv`` holds q, k and v interleaved by query group: for each KV group g,
  ``[q heads of g (heads/groups x head_dim rows), k_g (head_dim rows), v_g (head_dim rows)]``.
  TP rank r owns a contiguous run of whole groups.
* ``linear_fc1`` holds ``[gate; up]``; TP rank r owns ``[gate_r; up_r]`` (not a plain dim-0 cut).
* column-parallel weights (qkv, fc1, embedding, output layer) are cut along dim 0, row-parallel
  ones (``linear_proj``, ``linear_fc2``) along dim 1; norms are replicated.
* the embedding and output layer are padded with zero rows to the padded vocabulary.
* mixture-of-experts layers (Qwen3-MoE, Mixtral): the router ``mlp.router.weight`` is HF's gate
  (replicated); each expert is a small MLP, ``mlp.experts.local_experts.{e}.linear_fc1`` = its
  ``[gate; up]`` and ``linear_fc2`` = its down projection, sharded over TP like a dense MLP. Names
  here use the global expert index ``e``; expert parallelism holds experts
  ``ep_rank * E / EP .. (ep_rank + 1) * E / EP - 1`` on each rank (``local_experts.{e - offset}``).

Everything here is pure tensor layout: the sources of slices (``SliceSource``) live in
``hf_io.py``, the collectives in ``transfer.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_prime.models.hf_config import HFArch

# Megatron names of the local spec vs. Transformer Engine's fused-norm names.
_TE_NAME_FOR_LOCAL = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_LOCAL_NAME_FOR_TE = {v: k for k, v in _TE_NAME_FOR_LOCAL.items()}


@dataclass(frozen=True)
class ParamSpec:
    """How one Megatron parameter is made of HF tensors."""

    kind: str  # "plain", "qkv", "fc1"
    hf_names: tuple[str, ...]
    tp_dim: int | None  # dim cut across TP ranks (None: replicated)
    vocab_padded: bool = False


class SliceSource(Protocol):
    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The HF tensor ``name`` (restricted to ``[start, stop)`` along ``dim`` if given)."""
        ...


def canonical_layer_param(local_suffix: str) -> str:
    """``input_layernorm.weight`` (local spec) and TE's fused name map to one canonical name."""
    return _LOCAL_NAME_FOR_TE.get(local_suffix, local_suffix)


def param_spec(arch: HFArch, name: str) -> ParamSpec:
    """The spec of a Megatron parameter given its *global* name (global layer index)."""
    if name == "embedding.word_embeddings.weight":
        return ParamSpec("plain", ("model.embed_tokens.weight",), 0, vocab_padded=True)
    if name == "output_layer.weight":
        hf = "model.embed_tokens.weight" if arch.tie_embeddings else "lm_head.weight"
        return ParamSpec("plain", (hf,), 0, vocab_padded=True)
    if name == "decoder.final_layernorm.weight":
        return ParamSpec("plain", ("model.norm.weight",), None)
    if not name.startswith("decoder.layers."):
        raise KeyError(f"no Hugging Face mapping for Megatron parameter '{name}'")
    layer, suffix = name[len("decoder.layers."):].split(".", 1)
    hf = f"model.layers.{int(layer)}."
    suffix = canonical_layer_param(suffix)
    if suffix.startswith("mlp.router.") or suffix.startswith("mlp.experts."):
        return _expert_spec(arch, name, hf, suffix)
    table = {
        "input_layernorm.weight": ParamSpec("plain", (hf + "input_layernorm.weight",), None),
        "pre_mlp_layernorm.weight": ParamSpec("plain", (hf + "post_attention_layernorm.weight",), None),
        "self_attention.linear_qkv.weight": ParamSpec(
            "qkv", tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"), 0
        ),
        "self_attention.linear_qkv.bias": ParamSpec(
            "qkv", tuple(hf + f"self_attn.{p}_proj.bias" for p in "qkv"), 0
        ),
        "self_attention.q_layernorm.weight": ParamSpec("plain", (hf + "self_attn.q_norm.weight",), None),
        "self_attention.k_layernorm.weight": ParamSpec("plain", (hf + "self_attn.k_norm.weight",), None),
        "self_attention.linear_proj.weight": ParamSpec("plain", (hf + "self_attn.o_proj.weight",), 1),
        "mlp.linear_fc1.weight": ParamSpec(
            "fc1", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), 0
        ),
        "mlp.linear_fc2.weight": ParamSpec("plain", (hf + "mlp.down_proj.weight",), 1),
    }
    if suffix not in table:
        raise KeyError(f"no Hugging Face mapping for Megatron parameter '{name}'")
    return table[suffix]


# HF names of the MoE parts per family: (router, expert prefix, gate, up, down)
_MOE_HF = {"qwen3_moe": ("mlp.gate", "mlp.experts", "gate_proj", "up_proj", "down_proj"),
           "mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts", "w1", "w3", "w2")}


def _expert_spec(arch: HFArch, name: str, hf: str, suffix: str) -> ParamSpec:
    if not arch.is_moe:
        raise KeyError(f"no Hugging Face mapping for Megatron parameter '{name}' (a dense {arch.family} model)")
    router, experts, gate, up, down = _MOE_HF[arch.family]
    if suffix == "mlp.router.weight":
        return ParamSpec("plain", (f"{hf}{router}.weight",), None)
    _, _, _, expert, linear = suffix.split(".", 4)  # mlp.experts.local_experts.{e}.linear_fcN.weight
    prefix = f"{hf}{experts}.{int(expert)}."
    if linear == "linear_fc1.weight":
        return ParamSpec("fc1", (f"{prefix}{gate}.weight", f"{prefix}{up}.weight"), 0)
    if linear == "linear_fc2.weight":
        return ParamSpec("plain", (f"{prefix}{down}.weight",), 1)
    raise KeyError(f"no Hugging Face mapping for Megatron parameter '{name}'")


def expert_of(name: str) -> int | None:
    """The global expert index of an expert parameter's canonical name (None: not an expert's)."""
    marker = ".mlp.experts.local_experts."
    if marker not in name:
        return None
    return int(name.split(marker, 1)[1].split(".", 1)[0])


def megatron_param_names(arch: HFArch) -> list[str]:
    """All global Megatron parameter names of the model, in HF-like order (canonical names)."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(arch.num_layers):
        p = f"decoder.layers.{i}."
        names += [p + "input_layernorm.weight", p + "self_attention.linear_qkv.weight"]
        if arch.qkv_bias:
            names.append(p + "self_attention.linear_qkv.bias")
        if arch.qk_norm:
            names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
        names += [p + "self_attention.linear_proj.weight", p + "pre_mlp_layernorm.weight"]
        if arch.is_moe:
            names.append(p + "mlp.router.weight")
            for e in range(arch.num_experts):
                names += [p + f"mlp.experts.local_experts.{e}.linear_fc1.weight",
                          p + f"mlp.experts.local_experts.{e}.linear_fc2.weight"]
        else:
            names += [p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
    names.append("decoder.final_layernorm.weight")
    if not arch.tie_embeddings:
        names.append("output_layer.weight")
    return names


def hf_param_names(arch: HFArch) -> list[str]:
    out = []
    for name in megatron_param_names(arch):
        out += param_spec(arch, name).hf_names
    return out


def expected_hf_shape(arch: HFArch, hf_name: str) -> tuple[int, ...]:
    h, hd = arch.hidden_size, arch.head_dim
    suffix = hf_name.split(".", 3)[-1] if hf_name.startswith("model.layers.") else hf_name
    if ".experts." in suffix:  # one expert's projection: the same shape for every expert
        owner, rest = suffix.split(".experts.", 1)
        suffix = f"{owner}.experts.{rest.split('.', 1)[1]}"
    shapes = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "lm_head.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (arch.num_heads * hd, h),
        "self_attn.k_proj.weight": (arch.num_kv_heads * hd, h),
        "self_attn.v_proj.weight": (arch.num_kv_heads * hd, h),
        "self_attn.q_proj.bias": (arch.num_heads * hd,),
        "self_attn.k_proj.bias": (arch.num_kv_heads * hd,),
        "self_attn.v_proj.bias": (arch.num_kv_heads * hd,),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "self_attn.o_proj.weight": (h, arch.num_heads * hd),
        "mlp.gate_proj.weight": (arch.ffn_hidden_size, h),
        "mlp.up_proj.weight": (arch.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, arch.ffn_hidden_size),
        # mixture of experts (Qwen3-MoE, Mixtral)
        "mlp.gate.weight": (arch.num_experts, h),
        "mlp.experts.gate_proj.weight": (arch.moe_ffn_hidden_size, h),
        "mlp.experts.up_proj.weight": (arch.moe_ffn_hidden_size, h),
        "mlp.experts.down_proj.weight": (h, arch.moe_ffn_hidden_size),
        "block_sparse_moe.gate.weight": (arch.num_experts, h),
        "block_sparse_moe.experts.w1.weight": (arch.moe_ffn_hidden_size, h),
        "block_sparse_moe.experts.w3.weight": (arch.moe_ffn_hidden_size, h),
        "block_sparse_moe.experts.w2.weight": (h, arch.moe_ffn_hidden_size),
    }
    return shapes[suffix]


# ---------------------------------------------------------------------------------------------
# One Megatron TP shard <-> the full HF tensors: a table of pieces, used in both directions


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, start + count)`` of one TP shard (its dim 0) are the block
    ``narrow(hf_dim, hf_start, hf_count)`` of the full HF tensor ``hf_name``."""

    hf_name: str
    start: int
    count: int
    hf_dim: int
    hf_start: int
    hf_count: int

    def of_shard(self, shard: torch.Tensor) -> torch.Tensor:
        """This piece in the shard (a view; contiguous when the shard is)."""
        return shard.narrow(0, self.start, self.count)

    def of_hf(self, full: torch.Tensor) -> torch.Tensor:
        """This piece's place in the full HF tensor (a view)."""
        return full.narrow(self.hf_dim, self.hf_start, self.hf_count)


def shard_pieces(arch: HFArch, spec: ParamSpec, tp_rank: int, tp_size: int, padded_vocab: int) -> list[Piece]:
    """The pieces of TP rank ``tp_rank``'s shard of a Megatron parameter (of a replicated one: the
    whole tensor, on every rank). Shard rows in no piece are vocabulary padding (zeros)."""
    if spec.kind == "qkv":
        groups = arch.num_kv_heads // tp_size
        q_rows = arch.num_heads // arch.num_kv_heads * arch.head_dim
        hd = arch.head_dim
        q, k, v = spec.hf_names
        pieces = []
        for j in range(groups):
            g, base = tp_rank * groups + j, j * (q_rows + 2 * hd)
            pieces += [Piece(q, base, q_rows, 0, g * q_rows, q_rows),
                       Piece(k, base + q_rows, hd, 0, g * hd, hd),
                       Piece(v, base + q_rows + hd, hd, 0, g * hd, hd)]
        return pieces
    if spec.kind == "fc1":
        gate, up = spec.hf_names
        rows = expected_hf_shape(arch, gate)[0] // tp_size  # a dense MLP's or one expert's width
        return [Piece(gate, 0, rows, 0, tp_rank * rows, rows), Piece(up, rows, rows, 0, tp_rank * rows, rows)]
    (name,) = spec.hf_names
    full = expected_hf_shape(arch, name)
    if spec.tp_dim is None:
        return [Piece(name, 0, full[0], 0, 0, full[0])]
    if spec.tp_dim == 1:
        width = full[1] // tp_size
        return [Piece(name, 0, full[0], 1, tp_rank * width, width)]
    rows = (padded_vocab if spec.vocab_padded else full[0]) // tp_size
    real = max(0, min(rows, full[0] - tp_rank * rows))
    return [Piece(name, 0, real, 0, tp_rank * rows, real)] if real else []


def shard_rows(arch: HFArch, spec: ParamSpec, tp_size: int, padded_vocab: int) -> int:
    """Rows of one TP shard of the parameter."""
    if spec.kind == "qkv":
        return arch.num_kv_heads // tp_size * (arch.num_heads // arch.num_kv_heads + 2) * arch.head_dim
    if spec.kind == "fc1":
        return 2 * expected_hf_shape(arch, spec.hf_names[0])[0] // tp_size
    rows = padded_vocab if spec.vocab_padded else expected_hf_shape(arch, spec.hf_names[0])[0]
    return rows // tp_size if spec.tp_dim == 0 else rows


def load_shard(
    arch: HFArch, spec: ParamSpec, source: SliceSource, tp_rank: int, tp_size: int, padded_vocab: int,
    out: torch.Tensor,
) -> None:
    """Copy TP rank ``tp_rank``'s shard of a Megatron parameter into ``out`` (the parameter),
    reading only what it owns; each piece is copied straight to its place in ``out``.

    Raises ``ValueError`` naming the HF tensor whose slice does not fit where it belongs."""
    rows = shard_rows(arch, spec, tp_size, padded_vocab)
    if out.shape[0] != rows:
        raise ValueError(f"the Megatron shard has {out.shape[0]} rows, the config implies {rows}")
    pieces = shard_pieces(arch, spec, tp_rank, tp_size, padded_vocab)
    for p in pieces:
        src = source.read(p.hf_name, p.hf_dim, p.hf_start, p.hf_start + p.hf_count)
        dst = p.of_shard(out)
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(
                f"the slice of '{p.hf_name}' has shape {list(src.shape)}, its place in the shard {list(dst.shape)}"
            )
        dst.copy_(src)
    covered = sum(p.count for p in pieces)
    out[covered:].zero_()  # vocabulary padding (pieces cover the rows before it)
