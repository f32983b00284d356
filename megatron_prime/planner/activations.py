"""Activation and logits memory of one micro-batch, per GPU.

Activations follow the method of Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models" (arXiv 2205.05198, §4): count, per transformer layer, every tensor
kept for the backward pass. Their GPT layer (4h GELU MLP, dropout, scores materialised) gives
``s·b·h·(34 + 5·a·s/h)`` bytes in 16-bit; the layers here differ (SwiGLU, GQA, RMSNorm, no
dropout, fused attention), so the count is redone for them. Per token, with B bytes per element,
t = TP, σ = t under sequence parallelism else 1, h hidden, a heads, g KV groups, d head size,
f MLP size:

    norms (input, pre-MLP)      2 · (N + 4)/σ                  N: what one RMSNorm keeps with the next
                                                                 linear's input: 2·B·h fused in TE (input,
                                                                 output); (8 + B)·h for torch's rms_norm
                                                                 (float32 input and normalised, output)
    Q, K, V after rope          B·(a + 2·k)·d/t                 k = g with TE (native GQA); k = a with
                                                                 SDPAttention, which expands K/V
    attention output            B·a·d/t   (also the projection's input)
    softmax log-sum-exp         4·a/t     (float32)
    MLP                         5·B·f/t   (fc1 output 2f, silu(gate) f, up + offset f, fc2 input f)
    MoE MLP (instead)           4·E + k·(5·B·f_e/t + 2·B·h)   router scores in float32; per routed copy
                                                                 of the token: its expert's MLP, and the
                                                                 token dispatched to it and back (an
                                                                 estimate: not measured)

plus, per layer, the rotary cos/sin tables (4·B·s·d) and, for SDPAttention,
the additive mask its kernel keeps (B·b·s², not split over TP). Fused kernels (Transformer
Engine flash/cuDNN attention) keep no s² term; an unfused fallback would add 2·B·a·s²/t per
token-sequence. On top of the layers: the token ids (8 bytes/token, int64; + 1 for the vocab-parallel embedding's
mask when t > 1) and the final norm (N + 4)/σ.
With full recompute (megatron-core ``recompute_granularity="full"``, uniform, one layer per
chunk) a layer keeps only its input, B·h/σ per token, plus one layer's full set while it is
recomputed in the backward. (Not a trainer setting yet: reported to show what it would free.)

The local (``"local"``) figures equal the bytes megatron-core keeps on CPU exactly (saved-tensor
hooks), and the measured CPU peak of a forward lies between them (+ the logits) and that plus
one layer's activations, the temporaries of the op at the peak (``tests/planner/test_plan.py``, on
megatron-core 0.16.1 and 0.19.2: 3-10% over for a 4-layer model); the Transformer Engine
(``"te"``) ones are the same count for TE's fused modules and have not been measured on a GPU.

Pipeline parallelism (1F1B schedule): stage r holds ``min(pp - r, micro-batches)`` micro-batches
in flight, so the first stage holds pp × (layers / pp) = all layers' worth of one micro-batch.

Logits of the log-prob passes (last stage; counted from ``passes/forward_backward.py`` and
``passes/vocab_parallel.py``), V' = padded vocabulary / t, T tokens, c = min(T, 4096) (the chunk):
forward only, the output layer's logits and their gathered response positions (≤ T rows), plus
three float32 chunk temporaries: ``2·B·T·V' + 12·c·V'``; training adds the gradient of the
gathered logits and of the full logits: ``3·B·T·V' + 12·c·V'`` (the forward's full logits are
freed by then). This counts the pass as it was before the output layer was computed in chunks of
response positions (``vocab_parallel.output_layer_logprobs``), which never holds the full logits:
for the logits it is an upper bound (2-3x the CPU-measured peak of the chunked pass on a small
model), not an exact count like the figures above.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_prime.models.hf_config import HFArch
from megatron_prime.planner.state_memory import DTYPE_BYTES, padded_vocab

LOGPROB_CHUNK = 4096  # vocab_parallel's default chunk_size


@dataclass(frozen=True)
class MicroBatch:
    sequences: int  # b
    seq_len: int  # s (padded)

    @property
    def tokens(self) -> int:
        return self.sequences * self.seq_len


def _norm_bytes(B: int, h: int, spec: str) -> int:
    """Per token, what an RMSNorm and the linear after it keep (TE fuses them)."""
    return 2 * B * h if spec == "te" else (8 + B) * h


def layer_activation_bytes(arch: HFArch, mb: MicroBatch, *, dtype: str, tp: int, sequence_parallel: bool,
                           spec: str = "te") -> int:
    """Bytes one transformer layer keeps for the backward pass (see the module docstring)."""
    B = DTYPE_BYTES[dtype]
    h, a, g, d, f = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.ffn_hidden_size
    sigma = tp if sequence_parallel else 1
    k = g if spec == "te" else a
    if arch.is_moe:  # router scores (fp32), and per routed copy: the expert MLP and the dispatched token
        mlp = 4 * arch.num_experts + arch.moe_topk * (5 * B * arch.moe_ffn_hidden_size / tp + 2 * B * h)
    else:
        mlp = 5 * B * f / tp
    per_token = (2 * (_norm_bytes(B, h, spec) + 4) / sigma
                 + B * (a + 2 * k) * d / tp + B * a * d / tp + 4 * a / tp
                 + mlp)
    per_layer = 4 * B * mb.seq_len * d  # rotary cos/sin
    if spec == "local":
        per_layer += B * mb.sequences * mb.seq_len ** 2  # SDPA's additive mask
    return round(mb.tokens * per_token) + per_layer


def model_activation_bytes(arch: HFArch, mb: MicroBatch, *, dtype: str, tp: int, sequence_parallel: bool,
                           layers: int, first_stage: bool, last_stage: bool, recompute: bool = False,
                           spec: str = "te") -> int:
    """Activation bytes of one micro-batch through ``layers`` layers of one pipeline stage."""
    B = DTYPE_BYTES[dtype]
    sigma = tp if sequence_parallel else 1
    one_layer = layer_activation_bytes(arch, mb, dtype=dtype, tp=tp, sequence_parallel=sequence_parallel, spec=spec)
    if recompute:
        total = layers * mb.tokens * B * arch.hidden_size // sigma + one_layer
    else:
        total = layers * one_layer
    if first_stage:
        total += (8 + (tp > 1)) * mb.tokens  # token ids (+ the vocab-parallel embedding's mask)
    if last_stage:
        total += round(mb.tokens * (_norm_bytes(B, arch.hidden_size, spec) + 4) / sigma)
    return total


def logits_bytes(arch: HFArch, tokens: int, *, dtype: str, tp: int, vocab_pad_multiple: int, training: bool) -> int:
    """Peak bytes of the logits and log-prob temporaries of one micro-batch (last stage)."""
    B = DTYPE_BYTES[dtype]
    shard = padded_vocab(arch.vocab_size, tp, vocab_pad_multiple) // tp
    chunk = min(tokens, LOGPROB_CHUNK)
    return (3 if training else 2) * B * tokens * shard + 12 * chunk * shard
