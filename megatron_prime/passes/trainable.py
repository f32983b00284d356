"""The three models of PRIME in one parallel layout: trainable policy and implicit PRM (each with
its own DDP buffers, distributed optimizer and lr schedule), and the frozen reference; or, with
shared-base LoRA (``build_shared_base``), one frozen model carrying the policy's and the PRM's
adapters, each adapter with its own DDP buffer and optimizer.

Each model gets its own ``TransformerConfig``; megatron-core reads ``finalize_model_grads_func``,
``grad_scale_func`` and ``no_sync_func`` from it but never sets them, so we do. Losses are
per-token (``calculate_per_token_loss``): micro-batch losses are sums and
``finalize_model_grads`` divides the grads by the global item count over all micro-batches and
data-parallel ranks, which gives exact global-batch means.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_prime.config import Config, OptimizerConfig
from megatron_prime.models.gpt import ModelOptions, build_gpt_model, resolve_use_te
from megatron_prime.models.hf_config import HFArch
from megatron_prime.models.lora import LoRASettings, init_adapter_, lora_pairs
from megatron_prime.passes import routing_replay


NON_LEAF_GRAD_WARNING = "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed"


@dataclass
class TrainableModel:
    model: DistributedDataParallel
    optimizer: object  # MegatronOptimizer
    scheduler: OptimizerParamScheduler
    adapter: str | None = None  # shared-base LoRA: the adapter it trains (its DDP holds only that)

    def zero_grad(self) -> None:
        self.model.zero_grad_buffer()
        with warnings.catch_warnings():
            # megatron-core's optimizer reads .grad of main parameters that are views (non-leaf
            # tensors) where its fp32 parameters share the grad buffer: torch warns on every call,
            # which a user would read as an error.
            warnings.filterwarnings("ignore", message=NON_LEAF_GRAD_WARNING, category=UserWarning)
            self.optimizer.zero_grad()

    def step(self) -> dict:
        """Optimizer step (grads are already reduced by finalize_model_grads) + lr schedule."""
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return {"grad_norm": float(grad_norm or 0.0), "lr": self.optimizer.param_groups[0]["lr"],
                "update_ok": bool(ok)}


def model_options(cfg: Config, *, routing_replay: bool = False) -> ModelOptions:
    """How the run's models are built (dtype, Transformer Engine, vocabulary padding, TP/PP/EP);
    ``routing_replay``: the routers of a mixture-of-experts model can record and replay (the policy)."""
    return ModelOptions(
        dtype=cfg.model.dtype, fp8=cfg.model.fp8, use_te=resolve_use_te(cfg.model.transformer_engine),
        vocab_pad_multiple=cfg.model.vocab_pad_multiple, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
        sequence_parallel=cfg.parallel.sequence_parallel, ep=cfg.parallel.ep,
        moe_aux_loss_coef=cfg.model.moe_aux_loss_coef, routing_replay=routing_replay,
    )


def _wrap_half(model, opts: ModelOptions):
    return Float16Module(model.config, model) if opts.dtype in ("bf16", "fp16") else model


def build_trainable(arch: HFArch, opts: ModelOptions, optim: OptimizerConfig, *, total_steps: int,
                    distributed_optimizer: bool) -> TrainableModel:
    gpt = build_gpt_model(arch, opts)
    if opts.routing_replay:
        routing_replay.install(gpt)
    return _trainable(_wrap_half(gpt, opts), gpt.config, opts, optim, total_steps, distributed_optimizer)


def _trainable(module, config, opts: ModelOptions, optim: OptimizerConfig, total_steps: int,
               distributed_optimizer: bool, adapter: str | None = None) -> TrainableModel:
    """DDP (over ``module``'s parameters that require grad), the optimizer and the lr schedule, with
    ``config`` (the model's own TransformerConfig: the schedule reads these hooks from it)."""
    config.calculate_per_token_loss = True
    model = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=distributed_optimizer,
            average_in_collective=False,  # per-token losses: finalize_model_grads divides
        ),
        module,
    )
    model.lora_adapter = adapter  # which adapter a pass over this model activates (passes.forward_backward)
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2,
            adam_eps=optim.adam_eps,
            clip_grad=optim.grad_clip,
            bf16=opts.dtype == "bf16",
            fp16=opts.dtype == "fp16",
            params_dtype=config.params_dtype,
            use_distributed_optimizer=distributed_optimizer,
        ),
        [model],
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model.no_sync
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr if optim.lr_schedule != "constant" else optim.lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(total_steps, optim.warmup_steps + 1),
        lr_decay_style=optim.lr_schedule,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    return TrainableModel(model, optimizer, scheduler, adapter)


def build_shared_base(arch: HFArch, opts: ModelOptions, settings: LoRASettings,
                      adapters: dict[str, tuple[OptimizerConfig, int]], *, distributed_optimizer: bool,
                      seed: int) -> tuple[dict[str, TrainableModel], object]:
    """Shared-base LoRA: ONE model whose base weights are frozen and shared, and one trainable per
    adapter in ``settings`` (``adapters``: name -> (optimizer config, total optimizer steps)). Each
    trainable's DDP and optimizer hold only its adapter's parameters (an idle adapter never moves:
    Adam would move parameters whose gradient is zero), and a pass over it activates its adapter.
    Returns ``(trainables, reference)``: the reference is the same module with no adapter active,
    i.e. the base itself, which nothing ever writes."""
    gpt = build_gpt_model(arch, opts, lora=settings)
    gpt.lora_settings = settings
    if opts.routing_replay:
        routing_replay.install(gpt)
    module = _wrap_half(gpt, opts)
    for p in module.parameters():
        p.requires_grad_(False)
    trainables = {}
    for name, (optim, total_steps) in adapters.items():
        init_adapter_(settings, name, seed)
        params = [p for _, pair in lora_pairs(settings, name) for p in pair.parameters()]
        for p in params:  # DDP and the optimizer take the parameters that require grad when built
            p.requires_grad_(True)
        trainables[name] = _trainable(module, dataclasses.replace(gpt.config), opts, optim, total_steps,
                                      distributed_optimizer, adapter=name)
        for p in params:
            p.requires_grad_(False)
    for name in adapters:
        for _, pair in lora_pairs(settings, name):
            pair.requires_grad_(True)
    return trainables, module


def build_frozen(arch: HFArch, opts: ModelOptions):
    """The reference model: no DDP, no optimizer, no grads."""
    model = _wrap_half(build_gpt_model(arch, opts), opts)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
