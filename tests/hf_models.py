"""Tiny random Hugging Face models written to disk with transformers (no download)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 100  # deliberately not a multiple of the 128-row padding unit

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA, and TP=2 splits the KV groups
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)

FAMILIES = {
    # Llama 3 rope scaling with a short original context so scaling changes the logits.
    "llama": lambda: transformers.LlamaConfig(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        tie_word_embeddings=False,
        **_COMMON,
    ),
    "qwen2": lambda: transformers.Qwen2Config(rope_theta=1000000.0, tie_word_embeddings=False, **_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(head_dim=24, tie_word_embeddings=True, **_COMMON),
}


def make_tiny_hf(family: str, out_dir: str, seed: int = 0, dtype=torch.float32):
    """Save a random model whose logits are O(1) (weights std 0.2, norms around 1)."""
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out_dir)
    return model
