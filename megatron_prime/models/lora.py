"""Low-rank adapters (LoRA, Hu et al. 2021) on megatron-core's tensor-parallel linear layers, for
shared-base PRIME: one frozen base, the policy and the implicit PRM as two adapters on it, and the
reference as the base with no adapter active.

A LoRA linear computes ``y = W0 x + (alpha / r) * B A x`` with the base weight ``W0`` frozen and
``A [r, in]``, ``B [out, r]`` trained, ``B`` starting at zero (so every adapter starts as the
base). Each LoRA linear holds one ``(A, B)`` pair per adapter name; ``LoRASettings.active`` (shared
by every LoRA linear of a model) says which one the forward adds (``None``: the base alone).

Tensor parallelism (every pair computed on the layer's own input, with its own communication, so
the base layer's internals are untouched, for the local and the Transformer Engine layers alike):

* column-parallel base (``linear_qkv``, ``linear_fc1``: output rows sharded): ``A`` replicated,
  ``B`` sharded like the base's output rows. The input is taken into the tensor-parallel region
  (copied, or gathered along the sequence under sequence parallelism) so its gradient is reduced
  as the base's is; ``A`` enters through ``copy_to_tensor_model_parallel_region``, whose backward
  sums its partial gradients over TP ranks, so the replicated ``A`` stays identical everywhere.
* row-parallel base (``linear_proj``, ``linear_fc2``: input columns sharded): ``A`` sharded like the
  base's input columns, ``B`` replicated; ``A x`` is all-reduced over TP (then scattered along the
  sequence under sequence parallelism) and added to the base's reduced output.

Merging (``merged_shard``) is then local to each rank: ``B_shard A`` (column) or ``B A_shard`` (row)
is exactly the rank's shard of ``B A``.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")


@dataclass
class LoRASettings:
    """What every LoRA linear of one model shares: the adapters (name -> rank), alpha, the layers
    that carry adapters, and which adapter the forward adds."""

    ranks: dict[str, int]
    alpha: float
    targets: tuple[str, ...] = LORA_TARGETS
    active: str | None = None
    modules: list = field(default_factory=list, repr=False)  # every LoRA linear built with these settings

    def scale(self, adapter: str) -> float:
        return self.alpha / self.ranks[adapter]


class LoRAPair(torch.nn.Module):
    """One adapter's ``A`` and ``B`` on one layer (this rank's shards)."""

    def __init__(self, a_shape: tuple[int, int], b_shape: tuple[int, int], dtype, device):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(a_shape, dtype=dtype, device=device))
        self.b = torch.nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=device))


class _LoRAMixin:
    """The adapter part of a LoRA linear; ``parallel`` is "column" or "row"."""

    lora_settings: LoRASettings  # set on the class by ``lora_linear``
    parallel: str

    def _add_adapters(self, input_size: int, output_size: int) -> None:
        settings = self.lora_settings
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.lora_full_input = input_size
        self.lora_name = None  # the base weight's global name, set by ``name_lora_modules``
        dtype = self.weight.dtype
        device = self.weight.device
        self.lora = torch.nn.ModuleDict()
        for name, rank in settings.ranks.items():
            if self.parallel == "column":  # A replicated, B sharded like the output rows
                shapes = (rank, input_size), (output_size // tp, rank)
            else:  # A sharded like the input columns, B replicated
                shapes = (rank, input_size // tp), (output_size, rank)
            pair = self.lora[name] = LoRAPair(*shapes, dtype=dtype, device=device)
            # which half is a TP shard: megatron-core's grad norm counts a replicated tensor once (on
            # TP rank 0) and a shard on every rank
            sharded, replicated, dim = (pair.b, pair.a, 0) if self.parallel == "column" else (pair.a, pair.b, 1)
            tensor_parallel.set_tensor_model_parallel_attributes(sharded, is_parallel=True, dim=dim, stride=1)
            tensor_parallel.set_tensor_model_parallel_attributes(replicated, is_parallel=False, dim=-1, stride=1)
        for param in self.lora.parameters():
            param.is_lora = True  # not part of the HF model (bridge, export)
        settings.modules.append(self)

    def _adapter_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        settings = self.lora_settings
        if settings.active is None or settings.active not in self.lora:
            return None
        pair = self.lora[settings.active]
        sequence_parallel = self.config.sequence_parallel
        if self.parallel == "column":
            if sequence_parallel:
                x = tensor_parallel.gather_from_sequence_parallel_region(x)
            else:
                x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
            a = tensor_parallel.copy_to_tensor_model_parallel_region(pair.a)
            return settings.scale(settings.active) * torch.nn.functional.linear(
                torch.nn.functional.linear(x, a), pair.b)
        z = tensor_parallel.reduce_from_tensor_model_parallel_region(torch.nn.functional.linear(x, pair.a))
        delta = settings.scale(settings.active) * torch.nn.functional.linear(z, pair.b)
        if sequence_parallel:
            delta = tensor_parallel.scatter_to_sequence_parallel_region(delta)
        return delta

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        delta = self._adapter_delta(input_)
        return (output if delta is None else output + delta.to(output.dtype)), bias

    def merged_shard(self, adapter: str) -> torch.Tensor:
        """This rank's shard of ``W0 + (alpha / r) B A`` for ``adapter`` (``W0`` itself unchanged)."""
        pair = self.lora[adapter]
        delta = pair.b.float() @ pair.a.float()
        return (self.weight.float() + self.lora_settings.scale(adapter) * delta).to(self.weight.dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base weights as the base layer shards them, and each adapter's sharded half along the
        same axis (``B``'s rows of a column-parallel layer, ``A``'s columns of a row-parallel one)."""
        state_dict = self.state_dict(prefix="", keep_vars=True)
        if self.parallel == "column":
            axes = {"weight": 0, "bias": 0, **{f"lora.{name}.b": 0 for name in self.lora}}
        else:
            axes = {"weight": 1, **{f"lora.{name}.a": 1 for name in self.lora}}
        sharded = make_sharded_tensors_for_checkpoint(state_dict, prefix, axes, sharded_offsets,
                                                      tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        if self.config.gated_linear_unit and (self.lora_name or "").endswith("linear_fc1.weight"):
            # B's rows follow the base's [gate_r; up_r] per TP rank: saved as gate and up halves, as
            # megatron-core's MLP saves the base weight, so that they reshard to another TP
            singleton = (metadata or {}).get("singleton_local_shards", False)
            for name in self.lora:
                key = f"{prefix}lora.{name}.b"
                sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets, singleton)
        return sharded


def lora_linear(base: type, parallel: str, settings: LoRASettings) -> type:
    """A subclass of the tensor-parallel linear layer ``base`` (megatron-core's local
    ``ColumnParallelLinear`` / ``RowParallelLinear``, or Transformer Engine's wrappers of them) that
    carries the adapters of ``settings``; ``parallel`` is "column" or "row". What a layer spec names
    (megatron-core builds some linear layers by calling the class, others through ``build_module``)."""

    def __init__(self, input_size: int, output_size: int, **kwargs):
        base.__init__(self, input_size, output_size, **kwargs)
        self._add_adapters(input_size, output_size)

    return type(f"LoRA{base.__name__}", (_LoRAMixin, base),
                {"parallel": parallel, "lora_settings": settings, "__init__": __init__})


LAYER_PATHS = {"linear_qkv": "self_attention.linear_qkv", "linear_proj": "self_attention.linear_proj",
               "linear_fc1": "mlp.linear_fc1", "linear_fc2": "mlp.linear_fc2"}


def name_lora_modules(gpt_model) -> None:
    """Give every LoRA linear of this pipeline stage its base weight's global name
    (``decoder.layers.{global layer}.self_attention.linear_qkv.weight``, ...)."""
    for layer in gpt_model.decoder.layers:
        for path in LAYER_PATHS.values():
            try:
                module = layer.get_submodule(path)
            except AttributeError:  # a mixture-of-experts layer's MLP has experts, not linear_fc1/fc2
                continue
            if isinstance(module, _LoRAMixin):
                module.lora_name = f"decoder.layers.{layer.layer_number - 1}.{path}.weight"


@contextmanager
def active_adapter(model, adapter: str | None):
    """Inside the block, ``model``'s LoRA linears add ``adapter`` (None: the base alone). A model
    without adapters ignores it."""
    settings = getattr(model, "lora_settings", None)
    if settings is None:
        yield
        return
    previous, settings.active = settings.active, adapter
    try:
        yield
    finally:
        settings.active = previous


def lora_pairs(settings: LoRASettings, adapter: str):
    """Every ``(module, pair)`` of ``adapter`` in the model built with ``settings``."""
    return [(module, module.lora[adapter]) for module in settings.modules if adapter in module.lora]


def init_adapter_(settings: LoRASettings, adapter: str, seed: int) -> None:
    """PEFT's initialisation: ``A`` Kaiming-uniform (a = sqrt(5)), ``B`` zero. ``A`` is drawn whole
    per layer from a generator seeded by (seed, adapter, the layer's global name), and this rank
    keeps its shard: the same adapter on every layout."""
    for module, pair in lora_pairs(settings, adapter):
        key = f"{seed}/{adapter}/{module.lora_name}".encode()
        generator = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)
        rank, full_in = pair.a.shape[0], module.lora_full_input
        bound = 1.0 / math.sqrt(full_in)  # kaiming_uniform_(a=sqrt(5)) on [r, in]: bound = 1/sqrt(in)
        full = (torch.rand(rank, full_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        with torch.no_grad():
            if module.parallel == "column":
                pair.a.copy_(full)
            else:
                width = pair.a.shape[1]
                start = parallel_state.get_tensor_model_parallel_rank() * width
                pair.a.copy_(full[:, start:start + width])
            pair.b.zero_()

