"""Megatron passes over a rollout batch: per-token log-probs (forward only) and loss + backward
(training), all through ``get_forward_backward_func`` so pipeline parallelism works.

The last stage's model returns its final hidden states (GPTModel's ``post_process`` contract for
a stage without output layer) and the pass applies the output layer itself, only at the response
tokens and in chunks of tokens (``vocab_parallel.output_layer_logprobs``): neither the logits of
the whole sequence nor those of all response tokens ever exist, on any TP rank. Log-probs are
vocab-parallel (no full-vocabulary gather), at the given temperature, over the real vocabulary
(the padded rows of the output layer are left out, as in the Hugging Face model).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_prime.algorithm import accumulate_metrics
from megatron_prime.models.forward import attention_mask_4d, broadcast_from_last_stage, position_ids_for
from megatron_prime.models.lora import active_adapter
from megatron_prime.models.wrappers import unwrap
from megatron_prime.platform import watchdog
from megatron_prime.passes import routing_replay
from megatron_prime.passes.batch import RolloutBatch, micro_batch_rows
from megatron_prime.passes.vocab_parallel import output_layer_logprobs

# loss_fn(micro-batch rows of the batch, logprobs [b, R], entropy [b, R] | None)
#   -> (loss summed over its items, number of items (tokens or responses), metrics (sum, count))
LossFn = Callable[[RolloutBatch, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, int, dict]]


@dataclass
class PassResult:
    logprobs: torch.Tensor  # [n, R] for the rows passed in (detached, 0 on padding), on every rank of the replica
    entropy: torch.Tensor | None  # [n, R] likewise, with ``with_entropy``
    metrics: dict  # summed (sum, count) pairs of this rank's micro-batches (last stage; else empty)
    routes: torch.Tensor | None = None  # mixture of experts, ``routing="record"``: this stage's routes per row


def _micro_batch(batch: RolloutBatch, rows: torch.Tensor, device, length_multiple: int) -> dict:
    """Rows cut to their longest sequence, right-padded to a multiple of ``length_multiple``
    (sequence parallelism splits the sequence over TP ranks); pads are masked keys. ``tokens``
    are the (row, response column) pairs of the real response tokens."""
    sub = batch.rows(rows)
    length = int(sub.attention_mask.sum(dim=1).max())
    width = -(-length // length_multiple) * length_multiple
    ids = F.pad(sub.input_ids[:, :length], (0, width - length))
    row, column = sub.response_mask.bool().nonzero(as_tuple=True)
    position = sub.response_index[row, column]  # the logits at position t predict token t + 1
    return {
        "batch": sub,
        "rows": rows,
        "input_ids": ids.to(device),
        "position_ids": position_ids_for(ids).to(device),
        "attention_mask": attention_mask_4d(F.pad(sub.attention_mask[:, :length], (0, width - length))).to(device),
        "tokens": (row.to(device), column.to(device)),
        "positions": position.to(device),
        "targets": ids[row, position + 1].to(device),
    }


def output_weight(inner) -> torch.Tensor:
    """The output layer's ``[vocab / tp, h]`` weight shard (the embedding when they are tied)."""
    if inner.share_embeddings_and_output_weights:
        return inner.shared_embedding_or_output_weight()
    return inner.output_layer.weight


@contextmanager
def hidden_states_out(inner):
    """GPTModel returns its final hidden states ``[s, b, h]`` instead of logits while
    ``post_process`` is off (what it does on a pipeline stage without the output layer)."""
    post_process = inner.post_process
    inner.post_process = False
    try:
        yield
    finally:
        inner.post_process = post_process


def response_logprobs(hidden, mb: dict, weight, *, temperature: float, true_vocab: int,
                      sequence_parallel: bool, with_entropy: bool, entropy_grad: bool):
    """Log-probs ``[b, R]`` (and entropy) of the micro-batch's response tokens from the last
    stage's hidden states, through the output layer applied in chunks; 0 on padding."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    # The output layer is column-parallel: its input is gathered (sequence parallel) or copied
    # into the TP region, so that the input gradient of each vocabulary shard is summed.
    if sequence_parallel:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    else:
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
    row, column = mb["tokens"]
    shard = weight.shape[0]
    vocab_start = parallel_state.get_tensor_model_parallel_rank() * shard
    logprobs, entropy = output_layer_logprobs(
        hidden[mb["positions"], row], weight, mb["targets"], tp_group=tp_group, vocab_start=vocab_start,
        real_vocab_rows=max(0, min(shard, true_vocab - vocab_start)), temperature=temperature,
        with_entropy=with_entropy,
    )
    shape = mb["batch"].response_mask.shape

    def response_frame(values):
        return torch.zeros(shape, dtype=values.dtype, device=values.device).index_put((row, column), values)

    if entropy is not None:
        entropy = response_frame(entropy if entropy_grad else entropy.detach())
    return response_frame(logprobs), entropy


def run_pass(
    model,
    batch: RolloutBatch,
    *,
    temperature: float,
    token_budget: int,
    loss_fn: LossFn | None = None,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    routing: str | None = None,
) -> PassResult:
    """One pass over all rows of ``batch``: forward only (``loss_fn=None``) or forward + backward
    with gradients accumulated into the DDP buffers (the caller zeroes and steps the optimizer).
    ``routing`` (a mixture-of-experts model that can replay): "record" its routes per row
    (``PassResult.routes``), "replay" ``batch.extras["routes"]``, or "observe" how far its own choice
    drifts from them (``passes/routing_replay.py``; metric ``routing/flipped_frac``)."""
    forward_only = loss_fn is None
    inner = unwrap(model)
    device = next(inner.parameters()).device
    true_vocab = getattr(inner, "true_vocab_size", inner.vocab_size)
    weight = output_weight(inner) if inner.post_process else None  # the last stage's
    lengths = batch.attention_mask.sum(dim=1)
    row_groups = micro_batch_rows(lengths, token_budget)
    multiple = parallel_state.get_tensor_model_parallel_world_size() if inner.config.sequence_parallel else 1
    micro_batches = [_micro_batch(batch, rows, device, multiple) for rows in row_groups]
    routes = None
    if routing is not None and routing_replay.routers(inner):
        routes = routing_replay.RoutePass(inner, routing, batch.size, batch.input_ids.shape[1], device)

    def loss_func(mb, hidden, non_loss_data=False):
        logprobs, entropy = response_logprobs(
            hidden, mb, weight, temperature=temperature, true_vocab=true_vocab,
            sequence_parallel=inner.config.sequence_parallel, with_entropy=with_entropy,
            entropy_grad=entropy_grad,
        )
        out = {"logprobs": logprobs.detach(), "entropy": None if entropy is None else entropy.detach()}
        if forward_only:
            return out
        loss, count, metrics = loss_fn(mb["batch"], logprobs, entropy)
        out["metrics"] = metrics
        return loss, torch.tensor(int(count), dtype=torch.int), out

    def forward_step(data_iterator, model_chunk):
        watchdog.heartbeat()
        mb = next(data_iterator)
        # Only around the model call: the schedule's finalize_model_grads must see the last stage
        # as it is, or a tied output layer skips the embedding all-reduce the first stage is in.
        if routes is not None:
            routes.before(mb)
        with hidden_states_out(inner):
            output = model_chunk(mb["input_ids"], mb["position_ids"], mb["attention_mask"])
        if routes is not None:
            routes.after(mb, mb["rows"])
        return output, partial(loss_func, mb)

    if forward_only:
        model.eval()
    else:
        model.train()
    context = torch.no_grad() if forward_only else torch.enable_grad()
    # shared-base LoRA: a trainable's pass adds its adapter, the reference's none (models/lora.py)
    with context, active_adapter(inner, getattr(model, "lora_adapter", None)), _finishing(routes):
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
    if routes is not None and routes.mode != "record":  # every stage's layers count (summed over ranks)
        metrics["routing/flipped_frac"] = torch.tensor([float(routes.flipped), float(routes.compared)])
    return PassResult(logprobs=logprobs, entropy=entropy, metrics=metrics,
                      routes=routes.routes if routes is not None else None)


@contextmanager
def _finishing(routes):
    try:
        yield
    finally:
        if routes is not None:
            routes.finish()

