"""Masked tensor helpers shared by the estimators and losses.

Every tensor here is ``[batch, response_len]`` with a 0/1 (or bool) ``mask``. Positions where the
mask is 0 are never read: helpers replace them with zeros through ``torch.where`` rather than a
multiplication, so NaN or inf stored in padding (e.g. log-probs of pad tokens) cannot leak into
results or gradients.

Groups: the K responses of one prompt are adjacent rows, so a ``[batch]`` tensor reshapes to
``[batch // K, K]``.
"""

from __future__ import annotations

import torch

# Block width of the discounted scan. gamma**63 is the largest power in one block's matrix, and
# a [64, 64] matmul per block keeps the scan cheap without Python loops over tokens.
_SCAN_BLOCK = 64


def as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """Accept bool, integer or float 0/1 masks; return a bool mask."""
    return mask if mask.dtype == torch.bool else mask != 0


def zero_invalid(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``values`` where valid, exact (+0.0) zeros elsewhere, whatever padding holds."""
    return torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))


def zero_invalid_(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``zero_invalid`` into ``values``' own storage, for a fresh tensor the caller owns (saves an
    allocation; out-of-place when autograd records ``values``, as ``out=`` is not differentiable)."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    if values.requires_grad and torch.is_grad_enabled():
        return torch.where(valid, values, zero)
    return torch.where(valid, values, zero, out=values)


class _PrecomputedGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, num_inputs, *inputs_and_gradients):
        ctx.save_for_backward(*inputs_and_gradients[num_inputs:])
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        gradients = [None if g is None else g * grad_output for g in ctx.saved_tensors]
        return None, None, *gradients, *([None] * len(gradients))


def attach_gradient(
    value: torch.Tensor, inputs: tuple[torch.Tensor, ...], gradients: tuple[torch.Tensor | None, ...]
) -> torch.Tensor:
    """``value`` (computed without autograd) as a differentiable function of ``inputs`` whose
    derivative w.r.t. ``inputs[i]`` is ``gradients[i]`` (``None``: no gradient).

    A loss whose per-token derivative is computed in the same pass as the loss itself needs no
    autograd graph of its elementwise steps: nothing is saved but the gradients, and the backward
    is one multiplication. Not twice differentiable.
    """
    return _PrecomputedGradient.apply(value, len(inputs), *inputs, *gradients)


class _RowGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, _input, row_gradient, valid):
        ctx.save_for_backward(row_gradient, valid)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        row_gradient, valid = ctx.saved_tensors
        return None, zero_invalid((row_gradient * grad_output)[:, None], valid), None, None


def attach_row_gradient(
    value: torch.Tensor, input: torch.Tensor, row_gradient: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """``attach_gradient`` for a scalar ``value`` of a ``[B, T]`` ``input`` whose derivative is one
    value per row on its valid tokens (``row_gradient``, ``[B]``) and 0 on padding, as for a loss
    of masked row sums: the ``[B, T]`` gradient is only built in the backward, already scaled, and
    nothing of that size is kept in between."""
    if value.dim() != 0 or row_gradient.shape != input.shape[:1] or valid.shape != input.shape:
        raise ValueError(f"attach_row_gradient: value {tuple(value.shape)} must be a scalar, row_gradient "
                         f"{tuple(row_gradient.shape)} and mask {tuple(valid.shape)} must match input "
                         f"{tuple(input.shape)} as [B] and [B, T]")
    return _RowGradient.apply(value, input, row_gradient, as_bool_mask(valid))


def check_groups(batch_size: int, group_size: int) -> int:
    """Number of groups; raises if the batch does not split into whole groups of ``group_size``."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if batch_size % group_size != 0:
        raise ValueError(f"batch of {batch_size} responses is not a whole number of groups of {group_size}")
    return batch_size // group_size


def leave_one_out_mean(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """For each response i, the mean of ``values`` over the *other* K-1 responses of its group.

    ``values`` is ``[batch]``. With K = 1 there are no other responses; the empty mean is taken as
    0 (no baseline), so RLOO degrades to REINFORCE instead of dividing by zero. Computed in
    float64 so that a group of equal values gets a baseline exactly equal to them.
    """
    check_groups(values.shape[0], group_size)
    if group_size == 1:
        return torch.zeros_like(values)
    grouped = values.to(torch.float64).reshape(-1, group_size)
    others_sum = grouped.sum(dim=1, keepdim=True) - grouped
    return (others_sum / (group_size - 1)).reshape(-1).to(values.dtype)


def masked_mean_var(
    values: torch.Tensor, valid: torch.Tensor, dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased (n - 1) variance over the valid entries of ``dim`` (kept as size 1), or
    of the whole tensor when ``dim`` is None.

    n <= 1 gives variance 0. Sums accumulate in float64 and the mean is rounded to ``values``'
    dtype before taking deviations, so equal values give exactly zero deviations: a later
    division by a tiny std (GRPO, whitening) then sees 0, not amplified rounding noise.
    """

    def masked_sum(x: torch.Tensor) -> torch.Tensor:
        x = zero_invalid(x, valid)
        return (
            x.sum(dtype=torch.float64) if dim is None else x.sum(dim=dim, keepdim=True, dtype=torch.float64)
        )

    count = valid.sum() if dim is None else valid.sum(dim=dim, keepdim=True)
    mean = (masked_sum(values) / count.clamp(min=1)).to(values.dtype)
    var = (masked_sum((values - mean) ** 2) / (count - 1).clamp(min=1)).to(values.dtype)
    return mean, var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with the mean and unbiased variance over every valid token of
    the whole tensor (not per row); zero on padding. Constant inputs map to zeros, never NaN."""
    valid = as_bool_mask(mask)
    # masked_mean_var's arithmetic (float64 sums, the mean rounded to values' dtype before taking
    # deviations), with the deviations computed once and reused for the variance and the result.
    count = torch.count_nonzero(valid)
    deviations = zero_invalid(values, valid)
    mean = (deviations.sum(dtype=torch.float64) / count.clamp(min=1)).to(values.dtype)
    deviations = zero_invalid_(deviations.sub_(mean), valid)
    flat = deviations.view(-1).to(torch.float64) if values.dtype != torch.float64 else deviations.view(-1)
    var = (torch.dot(flat, flat) / (count - 1).clamp(min=1)).to(values.dtype)
    return deviations.mul_(torch.rsqrt(var + eps))


def is_right_padded(valid: torch.Tensor) -> bool:
    """True when every row is a run of valid positions followed only by padding."""
    if valid.shape[-1] < 2:
        return True
    return bool((valid[:, 1:] <= valid[:, :-1]).all())


def compaction_order(valid: torch.Tensor) -> torch.Tensor:
    """Column permutation that moves each row's valid positions to the front, in order.

    ``x.gather(-1, order)`` turns a general 0/1 mask into right padding; ``scatter`` with the
    same order puts results back. A stable sort keeps the valid tokens' order.
    """
    return torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)


def _scan_right_padded(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """y_t = sum_{s >= t} gamma^(s - t) x_s along the last dim; x must be zero past each row's end.

    Blocked: inside a block of L tokens the scan is one matmul with the triangular matrix
    D[s, t] = gamma^(s - t); the return entering each block from the right is itself a
    discounted scan over block starts with factor gamma^L, solved by recursion. Only
    non-negative powers of gamma appear, so nothing overflows for long responses.
    """
    if gamma == 1.0:
        return x.flip(-1).cumsum_(-1).flip(-1)
    rows, length = x.shape
    block = min(_SCAN_BLOCK, length)
    num_blocks = -(-length // block)
    blocks = torch.nn.functional.pad(x, (0, num_blocks * block - length)).view(rows, num_blocks, block)

    steps = torch.arange(block, device=x.device, dtype=torch.float64)
    lag = steps[:, None] - steps[None, :]  # lag[s, t] = s - t
    gamma64 = torch.tensor(gamma, dtype=torch.float64, device=x.device)
    discount = torch.where(lag >= 0, gamma64 ** lag.clamp(min=0), 0.0).to(x.dtype)
    scanned = blocks @ discount  # within-block discounted sums

    if num_blocks > 1:
        # Full return at the start of every block, then shift by one block: what flows in from
        # the right into block k is the return at the start of block k + 1.
        block_starts = _scan_right_padded(scanned[:, :, 0], gamma**block)
        incoming = torch.nn.functional.pad(block_starts[:, 1:], (0, 1))
        decay_to_next_block = (gamma64 ** (block - steps)).to(x.dtype)  # gamma^(L - t)
        scanned = scanned + incoming[:, :, None] * decay_to_next_block
    return scanned.reshape(rows, num_blocks * block)[:, :length]


def discounted_reverse_cumsum(values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """R_t = sum_{s >= t, s valid} gamma^(k(s) - k(t)) x_s, zero on padding.

    k(t) counts *valid* tokens, so masked positions inside a response (a general 0/1 mask)
    are skipped: they carry no reward and do not cost a discount step. With right padding
    k(t) = t and this is the usual reverse discounted cumulative sum.
    """
    if values.dim() != 2:
        raise ValueError(f"expected [batch, response_len], got shape {tuple(values.shape)}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    valid = as_bool_mask(mask)
    return zero_invalid_(reverse_returns(zero_invalid(values, valid), valid, gamma), valid)


def reverse_returns(x: torch.Tensor, valid: torch.Tensor, gamma: float) -> torch.Tensor:
    """``discounted_reverse_cumsum`` for ``x`` already zero on padding, without zeroing padding
    in the result (a fresh tensor): for callers that add more terms and mask once at the end."""
    # With gamma = 1 the discount does not depend on token indices, so holes need no compaction.
    if gamma == 1.0 or is_right_padded(valid):
        return _scan_right_padded(x, gamma)
    order = compaction_order(valid)
    scanned = _scan_right_padded(x.gather(-1, order), gamma)
    return torch.empty_like(scanned).scatter_(-1, order, scanned)
