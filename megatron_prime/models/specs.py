"""Layer specs: Transformer Engine on GPU, megatron-core local modules + torch SDPA elsewhere.

megatron-core's local ``DotProductAttention`` materialises the full score matrix in a CUDA
memory buffer; ``SDPAttention`` is a drop-in core-attention module built on
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU,
plain math on CPU) with the same constructor and forward contract.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class SDPAttention(MegatronModule):
    """Core attention (softmax(QK^T/sqrt(d) + mask) V) on torch SDPA.

    Megatron layout: query ``[sq, b, heads/tp, d]``, key/value ``[sk, b, groups/tp, d]``;
    ``attention_mask`` is boolean with True where attention is NOT allowed (Megatron's
    convention), or None for a plain causal mask. Returns ``[sq, b, heads/tp * d]``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use Transformer Engine")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if k.size(1) != q.size(1):  # grouped-query attention
            repeat = q.size(1) // k.size(1)
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        mask_type = attn_mask_type or self.attn_mask_type
        if attention_mask is None:
            allowed, is_causal = None, mask_type == AttnMaskType.causal
        else:
            allowed, is_causal = ~attention_mask, False
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=allowed,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
        )
        sq, b = query.size(0), query.size(1)
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)


def gpt_layer_spec(*, qk_layernorm: bool, use_te: bool) -> ModuleSpec:
    """The decoder layer spec: Transformer Engine modules, or local modules + SDPAttention."""
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec
