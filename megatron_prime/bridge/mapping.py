"""Hugging Face <-> Megatron parameter names and layouts, for one tensor-parallel shard at a time.

Megatron fuses and shards differently from HF:

* ``linear_qkv`` holds q, k and v interleaved by query group: for each KV group g,
  ``[q heads of g (heads/groups x head_dim rows), k_g (head_dim rows), v_g (head_dim rows)]``.
  TP rank r owns a contiguous run of whole groups.
* ``linear_fc1`` holds ``[gate; up]``; TP rank r owns ``[gate_r; up_r]`` (not a plain dim-0 cut).
* column-parallel weights (qkv, fc1, embedding, output layer) are cut along dim 0, row-parallel
  ones (``linear_proj``, ``linear_fc2``) along dim 1; norms are replicated.
* the embedding and output layer are padded with zero rows to the padded vocabulary.

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
        names += [
            p + "self_attention.linear_proj.weight",
            p + "pre_mlp_layernorm.weight",
            p + "mlp.linear_fc1.weight",
            p + "mlp.linear_fc2.weight",
        ]
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
    }
    return shapes[suffix]


# ---------------------------------------------------------------------------------------------
# HF -> one Megatron TP shard


def load_shard(
    arch: HFArch, spec: ParamSpec, source: SliceSource, tp_rank: int, tp_size: int, padded_vocab: int,
    out: torch.Tensor,
) -> None:
    """Copy TP rank ``tp_rank``'s shard of a Megatron parameter into ``out`` (the parameter),
    reading only what it owns; each HF piece is copied straight to its place in ``out``.

    Raises ``ValueError`` naming the HF tensor whose slice does not fit where it belongs."""
    if spec.kind == "qkv":
        groups = arch.num_kv_heads // tp_size
        q_rows = arch.num_heads // arch.num_kv_heads * arch.head_dim
        hd = arch.head_dim
        g0 = tp_rank * groups
        if out.shape[0] != groups * (q_rows + 2 * hd):
            raise ValueError(f"Megatron shard has {out.shape[0]} rows, expected {groups * (q_rows + 2 * hd)}")
        q_out, k_out, v_out = out.view(groups, q_rows + 2 * hd, *out.shape[1:]).split([q_rows, hd, hd], dim=1)
        for name, dst, rows in zip(spec.hf_names, (q_out, k_out, v_out), (q_rows, hd, hd)):
            src = source.read(name, 0, g0 * rows, (g0 + groups) * rows)
            _put(dst, src.view(groups, rows, *src.shape[1:]) if src.shape[0] == groups * rows else src, name)
        return
    if spec.kind == "fc1":
        rows = arch.ffn_hidden_size // tp_size
        lo, hi = tp_rank * rows, (tp_rank + 1) * rows
        gate, up = spec.hf_names
        _put(out[:rows], source.read(gate, 0, lo, hi), gate)
        _put(out[rows:], source.read(up, 0, lo, hi), up)
        return
    (name,) = spec.hf_names
    if spec.tp_dim is None:
        _put(out, source.read(name), name)
        return
    if spec.vocab_padded:
        rows = padded_vocab // tp_size
        lo, hi = tp_rank * rows, (tp_rank + 1) * rows
        if out.shape[0] != rows:
            raise ValueError(f"Megatron shard has {out.shape[0]} rows, expected {rows} (padded vocabulary)")
        real = source.read(name, 0, min(lo, arch.vocab_size), min(hi, arch.vocab_size))
        _put(out[: real.shape[0]], real, name)
        out[real.shape[0]:].zero_()
        return
    width = source.shape(name)[spec.tp_dim] // tp_size
    _put(out, source.read(name, spec.tp_dim, tp_rank * width, (tp_rank + 1) * width), name)


def _put(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"the slice of '{name}' has shape {list(src.shape)}, its place in the shard {list(dst.shape)}")
    dst.copy_(src)


def _cat(pieces: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat``, without copying a single piece."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


# ---------------------------------------------------------------------------------------------
# Megatron TP shards -> HF


def shards_to_hf(arch: HFArch, spec: ParamSpec, shards: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Full HF tensors from all TP shards of one Megatron parameter (inverse of ``load_shard``).
    Views of the shards where no copy is needed (one shard; the halves of fc1)."""
    tp_size = len(shards)
    if spec.kind == "qkv":
        groups = arch.num_kv_heads // tp_size
        hpg_hd = arch.num_heads // arch.num_kv_heads * arch.head_dim
        hd = arch.head_dim
        pieces = {n: [] for n in spec.hf_names}
        for shard in shards:
            rest = shard.shape[1:]
            g = shard.reshape(groups, hpg_hd + 2 * hd, *rest)
            q, k, v = g.split([hpg_hd, hd, hd], dim=1)
            for n, t in zip(spec.hf_names, (q, k, v)):
                pieces[n].append(t)
        # Concatenated by group (one copy), then the groups' rows are merged (a view).
        return [(n, _cat(p, 0).reshape(-1, *p[0].shape[2:])) for n, p in pieces.items()]
    if spec.kind == "fc1":
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
        return [(spec.hf_names[0], _cat(gates, 0)), (spec.hf_names[1], _cat(ups, 0))]
    (name,) = spec.hf_names
    full = shards[0] if spec.tp_dim is None else _cat(shards, spec.tp_dim)
    if spec.vocab_padded:
        full = full[: arch.vocab_size]
    return [(name, full)]
