"""Build a megatron-core ``GPTModel`` from a Hugging Face architecture (Llama, Qwen2, Qwen3, and the
mixture-of-experts Qwen3-MoE and Mixtral)."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_prime.models.hf_config import HFArch
from megatron_prime.models.lora import LoRASettings, name_lora_modules
from megatron_prime.models.specs import gpt_block_spec, transformer_engine_available
from megatron_prime.platform import cpu_backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How to build the model, independent of its architecture."""

    dtype: str = "fp32"
    fp8: str | None = None
    use_te: bool = False
    vocab_pad_multiple: int = 128
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    ep: int = 1  # expert parallelism (mixture-of-experts models)
    moe_aux_loss_coef: float = 0.0  # the router's load-balancing loss (0: off)
    routing_replay: bool = False  # the routers can record and replay their top-k (megatron-core's RouterReplay)


def resolve_use_te(setting: str) -> bool:
    """``model.transformer_engine``: auto = on when TE and CUDA are present."""
    if setting == "on":
        if not transformer_engine_available():
            raise RuntimeError("model.transformer_engine=on but Transformer Engine (or CUDA) is missing")
        return True
    return setting == "auto" and transformer_engine_available()


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Round the vocabulary up so every TP rank holds an equal multiple of ``multiple`` rows."""
    unit = multiple * tp
    return int(math.ceil(vocab_size / unit) * unit)


def transformer_config(arch: HFArch, opts: ModelOptions) -> TransformerConfig:
    dtype = DTYPES[opts.dtype]
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # fused kernels are CUDA/apex-only; torch SDPA and TE cover the hot paths
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        tensor_model_parallel_size=opts.tp,
        pipeline_model_parallel_size=opts.pp,
        sequence_parallel=opts.sequence_parallel,
        variable_seq_lengths=True,
        # Frees pipeline outputs early and runs backward through the autograd engine directly
        # (megatron-core's custom_backward), which also keeps the CPU backend's mode active there.
        deallocate_pipeline_outputs=True,
        moe_token_dispatcher_type="alltoall",  # allgather dies with unequal token counts over EP ranks
        fp8=opts.fp8,
        **_moe_options(arch, opts),
        # Every model is loaded from a checkpoint right after it is built (conversion, trainer, SFT),
        # so random weights would be drawn only to be overwritten. Megatron-core still allocates the
        # weights, zeroes the biases and sets the tensor-parallel attributes (which
        # perform_initialization=False skips on the CPU path, breaking grad norms at TP > 1).
        # Its "GPU" initialization path on CPU too (the CPU backend maps the device): the CPU path
        # first builds each full weight in fp32 and splits it, seconds for a 0.5B model.
        use_cpu_initialization=False,
        init_method=_keep,
        output_layer_init_method=_keep,
        embedding_init_method=_keep,
    )


def _moe_options(arch: HFArch, opts: ModelOptions) -> dict:
    """The experts of a Qwen3-MoE / Mixtral model: one MoE MLP per layer, top-k softmax routing,
    experts split over ``opts.ep`` ranks (and over TP like a dense MLP). Grouped GEMM, the permute
    and router fusions need CUDA (Transformer Engine): only with the TE spec."""
    if not arch.is_moe:
        return {}
    return dict(
        num_moe_experts=arch.num_experts, moe_ffn_hidden_size=arch.moe_ffn_hidden_size, moe_router_topk=arch.moe_topk,
        moe_router_pre_softmax=arch.moe_pre_softmax, moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss" if opts.moe_aux_loss_coef > 0 else "none",
        moe_aux_loss_coeff=opts.moe_aux_loss_coef, moe_grouped_gemm=opts.use_te,
        expert_model_parallel_size=opts.ep, moe_enable_routing_replay=opts.routing_replay,
    )


def _keep(weight: torch.Tensor) -> torch.Tensor:
    """An init method that leaves the freshly allocated weight as it is."""
    return weight


def rope_inv_freq(arch: HFArch) -> torch.Tensor:
    """Rotary inverse frequencies, incl. Llama 3 and linear scaling with the checkpoint's own
    parameters (megatron-core hard-codes Llama 3.1's low/high factors and context length)."""
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    p = arch.rope_params
    if arch.rope_type == "linear":
        inv_freq = inv_freq / p["factor"]
    elif arch.rope_type == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_ctx = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(
            wavelen > old_ctx / low,
            inv_freq / factor,
            torch.where(wavelen < old_ctx / high, inv_freq, smoothed),
        )
    return inv_freq.float()


def build_gpt_model(
    arch: HFArch,
    opts: ModelOptions,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    lora: LoRASettings | None = None,
) -> GPTModel:
    """A GPTModel for this rank's pipeline stage (``parallel_state`` must be initialised); with
    ``lora``, its linear layers carry those adapters (``models/lora.py``)."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    config = transformer_config(arch, opts)
    if arch.is_moe:
        cpu_backend.fill_moe_gaps()  # also on a GPU without Transformer Engine
    model = GPTModel(
        config=config,
        transformer_layer_spec=gpt_block_spec(config, qk_layernorm=arch.qk_norm, use_te=opts.use_te, lora=lora),
        vocab_size=padded_vocab_size(arch.vocab_size, opts.tp, opts.vocab_pad_multiple),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
    )
    model.rotary_pos_emb.inv_freq = rope_inv_freq(arch).to(
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    model.true_vocab_size = arch.vocab_size
    if lora is not None:
        name_lora_modules(model)
    if torch.cuda.is_available():
        model.cuda()
    return model
