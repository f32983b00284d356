"""A tiny trainer setup for tests: toy tokenizer, a small random Qwen2 and prompt files.

Random models almost never solve arithmetic, so the RL prompts use a test verifier that
rewards responses containing a "7": outcomes are mixed from the first step, the accuracy filter
keeps groups and the advantages are not trivially zero.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

CONTAINS7 = "test_contains7"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


# torch.compile (algorithm.compile_kernels) builds C++ kernels on CPU.
requires_cpp_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                                           reason="torch.compile on CPU needs a C++ compiler")


def contains7(response: str, ground_truth: str) -> float:
    return 1.0 if ground_truth in response else 0.0


def register_test_verifier() -> None:
    """Call in every process that loads or scores the test prompts."""
    from megatron_prime.rewards import register_data_source, register_verifier
    from megatron_prime.rewards.registry import known_verifiers

    if CONTAINS7 not in known_verifiers():
        register_verifier(CONTAINS7, contains7)
    register_data_source(CONTAINS7, CONTAINS7)


def make_trainer_fixture(root: str, seed: int = 0) -> dict:
    import torch
    import transformers

    from megatron_prime.data import build_toy_task

    task = build_toy_task(os.path.join(root, "data"), seed=seed, num_sft=64, num_rl=64, num_eval=16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(task.tokenizer))
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, **TINY)
    hf_dir = os.path.join(root, "hf")
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    # A different starting point for the implicit PRM, so q_t != 0 from the first step.
    prm_dir = os.path.join(root, "prm_hf")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(prm_dir)
    tokenizer.save_pretrained(prm_dir)
    rl = os.path.join(root, "rl_contains7.jsonl")
    with open(rl, "w") as f:
        for line in open(task.rl):
            row = json.loads(line)
            f.write(json.dumps({"prompt": row["prompt"], "answer": "7", "verifier": CONTAINS7}) + "\n")
    return {"hf": hf_dir, "prm_hf": prm_dir, "rl": rl, "sft": str(task.sft), "eval": str(task.eval)}


def overrides(fixture: dict, root: str, *extra: str) -> list[str]:
    return [
        f"model.hf_path={fixture['hf']}",
        "model.dtype=fp32",
        f"data.train_files=[{fixture['rl']}]",
        "data.max_prompt_len=16",
        "data.max_response_len=12",
        "train.prompts_per_step=8",
        "train.mini_batch_responses=16",
        "train.micro_batch_tokens=256",
        "train.max_rollout_rounds=3",
        "algorithm.filter_low=0.0",
        "algorithm.filter_high=1.0",
        f"checkpoint.dir={os.path.join(root, 'ckpt')}",
        f"checkpoint.export_dir={os.path.join(root, 'export')}",
        f"logging.dir={os.path.join(root, 'logs')}",
        "logging.progress=false",
        *extra,
    ]


# head_dim 32 (128 / 4): vLLM's CPU attention refuses head_dim 16 ("Unsupported CPU attention configuration").
VLLM_TINY = dict(TINY, hidden_size=128, intermediate_size=256)


def make_vllm_trainer_fixture(root: str, seed: int = 0, tied: bool = False) -> dict:
    """``make_trainer_fixture``'s files and prompts with a model that vLLM's CPU build runs (head_dim
    32; ``tied``: the output layer is the embedding). Weights are drawn with std 0.2 (norms around
    1), so logits are O(1): a weight sync that did not land, or a stale tensor, moves log-probs by
    far more than the 1e-4 the tests allow."""
    import torch
    import transformers

    fixture = make_trainer_fixture(root, seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(fixture["hf"])
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, **{**VLLM_TINY, "tie_word_embeddings": tied})
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config)
    for target, noise in ((fixture["hf"], 0.0), (fixture["prm_hf"], 0.02)):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if noise:
                    p.add_(noise * torch.randn_like(p))
                elif "norm" in name:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.2)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    return fixture
