"""Megatron passes over a rollout batch: per-token log-probs (forward only) and loss + backward
(training), all through ``get_forward_backward_func`` so pipeline parallelism works.

Log-probs are computed vocab-parallel from the TP-sharded logits (no full-vocabulary gather),
only at response positions, at the sampling temperature. Padded vocabulary columns are masked
out so the softmax is over the real vocabulary, as in the Hugging Face model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_prime.algorithm import accumulate_metrics
from megatron_prime.models.forward import attention_mask_4d, broadcast_from_last_stage, position_ids_for
from megatron_prime.models.wrappers import unwrap
from megatron_prime.training.batch import RolloutBatch, micro_batch_rows
from megatron_prime.training.vocab_parallel import vocab_parallel_entropy, vocab_parallel_logprobs

# loss_fn(micro-batch rows of the batch, logprobs [b, R], entropy [b, R] | None)
#   -> (loss summed over its items, number of items (tokens or responses), metrics (sum, count))
LossFn = Callable[[RolloutBatch, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, int, dict]]


@dataclass
class PassResult:
    logprobs: torch.Tensor  # [n, R] for the rows passed in (detached), on every rank of the replica
    entropy: torch.Tensor | None
    metrics: dict  # summed (sum, count) pairs of this rank's micro-batches (last stage; else empty)


def _micro_batch(batch: RolloutBatch, rows: torch.Tensor, device, length_multiple: int) -> dict:
    """Rows cut to their longest sequence, right-padded to a multiple of ``length_multiple``
    (sequence parallelism splits the sequence over TP ranks); pads are masked keys."""
    sub = batch.rows(rows)
    length = int(sub.attention_mask.sum(dim=1).max())
    width = -(-length // length_multiple) * length_multiple
    ids = F.pad(sub.input_ids[:, :length], (0, width - length))
    return {
        "batch": sub,
        "input_ids": ids.to(device),
        "position_ids": position_ids_for(ids).to(device),
        "attention_mask": attention_mask_4d(F.pad(sub.attention_mask[:, :length], (0, width - length))).to(device),
        "response_index": sub.response_index.clamp(max=length - 1).to(device),
        "targets": torch.gather(ids, 1, (sub.response_index + 1).clamp(max=length - 1)).to(device),
    }


def response_logits(logits: torch.Tensor, response_index: torch.Tensor, temperature: float,
                    true_vocab: int) -> torch.Tensor:
    """Logits at response positions ``[b, R, vocab/tp]``, divided by the temperature, with the
    padded vocabulary columns of this TP shard set to the most negative finite value."""
    b, r = response_index.shape
    picked = torch.gather(logits, 1, response_index[..., None].expand(b, r, logits.shape[-1]))
    if temperature != 1.0:
        picked = picked / temperature
    shard = logits.shape[-1]
    vocab_start = parallel_state.get_tensor_model_parallel_rank() * shard
    first_padded = max(0, min(shard, true_vocab - vocab_start))
    if first_padded < shard:
        picked[..., first_padded:] = torch.finfo(picked.dtype).min
    return picked


def run_pass(
    model,
    batch: RolloutBatch,
    *,
    temperature: float,
    token_budget: int,
    loss_fn: LossFn | None = None,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> PassResult:
    """One pass over all rows of ``batch``: forward only (``loss_fn=None``) or forward + backward
    with gradients accumulated into the DDP buffers (the caller zeroes and steps the optimizer)."""
    forward_only = loss_fn is None
    inner = unwrap(model)
    device = next(inner.parameters()).device
    true_vocab = getattr(inner, "true_vocab_size", inner.vocab_size)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    lengths = batch.attention_mask.sum(dim=1)
    row_groups = micro_batch_rows(lengths, token_budget)
    multiple = parallel_state.get_tensor_model_parallel_world_size() if inner.config.sequence_parallel else 1
    micro_batches = [_micro_batch(batch, rows, device, multiple) for rows in row_groups]

    def loss_func(mb, logits, non_loss_data=False):
        picked = response_logits(logits, mb["response_index"], temperature, true_vocab)
        logprobs = vocab_parallel_logprobs(picked, mb["targets"], tp_group)
        entropy = None
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                entropy = vocab_parallel_entropy(picked if entropy_grad else picked.detach(), tp_group)
        out = {"logprobs": logprobs.detach(), "entropy": None if entropy is None else entropy.detach()}
        if forward_only:
            return out
        loss, count, metrics = loss_fn(mb["batch"], logprobs, entropy)
        out["metrics"] = metrics
        return loss, torch.tensor(int(count), dtype=torch.int), out

    def forward_step(data_iterator, model_chunk):
        mb = next(data_iterator)
        output = model_chunk(mb["input_ids"], mb["position_ids"], mb["attention_mask"])
        return output, partial(loss_func, mb)

    if forward_only:
        model.eval()
    else:
        model.train()
    context = torch.no_grad() if forward_only else torch.enable_grad()
    with context:
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=max(mb["input_ids"].shape[1] for mb in micro_batches),
            micro_batch_size=max(mb["input_ids"].shape[0] for mb in micro_batches),
            forward_only=forward_only,
            collect_non_loss_data=forward_only,
        )

    n, r = batch.response_mask.shape
    logprobs = torch.zeros(n, r, dtype=torch.float32, device=device)
    entropy = torch.zeros(n, r, dtype=torch.float32, device=device) if with_entropy else None
    metrics: dict = {}
    for rows, out in zip(row_groups, outputs):  # empty unless this is the last stage
        logprobs[rows.to(device)] = out["logprobs"].float()
        if with_entropy:
            entropy[rows.to(device)] = out["entropy"].float()
        accumulate_metrics(metrics, out.get("metrics", {}))
    logprobs = broadcast_from_last_stage(logprobs)
    if with_entropy:
        entropy = broadcast_from_last_stage(entropy)
    return PassResult(logprobs=logprobs, entropy=entropy, metrics=metrics)

