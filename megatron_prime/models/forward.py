"""Forward passes of a Megatron GPT model through megatron-core's pipeline schedules.

Inputs are right-padded ``[batch, seq]`` token ids with a 0/1 ``attention_mask`` (RoPE in
megatron-core ignores position ids beyond 0..s-1, so left padding would shift positions).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_prime.models.wrappers import unwrap


def attention_mask_4d(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` 0/1 -> Megatron's boolean ``[b, 1, s, s]`` mask, True where attention is
    not allowed (future positions and padded keys). Padded queries keep their own position so
    no row is fully masked."""
    b, s = attention_mask.shape
    device = attention_mask.device
    future = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), diagonal=1)
    pad_key = ~attention_mask.bool()[:, None, None, :]
    mask = future[None, None] | pad_key
    eye = torch.eye(s, dtype=torch.bool, device=device)[None, None]
    return mask & ~eye


def position_ids_for(input_ids: torch.Tensor) -> torch.Tensor:
    b, s = input_ids.shape
    return torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)


def broadcast_from_last_stage(tensor: torch.Tensor) -> torch.Tensor:
    """The last pipeline stage's ``tensor`` on every stage (others pass a buffer of its shape)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(tensor, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return tensor


@torch.no_grad()
def full_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                vocab_size: int | None = None) -> torch.Tensor:
    """Full-vocabulary logits ``[b, s, vocab]`` (fp32) on every rank. For checks and small
    models: training code computes log-probs vocab-parallel instead of gathering logits."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch = dict(
        input_ids=input_ids,
        position_ids=position_ids_for(input_ids),
        attention_mask=attention_mask_4d(attention_mask),
    )

    def forward_step(data_iterator, model_chunk):
        data = next(data_iterator)
        output = model_chunk(data["input_ids"], data["position_ids"], data["attention_mask"])

        def collect(output_tensor, non_loss_data=True):
            return gather_from_tensor_model_parallel_region(output_tensor).float()

        return output, collect

    model.eval()
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=[model],
        num_microbatches=1,
        seq_length=input_ids.shape[1],
        micro_batch_size=input_ids.shape[0],
        forward_only=True,
        collect_non_loss_data=True,
    )
    padded_vocab = unwrap(model).vocab_size
    logits = outputs[0] if outputs else torch.empty(
        (*input_ids.shape, padded_vocab), dtype=torch.float32, device=input_ids.device
    )
    logits = broadcast_from_last_stage(logits)
    return logits[..., : vocab_size or padded_vocab]
