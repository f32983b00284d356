"""The trainable models start from the checkpoint in every precision.

In bf16/fp16 megatron-core's optimizer keeps fp32 main copies of the parameters, taken when the
optimizer is built. The trainer loads the HF weights after that, so it must refresh those copies:
otherwise the first optimizer step writes the random initialisation back over the checkpoint. An
optimizer step with zero gradients (Adam moves nothing) must leave every parameter equal to the
checkpoint it was loaded from."""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.trainer_fixtures import make_trainer_fixture, overrides, register_test_verifier


def _step_with_zero_grads(rank, world_size, fixture, root, dtype):
    from megatron_prime.bridge.transfer import iter_hf_tensors
    from megatron_prime.config import load_config
    from megatron_prime.platform import distributed
    from megatron_prime.training.trainer import build_context

    register_test_verifier()
    cfg = load_config(None, overrides(fixture, root, f"model.dtype={dtype}",
                                      f"model.prm_hf_path={fixture['prm_hf']}", "optim.policy.lr=1e-3",
                                      "optim.prm.lr=1e-3"))
    distributed.init_model_parallel(seed=cfg.train.seed)
    ctx = build_context(cfg)
    out = {}
    for name, trainable in (("policy", ctx.policy), ("prm", ctx.prm)):
        loaded = dict(iter_hf_tensors(trainable.model, ctx.arch))
        trainable.zero_grad()
        trainable.step()
        after = dict(iter_hf_tensors(trainable.model, ctx.arch))
        out[name] = {"loaded": loaded, "changed": [n for n in loaded if not torch.equal(loaded[n], after[n])]}
    ctx.fleet.shutdown()
    return out


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("initial_weights"))
    return make_trainer_fixture(root), root


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_zero_grad_step_keeps_the_checkpoint(fixture_dirs, dtype):
    import transformers

    fixture, root = fixture_dirs
    out = run_distributed(_step_with_zero_grads, fixture, root, dtype, world_size=1)
    for name, hf_dir in (("policy", fixture["hf"]), ("prm", fixture["prm_hf"])):
        reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        loaded = out[name]["loaded"]
        for n, p in reference.named_parameters():
            expected = p.detach().to(loaded[n].dtype)
            assert torch.equal(loaded[n], expected), (name, n)  # loaded as written
        assert out[name]["changed"] == [], (name, dtype)  # and still there after the step
