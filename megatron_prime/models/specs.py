"""Layer specs: Transformer Engine on GPU, megatron-core local modules + torch SDPA elsewhere.

megatron-core's local ``DotProductAttention`` materialises the full score matrix in a CUDA
memory buffer; ``SDPAttention`` is a drop-in core-attention module built on
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU,
plain math on CPU) with the same constructor and forward contract. ``RMSNorm`` replaces
megatron-core's torch-norm fallback, which refuses sequence parallelism.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_prime.models.lora import COLUMN_PARALLEL, LoRASettings, lora_linear


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


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm behind megatron-core's norm constructor, usable with sequence parallelism
    (megatron-core's own torch fallback refuses it). Under sequence parallelism each TP rank
    normalises its own slice of the sequence, so the weight's gradient is a partial sum; the
    ``sequence_parallel`` attribute makes ``finalize_model_grads`` sum it over TP."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused_norm_options):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def gpt_block_spec(config: TransformerConfig, *, qk_layernorm: bool, use_te: bool,
                   lora: LoRASettings | None = None) -> ModuleSpec:
    """The decoder spec: Transformer Engine layers, or local layers with SDPAttention and
    ``RMSNorm`` (this stage's layers plus the final norm); with ``lora``, its target linear layers
    carry the adapters (``models/lora.py``)."""
    experts = config.num_moe_experts
    if use_te:
        layer = get_gpt_layer_with_transformer_engine_spec(num_experts=experts, moe_grouped_gemm=bool(experts),
                                                           qk_layernorm=qk_layernorm)
        if lora is not None:
            _te_lora(layer, lora)
        return layer
    # MoE: megatron-core's SequentialMLP (one local MLP per expert; grouped GEMM needs CUDA)
    layer = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False, qk_layernorm=qk_layernorm,
                                     normalization="RMSNorm")
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    attention = layer.submodules.self_attention.submodules
    attention.core_attention = SDPAttention
    if qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = RMSNorm
    if lora is not None:
        _set_lora_linears(layer, lora_linear(ColumnParallelLinear, "column", lora),
                          lora_linear(RowParallelLinear, "row", lora), lora.targets)
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=RMSNorm))


def _set_lora_linears(layer: ModuleSpec, column: type, row: type, targets) -> None:
    attention, mlp = layer.submodules.self_attention.submodules, layer.submodules.mlp.submodules
    for target, holder in (("linear_qkv", attention), ("linear_proj", attention), ("linear_fc1", mlp),
                           ("linear_fc2", mlp)):
        if target in targets:
            setattr(holder, target, column if target in COLUMN_PARALLEL else row)


def _te_lora(layer: ModuleSpec, lora: LoRASettings) -> None:
    """The TE layer spec with LoRA: the norms unfused from linear_qkv / linear_fc1 (TENorm before
    plain TE linears), so that the adapters see the normalised input. Written against
    megatron-core's TE wrappers; it has not run here (no GPU on the development machine)."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm, TERowParallelLinear

    attention, mlp = layer.submodules.self_attention.submodules, layer.submodules.mlp.submodules
    layer.submodules.input_layernorm = TENorm
    layer.submodules.pre_mlp_layernorm = TENorm
    attention.linear_qkv = mlp.linear_fc1 = TEColumnParallelLinear
    _set_lora_linears(layer, lora_linear(TEColumnParallelLinear, "column", lora),
                      lora_linear(TERowParallelLinear, "row", lora), lora.targets)
