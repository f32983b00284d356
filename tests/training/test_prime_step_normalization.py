"""The absolute scale of both losses, through the trainer's own update functions (megatron-core's
schedule and ``finalize_model_grads``, several micro-batches, 2 data-parallel gloo ranks), against
gradients worked by hand with transformers on the whole global mini-batch:

* policy: PPO-clip as a token mean over the global mini-batch,
      L = -1/|T| sum_{i,t} min(rho A, clip(rho, 1-eps, 1+eps) A),  |T| = valid tokens of all ranks;
* implicit PRM: the cross-entropy as a mean over the responses of the global PRM mini-batch,
      L = -1/N sum_i [ r_o log sigmoid(s_i) + (1 - r_o) log sigmoid(-s_i) ],  s_i = beta sum_t q_t.

Adam divides any constant factor out of its first steps, so only a gradient comparison pins
these means (a PRM loss divided by tokens instead of responses passes every end-to-end test).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_tiny_hf, run_distributed, VOCAB

pytestmark = pytest.mark.multi_rank

N = 8  # responses in the global mini-batch, 4 per data-parallel rank
BETA = 0.5
CLIP = 0.2


def _data():
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (int(torch.randint(2, 6, (), generator=g)),), generator=g).tolist()
               for _ in range(N)]
    responses = [torch.randint(0, VOCAB, (int(torch.randint(2, 11, (), generator=g)),), generator=g).tolist()
                 for _ in range(N)]
    width = max(len(r) for r in responses)
    return {
        "prompts": prompts, "responses": responses,
        "outcome": torch.tensor([1.0, 0.0, 1.0, 0.25, 0.0, 1.0, 0.0, 0.75]),
        "advantages": torch.randn(N, width, generator=g),
        # old and reference log-probs away from the current ones: ratios inside and outside the clip
        "old_shift": 0.3 * torch.randn(N, width, generator=g),
        "ref_shift": 0.5 * torch.randn(N, width, generator=g),
    }


def _hf_logprobs(model, data):
    """Per response token log-probs from transformers, [N, R] (0 on padding), with autograd."""
    width = data["advantages"].shape[1]
    rows = []
    for p, r in zip(data["prompts"], data["responses"]):
        logits = model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1: len(p) - 1 + len(r)]
        lp = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(r)[:, None])[:, 0]
        rows.append(torch.nn.functional.pad(lp, (0, width - len(r))))
    return torch.stack(rows)


def _mask(data):
    width = data["advantages"].shape[1]
    return torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in data["responses"]])


def _reference_grads(hf_dir, data):
    """Hand-worked gradients of both losses, HF names, on one process."""
    import transformers

    out = {}
    for which in ("policy", "prm"):
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        mask = _mask(data)
        lp = _hf_logprobs(model, data)
        current = lp.detach()
        if which == "policy":
            ratio = torch.exp(lp - (current + data["old_shift"]))
            a = data["advantages"]
            per_token = -torch.minimum(ratio * a, ratio.clamp(1 - CLIP, 1 + CLIP) * a)
            loss = (per_token * mask).sum() / mask.sum()  # token mean over the global mini-batch
        else:
            s = BETA * ((lp - (current + data["ref_shift"])) * mask).sum(dim=1)
            r = data["outcome"]
            ce = -(r * torch.nn.functional.logsigmoid(s) + (1 - r) * torch.nn.functional.logsigmoid(-s))
            loss = ce.mean()  # mean over the responses of the global mini-batch
        loss.backward()
        out[which] = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out


def _trainer_grads(rank, world_size, hf_dir, data):
    from megatron_prime.bridge.hf_io import SafetensorsSource
    from megatron_prime.bridge.transfer import load_hf_weights, local_to_global_names
    from megatron_prime.config import load_config
    from megatron_prime.models.gpt import ModelOptions
    from megatron_prime.models.hf_config import read_hf_config
    from megatron_prime.platform import distributed
    from megatron_prime.passes.batch import build_rollout_batch
    from megatron_prime.passes.data_parallel import dp_rows
    from megatron_prime.passes.trainable import build_trainable
    from megatron_prime.passes.forward_backward import run_pass
    from megatron_prime.training.prime_step import PrimeContext, update_policy, update_prm

    distributed.init_model_parallel()  # tp = pp = 1: two data-parallel ranks
    cfg = load_config(None, [f"model.hf_path={hf_dir}", "model.dtype=fp32", f"algorithm.beta={BETA}",
                             f"algorithm.clip_low={CLIP}", f"algorithm.clip_high={CLIP}",
                             "train.prompts_per_step=2", "rollout.n=4", f"train.mini_batch_responses={N}",
                             f"train.prm_mini_batch_responses={N}", "data.max_prompt_len=8",
                             "data.max_response_len=12", "train.micro_batch_tokens=20"])
    arch = read_hf_config(hf_dir)
    batch = build_rollout_batch(data["prompts"], data["responses"], data["outcome"].tolist(), None,
                                [False] * N, group_size=4)
    local = batch.rows(dp_rows(N))
    grads = {}
    for which in ("policy", "prm"):
        optim = cfg.optim.policy if which == "policy" else cfg.optim.prm
        trainable = build_trainable(arch, ModelOptions(dtype="fp32"), optim, total_steps=1,
                                    distributed_optimizer=False)
        load_hf_weights(trainable.model, arch, SafetensorsSource(hf_dir, arch))
        trainable.optimizer.reload_model_params()
        args = dict(temperature=1.0, token_budget=cfg.train.micro_batch_tokens)
        current = run_pass(trainable.model, local, **args).logprobs
        rows = dp_rows(N)
        local.extras = {"old_logprobs": current + data["old_shift"][rows], "advantages": data["advantages"][rows],
                        "ref_logprobs": current + data["ref_shift"][rows]}
        captured = {}
        inner = trainable.model.module
        original_step = trainable.step

        def step_capturing_grads():
            captured.update({local_to_global_names(inner)[n]: p.main_grad.clone() for n, p in inner.named_parameters()})
            return original_step()

        trainable.step = step_capturing_grads
        ctx = PrimeContext(cfg=cfg, arch=arch, policy=trainable, prm=trainable, reference=None, fleet=None,
                           sampler=None, buffer=None, tokenizer=None, render=None)
        if which == "policy":
            update_policy(ctx, local, 0, args)
        else:
            update_prm(ctx, local, args)
        grads[which] = captured
    return grads


class _DictSource:
    def __init__(self, tensors):
        self.tensors = tensors

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def read(self, name, dim=None, start=0, stop=None):
        t = self.tensors[name]
        return t if dim is None else t.narrow(dim, start, (stop if stop is not None else t.shape[dim]) - start)


def test_gradients_are_the_documented_global_means(tmp_path):
    from megatron_prime.bridge.mapping import load_shard, param_spec
    from megatron_prime.models.gpt import padded_vocab_size
    from megatron_prime.models.hf_config import read_hf_config

    hf_dir = str(tmp_path / "qwen2")
    make_tiny_hf("qwen2", hf_dir)
    arch = read_hf_config(hf_dir)
    data = _data()
    reference = _reference_grads(hf_dir, data)
    trained = run_distributed(_trainer_grads, hf_dir, data)
    for which in ("policy", "prm"):
        source = _DictSource(reference[which])
        scale = max(g.abs().max().item() for g in reference[which].values())
        assert scale > 1e-3, which
        for name, grad in trained[which].items():
            expected = torch.empty_like(grad)
            load_shard(arch, param_spec(arch, name), source, 0, 1, padded_vocab_size(arch.vocab_size, 1), expected)
            error = (grad - expected).abs().max().item() / scale
            assert error < 1e-5, (which, name, error)
