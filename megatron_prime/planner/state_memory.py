"""Bytes of parameters, gradients and optimizer state on one rank, as megatron-core lays them out.

Exact for the models ``passes.trainable`` builds (checked against the allocated tensors on CPU at
TP=1, TP=2 and PP=2 in ``tests/planner/test_plan.py``):

- The parameters of one pipeline stage are listed in ``GPTModel.named_parameters()`` order:
  embedding (first stage), per layer the input norm, attention output projection, fused QKV (+ its
  bias for Qwen2, + q/k norms for Qwen3), the pre-MLP norm and the two MLP projections, then the
  final norm and the output layer (last stage; with tied embeddings and PP > 1 the last stage holds
  its own copy of the embedding). Column-parallel weights (QKV, MLP fc1, embedding, output layer)
  are split over TP along rows, row-parallel ones (projection, fc2) along columns; norms are
  replicated. The vocabulary is padded to a multiple of ``vocab_pad_multiple * tp``.
- ``DistributedDataParallel`` puts every trainable parameter into one buffer (one dtype), walking
  the parameters in reverse. With the distributed optimizer each parameter starts at a multiple of
  64 elements and each bucket ends at a multiple of lcm(DP, 128); the tied embedding gets a bucket
  of its own. The parameters then live in that buffer (``param_data``) and the gradients in a
  float32 twin (``grad_data``, ``grad_reduce_in_fp32``). Without the distributed optimizer
  nothing is padded and the parameters keep their own storage.
- A mixture-of-experts model's experts (``param.allreduce = False``) get a buffer of their own, laid
  out by the same rules over the expert-data-parallel ranks (DP / EP), which the distributed
  optimizer shards over.
- The distributed optimizer gives DP rank r the r-th of DP equal slices of every bucket; it keeps
  Adam's two moments (float32) for the elements of real parameters in its slice, and for
  half-precision models a float32 main copy of them too. Without it, every rank keeps those for
  all parameters. (Adam's 0-d step counters are not counted: 4 bytes per tensor.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_prime.models.hf_config import HFArch

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GRAD_BYTES = 4  # gradients are reduced in float32 (grad_reduce_in_fp32=True in passes.trainable)
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, float32
MAIN_PARAM_BYTES = 4  # float32 master copy of a half-precision parameter


@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    shared_embedding: bool = False  # the tied embedding / output weight under PP > 1
    expert: bool = False  # a mixture-of-experts expert's: its own DDP buffer, over the expert-data-parallel ranks


@dataclass(frozen=True)
class StateBytes:
    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def padded_vocab(vocab_size: int, tp: int, multiple: int) -> int:
    """The vocabulary rows megatron holds (``models.gpt.padded_vocab_size``, restated torch-free)."""
    unit = multiple * tp
    return -(-vocab_size // unit) * unit


def stage_parameters(arch: HFArch, *, tp: int, pp: int, pp_rank: int, vocab_pad_multiple: int,
                     ep: int = 1) -> list[Param]:
    """This stage's parameters on one TP rank (and EP rank: E / EP experts per MoE layer), in
    ``named_parameters()`` order."""
    h, d = arch.hidden_size, arch.head_dim
    qkv_rows = (arch.num_heads + 2 * arch.num_kv_heads) * d // tp
    vocab_rows = padded_vocab(arch.vocab_size, tp, vocab_pad_multiple) // tp
    first, last = pp_rank == 0, pp_rank == pp - 1
    params = []
    if first:
        params.append(Param("embedding.word_embeddings.weight", vocab_rows * h,
                            shared_embedding=arch.tie_embeddings and pp > 1))
    for i in range(arch.num_layers // pp):
        layer = f"decoder.layers.{i}."
        params += [Param(layer + "input_layernorm.weight", h),
                   Param(layer + "self_attention.linear_proj.weight", h * arch.num_heads * d // tp),
                   Param(layer + "self_attention.linear_qkv.weight", qkv_rows * h)]
        if arch.qkv_bias:
            params.append(Param(layer + "self_attention.linear_qkv.bias", qkv_rows))
        if arch.qk_norm:
            params += [Param(layer + "self_attention.q_layernorm.weight", d),
                       Param(layer + "self_attention.k_layernorm.weight", d)]
        params.append(Param(layer + "pre_mlp_layernorm.weight", h))
        if arch.is_moe:  # the router (replicated), then this rank's experts, each a small MLP split over TP
            params.append(Param(layer + "mlp.router.weight", arch.num_experts * h))
            f = arch.moe_ffn_hidden_size
            for j in range(arch.num_experts // ep):
                expert = f"{layer}mlp.experts.local_experts.{j}."
                params += [Param(expert + "linear_fc1.weight", 2 * f // tp * h, expert=True),
                           Param(expert + "linear_fc2.weight", h * f // tp, expert=True)]
        else:
            params += [Param(layer + "mlp.linear_fc1.weight", 2 * arch.ffn_hidden_size // tp * h),
                       Param(layer + "mlp.linear_fc2.weight", h * arch.ffn_hidden_size // tp)]
    if last:
        params.append(Param("decoder.final_layernorm.weight", h))
        if not arch.tie_embeddings or not first:  # tied at PP=1: the embedding is the output layer
            params.append(Param("output_layer.weight", vocab_rows * h, shared_embedding=arch.tie_embeddings))
    return params


# Megatron target -> (column-parallel, its input width, its output rows) for the LoRA sizes below
def _lora_shapes(arch: HFArch) -> dict[str, tuple[bool, int, int]]:
    h, d, ffn = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    return {"linear_qkv": (True, h, (arch.num_heads + 2 * arch.num_kv_heads) * d), "linear_proj": (False, arch.num_heads * d, h),
            "linear_fc1": (True, h, 2 * ffn), "linear_fc2": (False, ffn, h)}


def lora_parameters(arch: HFArch, *, rank: int, targets, tp: int, pp: int) -> list[Param]:
    """One LoRA adapter's parameters on one TP rank of a stage (``models/lora.py``): on a
    column-parallel base, A [r, in] replicated and B [out/tp, r]; on a row-parallel one, A [r, in/tp]
    and B [out, r] replicated."""
    shapes = _lora_shapes(arch)
    params = []
    for i in range(arch.num_layers // pp):
        for target in targets:
            column, fan_in, fan_out = shapes[target]
            a = rank * (fan_in if column else fan_in // tp)
            b = (fan_out // tp if column else fan_out) * rank
            params += [Param(f"decoder.layers.{i}.{target}.lora.a", a), Param(f"decoder.layers.{i}.{target}.lora.b", b)]
    return params


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def buffer_layout(params: list[Param], *, dp: int, distributed_optimizer: bool):
    """Megatron DDP's buffer: ``(total elements, [(param, start, end, bucket)], [(bucket start, end)])``.
    Restates ``_ParamAndGradBuffer.__init__`` for one bucket per buffer (``overlap_grad_reduce``
    is off, so bucket_size is unlimited)."""
    if not distributed_optimizer:
        placed, start = [], 0
        for p in reversed(params):
            placed.append((p, start, start + p.numel, 0))
            start += p.numel
        return start, placed, [(0, start)]
    bucket_multiple = math.lcm(dp, 128)
    placed, buckets = [], []
    start = bucket_start = 0
    in_bucket = 0
    end = 0
    for p in reversed(params):
        start = _ceil_to(start, 64)
        if p.shared_embedding and in_bucket:
            start = _ceil_to(start, bucket_multiple)
            buckets.append((bucket_start, start))
            bucket_start, in_bucket = start, 0
        end = start + p.numel
        placed.append((p, start, end, len(buckets)))
        in_bucket += 1
        if p.shared_embedding:
            start = _ceil_to(end, bucket_multiple)
            buckets.append((bucket_start, start))
            bucket_start, in_bucket = start, 0
        else:
            start = end
    if in_bucket:
        buckets.append((bucket_start, _ceil_to(end, bucket_multiple)))
    return buckets[-1][1] if buckets else 0, placed, buckets


def trainable_state_bytes(params: list[Param], *, dtype: str, dp: int, dp_rank: int,
                          distributed_optimizer: bool, ep: int = 1) -> StateBytes:
    """Parameter, gradient and optimizer bytes of a trained model on one rank: the dense
    parameters' buffer over the DP ranks and, for a mixture-of-experts model, the experts' own buffer
    over the expert-data-parallel ranks (DP / EP)."""
    dense = [p for p in params if not p.expert]
    experts = [p for p in params if p.expert]
    state = _buffer_state_bytes(dense, dtype=dtype, dp=dp, dp_rank=dp_rank, distributed_optimizer=distributed_optimizer)
    if experts:
        more = _buffer_state_bytes(experts, dtype=dtype, dp=dp // ep, dp_rank=expert_data_parallel_rank(dp_rank, ep),
                                   distributed_optimizer=distributed_optimizer)
        state = StateBytes(state.params + more.params, state.grads + more.grads, state.optimizer + more.optimizer)
    return state


def expert_data_parallel_rank(dp_rank: int, ep: int) -> int:
    """The expert-data-parallel rank of data-parallel rank ``dp_rank``: megatron-core's rank order
    (tp-cp-ep-dp-pp) has the expert-parallel rank vary fastest inside the data-parallel ranks."""
    return dp_rank // ep


def _buffer_state_bytes(params: list[Param], *, dtype: str, dp: int, dp_rank: int,
                        distributed_optimizer: bool) -> StateBytes:
    total, placed, buckets = buffer_layout(params, dp=dp, distributed_optimizer=distributed_optimizer)
    if not distributed_optimizer:
        owned = total
    else:
        owned = 0
        for _p, start, end, bucket in placed:
            b_start, b_end = buckets[bucket]
            shard = (b_end - b_start) // dp
            lo, hi = b_start + dp_rank * shard, b_start + (dp_rank + 1) * shard
            owned += max(0, min(end, hi) - max(start, lo))
    half = DTYPE_BYTES[dtype] < 4
    per_owned = ADAM_STATE_BYTES + (MAIN_PARAM_BYTES if half else 0)
    return StateBytes(params=total * DTYPE_BYTES[dtype], grads=total * GRAD_BYTES, optimizer=owned * per_owned)


def frozen_state_bytes(params: list[Param], *, dtype: str) -> StateBytes:
    """The reference model: its parameters only (no DDP buffers, no optimizer)."""
    return StateBytes(params=sum(p.numel for p in params) * DTYPE_BYTES[dtype], grads=0, optimizer=0)


def num_parameters(arch: HFArch) -> int:
    """Parameters of the unsharded model (no vocabulary padding)."""
    params = stage_parameters(arch, tp=1, pp=1, pp_rank=0, vocab_pad_multiple=1)
    return sum(p.numel for p in params)
