"""Move weights between HF tensors and a Megatron model sharded over TP/PP ranks.

* ``load_hf_weights``: each rank reads only the slices of the HF tensors it owns, straight into
  its parameters.
* ``export_hf_weights``: a generator of byte-bounded buckets of full, HF-named tensors. TP shards
  are gathered to the stage's TP rank 0, later pipeline stages send to stage 0, and only the
  (tp 0, pp 0) rank of each data-parallel replica materialises full tensors and yields them.
  Every rank of the replica must iterate the generator to the end (it drives the collectives);
  the others get no buckets. With ``to_all_ranks`` every rank gets every tensor (colocated
  engines fed by each rank): every TP rank sends its pieces to every other, and the owning
  pipeline stage broadcasts to the others. Peak extra memory on a receiving rank: one bucket
  plus the largest tensor. The TP pieces travel point-to-point straight into their place in the
  full HF tensors (a gather collective on gloo would stage its output in a second buffer, and
  shards gathered whole would still need reordering into the HF layout). Tensors that need no
  gathering or reordering (replicated ones; at TP=1 all but q/k/v) are yielded as views of the
  parameters: they stay valid until the model is next changed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_prime.bridge.hf_io import CheckpointError
from megatron_prime.bridge.mapping import (
    SliceSource,
    expected_hf_shape,
    expert_of,
    load_shard,
    megatron_param_names,
    param_spec,
    shard_pieces,
)
from megatron_prime.models.gpt import padded_vocab_size
from megatron_prime.models.hf_config import HFArch
from megatron_prime.models.wrappers import unwrap
from megatron_prime.platform import watchdog

Bucket = list[tuple[str, torch.Tensor]]


def local_to_global_names(model) -> dict[str, str]:
    """This stage's parameter names -> global canonical names (global layer numbers); LoRA adapters'
    parameters (not part of the HF model) are left out."""
    model = unwrap(model)
    offset = expert_offset(model)
    out = {}
    for name, param in model.named_parameters():
        if getattr(param, "is_lora", False):
            continue
        if name.startswith("decoder.layers."):
            local, rest = name[len("decoder.layers."):].split(".", 1)
            global_index = model.decoder.layers[int(local)].layer_number - 1
            out[name] = f"decoder.layers.{global_index}.{_global_expert(rest, offset)}"
        else:
            out[name] = name
    return out


_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")  # Transformer Engine's TEGroupedMLP
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")  # SequentialMLP


def _global_expert(rest: str, offset: int) -> str:
    """A layer parameter's name with this rank's local expert index made global (expert parallelism
    holds experts ep_rank * E / EP ...), in SequentialMLP's form whatever the spec."""
    grouped, local = _GROUPED_EXPERT.match(rest), _LOCAL_EXPERT.match(rest)
    if not grouped and not local:
        return rest
    index, linear = (int(grouped.group(2)), f"{grouped.group(1)}.weight") if grouped else (int(local.group(1)), local.group(2))
    return f"mlp.experts.local_experts.{offset + index}.{linear}"


def expert_offset(model) -> int:
    """The global index of this rank's first expert (0 for a dense model)."""
    experts = getattr(unwrap(model).config, "num_moe_experts", None) or 0
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    return parallel_state.get_expert_model_parallel_rank() * (experts // ep_size) if experts else 0


def load_hf_weights(model, arch: HFArch, source: SliceSource, vocab_pad_multiple: int = 128) -> None:
    """Copy HF weights into this rank's shards of ``model`` (any TP/PP layout), each slice
    straight into its place in the parameter."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    padded = padded_vocab_size(arch.vocab_size, tp_size, vocab_pad_multiple)
    names = local_to_global_names(model)
    params = dict(unwrap(model).named_parameters())
    for local_name, global_name in names.items():
        watchdog.heartbeat()  # a 70B model read from slow storage takes a while: progress per tensor
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


def owner_stage(arch: HFArch, global_name: str, pp_size: int) -> int:
    if global_name.startswith("embedding."):
        return 0
    if global_name.startswith("decoder.layers."):
        layer = int(global_name.split(".")[2])
        return layer // (arch.num_layers // pp_size)
    return pp_size - 1


@dataclass
class _Gather:
    """The TP gather of one parameter's full HF tensors, in two steps so that the transfers of a
    whole bucket of parameters travel together: post ``ops`` (with the other parameters'), then
    ``finish`` once they are done. ``own`` are this rank's pieces, copied while the others
    arrive; ``staged`` the (place, buffer) pairs of pieces received through a staging buffer."""

    tensors: list[tuple[str, torch.Tensor]]
    ops: list
    own: list
    staged: list

    def copy_own(self) -> None:
        for piece, shard, full in self.own:
            piece.of_hf(full).copy_(piece.of_shard(shard))

    def finish(self) -> list[tuple[str, torch.Tensor]]:
        for place, buffer in self.staged:
            place.copy_(buffer)
        return self.tensors


def _start_gather(arch: HFArch, spec, shard: torch.Tensor, to_all: bool) -> _Gather:
    """The full HF tensors of one Megatron parameter, on TP rank 0 (on every TP rank with
    ``to_all``; none on the others). Every TP rank's pieces (``mapping.shard_pieces``) go
    straight to their place in the full tensors: copied on the rank itself, sent point-to-point
    to the others and received in place (through a staging buffer only where the place is not
    contiguous: the column blocks of row-parallel weights). A full tensor that is one whole piece
    of this rank's shard is that view, no copy (replicated tensors; at TP=1 most tensors)."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    receives = to_all or tp_rank == 0
    if spec.tp_dim is None or tp_size == 1:
        tp_size, tp_rank = 1, 0  # nothing to gather
    padded = shard.shape[0] * tp_size if spec.vocab_padded else 0
    pieces = [shard_pieces(arch, spec, r, tp_size, padded) for r in range(tp_size)]
    full: dict[str, torch.Tensor] = {}
    own = []
    for name in (spec.hf_names if receives else ()):
        mine = [p for p in pieces[tp_rank] if p.hf_name == name]
        whole = expected_hf_shape(arch, name)
        if tp_size == 1 and len(mine) == 1 and mine[0].hf_start == 0 and mine[0].hf_count == whole[mine[0].hf_dim]:
            full[name] = mine[0].of_shard(shard)
        else:
            full[name] = torch.empty(whole, dtype=shard.dtype, device=shard.device)
            own += [(p, shard, full[name]) for p in mine]
    ops, staged = _exchange_ops(shard, pieces, full, tp_rank, to_all) if tp_size > 1 else ([], [])
    return _Gather([(n, full[n]) for n in spec.hf_names] if receives else [], ops, own, staged)


def _exchange_ops(shard: torch.Tensor, pieces: list[list], full: dict, tp_rank: int, to_all: bool):
    """The point-to-point ops that send this rank's pieces to the TP ranks that receive, and
    receive the other ranks' pieces into ``full`` (in the same order on both sides, which is how
    point-to-point messages match), and the (place, staging buffer) pairs to copy afterwards."""
    group = parallel_state.get_tensor_model_parallel_group()
    ranks = dist.get_process_group_ranks(group)
    receivers = range(len(ranks)) if to_all else [0]
    ops, staged = [], []
    for peer in range(len(ranks)):
        if peer == tp_rank:
            continue
        if peer in receivers:
            ops += [dist.P2POp(dist.isend, p.of_shard(shard), ranks[peer], group) for p in pieces[tp_rank]]
        if tp_rank in receivers:
            for p in pieces[peer]:
                place = p.of_hf(full[p.hf_name])
                buffer = place if place.is_contiguous() else torch.empty_like(p.of_shard(shard))
                if buffer is not place:
                    staged.append((place, buffer))
                ops.append(dist.P2POp(dist.irecv, buffer, ranks[peer], group))
    return ops, staged


def _param_buckets(arch: HFArch, bucket_bytes: int, itemsize: int, tp_size: int) -> list[list[str]]:
    """Consecutive Megatron parameters whose HF tensors (and staging buffers) fit together in
    ``bucket_bytes``, a parameter alone where it is larger; the same on every rank."""
    buckets, current, size = [], [], 0
    for name in megatron_param_names(arch):
        spec = param_spec(arch, name)
        nbytes = sum(math.prod(expected_hf_shape(arch, n)) for n in spec.hf_names) * itemsize
        if spec.tp_dim == 1:
            nbytes += nbytes * (tp_size - 1) // tp_size  # the other ranks' column blocks, staged
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return buckets + [current] if current else buckets


def export_hf_weights(model, arch: HFArch, bucket_bytes: int = 512 * 2**20,
                      to_all_ranks: bool = False, adapter: str | None = None) -> Iterator[Bucket]:
    """Yield buckets of ``(hf_name, full tensor)`` on each replica's (tp 0, pp 0) rank, or on every
    rank with ``to_all_ranks`` (for engines fed by every rank: every TP rank sends its pieces to
    every other, and the owning pipeline stage broadcasts to the others). A bucket holds whole
    parameters' tensors, at most ``bucket_bytes`` unless one parameter is larger; the TP transfers
    of a bucket are posted together. With ``adapter`` (a LoRA model), the layers that carry it give
    their merged weights, ``W0 + (alpha / r) B A``, computed from the untouched base each time."""
    # No @torch.no_grad() here: its generator wrapper keeps the previously yielded bucket alive
    # while the next one is built (two buckets live). Grad mode is switched off per bucket below.
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    pp_group = parallel_state.get_pipeline_model_parallel_group() if pp_size > 1 else None
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp_size > 1 else None
    receives = to_all_ranks or (pp_rank == 0 and tp_rank == 0)
    holds = to_all_ranks or tp_rank == 0  # has a parameter's full tensors after its stage's TP gather
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    ep_group = parallel_state.get_expert_model_parallel_group() if ep_size > 1 else None
    experts_per_rank = arch.num_experts // ep_size if arch.is_moe else 0
    local_params = dict(unwrap(model).named_parameters())
    params = {g: local_params[l] for l, g in local_to_global_names(model).items()}
    merged = lora_modules_by_name(unwrap(model), adapter) if adapter is not None else {}
    dtype = next(iter(params.values())).dtype
    device = next(iter(params.values())).device

    for names in _param_buckets(arch, bucket_bytes, dtype.itemsize, tp_size):
        watchdog.heartbeat()
        bucket: Bucket = []
        with torch.no_grad():
            gathers = {name: _start_gather(arch, param_spec(arch, name),
                                           merged[name].merged_shard(adapter) if name in merged else params[name].detach(),
                                           to_all_ranks)
                       for name in names if pp_rank == owner_stage(arch, name, pp_size)
                       and (expert_of(name) is None or expert_of(name) // experts_per_rank == ep_rank)}
            ops = [op for g in gathers.values() for op in g.ops]
            requests = dist.batch_isend_irecv(ops) if ops else []
            for g in gathers.values():  # while the other ranks' pieces arrive
                g.copy_own()
            for request in requests:
                request.wait()
            for name in names:
                owner = owner_stage(arch, name, pp_size)
                # an expert's tensors reach the other expert-parallel ranks of its stage first
                expert_share = ep_group is not None and expert_of(name) is not None and pp_rank == owner and holds
                if name in gathers:
                    tensors = gathers.pop(name).finish()
                elif receives or expert_share:
                    tensors = [(n, torch.empty(expected_hf_shape(arch, n), dtype=dtype, device=device))
                               for n in param_spec(arch, name).hf_names]
                else:
                    tensors = []
                if expert_share:
                    src = dist.get_global_rank(ep_group, expert_of(name) // experts_per_rank)
                    for _, t in tensors:
                        dist.broadcast(t, src=src, group=ep_group)
                if pp_size > 1 and owner != 0 or to_all_ranks:
                    tensors = _share_across_stages(tensors, owner, pp_ranks, pp_group, to_all_ranks, receives)
                if receives:
                    bucket += tensors
        if bucket:
            yield bucket
        del bucket  # else it stays alive while the next bucket is built


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


def lora_modules_by_name(model, adapter: str) -> dict:
    """Global base-weight name -> the LoRA linear of this stage that carries ``adapter``."""
    return {m.lora_name: m for m in model.modules() if getattr(m, "lora_name", None) and adapter in m.lora}


def iter_hf_tensors(model, arch: HFArch, bucket_bytes: int = 512 * 2**20,
                    to_all_ranks: bool = False, adapter: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``export_hf_weights`` flattened to ``(hf_name, tensor)`` pairs (what engines consume)."""
    for bucket in export_hf_weights(model, arch, bucket_bytes, to_all_ranks, adapter):
        yield from bucket
        del bucket  # else it stays alive while the next bucket is built
