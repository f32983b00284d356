"""Every engine stops at the same end tokens: the tokenizer's eos and the generation config's
``eos_token_id`` list, where chat models put their end-of-turn token (as vLLM and SGLang read it).
A model whose end-of-turn token is listed only in ``generation_config.json`` ends its responses
there on the hf engine too, not at the length limit."""

from __future__ import annotations

import json
import os

import torch
import transformers

from megatron_prime.rollout.base import SamplingParams, end_token_ids
from megatron_prime.rollout.hf_engine import HFEngine

PROMPT = [5, 9, 13]
SAMPLING = SamplingParams(temperature=1.0, seed=0, max_new_tokens=12)  # seeded: the same tokens every time


def _model_dir(root) -> tuple[str, int, int]:
    """A tiny Qwen2 with the toy tokenizer; its end-of-turn token (only in generation_config.json)
    is a token its (seeded) response would produce, the first time at 0-based index ``where`` > 0.
    Returns (directory, end-of-turn token, where)."""
    from megatron_prime.data import build_toy_task

    task = build_toy_task(os.path.join(root, "data"), seed=0, num_sft=4, num_rl=4, num_eval=4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(task.tokenizer))
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    out = os.path.join(root, "model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    free = HFEngine(out, eos_token_ids=())  # no end tokens at all: what the model says
    tokens = free.generate([PROMPT], SAMPLING)[0].token_ids
    # the first token after the first one that is new in the response
    where = next(k for k in range(1, len(tokens)) if tokens[k] not in tokens[:k] and tokens[k] != tokenizer.eos_token_id)
    end_of_turn = tokens[where]
    with open(os.path.join(out, "generation_config.json")) as f:
        generation = json.load(f)
    generation["eos_token_id"] = [tokenizer.eos_token_id, end_of_turn]
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(generation, f)
    return out, end_of_turn, where


def test_end_token_listed_only_in_the_generation_config_ends_responses(tmp_path):
    model_dir, end_of_turn, where = _model_dir(str(tmp_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert end_token_ids(model_dir, tokenizer) == tuple(sorted({tokenizer.eos_token_id, end_of_turn}))

    engine = HFEngine(model_dir)  # its own default end tokens
    response = engine.generate([PROMPT], SAMPLING)[0]
    assert response.token_ids[-1] == end_of_turn and len(response.token_ids) == where + 1
    assert response.finish_reason == "stop"

    # The trainer's fleet passes the same tokens to whichever engine it runs.
    from megatron_prime.config import Config
    from megatron_prime.models.hf_config import read_hf_config
    from megatron_prime.fleet.fleet import build_fleet

    cfg = Config()
    cfg.model.hf_path = model_dir
    fleet = build_fleet(cfg, tokenizer, None, read_hf_config(model_dir))
    assert fleet.end_tokens == end_token_ids(model_dir, tokenizer)
    fleet.shutdown()
