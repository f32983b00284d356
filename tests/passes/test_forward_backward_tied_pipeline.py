"""Training a tied-embedding model (Qwen2.5 up to 3B, Llama 3.2, small Qwen3) at PP=2, the way it
once deadlocked: the last stage's copy of the embedding (its output layer) and the first stage's
embedding are one parameter, whose gradient megatron-core's ``finalize_model_grads`` sums over the
two stages. The gradients equal PP=1's (where they are one tensor) and both copies stay equal after
optimizer steps."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_tiny_hf, run_distributed

pytestmark = pytest.mark.multi_rank

PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 8, 60, 11], [70, 3, 3, 19, 2]]
RESPONSES = [[12, 99, 4, 4, 31, 0], [50, 7], [1, 2, 3, 98, 5, 6, 7, 8, 9]]
STEPS = 3
TIED = ("embedding.word_embeddings.weight", "output_layer.weight")


def _train(rank, world_size, hf_dir):
    from megatron.core import parallel_state

    from megatron_prime.bridge.hf_io import SafetensorsSource
    from megatron_prime.bridge.transfer import load_hf_weights
    from megatron_prime.config import OptimizerConfig
    from megatron_prime.models.gpt import ModelOptions
    from megatron_prime.models.hf_config import read_hf_config
    from megatron_prime.platform import distributed
    from megatron_prime.platform.distributed import all_gather_object
    from megatron_prime.passes.batch import build_rollout_batch
    from megatron_prime.passes.trainable import build_trainable
    from megatron_prime.passes.forward_backward import run_pass

    arch = read_hf_config(hf_dir)
    assert arch.tie_embeddings
    batch = build_rollout_batch(PROMPTS, RESPONSES, [1.0, 0.0, 1.0], None, [False] * 3, group_size=3)

    def loss_fn(mb, logprobs, _entropy):
        return -(logprobs * mb.response_mask).sum(), int(mb.response_mask.sum()), {}

    results = {}
    for pp in (1, 2):  # PP=1: two data-parallel ranks on the same batch (the same mean gradient)
        distributed.init_model_parallel(pp=pp)
        trainable = build_trainable(arch, ModelOptions(dtype="fp32", pp=pp), OptimizerConfig(lr=1e-2),
                                    total_steps=STEPS, distributed_optimizer=False)
        inner = trainable.model.module
        load_hf_weights(trainable.model, arch, SafetensorsSource(hf_dir, arch))
        trainable.optimizer.reload_model_params()
        grads = None
        for _ in range(STEPS):
            trainable.zero_grad()
            run_pass(trainable.model, batch, temperature=1.0, token_budget=16, loss_fn=loss_fn)  # 3 micro-batches
            if grads is None:
                grads = {n: p.main_grad.clone() for n, p in inner.named_parameters() if n in TIED}
            trainable.step()
        weights = {n: p.detach().clone() for n, p in inner.named_parameters() if n in TIED}
        stage = parallel_state.get_pipeline_model_parallel_rank()
        results[pp] = all_gather_object({"stage": stage, "grads": grads, "weights": weights})
    return results


def test_tied_embedding_trains_at_pp2_as_at_pp1(tmp_path):
    hf_dir = str(tmp_path / "qwen3_tied")
    make_tiny_hf("qwen3", hf_dir)
    results = run_distributed(_train, hf_dir, timeout_s=300)
    single = results[1][0]
    assert set(single["grads"]) == {TIED[0]}  # one tensor at PP=1
    reference_grad, reference_weight = single["grads"][TIED[0]], single["weights"][TIED[0]]
    assert reference_grad.abs().max() > 1e-3
    first, last = sorted(results[2], key=lambda r: r["stage"])
    stage_copies = [(first, TIED[0]), (last, TIED[1])]
    for rank_result, name in stage_copies:
        assert set(rank_result["grads"]) == {name}
        torch.testing.assert_close(rank_result["grads"][name], reference_grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank_result["weights"][name], reference_weight, rtol=1e-5, atol=1e-6)
    # the two stages' copies are one parameter: equal after every optimizer step
    assert torch.equal(first["weights"][TIED[0]], last["weights"][TIED[1]])
    assert not torch.equal(reference_weight, make_initial_embedding(hf_dir))  # the steps moved it


def make_initial_embedding(hf_dir: str) -> torch.Tensor:
    from safetensors.torch import load_file

    embedding = load_file(f"{hf_dir}/model.safetensors")["model.embed_tokens.weight"]
    padded = torch.zeros(128, embedding.shape[1])
    padded[: embedding.shape[0]] = embedding
    return padded
