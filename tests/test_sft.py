"""SFT stage: the response-masked loss goes down, and the exported HF checkpoint reproduces the
Megatron model's logits in transformers."""

from __future__ import annotations

import os

from tests.dist_utils import run_distributed
from tests.trainer_fixtures import make_trainer_fixture, overrides


def _sft(rank, world_size, fixture, root, steps):
    import torch
    import transformers

    from megatron_prime.config import load_config
    from megatron_prime.training import sft as sft_module

    losses = []
    original = sft_module.metric_means

    def record(pairs):  # the per-step NLL the loop prints
        means = original(pairs)
        losses.append(means.get("sft/nll"))
        return means

    sft_module.metric_means = record
    cfg = load_config(None, overrides(fixture, root, f"sft.train_file={fixture['sft']}", f"sft.steps={steps}",
                                      "sft.batch_size=16", "sft.lr=2e-3", "sft.min_lr=2e-3", "data.max_response_len=40",
                                      f"sft.output_dir={os.path.join(root, 'sft')}", "sft.log_every=1000"))
    result = sft_module.sft(cfg)
    hf = transformers.AutoModelForCausalLM.from_pretrained(result["hf"])
    from megatron_prime.bridge.convert import build_from_mcore
    from megatron_prime.models.forward import full_logits

    model, arch = build_from_mcore(result["mcore"])
    ids = torch.randint(0, arch.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (full_logits(model, ids, vocab_size=arch.vocab_size) - hf(input_ids=ids).logits).abs().max().item()
    return {"losses": losses, "export_vs_mcore": diff}


def test_sft_learns_and_exports(tmp_path):
    fixture = make_trainer_fixture(str(tmp_path))
    result = run_distributed(_sft, fixture, str(tmp_path), 30, world_size=1)
    losses = result["losses"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    assert result["export_vs_mcore"] <= 1e-4
