"""Move weights between HF tensors and a Megatron model sharded over TP/PP ranks.

* ``load_hf_weights``: each rank reads only the slices of the HF tensors it owns.
* ``export_hf_weights``: a generator of byte-bounded buckets of full, HF-named tensors. TP shards
  are gathered to the stage's TP rank 0, later pipeline stages send to stage 0, and only the
  (tp 0, pp 0) rank of each data-parallel replica materialises full tensors and yields them.
  Every rank of the replica must iterate the generator to the end (it drives the collectives);
  the others get no buckets. With ``to_all_ranks`` every rank gets every tensor (colocated
  engines fed by each rank), via all-gather over TP and broadcast over PP. Peak extra memory on a
  receiving rank: one bucket plus the largest tensor. Row-split tensors (the embedding and output
  layer, usually the largest) are gathered straight into the full tensor (point-to-point to the
  leader; all-gather-into-tensor for every rank, which gloo, unlike NCCL, stages in a second
  buffer); the others are assembled from their gathered shards, briefly twice their size.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_prime.bridge.mapping import (
    SliceSource,
    expected_hf_shape,
    load_shard,
    megatron_param_names,
    param_spec,
    shards_to_hf,
)
from megatron_prime.bridge.hf_io import CheckpointError
from megatron_prime.models.gpt import padded_vocab_size
from megatron_prime.models.hf_config import HFArch
from megatron_prime.models.wrappers import unwrap

Bucket = list[tuple[str, torch.Tensor]]


def local_to_global_names(model) -> dict[str, str]:
    """This stage's parameter names -> global canonical names (global layer numbers)."""
    model = unwrap(model)
    out = {}
    for name, _ in model.named_parameters():
        if name.startswith("decoder.layers."):
            local, rest = name[len("decoder.layers."):].split(".", 1)
            global_index = model.decoder.layers[int(local)].layer_number - 1
            out[name] = f"decoder.layers.{global_index}.{rest}"
        else:
            out[name] = name
    return out


def load_hf_weights(model, arch: HFArch, source: SliceSource, vocab_pad_multiple: int = 128) -> None:
    """Copy HF weights into this rank's shards of ``model`` (any TP/PP layout), each slice
    straight into its place in the parameter."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    padded = padded_vocab_size(arch.vocab_size, tp_size, vocab_pad_multiple)
    names = local_to_global_names(model)
    params = dict(unwrap(model).named_parameters())
    for local_name, global_name in names.items():
        spec = param_spec(arch, global_name)
        try:
            with torch.no_grad():
                load_shard(arch, spec, source, tp_rank, tp_size, padded, params[local_name])
        except CheckpointError:
            raise
        except ValueError as e:
            raise CheckpointError(
                f"tensor(s) {', '.join(spec.hf_names)} -> Megatron '{global_name}': {e} "
                f"(config and weights disagree)"
            ) from None


def _owner_stage(arch: HFArch, global_name: str, pp_size: int) -> int:
    if global_name.startswith("embedding."):
        return 0
    if global_name.startswith("decoder.layers."):
        layer = int(global_name.split(".")[2])
        return layer // (arch.num_layers // pp_size)
    return pp_size - 1


def _gather_tp(tensor: torch.Tensor, tp_dim: int | None, to_all: bool):
    """``(shards, stacked)``: all TP shards on TP rank 0 (on every TP rank with ``to_all``; None
    elsewhere), and for shards split along dim 0 the one tensor they were gathered into (the full
    parameter, no copy), else None. Replicated tensors are not gathered."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if tp_dim is None or tp_size == 1:
        return [tensor], (tensor if tp_dim == 0 else None)
    group = parallel_state.get_tensor_model_parallel_group()
    receives = to_all or parallel_state.get_tensor_model_parallel_rank() == 0
    stacked = None
    if receives:
        stacked = torch.empty((tp_size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    shards = list(stacked.chunk(tp_size)) if receives else None  # contiguous views: gathered in place
    if to_all:
        dist.all_gather_into_tensor(stacked, tensor.contiguous(), group=group)
    else:
        _gather_in_place(tensor.contiguous(), shards, group)
    if tp_dim != 0:
        stacked = None  # shards along another dim: shards_to_hf concatenates them
    return shards, stacked


def _gather_in_place(tensor: torch.Tensor, shards: list[torch.Tensor] | None, group) -> None:
    """Gather to TP rank 0 by point-to-point transfers straight into ``shards`` (views of one
    tensor): unlike a gather collective on gloo, nothing is staged in a second full-size buffer."""
    ranks = dist.get_process_group_ranks(group)
    if shards is None:
        dist.send(tensor, dst=ranks[0], group=group)
        return
    shards[0].copy_(tensor)
    for request in [dist.irecv(shard, src=peer, group=group) for shard, peer in zip(shards[1:], ranks[1:])]:
        request.wait()


def export_hf_weights(model, arch: HFArch, bucket_bytes: int = 512 * 2**20,
                      to_all_ranks: bool = False) -> Iterator[Bucket]:
    """Yield buckets of ``(hf_name, full tensor)`` on each replica's (tp 0, pp 0) rank, or on every
    rank with ``to_all_ranks`` (for engines fed by every rank: TP shards are all-gathered and the
    owning pipeline stage broadcasts to the others)."""
    # No @torch.no_grad() here: its generator wrapper keeps the previously yielded bucket alive
    # while the next one is built (two buckets live). Grad mode is switched off per parameter below.
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_group = parallel_state.get_pipeline_model_parallel_group() if pp_size > 1 else None
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp_size > 1 else None
    receives = to_all_ranks or (pp_rank == 0 and tp_rank == 0)
    local_params = dict(unwrap(model).named_parameters())
    params = {g: local_params[l] for l, g in local_to_global_names(model).items()}
    dtype = next(iter(params.values())).dtype
    device = next(iter(params.values())).device

    bucket: Bucket = []
    bucket_size = 0
    for global_name in megatron_param_names(arch):
        spec = param_spec(arch, global_name)
        owner = _owner_stage(arch, global_name, pp_size)
        tensors: list[tuple[str, torch.Tensor]] = []
        with torch.no_grad():
            if pp_rank == owner:
                shards, stacked = _gather_tp(params[global_name].detach(), spec.tp_dim, to_all_ranks)
                if shards is not None and spec.kind == "plain" and stacked is not None:
                    # Gathered straight into the full tensor: peak one copy of it, not two.
                    tensors = [(spec.hf_names[0], stacked[: arch.vocab_size] if spec.vocab_padded else stacked)]
                elif shards is not None:
                    tensors = [(n, t.contiguous()) for n, t in shards_to_hf(arch, spec, shards)]
                del shards, stacked
            elif receives:
                tensors = [(n, torch.empty(expected_hf_shape(arch, n), dtype=dtype, device=device))
                           for n in spec.hf_names]
            if pp_size > 1 and owner != 0 or to_all_ranks:
                tensors = _share_across_stages(tensors, owner, pp_ranks, pp_group, to_all_ranks, receives)
        if not receives:
            continue
        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            if bucket and bucket_size + nbytes > bucket_bytes:
                yield bucket
                bucket, bucket_size = [], 0
            bucket.append((name, t))
            bucket_size += nbytes
    if bucket:
        yield bucket


def _share_across_stages(tensors, owner: int, pp_ranks, pp_group, to_all: bool, receives: bool):
    """Move the owning stage's full tensors to where they are wanted: stage 0's TP rank 0 (send /
    recv), or every stage (broadcast over each TP rank's pipeline group)."""
    if pp_ranks is None:
        return tensors
    if to_all:
        for _, t in tensors:
            dist.broadcast(t, src=pp_ranks[owner], group=pp_group)
        return tensors
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    if pp_rank == owner and tensors:  # TP rank 0 of a later stage: hand over to stage 0
        for _, t in tensors:
            dist.send(t, dst=pp_ranks[0])
        return []
    if receives:
        for _, t in tensors:
            dist.recv(t, src=pp_ranks[owner])
    return tensors


def iter_hf_tensors(model, arch: HFArch, bucket_bytes: int = 512 * 2**20,
                    to_all_ranks: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``export_hf_weights`` flattened to ``(hf_name, tensor)`` pairs (what engines consume)."""
    for bucket in export_hf_weights(model, arch, bucket_bytes, to_all_ranks):
        yield from bucket
        del bucket  # else it stays alive while the next bucket is built
