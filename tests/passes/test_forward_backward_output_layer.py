"""``run_pass`` through the chunked output layer against the computation it replaced: the model's
own full-sequence logits, gathered over TP, picked at the response positions, divided by the
temperature, cut to the real vocabulary, then log_softmax. Log-probs, entropies and the gradient
of every parameter agree within 1e-6 (fp32) at TP=1 and TP=2 on two gloo ranks (also with
sequence parallelism), for separate and tied output layers, over several micro-batches and a
vocabulary that is not a multiple of the padding (so the last shard holds padding rows)."""

import pytest
import torch

from tests.helpers import run_distributed

pytestmark = pytest.mark.multi_rank

VOCAB = 300  # padded to 384 at TP=1, 512 at TP=2 (rank 1: 44 real rows of 256)
TEMPERATURE = 0.7


def _batch(seed=0):
    from megatron_prime.passes.batch import build_rollout_batch

    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for _ in range(6):
        prompts.append(torch.randint(0, VOCAB, (int(torch.randint(2, 9, (), generator=g)),), generator=g).tolist())
        responses.append(torch.randint(0, VOCAB, (int(torch.randint(3, 12, (), generator=g)),), generator=g).tolist())
    batch = build_rollout_batch(prompts, responses, outcomes=[1.0] * 6, rollout_logprobs=None,
                                truncated=[False] * 6, group_size=1)
    batch.extras["w"] = torch.randn(2, *batch.response_mask.shape, generator=g).transpose(0, 1)  # [N, 2, R]
    return batch


def _init_weights(inner, seed=0):
    """Random weights, the same on every rank (models are built to be loaded, not initialised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in inner.named_parameters():
            values = 0.2 * torch.randn(p.shape, generator=g)
            p.copy_(values + 1.0 if "norm" in name else values)


def _old_logprobs(model, batch, true_vocab):
    """The previous computation: full logits of every position, then the response positions."""
    from megatron.core import tensor_parallel

    from megatron_prime.models.forward import attention_mask_4d, position_ids_for

    logits = model(batch.input_ids, position_ids_for(batch.input_ids), attention_mask_4d(batch.attention_mask))
    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)[..., :true_vocab]
    index = batch.response_index[..., None].expand(*batch.response_index.shape, true_vocab)
    log_probs = torch.log_softmax(full.gather(1, index) / TEMPERATURE, dim=-1)
    targets = batch.input_ids.gather(1, batch.response_index + 1)
    logprobs = log_probs.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logprobs, entropy


def _compare(rank, world_size, layouts):
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel.schedules import custom_backward

    from megatron_prime.config import OptimizerConfig
    from megatron_prime.models.gpt import ModelOptions
    from megatron_prime.models.hf_config import HFArch
    from megatron_prime.platform import distributed
    from megatron_prime.platform.distributed import all_gather_object
    from megatron_prime.passes.trainable import build_trainable
    from megatron_prime.passes.forward_backward import run_pass

    results = {}
    for tp, sequence_parallel, tied in layouts:
        distributed.init_model_parallel(tp=tp)
        arch = HFArch(architecture="Qwen2ForCausalLM", family="qwen2", num_layers=2, hidden_size=32, num_heads=4,
                      num_kv_heads=2, head_dim=8, ffn_hidden_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                      rms_norm_eps=1e-6, rope_theta=10000.0, tie_embeddings=tied, qkv_bias=True)
        torch.manual_seed(0)
        trainable = build_trainable(arch, ModelOptions(tp=tp, sequence_parallel=sequence_parallel),
                                    OptimizerConfig(), total_steps=1, distributed_optimizer=False)
        model, inner = trainable.model, trainable.model.module
        _init_weights(inner)
        batch = _batch()
        mask = batch.response_mask
        num_tokens = int(mask.sum())

        def loss_fn(mb, logprobs, entropy):
            w = mb.extras["w"]
            loss = (w[:, 0] * logprobs * mb.response_mask).sum() + (w[:, 1] * entropy * mb.response_mask).sum()
            return loss, int(mb.response_mask.sum()), {}

        def grads():
            return {name: p.main_grad.clone() for name, p in inner.named_parameters()}

        args = dict(temperature=TEMPERATURE, token_budget=40, with_entropy=True)  # several micro-batches
        forward = run_pass(model, batch, **args)
        trainable.zero_grad()
        new = run_pass(model, batch, loss_fn=loss_fn, entropy_grad=True, **args)
        new_grads = grads()

        trainable.zero_grad()
        old_lp, old_ent = _old_logprobs(model, batch, VOCAB)
        w = batch.extras["w"]
        # Straight into the autograd engine, as megatron's schedules: torch.autograd.backward would
        # run the backward outside the CPU backend's torch-function mode (which intercepts it).
        loss = (w[:, 0] * old_lp * mask).sum() + (w[:, 1] * old_ent * mask).sum()
        custom_backward(loss, torch.ones_like(loss))
        finalize_model_grads([model], num_tokens=torch.tensor(num_tokens))  # as the schedule does
        old_grads = grads()

        valid = mask.bool()

        def error(new, old):  # |new - old| / (1 + |old|): absolute near 0, relative beyond 1
            return ((new - old.detach()).abs() / (1 + old.detach().abs()))[valid].max().item()

        grad_scale = max(g.abs().max().item() for g in old_grads.values())
        results[(tp, sequence_parallel, tied)] = {
            "logprobs": error(new.logprobs, old_lp),
            "forward_logprobs": error(forward.logprobs, old_lp),
            "entropy": error(new.entropy, old_ent),
            "padding_zero": bool((new.logprobs[~valid] == 0).all() and (new.entropy[~valid] == 0).all()),
            # relative to the largest gradient of any parameter
            "grads": {n: (new_grads[n] - old_grads[n]).abs().max().item() / grad_scale for n in new_grads},
            "grad_scale": grad_scale,
        }
    return all_gather_object(results)  # every rank's: only the last TP rank holds padded vocabulary rows


def _check(per_rank):
    for rank, results in enumerate(per_rank):
        _check_rank(rank, results)


def _check_rank(rank, results):
    for layout, r in results.items():
        layout = (f"rank {rank}", *layout)
        assert r["logprobs"] < 1e-6 and r["forward_logprobs"] < 1e-6, (layout, r["logprobs"], r["forward_logprobs"])
        assert r["entropy"] < 1e-6, (layout, r["entropy"])
        assert r["padding_zero"], layout
        assert r["grad_scale"] > 1e-3, layout  # the loss reaches the parameters
        worst = max(r["grads"], key=r["grads"].get)
        assert r["grads"][worst] < 1e-6, (layout, worst, r["grads"][worst])


def test_tp1_matches_full_logits():
    _check(run_distributed(_compare, [(1, False, False), (1, False, True)], world_size=1))


def test_tp2_matches_full_logits():
    _check(run_distributed(_compare, [(2, False, False), (2, False, True), (2, True, False)], world_size=2))
