"""Token choice (top-k / top-p / temperature) and weight bucketing, in plain torch."""

from __future__ import annotations

import pytest
import torch

from megatron_prime.rollout.base import sample_seed
from megatron_prime.rollout.sampling import choose_tokens, filter_top_k_top_p
from megatron_prime.rollout.weight_buckets import bucket_meta, iter_buckets

torch.set_num_threads(2)


def test_top_k_and_top_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    kept = lambda out: torch.isfinite(out[0]).tolist()  # noqa: E731
    assert kept(filter_top_k_top_p(logits, top_k=2, top_p=1.0)) == [True, True, False, False]
    assert kept(filter_top_k_top_p(logits, top_k=-1, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_top_k_top_p(logits, top_k=-1, top_p=0.6)) == [True, True, False, False]
    assert kept(filter_top_k_top_p(logits, top_k=-1, top_p=0.9)) == [True, True, True, False]
    assert kept(filter_top_k_top_p(logits, top_k=0, top_p=1.0)) == [True] * 4
    # Unsorted input: the mask follows the tokens, not positions.
    shuffled = logits[:, [2, 0, 3, 1]]
    assert kept(filter_top_k_top_p(shuffled, top_k=-1, top_p=0.6)) == [False, True, False, True]


def test_sampling_frequencies_follow_the_filtered_distribution():
    rows = 4000
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1])).repeat(rows, 1)
    gens = [torch.Generator().manual_seed(sample_seed(0, i, 0)) for i in range(rows)]
    tokens, logprobs = choose_tokens(logits, 1.0, -1, 0.85, gens)
    freq = torch.bincount(tokens, minlength=4).double() / rows
    expected = torch.tensor([0.5, 0.25, 0.15, 0.0], dtype=torch.float64) / 0.9
    assert torch.allclose(freq, expected, atol=0.03), freq
    # Log-probs are of the untruncated distribution, whatever top-p kept.
    assert torch.allclose(logprobs, torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))[tokens], atol=1e-6)
    # Temperature: T=2 flattens the distribution as softmax(logits / 2) says.
    tokens, logprobs = choose_tokens(logits, 2.0, -1, 1.0, gens)
    want = torch.softmax(logits[0] / 2, dim=-1)
    freq = torch.bincount(tokens, minlength=4).double() / rows
    assert torch.allclose(freq, want.double(), atol=0.03), freq
    assert torch.allclose(logprobs, torch.log(want)[tokens], atol=1e-6)


def test_sample_seeds_are_distinct_and_stable():
    seeds = {sample_seed(1, p, j) for p in range(50) for j in range(8)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3) != sample_seed(2, 2, 3)


def test_buckets_keep_order_split_by_size_and_dtype():
    stream = [
        ("a", torch.zeros(10)),  # 40 bytes
        ("b", torch.zeros(10)),
        ("c", torch.zeros(30)),  # 120 bytes: alone, over the limit
        ("d", torch.zeros(4, dtype=torch.bfloat16)),  # dtype change starts a bucket
        ("e", torch.zeros(4, dtype=torch.bfloat16)),
        ("f", torch.zeros(2)),
    ]
    buckets = list(iter_buckets(iter(stream), bucket_bytes=100))
    assert [[n for n, _ in b] for b in buckets] == [["a", "b"], ["c"], ["d", "e"], ["f"]]
    assert all(len({t.dtype for _, t in b}) == 1 for b in buckets)
    names, dtypes, shapes = bucket_meta(buckets[2])
    assert (names, dtypes, shapes) == (["d", "e"], ["bfloat16", "bfloat16"], [[4], [4]])
    assert list(iter_buckets(iter([]), 100)) == []
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(iter_buckets(iter(stream), 0))


def test_buckets_stream_lazily():
    pulled = []

    def stream():
        for i in range(5):
            pulled.append(i)
            yield f"t{i}", torch.zeros(25)  # 100 bytes each

    buckets = iter_buckets(stream(), bucket_bytes=200)
    assert [n for n, _ in next(buckets)] == ["t0", "t1"]
    assert pulled == [0, 1, 2]  # one tensor of look-ahead, never the whole model
    assert len(list(buckets)) == 2


def test_sglang_and_vllm_requests_seed_by_global_prompt_index():
    from megatron_prime.rollout.base import SamplingParams, sample_seed
    from megatron_prime.rollout.sglang_engine import expand_requests

    prompts = [[1, 2], [3], [4, 5, 6]]
    whole = SamplingParams(n=2, seed=9)
    _, params, _ = expand_requests(prompts, whole)
    _, tail, _ = expand_requests(prompts[1:], SamplingParams(n=2, seed=9, prompt_offset=1))
    assert [p["sampling_seed"] for p in params[2:]] == [p["sampling_seed"] for p in tail]
    assert params[0]["sampling_seed"] == sample_seed(9, 0, 0) == whole.seed_of(0, 0)
    assert SamplingParams(n=2).seed_of(0, 0) is None
