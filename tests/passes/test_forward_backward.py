"""The trainer's log-prob passes against an independent model: ``run_pass`` on a ragged, right-padded
rollout batch gives transformers' ``log_softmax(logits / T)`` of every response token, and the
entropy of the same distribution, at TP=2 and PP=2 on two real gloo ranks, with a vocabulary that
is not a multiple of the 128-row padding (so the padded columns must be masked out).

Every other trainer test compares Megatron with Megatron; an off-by-one in the response positions,
a wrong temperature or unmasked vocabulary padding would pass them and fail here.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_tiny_hf, run_distributed, VOCAB

pytestmark = pytest.mark.multi_rank

PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 8, 60, 11], [70, 3, 3, 19, 2]]
RESPONSES = [[12, 99, 4, 4, 31, 0], [50, 7], [1, 2, 3, 98, 5, 6, 7, 8, 9]]
TEMPERATURES = (1.0, 0.7)


def _reference(hf_dir: str) -> dict:
    """Per response token: log_softmax(logits / T)[token] and the entropy, from transformers, one
    unpadded sequence at a time."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    out = {}
    for t in TEMPERATURES:
        logprobs, entropies = [], []
        for p, r in zip(PROMPTS, RESPONSES):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + r])).logits[0] / t
            logp = torch.log_softmax(logits[len(p) - 1: len(p) - 1 + len(r)], dim=-1)
            logprobs.append(logp.gather(1, torch.tensor(r)[:, None])[:, 0])
            entropies.append(-(logp.exp() * logp).sum(dim=-1))
        out[t] = (logprobs, entropies)
    return out


def _passes(rank, world_size, hf_dir):
    from megatron_prime.bridge.hf_io import SafetensorsSource
    from megatron_prime.bridge.transfer import load_hf_weights
    from megatron_prime.config import OptimizerConfig
    from megatron_prime.models.gpt import ModelOptions
    from megatron_prime.models.hf_config import read_hf_config
    from megatron_prime.platform import distributed
    from megatron_prime.passes.batch import build_rollout_batch
    from megatron_prime.passes.trainable import build_frozen, build_trainable
    from megatron_prime.passes.forward_backward import run_pass

    arch = read_hf_config(hf_dir)
    batch = build_rollout_batch(PROMPTS, RESPONSES, [1.0, 0.0, 1.0], None, [False] * 3, group_size=3, pad_id=VOCAB - 1)
    results = {}
    for tp, pp in ((2, 1), (1, 2)):
        distributed.init_model_parallel(tp=tp, pp=pp)
        opts = ModelOptions(dtype="fp32", tp=tp, pp=pp)
        frozen = build_frozen(arch, opts)
        trainable = build_trainable(arch, opts, OptimizerConfig(lr=1e-3), total_steps=1, distributed_optimizer=False)
        for model in (frozen, trainable.model):
            load_hf_weights(model, arch, SafetensorsSource(hf_dir, arch))
        def loss_fn(mb, logprobs, entropy):  # the training path's log-probs, inside the loss
            return -(logprobs * mb.response_mask).sum(), int(mb.response_mask.sum()), {}

        for t in TEMPERATURES:
            # budget 16 tokens: the three rows go through separate micro-batches
            forward = run_pass(frozen, batch, temperature=t, token_budget=16, with_entropy=True)
            trainable.zero_grad()
            train = run_pass(trainable.model, batch, temperature=t, token_budget=16, loss_fn=loss_fn,
                             with_entropy=True)
            results[(tp, pp, t)] = {"forward": (forward.logprobs, forward.entropy),
                                    "train": (train.logprobs, train.entropy)}
    return results


def test_run_pass_matches_transformers_log_softmax(tmp_path):
    hf_dir = str(tmp_path / "qwen2")
    make_tiny_hf("qwen2", hf_dir)
    reference = _reference(hf_dir)
    results = run_distributed(_passes, hf_dir)
    for (tp, pp, t), passes in results.items():
        ref_logprobs, ref_entropy = reference[t]
        for kind, (logprobs, entropy) in passes.items():
            for i, r in enumerate(RESPONSES):
                n = len(r)
                where = f"tp={tp} pp={pp} T={t} {kind} row {i}"
                assert torch.allclose(logprobs[i, :n], ref_logprobs[i], atol=1e-4), where
                assert torch.allclose(entropy[i, :n], ref_entropy[i], atol=1e-4), where
