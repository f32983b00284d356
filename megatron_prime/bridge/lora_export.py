"""LoRA adapters out of Megatron, in the PEFT layout: what a rollout engine loads as an adapter and
what ``peft.PeftModel.from_pretrained`` loads on the HF base.

PEFT holds one ``(lora_A, lora_B)`` per HF projection, where Megatron fuses some (``models/lora.py``):

* ``linear_qkv`` -> ``q_proj``, ``k_proj``, ``v_proj``: the same ``A`` for each (the three share the
  input), ``B``'s rows split like the fused base weight's (query groups interleaved, per TP rank);
* ``linear_fc1`` -> ``gate_proj``, ``up_proj``: ``A`` twice, ``B``'s rows split like ``[gate_r; up_r]``;
* ``linear_proj`` -> ``o_proj``, ``linear_fc2`` -> ``down_proj``: one pair, ``A``'s columns gathered.

The split is exact: each projection's ``B_p A`` is its rows of the fused ``B A``. Tensors are
gathered over TP (all-gather of the sharded half) and the owning pipeline stage broadcasts them to
the others, so every rank that asks gets all of them (adapters are ~1% of the model).
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_prime.bridge.atomic_dir import DistributedAtomicDir
from megatron_prime.bridge.mapping import expected_hf_shape, param_spec, shard_pieces
from megatron_prime.bridge.transfer import lora_modules_by_name, owner_stage
from megatron_prime.models.hf_config import HFArch
from megatron_prime.models.lora import LAYER_PATHS, LoRASettings
from megatron_prime.models.wrappers import unwrap
from megatron_prime.platform.distributed import is_rank0

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def hf_modules(arch: HFArch, target: str, layer: int = 0) -> list[str]:
    """The HF modules (``model.layers.L.self_attn.q_proj``, ...) a Megatron target covers."""
    spec = param_spec(arch, f"decoder.layers.{layer}.{LAYER_PATHS[target]}.weight")
    return [name.removesuffix(".weight") for name in spec.hf_names]


def peft_config(arch: HFArch, settings: LoRASettings, adapter: str, base_model_dir: str) -> dict:
    """The ``adapter_config.json`` of ``adapter``: PEFT's LoRA on the HF modules of the targets."""
    modules = sorted({m.rsplit(".", 1)[-1] for t in settings.targets for m in hf_modules(arch, t)})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": os.path.abspath(base_model_dir),
            "r": settings.ranks[adapter], "lora_alpha": settings.alpha, "target_modules": modules,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}


def _tp_all_gather(shard: torch.Tensor) -> list[torch.Tensor]:
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return parts


def _layer_pairs(arch: HFArch, module, adapter: str, spec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF module -> (A, B) of one Megatron LoRA linear on this stage, gathered over TP."""
    pair = module.lora[adapter]
    a, b = pair.a.detach(), pair.b.detach()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    names = [n.removesuffix(".weight") for n in spec.hf_names]
    if module.parallel == "row":  # A's columns sharded like the base's input, B replicated
        full_a = torch.cat(_tp_all_gather(a), dim=1) if tp_size > 1 else a
        return {names[0]: (full_a, b)}
    shards = _tp_all_gather(b) if tp_size > 1 else [b]
    full_b = {n: torch.empty(expected_hf_shape(arch, n + ".weight")[0], b.shape[1], dtype=b.dtype, device=b.device)
              for n in names}
    for rank, shard in enumerate(shards):  # B's rows go where the fused base weight's rows go
        for piece in shard_pieces(arch, spec, rank, tp_size, 0):
            full_b[piece.hf_name.removesuffix(".weight")].narrow(0, piece.hf_start, piece.hf_count).copy_(
                piece.of_shard(shard))
    return {n: (a, full_b[n]) for n in names}


def adapter_hf_tensors(model, arch: HFArch, settings: LoRASettings, adapter: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``adapter`` in PEFT's names (``base_model.model.<module>.lora_A.weight``), full,
    on every rank of the model's TP x PP group (all of them must call this)."""
    inner = unwrap(model)
    modules = lora_modules_by_name(inner, adapter)
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    rank = settings.ranks[adapter]
    first = next(iter(modules.values())).lora[adapter].a
    out: dict[str, torch.Tensor] = {}
    for layer in range(arch.num_layers):
        for target in settings.targets:
            name = f"decoder.layers.{layer}.{LAYER_PATHS[target]}.weight"
            spec = param_spec(arch, name)
            owner = owner_stage(arch, name, pp_size)
            if owner == pp_rank:
                pairs = _layer_pairs(arch, modules[name], adapter, spec)
            else:  # shapes known from the config; the owner's values arrive below
                pairs = {}
                for hf_name in spec.hf_names:
                    rows, cols = expected_hf_shape(arch, hf_name)
                    pairs[hf_name.removesuffix(".weight")] = (
                        torch.empty(rank, cols, dtype=first.dtype, device=first.device),
                        torch.empty(rows, rank, dtype=first.dtype, device=first.device))
            if pp_size > 1:
                group = parallel_state.get_pipeline_model_parallel_group()
                src = dist.get_global_rank(group, owner)
                for a, b in pairs.values():
                    dist.broadcast(a.contiguous() if owner == pp_rank else a, src=src, group=group)
                    dist.broadcast(b.contiguous() if owner == pp_rank else b, src=src, group=group)
            for module_name, (a, b) in pairs.items():
                out[f"{PEFT_PREFIX}{module_name}.lora_A.weight"] = a
                out[f"{PEFT_PREFIX}{module_name}.lora_B.weight"] = b
    return out


def write_peft_adapter(model, arch: HFArch, settings: LoRASettings, adapter: str, out_dir: str,
                       base_model_dir: str) -> None:
    """``out_dir`` as a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``),
    written atomically; all ranks call this."""
    from safetensors.torch import save_file

    tensors = adapter_hf_tensors(model, arch, settings, adapter)
    with DistributedAtomicDir(out_dir) as tmp:
        if is_rank0():
            save_file({k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}, os.path.join(tmp, ADAPTER_WEIGHTS),
                      metadata={"format": "pt"})
            with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
                json.dump(peft_config(arch, settings, adapter, base_model_dir), f, indent=2)
