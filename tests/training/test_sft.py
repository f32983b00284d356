"""SFT stage: the first step's loss is transformers' NLL of the same response tokens (so the targets
are the right tokens), the loss goes down, the exported HF checkpoint reproduces the Megatron model's
logits in transformers, and a run stopped at a step boundary resumes to the same losses."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import make_trainer_fixture, overrides, run_distributed

pytestmark = [pytest.mark.multi_rank, pytest.mark.slow]

STEPS, BATCH = 30, 16


def _reference_nll(hf_dir: str, sft_file: str, picked: list[int]) -> float:
    """Token-mean NLL of the picked rows' responses (+ eos) under the HF model, computed here."""
    import transformers

    from megatron_prime.data import load_sft_dataset, render_prompt

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    rows = load_sft_dataset(sft_file)
    total, count = 0.0, 0
    for i in picked:
        prompt = tokenizer(render_prompt(tokenizer, rows[i].prompt), add_special_tokens=False)["input_ids"]
        response = tokenizer(rows[i].response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
        logp = torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(response)], dim=-1)
        total -= logp.gather(1, torch.tensor(response)[:, None]).sum().item()
        count += len(response)
    return total / count


def _sft(rank, world_size, fixture, root):
    import transformers

    from megatron_prime.bridge.convert import build_from_mcore
    from megatron_prime.config import load_config
    from megatron_prime.models.forward import full_logits
    from megatron_prime.training.sft import BatchOrder, sft

    def config(name, *extra):
        return load_config(None, overrides(fixture, os.path.join(root, name), f"sft.train_file={fixture['sft']}",
                                           f"sft.batch_size={BATCH}", "sft.optim.lr=2e-3", "sft.optim.lr_schedule=constant",
                                           "data.max_response_len=40", f"sft.output_dir={os.path.join(root, name)}",
                                           "sft.log_every=1000", *extra))

    result = sft(config("full", f"sft.steps={STEPS}"))
    first_batch = BatchOrder(64, BATCH, config("full").train.seed).next()
    hf = transformers.AutoModelForCausalLM.from_pretrained(result["hf"])
    model, arch = build_from_mcore(result["mcore"])
    ids = torch.randint(0, arch.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (full_logits(model, ids, vocab_size=arch.vocab_size) - hf(input_ids=ids).logits).abs().max().item()

    # Stopped by the wall-clock budget after its first step, then resumed by running again.
    short = ("sft.steps=6", "sft.checkpoint_interval=4")
    uninterrupted = sft(config("whole", *short))["history"]
    stopped = sft(config("parts", *short, "train.exit_after_minutes=1e-6"))
    stopped["exported"] = os.path.exists(stopped["hf"])
    resumed = sft(config("parts", *short))
    return {"losses": result["history"], "first_batch": first_batch, "export_vs_mcore": diff,
            "uninterrupted": uninterrupted, "stopped": stopped, "resumed": resumed["history"],
            "checkpoints": sorted(os.listdir(os.path.join(root, "parts", "checkpoints")))}


def test_sft_learns_exports_and_resumes(tmp_path):
    fixture = make_trainer_fixture(str(tmp_path))
    result = run_distributed(_sft, fixture, str(tmp_path), world_size=1)
    losses = result["losses"]
    assert len(losses) == STEPS
    # The first step's loss is computed before any update: the same tokens scored by transformers.
    assert abs(losses[0] - _reference_nll(fixture["hf"], fixture["sft"], result["first_batch"])) < 1e-4
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    assert result["export_vs_mcore"] <= 1e-4

    stopped = result["stopped"]
    assert stopped["stopped"].startswith("train.exit_after_minutes") and len(stopped["history"]) == 1
    assert not stopped["exported"]  # a stopped run only checkpoints
    assert len(result["resumed"]) == 5  # steps 1..5 after resuming from step 0
    assert result["resumed"] == pytest.approx(result["uninterrupted"][1:], rel=1e-6, abs=1e-7)
    # the stop's checkpoint, then every sft.checkpoint_interval=4 steps and the last step
    assert result["checkpoints"] == ["step_00000000", "step_00000003", "step_00000005"]
