"""The chunked vocab-parallel output layer (``output_layer_logprobs``): single rank against plain
``log_softmax`` of ``hidden @ weight^T / T``, and TP=2 on two gloo ranks against the
full-vocabulary computation (log-probs, entropies and the gradients of hidden and weight)."""

import pytest
import torch
import torch.distributed as dist

from megatron_prime.passes.vocab_parallel import output_layer_logprobs
from tests.helpers import run_distributed

pytestmark = pytest.mark.multi_rank

torch.set_num_threads(1)


def reference(hidden, weight, targets, temperature=1.0, real_rows=None):
    """Log-probs of the targets and entropies of softmax(hidden @ weight[:real]^T / T), plain torch."""
    weight = weight if real_rows is None else weight[:real_rows]
    log_probs = torch.log_softmax((hidden.double() @ weight.double().t()) / temperature, dim=-1)
    target_logprobs = log_probs.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return target_logprobs, entropy


def random_case(seed, tokens, vocab, hidden_size=6, scale=1.0, dtype=torch.float32, real_rows=None):
    g = torch.Generator().manual_seed(seed)
    hidden = (scale * torch.randn(tokens, hidden_size, generator=g)).to(dtype)
    weight = torch.randn(vocab, hidden_size, generator=g).to(dtype)
    targets = torch.randint(0, real_rows or vocab, (tokens,), generator=g)
    weights = torch.randn(2, tokens, generator=g)  # random upstream gradients for both outputs
    return hidden, weight, targets, weights


def run(hidden, weight, targets, weights, **kwargs):
    """Outputs and the gradients of hidden and weight for the loss sum(w0 * logprob + w1 * H)."""
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    lp, ent = output_layer_logprobs(hidden, weight, targets, with_entropy=True, **kwargs)
    ((lp * weights[0]).sum() + (ent * weights[1]).sum()).backward()
    return lp, ent, hidden.grad, weight.grad


def test_hand_example():
    # hidden [1], weight rows [0, ln 2, ln 5] -> logits [0, ln 2, ln 5] -> softmax [1, 2, 5] / 8
    # target 1: log(2/8) = -1.386294361;  entropy = 0.259930 + 0.346574 + 0.293752 = 0.900256
    weight = torch.log(torch.tensor([[1.0], [2.0], [5.0]]))
    lp, ent = output_layer_logprobs(torch.ones(1, 1), weight, torch.tensor([1]), with_entropy=True)
    assert lp.item() == pytest.approx(-1.386294361, abs=1e-6)
    assert ent.item() == pytest.approx(0.900256, abs=1e-6)
    # A padding row of the weight (real_vocab_rows=3) gets probability 0, whatever it holds.
    padded = torch.cat([weight, torch.tensor([[50.0]])])
    lp_padded, _ = output_layer_logprobs(torch.ones(1, 1), padded, torch.tensor([1]), real_vocab_rows=3)
    assert lp_padded.item() == pytest.approx(-1.386294361, abs=1e-6)


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 1000])
@pytest.mark.parametrize("temperature,real_rows", [(1.0, None), (0.7, 41)])
def test_single_rank_matches_log_softmax(rows_per_chunk, temperature, real_rows):
    vocab = 50
    hidden, weight, targets, weights = random_case(0, tokens=37, vocab=vocab, scale=2.0, real_rows=real_rows)
    width = real_rows or vocab
    lp, ent, grad_hidden, grad_weight = run(
        hidden, weight, targets, weights, temperature=temperature, real_vocab_rows=real_rows,
        chunk_bytes=4 * width * rows_per_chunk,
    )
    h = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    ref_lp, ref_ent = reference(h, w, targets, temperature, real_rows)
    ((ref_lp * weights[0]).sum() + (ref_ent * weights[1]).sum()).backward()

    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref_lp.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_hidden.double(), h.grad, rtol=0, atol=1e-4)
    torch.testing.assert_close(grad_weight.double(), w.grad, rtol=0, atol=1e-4)
    if real_rows is not None:
        assert (grad_weight[real_rows:] == 0).all()


def test_gradcheck_float64():
    # The custom backward against numerical derivatives, for both outputs and both inputs.
    hidden, weight, targets, _ = random_case(1, tokens=5, vocab=6, hidden_size=3, dtype=torch.float64)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def outputs(h, w):
        return output_layer_logprobs(h, w, targets, temperature=0.8, with_entropy=True, chunk_bytes=2 * 8 * 6)

    assert torch.autograd.gradcheck(outputs, (hidden, weight), atol=1e-6)


def test_large_logits_entropy_off_and_inputs_untouched():
    # Logits around 1e3 (stability of the max shift), no entropy asked (None, no gradient needed),
    # inputs not modified in place.
    hidden, weight, targets, _ = random_case(2, tokens=9, vocab=11)
    hidden[:, 0], weight[:, 0] = 100.0, 10.0  # +1000 on every logit
    before = (hidden.clone(), weight.clone())
    lp, ent = output_layer_logprobs(hidden, weight, targets, chunk_bytes=4 * 11 * 4)
    assert ent is None
    assert torch.equal(hidden, before[0]) and torch.equal(weight, before[1])
    ref_lp, _ = reference(hidden, weight, targets)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=1e-4)


def test_bfloat16_weights():
    # bf16 output layer: a bf16 matmul (as the model's output layer), float32 softmax math,
    # float32 outputs, bf16 gradients.
    hidden, weight, targets, weights = random_case(3, tokens=9, vocab=16, dtype=torch.bfloat16)
    lp, ent, grad_hidden, grad_weight = run(hidden, weight, targets, weights)
    assert lp.dtype == torch.float32 and grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    bf16_logits = hidden @ weight.t()
    ref_lp, ref_ent = reference(bf16_logits, torch.eye(16), targets)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=1e-5)


def test_argument_errors():
    with pytest.raises(ValueError, match="must be"):
        output_layer_logprobs(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))


# --- TP = 2 on two gloo ranks ------------------------------------------------------------------
def _tp2_checks(rank, world_size):
    """Every multi-rank check in one launch. Returns the worst errors seen on any rank."""
    tp_group = dist.new_group(list(range(world_size)))
    errors = {}

    def record(name, value):
        worst = torch.tensor(float(torch.as_tensor(value).detach()))
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        errors[name] = max(errors.get(name, 0.0), worst.item())

    # Same seed on both ranks: every rank knows the full weight and keeps its own vocabulary
    # shard. (tokens, padded vocab, real vocab, rows per chunk, temperature, +1000 on the logits)
    cases = [
        (37, 24, 24, 5, 1.0, False),
        (37, 24, 19, 1000, 0.7, False),  # rank 1's shard is partly padding
        (16, 24, 10, 3, 1.0, True),  # rank 1's shard is padding only; global max shift needed
        (1, 2, 2, 1, 1.0, False),
    ]
    for case, (tokens, vocab, real, rows_per_chunk, temperature, offset) in enumerate(cases):
        hidden, weight, targets, weights = random_case(100 + case, tokens, vocab, scale=2.0, real_rows=real)
        if offset:
            hidden[:, 0], weight[:, 0] = 100.0, 10.0
        shard = vocab // world_size
        start = rank * shard
        rows = slice(start, start + shard)

        h_full = hidden.double().requires_grad_(True)
        w_full = weight.double().requires_grad_(True)
        ref_lp, ref_ent = reference(h_full, w_full, targets, temperature, real)
        ((ref_lp * weights[0]).sum() + (ref_ent * weights[1]).sum()).backward()

        h = hidden.clone().requires_grad_(True)
        w = weight[rows].clone().requires_grad_(True)
        untouched = (h.detach().clone(), w.detach().clone())
        lp, ent = output_layer_logprobs(
            h, w, targets, tp_group=tp_group, vocab_start=start, real_vocab_rows=max(0, min(shard, real - start)),
            temperature=temperature, with_entropy=True, chunk_bytes=4 * shard * rows_per_chunk,
        )
        # The loss is computed redundantly on every TP rank (Megatron's convention); the
        # hidden states' gradient is each shard's part, summed over the TP group by the caller.
        ((lp * weights[0]).sum() + (ent * weights[1]).sum()).backward()
        grad_hidden = h.grad.clone()
        dist.all_reduce(grad_hidden, group=tp_group)

        record("logprobs", (lp.double() - ref_lp.detach()).abs().max())
        record("entropy", (ent.double() - ref_ent.detach()).abs().max())
        # relative to the largest gradient: the +1000 case's gradients are ~100x larger
        record("grad_hidden", (grad_hidden.double() - h_full.grad).abs().max() / h_full.grad.abs().max())
        record("grad_weight", (w.grad.double() - w_full.grad[rows]).abs().max() / w_full.grad.abs().max())
        record("input_modified", float(not (torch.equal(h.detach(), untouched[0])
                                            and torch.equal(w.detach(), untouched[1]))))
        # Outputs are replicated: identical on every rank.
        both = torch.stack([lp.detach(), ent.detach()])
        gathered = [torch.empty_like(both) for _ in range(world_size)]
        dist.all_gather(gathered, both)
        record("rank_disagreement", max((g - gathered[0]).abs().max().item() for g in gathered))

    # tp_group=None means no tensor parallelism even inside an initialised process group.
    hidden, weight, targets, _ = random_case(7, 6, 8)
    lp, _ = output_layer_logprobs(hidden, weight, targets)
    record("no_tp_logprobs", (lp.double() - reference(hidden, weight, targets)[0]).abs().max())
    return errors


def test_tp2_matches_full_vocabulary():
    errors = run_distributed(_tp2_checks, world_size=2)
    assert errors is not None
    for name in ("logprobs", "entropy", "grad_hidden", "grad_weight", "no_tp_logprobs"):
        assert errors[name] < 1e-4, (name, errors[name])
    assert errors["input_modified"] == 0.0
    assert errors["rank_disagreement"] == 0.0
