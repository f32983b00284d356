"""Checkpoint conversion and verification (the bodies of ``megatron-prime convert``).

Each function runs on every rank of an initialised TP/PP layout (one process is fine) and prints
progress on rank 0.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_prime.bridge.atomic_dir import DistributedAtomicDir
from megatron_prime.bridge.hf_io import (
    CheckpointError,
    SafetensorsSource,
    ShardedSafetensorsWriter,
    copy_hf_metadata,
)
from megatron_prime.bridge.mcore_io import load_model, read_arch, read_meta, save_model
from megatron_prime.bridge.transfer import export_hf_weights, load_hf_weights
from megatron_prime.models.gpt import DTYPES, ModelOptions, build_gpt_model
from megatron_prime.models.hf_config import HFArch, read_hf_config
from megatron_prime.platform.distributed import is_rank0


def log(msg: str) -> None:
    if is_rank0():
        print(msg, flush=True)


def model_options(dtype: str, vocab_pad_multiple: int = 128, use_te: bool = False) -> ModelOptions:
    return ModelOptions(
        dtype=dtype,
        use_te=use_te,
        vocab_pad_multiple=vocab_pad_multiple,
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        ep=parallel_state.get_expert_model_parallel_world_size(),
    )


def weights_dtype(source: SafetensorsSource, arch: HFArch) -> str:
    """The dtype name of the checkpoint's weights, so conversion never changes a bit."""
    dtype = source.read("model.norm.weight").dtype
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise CheckpointError(f"{source.hf_dir}: unsupported weight dtype {dtype}")


def build_from_hf(hf_dir: str, dtype: str = "auto", vocab_pad_multiple: int = 128):
    """Read config + weights of an HF checkpoint into a Megatron model for this rank."""
    arch = read_hf_config(hf_dir)
    source = SafetensorsSource(hf_dir, arch)
    source.check_shapes()  # fail before building anything
    dtype = weights_dtype(source, arch) if dtype == "auto" else dtype
    model = build_gpt_model(arch, model_options(dtype, vocab_pad_multiple))
    log(f"loading {hf_dir} ({arch.architecture}, {arch.num_layers} layers) into Megatron ({dtype})")
    load_hf_weights(model, arch, source, vocab_pad_multiple)
    return model, arch


def build_from_mcore(mcore_dir: str, dtype: str = "auto", vocab_pad_multiple: int = 128):
    arch = read_arch(mcore_dir)
    if dtype == "auto":
        dtype = read_meta(mcore_dir).get("dtype", "fp32")
    model = build_gpt_model(arch, model_options(dtype, vocab_pad_multiple))
    log(f"loading Megatron checkpoint {mcore_dir}")
    load_model(model, mcore_dir)
    return model, arch


def hf_to_mcore(hf_dir: str, out_dir: str, dtype: str = "auto") -> None:
    model, arch = build_from_hf(hf_dir, dtype)
    log(f"writing Megatron checkpoint to {out_dir}")
    dtype_name = next(k for k, v in DTYPES.items() if v == model.config.params_dtype)
    save_model(model, out_dir, hf_meta_dir=hf_dir, extra_meta={"dtype": dtype_name})
    log("done")


def write_hf(model, arch: HFArch, out_dir: str, hf_meta_dir: str, max_shard_bytes: int = 5 * 2**30,
             adapter: str | None = None) -> None:
    """Stream ``model``'s weights into an HF checkpoint dir (atomic); all ranks must call this.
    With ``adapter`` (a LoRA model), the weights merged with that adapter."""
    with DistributedAtomicDir(out_dir) as tmp:
        if not is_rank0():
            for _ in export_hf_weights(model, arch, adapter=adapter):  # take part in the gathers
                pass
            return
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        count = 0
        for bucket in export_hf_weights(model, arch, adapter=adapter):
            for name, tensor in bucket:
                writer.add(name, tensor)
                count += 1
            log(f"  exported {count} tensors")
        writer.finish()
        copy_hf_metadata(hf_meta_dir, tmp)


def mcore_to_hf(mcore_dir: str, out_dir: str, dtype: str = "auto") -> None:
    model, arch = build_from_mcore(mcore_dir, dtype)
    log(f"writing Hugging Face checkpoint to {out_dir}")
    write_hf(model, arch, out_dir, hf_meta_dir=os.path.join(mcore_dir, "hf"))
    log("done")


def verify(hf_dir: str, mcore_dir: str, num_prompts: int = 4, seq_len: int = 64, seed: int = 0,
           device: str = "cpu") -> dict:
    """Run the HF model (transformers) and the Megatron model on the same token ids.

    Returns ``{"max_abs_diff", "top1_agreement", "mean_abs_logit"}`` (on every rank).
    """
    import transformers

    model, arch = build_from_mcore(mcore_dir)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, arch.vocab_size, (num_prompts, seq_len), generator=gen)
    from megatron_prime.models.forward import full_logits

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    logits = full_logits(model, ids.to(dev), vocab_size=arch.vocab_size).float()
    stats = torch.zeros(3, dtype=torch.float64, device=dev)
    if is_rank0():
        log(f"running transformers reference from {hf_dir}")
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=model.config.params_dtype
        ).to(dev)
        with torch.no_grad():
            ref = ref_model(input_ids=ids.to(dev)).logits.float()
        stats[0] = (logits - ref).abs().max()
        stats[1] = (logits.argmax(-1) == ref.argmax(-1)).double().mean()
        stats[2] = ref.abs().mean()
    if dist.is_initialized():
        dist.broadcast(stats, src=0)
    return {"max_abs_diff": stats[0].item(), "top1_agreement": stats[1].item(),
            "mean_abs_logit": stats[2].item()}
