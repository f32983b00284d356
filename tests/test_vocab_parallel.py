"""Vocab-parallel log-probs and entropy: single rank against log_softmax, and TP=2 on two gloo
ranks against the full-vocabulary computation (values and gradients within 1e-5)."""

import pytest
import torch
import torch.distributed as dist

from megatron_prime.training.vocab_parallel import vocab_parallel_entropy, vocab_parallel_logprobs
from tests.dist_utils import run_distributed

torch.set_num_threads(1)


def reference(logits, targets):
    """Full-vocabulary log-probs of the targets and entropies, by plain torch."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    target_logprobs = log_probs.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return target_logprobs, entropy


def random_case(seed, tokens, vocab, scale=3.0, dtype=torch.float32, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    logits = (offset + scale * torch.randn(tokens, vocab, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    weights = torch.randn(2, tokens, generator=g)  # random upstream gradients for both outputs
    return logits, targets, weights


def test_hand_example():
    # logits [0, ln 2, ln 5] -> softmax [1, 2, 5] / 8; target 1: log(2/8) = -1.386294361
    # entropy = -(1/8 ln 1/8 + 2/8 ln 2/8 + 5/8 ln 5/8) = 0.259930 + 0.346574 + 0.293752 = 0.900256
    logits = torch.log(torch.tensor([[1.0, 2.0, 5.0]]))
    assert vocab_parallel_logprobs(logits, torch.tensor([1])).item() == pytest.approx(-1.386294361, abs=1e-6)
    assert vocab_parallel_entropy(logits).item() == pytest.approx(0.900256, abs=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_single_rank_matches_log_softmax(chunk_size):
    logits, targets, weights = random_case(0, tokens=37, vocab=50)
    logits_ref = logits.clone().requires_grad_(True)
    ref_lp, ref_ent = reference(logits_ref, targets)
    ((ref_lp * weights[0]).sum() + (ref_ent * weights[1]).sum()).backward()

    logits_vp = logits.clone().requires_grad_(True)
    lp = vocab_parallel_logprobs(logits_vp, targets, chunk_size=chunk_size)
    ent = vocab_parallel_entropy(logits_vp, chunk_size=chunk_size)
    ((lp * weights[0]).sum() + (ent * weights[1]).sum()).backward()

    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref_lp.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits_vp.grad, logits_ref.grad, rtol=0, atol=1e-5)


def test_gradcheck_float64():
    # The custom backward passes against numerical derivatives (float64 inputs).
    logits, targets, _ = random_case(1, tokens=5, vocab=6, dtype=torch.float64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_logprobs(x, targets, chunk_size=2), (logits,), atol=1e-5
    )
    assert torch.autograd.gradcheck(lambda x: vocab_parallel_entropy(x, chunk_size=2), (logits,), atol=1e-5)


def test_leading_dims_large_logits_and_input_untouched():
    # Megatron's [s, b, vocab] layout; logits around 1e3 (stability of the max shift); the input
    # tensor must not be modified in place.
    g = torch.Generator().manual_seed(2)
    logits = 1000.0 + 5 * torch.randn(4, 3, 11, generator=g)
    targets = torch.randint(0, 11, (4, 3), generator=g)
    before = logits.clone()
    lp = vocab_parallel_logprobs(logits, targets, chunk_size=5)
    ent = vocab_parallel_entropy(logits, chunk_size=5)
    assert torch.equal(logits, before)
    assert lp.shape == ent.shape == (4, 3)
    ref_lp, ref_ent = reference(logits, targets)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=1e-4)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=1e-4)


def test_bfloat16_logits():
    # bf16 logits: float32 math inside, float32 outputs, bf16 gradient.
    logits, targets, weights = random_case(3, tokens=9, vocab=16, dtype=torch.bfloat16)
    logits.requires_grad_(True)
    lp = vocab_parallel_logprobs(logits, targets)
    ent = vocab_parallel_entropy(logits)
    ((lp * weights[0]).sum() + (ent * weights[1]).sum()).backward()
    assert lp.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    ref_lp, ref_ent = reference(logits.detach().float(), targets)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=1e-5)


def test_argument_errors():
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_logprobs(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_entropy(torch.zeros(3, 4), chunk_size=0)


# --- TP = 2 on two gloo ranks ------------------------------------------------------------------
def _tp2_checks(rank, world_size):
    """Every multi-rank check in one launch. Returns the worst errors seen on any rank."""
    tp_group = dist.new_group(list(range(world_size)))
    errors = {}

    def record(name, value):
        worst = torch.tensor(float(torch.as_tensor(value).detach()))
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        errors[name] = max(errors.get(name, 0.0), worst.item())

    # Same seed on both ranks: every rank knows the full logits and keeps its own vocab shard.
    # (tokens, vocab, chunk_size, scale, offset, explicit vocab_start); the offset case needs the
    # global max shift: exp(1000) overflows float32.
    cases = [
        (37, 24, 5, 3.0, 0.0, False),
        (37, 24, 4096, 3.0, 0.0, True),
        (16, 10, 3, 8.0, 1000.0, False),
        (1, 2, 1, 1.0, 0.0, False),
    ]
    for case, (tokens, vocab, chunk_size, scale, offset, explicit_start) in enumerate(cases):
        logits, targets, weights = random_case(100 + case, tokens, vocab, scale, offset=offset)
        shard_width = vocab // world_size
        columns = slice(rank * shard_width, (rank + 1) * shard_width)

        full = logits.clone().requires_grad_(True)
        ref_lp, ref_ent = reference(full, targets)
        ((ref_lp * weights[0]).sum() + (ref_ent * weights[1]).sum()).backward()

        shard = logits[:, columns].clone().requires_grad_(True)
        untouched = shard.detach().clone()
        start = rank * shard_width if explicit_start else None
        lp = vocab_parallel_logprobs(
            shard, targets, tp_group=tp_group, vocab_start=start, chunk_size=chunk_size
        )
        ent = vocab_parallel_entropy(shard, tp_group=tp_group, chunk_size=chunk_size)
        # The loss is computed redundantly on every TP rank (Megatron's convention).
        ((lp * weights[0]).sum() + (ent * weights[1]).sum()).backward()

        record("logprobs", (lp.double() - ref_lp.detach()).abs().max())
        record("entropy", (ent.double() - ref_ent.detach()).abs().max())
        record("grad", (shard.grad - full.grad[:, columns]).abs().max())
        record("input_modified", float(not torch.equal(shard.detach(), untouched)))
        # Outputs are replicated: identical on every rank.
        both = torch.stack([lp.detach(), ent.detach()])
        gathered = [torch.empty_like(both) for _ in range(world_size)]
        dist.all_gather(gathered, both)
        record("rank_disagreement", max((g - gathered[0]).abs().max().item() for g in gathered))

    # tp_group=None means no tensor parallelism even inside an initialised process group.
    logits, targets, _ = random_case(7, 6, 8)
    record(
        "no_tp_logprobs",
        (vocab_parallel_logprobs(logits, targets).double() - reference(logits, targets)[0]).abs().max(),
    )
    return errors


def test_tp2_matches_full_vocabulary():
    errors = run_distributed(_tp2_checks, world_size=2)
    assert errors is not None
    for name in ("logprobs", "entropy", "grad", "no_tp_logprobs"):
        assert errors[name] < 1e-5, (name, errors[name])
    assert errors["input_modified"] == 0.0
    assert errors["rank_disagreement"] == 0.0
