"""PromptSampler: deterministic per-epoch shuffles, full batches, exact resume from a cursor."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_prime.data import PromptRow, PromptSampler


def rows(n):
    return [PromptRow(f"p{i}", str(i), "math", "plain", i) for i in range(n)]


def indices(batch):
    return [r.index for r in batch]


def test_each_epoch_is_a_permutation_and_epochs_differ():
    sampler = PromptSampler(rows(10), batch_size=5, seed=3)
    epoch0 = indices(sampler.next_batch()) + indices(sampler.next_batch())
    epoch1 = indices(sampler.next_batch()) + indices(sampler.next_batch())
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1 and epoch0 != list(range(10))
    assert sampler.state_dict()["epoch"] == 2


def test_same_seed_same_stream_other_seed_other_stream():
    a, b, c = (PromptSampler(rows(50), 7, seed) for seed in (1, 1, 2))
    stream = lambda s: [indices(s.next_batch()) for _ in range(20)]
    sa = stream(a)
    assert sa == stream(b)
    assert sa != stream(c)


def test_batch_crossing_an_epoch_is_completed_from_the_next():
    sampler = PromptSampler(rows(5), batch_size=3, seed=0)
    first, second = sampler.next_batch(), sampler.next_batch()
    assert len(first) == len(second) == 3
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["position"] == 1
    # Batch larger than the dataset: spans several epochs.
    assert len(PromptSampler(rows(2), batch_size=5).next_batch()) == 5


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), batch=st.integers(1, 12), seed=st.integers(0, 5), cut=st.integers(0, 10), more=st.integers(1, 10))
def test_resume_replays_exactly(n, batch, seed, cut, more):
    reference = PromptSampler(rows(n), batch, seed)
    stream = [indices(reference.next_batch()) for _ in range(cut + more)]
    first = PromptSampler(rows(n), batch, seed)
    for _ in range(cut):
        first.next_batch()
    state = dict(first.state_dict())
    resumed = PromptSampler(rows(n), batch, seed)
    resumed.load_state_dict(state)
    assert [indices(resumed.next_batch()) for _ in range(more)] == stream[cut:]


def test_load_state_refuses_a_different_dataset_or_seed():
    state = PromptSampler(rows(10), 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="10 rows"):
        PromptSampler(rows(11), 2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(rows(10), 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError):
        PromptSampler([], 2)
