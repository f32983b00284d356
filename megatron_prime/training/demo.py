"""The tiny CPU demo: toy task -> tiny Qwen2 (HF) -> SFT in Megatron -> HF checkpoint -> PRIME ->
greedy accuracy on the held-out split before and after, with a summary table."""

from __future__ import annotations

import contextlib
import json
import os
import time

from megatron_prime.config import SHIPPED_EXAMPLES, Config, load_config

DEFAULT_CONFIG = os.path.join(SHIPPED_EXAMPLES, "configs", "tiny_cpu.yaml")

# ~0.8M parameters: the toy task is learnable with it in demo time on 2 CPU cores
TINY_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
# the mixture-of-experts variant (demo --moe): a Qwen3-MoE of 4 experts, 2 per token, routed as
# Qwen3-30B-A3B; its experts are half as wide as the dense MLP, so a token's compute stays the same
TINY_MOE = dict(TINY_MODEL, intermediate_size=384, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=192,
                norm_topk_prob=True, head_dim=32)


def make_tiny_model(tokenizer_dir: str, out_dir: str, seed: int, max_positions: int = 64, moe: bool = False) -> str:
    """A randomly initialised Qwen2 (``moe``: Qwen3-MoE) with the toy tokenizer, saved as a Hugging
    Face checkpoint."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = (transformers.Qwen3MoeConfig if moe else transformers.Qwen2Config)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **{**(TINY_MOE if moe else TINY_MODEL), "max_position_embeddings": max_positions},
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def demo_configs(out: str, seed: int, config_path: str | None, overrides: list[str],
                 task_preset: str = "default", moe: bool = False) -> tuple[Config, str]:
    """The demo's config (the tiny CPU config, its paths filled in) and the tiny model's initial HF
    checkpoint, for the toy task ``task_preset`` (``data.toy.PRESETS``). A preset other than the
    default sizes the prompt and response limits (and the model's positions) to its problems."""
    from megatron_prime.data import build_toy_task

    task = build_toy_task(os.path.join(out, "data"), seed=seed, difficulty=task_preset)
    lengths, positions = [], 64
    if task_preset != "default":
        meta = json.loads(task.meta.read_text())
        # room for a wrong answer a little longer than the longest right one, and for eos
        prompt_len, response_len = meta["max_prompt_chars"], meta["max_response_chars"] + 8
        lengths = [f"data.max_prompt_len={prompt_len}", f"data.max_response_len={response_len}"]
        positions = 64 * -(-(prompt_len + response_len) // 64)
    init_hf = make_tiny_model(str(task.tokenizer), os.path.join(out, "init_hf"), seed, positions, moe=moe)
    paths = [*lengths,
        f"model.hf_path={init_hf}",
        f"sft.train_file={task.sft}",
        f"sft.output_dir={os.path.join(out, 'sft')}",
        f"data.train_files=[{task.rl}]",
        f"data.eval_files=[{task.eval}]",
        f"checkpoint.dir={os.path.join(out, 'checkpoints')}",
        f"checkpoint.export_dir={os.path.join(out, 'hf')}",
        f"logging.dir={os.path.join(out, 'logs')}",
        f"train.seed={seed}",
        f"data.seed={seed}",
    ]
    cfg = load_config(config_path or DEFAULT_CONFIG, paths + list(overrides))
    return cfg, init_hf


@contextlib.contextmanager
def local_rollout_server(cfg: Config):
    """One-step-off rollouts (``rollout.max_staleness=1``) need engines that do not share the
    trainer's devices: on a laptop, an hf engine in a server process of its own on loopback
    (``rollout.protocol_server``), which ``cfg`` is switched to for the block (remote mode). Any other
    config is left as it is."""
    r = cfg.rollout
    if r.max_staleness == 0 or r.mode == "remote":
        yield cfg
        return
    from megatron_prime.platform.distributed import free_port
    from megatron_prime.rollout.protocol_server import local_server

    with local_server(cfg.model.hf_path) as url:
        print(f"[demo] rollout.max_staleness={r.max_staleness}: generation runs in a server process of its own "
              f"({url}) while the trainer trains", flush=True)
        r.mode, r.engine, r.remote_urls = "remote", "sglang", [url]
        r.weight_sync_address, r.weight_sync_port = "127.0.0.1", free_port()
        yield cfg


def run_demo(out: str = "outputs/demo", seed: int = 1, config_path: str | None = None,
             overrides: list[str] = (), task_preset: str = "default", moe: bool = False) -> dict:
    from megatron_prime.training.sft import sft
    from megatron_prime.training.trainer import train

    t0 = time.time()
    print(f"[demo] building the toy task and a tiny {'mixture-of-experts ' if moe else ''}model under {out}", flush=True)
    cfg, _ = demo_configs(out, seed, config_path, overrides, task_preset, moe)
    print(f"[demo] SFT: {cfg.sft.steps} steps, batch {cfg.sft.batch_size}", flush=True)
    sft_result = sft(cfg)
    t_sft = time.time() - t0
    cfg.model.hf_path = sft_result["hf"]  # PRIME starts from the SFT model's HF checkpoint
    cfg.checkpoint.resume = "none"
    print(f"[demo] PRIME: {cfg.train.steps} steps of {cfg.train.prompts_per_step} prompts x K={cfg.rollout.n}",
          flush=True)
    with local_rollout_server(cfg):
        result = train(cfg)
    total = time.time() - t0
    rows = [
        ("held-out greedy accuracy after SFT", f"{result.get('eval_before', float('nan')):.3f}"),
        ("held-out greedy accuracy after PRIME", f"{result.get('eval_after', float('nan')):.3f}"),
        ("SFT time", f"{t_sft:.0f} s"),
        ("PRIME time", f"{total - t_sft:.0f} s"),
        ("TensorBoard logs", f"tensorboard --logdir {cfg.logging.dir}"),
        ("rollout samples", os.path.join(cfg.logging.dir, "samples.jsonl")),
        ("process rewards, token by token", f"megatron-prime inspect {cfg.logging.dir} --open"),
        ("final policy (HF)", result.get("export_policy", "-")),
        ("final implicit PRM (HF)", result.get("export_prm", "-")),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "=" * (width + 40))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("=" * (width + 40), flush=True)
    return {**result, "sft_time": t_sft, "total_time": total}
