"""Per-token log-probs and entropy under a tensor-parallel (vocab-sharded) output layer, without
materialising the logits.

Under tensor parallelism the output layer's weight is split by vocabulary: each rank holds
``[vocab / tp, h]`` and would produce ``[tokens, vocab / tp]`` logits, the largest activation of
a log-prob pass (vocabularies are 128k-152k). ``output_layer_logprobs`` instead applies the
output layer to chunks of tokens and reduces each chunk to per-token scalars across the TP group:

    max          all_reduce MAX   (numerical stability)
    sum of exp,  all_reduce SUM   (one collective for all, stacked)
    target logit, sum of p*x

so at most one chunk of logits exists at a time (as fused linear-cross-entropy kernels do). The
backward recomputes each chunk's logits (one extra matmul) and needs no communication:
d log p(y)/dx_v = 1[v = y] - p_v and dH/dx_v = -p_v (log p_v + H) only involve each rank's own
shard once the global log-sum-exp is known. Like Megatron's vocab-parallel cross-entropy this
assumes the gradient arriving at the outputs is the same on every TP rank (the loss is computed
redundantly on each). Math runs in float32 for half-precision weights (float64 stays float64).

Uses only torch.distributed (no Megatron). ``tp_group=None`` means no tensor parallelism.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable


def _tp_active(tp_group) -> bool:
    return tp_group is not None and dist.get_world_size(tp_group) > 1


def _all_reduce(tensor: torch.Tensor, op, tp_group) -> torch.Tensor:
    if _tp_active(tp_group):
        dist.all_reduce(tensor, op=op, group=tp_group)
    return tensor


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32 for half-precision weights (softmax sums need it), else the weight's own dtype."""
    return torch.promote_types(weight.dtype, torch.float32)


def _chunks(num_tokens: int, chunk_size: int):
    for start in range(0, num_tokens, chunk_size):
        yield slice(start, min(start + chunk_size, num_tokens))


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float, dtype) -> torch.Tensor:
    """This rank's logits of a chunk of tokens, ``hidden @ weight^T / temperature``, in ``dtype``.
    The matmul runs in the weight's dtype, as the model's own output layer does."""
    logits = (hidden.to(weight.dtype) @ weight.t()).to(dtype)
    return logits.div_(temperature) if temperature != 1.0 else logits


class _OutputLayerLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, tp_group, vocab_start, temperature, with_entropy, chunk_size):
        # ``weight`` holds only this shard's real vocabulary rows (padding rows are left out of
        # the matmul, which is the same as giving them probability 0).
        dtype = _compute_dtype(weight)
        n, width = hidden.shape[0], weight.shape[0]
        local_targets = targets - vocab_start
        in_shard = (local_targets >= 0) & (local_targets < width)
        local_targets = torch.where(in_shard, local_targets, 0)
        logprobs = torch.empty(n, dtype=dtype, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=dtype, device=hidden.device)
        row_maxes, log_sums = torch.empty_like(logprobs), torch.empty_like(logprobs)
        for rows in _chunks(n, chunk_size):
            x = _chunk_logits(hidden[rows], weight, temperature, dtype)
            if width:
                local_max = x.max(dim=-1).values
            else:  # a shard of vocabulary padding only
                local_max = torch.full((x.shape[0],), -torch.inf, dtype=dtype, device=x.device)
            row_max = _all_reduce(local_max, dist.ReduceOp.MAX, tp_group)
            x.sub_(row_max[:, None])  # x - m from here on
            target_shifted = torch.zeros_like(row_max)
            if width:  # only the rank owning the target contributes its logit; the others add 0
                target_shifted = torch.where(in_shard[rows], x.gather(-1, local_targets[rows, None]).squeeze(-1), 0.0)
            exp_shifted = torch.exp(x)
            stats = [exp_shifted.sum(dim=-1), target_shifted]
            if with_entropy:  # H = log S - sum_v e_v (x_v - m) / S: x - m, not x, avoids cancellation
                stats.append(x.mul_(exp_shifted).sum(dim=-1))
            sums = _all_reduce(torch.stack(stats), dist.ReduceOp.SUM, tp_group)
            log_sums[rows] = sums[0].log()
            logprobs[rows] = sums[1] - log_sums[rows]
            if with_entropy:
                entropy[rows] = log_sums[rows] - sums[2] / sums[0]
            row_maxes[rows] = row_max
        ctx.save_for_backward(hidden, weight, local_targets, in_shard, row_maxes, log_sums, entropy)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, local_targets, in_shard, row_maxes, log_sums, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = log_sums.dtype
        use_entropy = ctx.with_entropy and grad_entropy is not None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # The weight's gradient is summed over chunks in float32 (one rounding at the end).
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
        for rows in _chunks(hidden.shape[0], ctx.chunk_size):
            log_probs = _chunk_logits(hidden[rows], weight, ctx.temperature, dtype)
            log_probs.sub_(row_maxes[rows, None]).sub_(log_sums[rows, None])
            probs = torch.exp(log_probs)
            g = grad_logprobs[rows].to(dtype) if grad_logprobs is not None else torch.zeros_like(row_maxes[rows])
            if use_entropy:  # dH/dx_v = -p_v (log p_v + H)
                entropy_term = log_probs.add_(entropy[rows, None]).mul_(probs).mul_(grad_entropy[rows, None].to(dtype))
                grad_x = probs.mul_(-g[:, None]).sub_(entropy_term)
            else:
                grad_x = probs.mul_(-g[:, None])  # -g * p_v for every v of this shard
            if grad_x.shape[-1]:  # + g at v = y, on the rank owning y
                grad_x.scatter_add_(-1, local_targets[rows, None], torch.where(in_shard[rows], g, 0.0)[:, None])
            if ctx.temperature != 1.0:
                grad_x.div_(ctx.temperature)
            grad_x = grad_x.to(weight.dtype)
            if need_hidden:  # this shard's part; the TP all-reduce is the caller's (as for a column-parallel layer)
                grad_hidden[rows] = (grad_x @ weight).to(hidden.dtype)
            if need_weight and grad_x.dtype == dtype:
                grad_weight.addmm_(grad_x.t(), hidden[rows].to(dtype))
            elif need_weight:
                grad_weight.add_(grad_x.t() @ hidden[rows].to(weight.dtype))
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def output_layer_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group=None,
    vocab_start: int = 0,
    real_vocab_rows: int | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_bytes: int = 64 * 2**20,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of ``targets`` (and the entropy) under softmax(hidden @ weight^T / temperature)
    over the full vocabulary, for ``[n, h]`` hidden states and this rank's ``[vocab / tp, h]``
    shard of the output layer's weight, without ever holding more than ``chunk_bytes`` of logits:
    the output layer runs on chunks of tokens, and the backward recomputes each chunk's logits
    (one extra matmul) instead of keeping them.

    ``vocab_start`` is the shard's first vocabulary id; only its first ``real_vocab_rows`` rows
    (default: all) are real vocabulary, the rest is padding and gets probability 0. Returns
    ``[n]`` log-probs (float32 for half-precision weights) and the ``[n]`` entropy or ``None``,
    identical on every TP rank. Gradients flow to ``hidden`` (this rank's part: all-reduce it over
    the TP group, e.g. with megatron's ``copy_to_tensor_model_parallel_region`` on the input, as a
    column-parallel layer does) and to ``weight``.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [n, h] and targets {tuple(targets.shape)} [n]")
    # The same chunks on every TP rank (each chunk is a collective), whatever its padding.
    chunk_size = max(1, chunk_bytes // (4 * max(1, weight.shape[0])))
    if real_vocab_rows is not None:
        weight = weight[:real_vocab_rows]
    logprobs, entropy = _OutputLayerLogProbs.apply(
        hidden, weight, targets.long(), tp_group, vocab_start, temperature, with_entropy, chunk_size
    )
    return logprobs, (entropy if with_entropy else None)
