"""The implicit PRM as a reward model of its own (paper Eq. 3): per-token rewards
r_t = beta * (log pi_phi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)) and the response's reward
beta * sum_t (log pi_phi - log pi_ref), from the PRM and reference Hugging Face checkpoints (the PRM
may be a PEFT adapter of the reference: shared-base LoRA PRIME).

Log-probs are the models' own distributions (temperature 1), computed with transformers: the
command reads HF checkpoints on one process, and transformers is the reference our Megatron
log-prob passes are tested against, so no process groups or parallel layout are needed (a model
too large for one device is not supported here).
"""

from __future__ import annotations

import os

import torch

from megatron_prime.algorithm import implicit_process_rewards


def is_adapter(path: str) -> bool:
    """A PEFT adapter directory (a LoRA run's export_dir/prm_adapter), not a whole model."""
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def load_model(path: str, device: torch.device, base: str | None = None):
    """The HF model at ``path``; a PEFT adapter directory is applied to ``base`` (the model it was
    trained on: for shared-base LoRA PRIME, the reference) and merged."""
    from transformers import AutoModelForCausalLM

    if is_adapter(path):
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


@torch.inference_mode()
def response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], *,
                      token_budget: int = 16384) -> list[torch.Tensor]:
    """log p(y_t | x, y_<t) of every response token (fp32, on CPU), in input order. Sequences
    are batched by length under ``token_budget`` tokens (padded) per forward, right-padded."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    out: list[torch.Tensor | None] = [None] * len(prompts)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * (len(prompts[order[end]]) + len(responses[order[end]])) <= token_budget:
            end += 1
        batch = order[start:end]
        width = max(len(prompts[i]) + len(responses[i]) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            seq = prompts[i] + responses[i]
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, i in enumerate(batch):
            p, r = len(prompts[i]), len(responses[i])
            # logits at position t predict token t + 1: the response's tokens are p .. p + r - 1.
            step = logits[row, p - 1:p + r - 1].float().log_softmax(dim=-1)
            out[i] = step.gather(-1, ids[row, p:p + r, None].to(device)).squeeze(-1).cpu()
        start = end
    return out  # type: ignore[return-value]


def token_rewards(prm_logprobs: list[torch.Tensor], ref_logprobs: list[torch.Tensor],
                  beta: float) -> list[list[float]]:
    """Per-token implicit rewards of each response (paper Eq. 3), via the trainer's own function."""
    width = max((len(lp) for lp in prm_logprobs), default=0)
    if width == 0:
        return [[] for _ in prm_logprobs]
    prm = torch.zeros(len(prm_logprobs), width)
    ref = torch.zeros_like(prm)
    mask = torch.zeros_like(prm)
    for i, (a, b) in enumerate(zip(prm_logprobs, ref_logprobs)):
        prm[i, :len(a)], ref[i, :len(b)], mask[i, :len(a)] = a, b, 1.0
    rewards = implicit_process_rewards(prm, ref, mask, beta)
    return [rewards[i, :len(a)].tolist() for i, a in enumerate(prm_logprobs)]
