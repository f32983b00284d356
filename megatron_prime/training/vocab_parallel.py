"""Per-token log-probs and entropy from tensor-parallel (vocab-sharded) logits.

Under tensor parallelism the output layer leaves each rank with ``[..., vocab / tp]`` logits.
Gathering the full vocabulary would cost ``tp`` times the memory of the largest activation of the
step, so these functions reduce only per-token scalars across the TP group:

    max          all_reduce MAX   (numerical stability)
    sum of exp,  all_reduce SUM   (one collective for both, stacked)
    target logit / sum of p*x

and are chunked along tokens so that the temporaries are ``[chunk_size, vocab / tp]``. Math runs
in float32 for half-precision logits (float64 stays float64).
The backward passes need no communication: d log p(y)/dx_v = 1[v = y] - p_v and
dH/dx_v = -p_v (log p_v + H) only involve each rank's own shard once the global
log-sum-exp is known. Like Megatron's vocab-parallel cross-entropy this assumes the gradient
arriving at the outputs is the same on every TP rank (the loss is computed redundantly on each).

Uses only torch.distributed (no Megatron). ``tp_group=None`` means no tensor parallelism.
Temperature is the caller's business: pass ``logits / temperature``.
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


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half-precision logits (softmax sums need it), else the logits' own dtype."""
    return torch.promote_types(logits.dtype, torch.float32)


def _chunks(num_tokens: int, chunk_size: int):
    for start in range(0, num_tokens, chunk_size):
        yield slice(start, min(start + chunk_size, num_tokens))


def _shifted_exp_sums(x: torch.Tensor, tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """Global row max m and shifted exponentials exp(x - m) of one chunk."""
    row_max = _all_reduce(x.max(dim=-1).values, dist.ReduceOp.MAX, tp_group)
    return row_max, torch.exp(x - row_max[:, None])


def _log_softmax_chunk(logits: torch.Tensor, row_max: torch.Tensor, log_sum: torch.Tensor) -> torch.Tensor:
    """log p = (x - max) - log sum exp(x - max) for this rank's shard, from saved row statistics."""
    return (logits.to(log_sum.dtype) - row_max[:, None]) - log_sum[:, None]


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, tp_group, vocab_start, chunk_size):
        shard_width = logits.shape[-1]
        local_targets = targets - vocab_start
        in_shard = (local_targets >= 0) & (local_targets < shard_width)
        local_targets = torch.where(in_shard, local_targets, 0)

        dtype = _compute_dtype(logits)
        logprobs = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        row_maxes, log_sums = torch.empty_like(logprobs), torch.empty_like(logprobs)
        for rows in _chunks(logits.shape[0], chunk_size):
            x = logits[rows].to(dtype)  # never written to: may alias the caller's logits
            row_max, exp_shifted = _shifted_exp_sums(x, tp_group)
            target_logit = x.gather(-1, local_targets[rows, None]).squeeze(-1)
            # Only the rank owning the target contributes its logit; the others add 0.
            target_shifted = torch.where(in_shard[rows], target_logit - row_max, 0.0)
            sums = _all_reduce(
                torch.stack([exp_shifted.sum(dim=-1), target_shifted]), dist.ReduceOp.SUM, tp_group
            )
            log_sums[rows] = sums[0].log()
            logprobs[rows] = sums[1] - log_sums[rows]
            row_maxes[rows] = row_max

        # logsumexp = max + log(sum exp(x - max)), kept as two numbers: in float32 a summed
        # logsumexp near |x| ~ 1e3 would lose ~1e-4 of absolute precision in the backward.
        ctx.save_for_backward(logits, local_targets, in_shard, row_maxes, log_sums)
        ctx.chunk_size = chunk_size
        return logprobs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs):
        logits, local_targets, in_shard, row_maxes, log_sums = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for rows in _chunks(logits.shape[0], ctx.chunk_size):
            grad = grad_logprobs[rows].to(log_sums.dtype)
            probs = torch.exp(_log_softmax_chunk(logits[rows], row_maxes[rows], log_sums[rows]))
            chunk_grad = probs.mul_(-grad[:, None])  # -g * p_v for every v of this shard
            owned_grad = torch.where(in_shard[rows], grad, 0.0)
            chunk_grad.scatter_add_(-1, local_targets[rows, None], owned_grad[:, None])  # + g at v = y
            grad_logits[rows] = chunk_grad
        return grad_logits, None, None, None, None


class _VocabParallelEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tp_group, chunk_size):
        dtype = _compute_dtype(logits)
        entropy = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        row_maxes, log_sums = torch.empty_like(entropy), torch.empty_like(entropy)
        for rows in _chunks(logits.shape[0], chunk_size):
            x = logits[rows].to(dtype)
            row_max, exp_shifted = _shifted_exp_sums(x, tp_group)
            # H = log S - sum_v e_v (x_v - m) / S with e = exp(x - m), S = sum e: working with
            # x - m (not x) avoids cancellation between log-sum-exp and E[x] for large logits.
            weighted = (exp_shifted * (x - row_max[:, None])).sum(dim=-1)
            sums = _all_reduce(torch.stack([exp_shifted.sum(dim=-1), weighted]), dist.ReduceOp.SUM, tp_group)
            log_sums[rows] = sums[0].log()
            entropy[rows] = log_sums[rows] - sums[1] / sums[0]
            row_maxes[rows] = row_max

        ctx.save_for_backward(logits, row_maxes, log_sums, entropy)
        ctx.chunk_size = chunk_size
        return entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_entropy):
        logits, row_maxes, log_sums, entropy = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for rows in _chunks(logits.shape[0], ctx.chunk_size):
            grad = grad_entropy[rows].to(entropy.dtype)
            log_probs = _log_softmax_chunk(logits[rows], row_maxes[rows], log_sums[rows])
            # dH/dx_v = -p_v (log p_v + H)
            chunk_grad = torch.exp(log_probs).mul_(log_probs + entropy[rows, None]).mul_(-grad[:, None])
            grad_logits[rows] = chunk_grad
        return grad_logits, None, None


def _flatten(logits_shard: torch.Tensor) -> torch.Tensor:
    return logits_shard.reshape(-1, logits_shard.shape[-1])


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def vocab_parallel_logprobs(
    logits_shard: torch.Tensor,
    targets: torch.Tensor,
    tp_group=None,
    vocab_start: int | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """log softmax(logits)[target] per token, from this rank's vocabulary shard.

    ``logits_shard`` is ``[..., vocab / tp]`` (any leading dims, e.g. Megatron's [s, b]) holding
    columns ``vocab_start .. vocab_start + vocab / tp`` of the full vocabulary; ``targets`` has
    the leading dims and holds full-vocabulary ids. ``vocab_start`` defaults to
    ``tp_rank * (vocab / tp)``. Returns ``targets.shape`` log-probs, float32 for half-precision logits,
    identical on every TP rank; the gradient w.r.t. ``logits_shard`` has its dtype. The input is never modified.
    A target outside the vocabulary gives -logsumexp (mask such tokens out).
    """
    _check_chunk_size(chunk_size)
    if logits_shard.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits_shard.shape)} and targets {tuple(targets.shape)} disagree")
    if vocab_start is None:
        vocab_start = dist.get_rank(tp_group) * logits_shard.shape[-1] if _tp_active(tp_group) else 0
    logprobs = _VocabParallelLogProbs.apply(
        _flatten(logits_shard), targets.reshape(-1).long(), tp_group, vocab_start, chunk_size
    )
    return logprobs.view(targets.shape)


def vocab_parallel_entropy(logits_shard: torch.Tensor, tp_group=None, chunk_size: int = 4096) -> torch.Tensor:
    """Entropy H = -sum_v p_v log p_v of softmax(logits) over the full vocabulary, per token,
    from this rank's ``[..., vocab / tp]`` shard. Returns ``logits_shard.shape[:-1]``, float32 for
    half-precision logits."""
    _check_chunk_size(chunk_size)
    entropy = _VocabParallelEntropy.apply(_flatten(logits_shard), tp_group, chunk_size)
    return entropy.view(logits_shard.shape[:-1])
