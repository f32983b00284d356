"""Accuracy filter on prompt groups and the buffer carrying surplus prompts to the next step."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_prime.algorithm import PromptBuffer, filter_groups
from megatron_prime.data import PromptRow

torch.set_num_threads(1)


def naive_filter(outcome, K, low, high, truncated=None):
    keep = []
    for start in range(0, len(outcome), K):
        group = [float(x) for x in outcome[start : start + K]]
        mean = sum(group) / K
        ok = low - 1e-6 <= mean <= high + 1e-6
        if truncated is not None:
            ok = ok and not any(bool(x) for x in truncated[start : start + K])
        keep.append(ok)
    return torch.tensor(keep, dtype=torch.bool)


def test_filter_groups_hand_example():
    # K = 4, bounds [0.2, 0.8]:
    #   [1, 1, 1, 1] mean 1.0  -> drop (too easy)
    #   [1, 0, 0, 0] mean 0.25 -> keep
    #   [0, 0, 0, 0] mean 0.0  -> drop (too hard)
    #   [1, 1, 1, 0] mean 0.75 -> keep
    outcome = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0], dtype=torch.float32)
    assert filter_groups(outcome, 4).tolist() == [False, True, False, True]


def test_filter_bounds_are_inclusive():
    # K = 5: [1, 0, 0, 0, 0] mean 1/5 = 0.2 (float 0.2 is not exactly 1/5) -> keep (lower bound)
    #        [1, 1, 1, 1, 0] mean 4/5 = 0.8                                 -> keep (upper bound)
    #        [0, 0, 0, 0, 0] mean 0                                          -> drop
    # fractional code pass rates, K = 2: [0.1, 0.25] mean 0.175 -> drop; [0.9, 0.7] mean 0.8 -> keep
    binary = torch.tensor([1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.float32)
    assert filter_groups(binary, 5).tolist() == [True, True, False]
    fractional = torch.tensor([0.1, 0.25, 0.9, 0.7])
    assert filter_groups(fractional, 2).tolist() == [False, True]
    # Custom bounds: [0, 1] keeps everything.
    assert filter_groups(binary, 5, low=0.0, high=1.0).all()


def test_filter_drops_groups_with_truncated_responses():
    # Both groups have mean 0.5; the second has one truncated response -> dropped.
    outcome = torch.tensor([1.0, 0.0, 1.0, 0.0])
    truncated = torch.tensor([False, False, False, True])
    assert filter_groups(outcome, 2, truncated=truncated).tolist() == [True, False]
    assert filter_groups(outcome, 2).tolist() == [True, True]


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(0, 2**31 - 1),
    st.booleans(),
    st.booleans(),
    st.sampled_from([(0.2, 0.8), (0.0, 0.5), (0.3, 0.3)]),
)
def test_filter_matches_naive(num_groups, K, seed, fractional, with_truncation, bounds):
    g = torch.Generator().manual_seed(seed)
    B = num_groups * K
    outcome = torch.rand(B, generator=g) if fractional else torch.randint(0, 2, (B,), generator=g).float()
    truncated = torch.rand(B, generator=g) < 0.2 if with_truncation else None
    low, high = bounds
    keep = filter_groups(outcome, K, low, high, truncated)
    assert keep.dtype == torch.bool and keep.shape == (num_groups,)
    assert torch.equal(keep, naive_filter(outcome, K, low, high, truncated))


def test_filter_argument_errors():
    with pytest.raises(ValueError, match="whole number of groups"):
        filter_groups(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="low <= high"):
        filter_groups(torch.zeros(4), 2, low=0.9, high=0.1)
    with pytest.raises(ValueError, match="truncated"):
        filter_groups(torch.zeros(4), 2, truncated=torch.zeros(2, dtype=torch.bool))


def test_prompt_buffer_is_fifo():
    buffer = PromptBuffer()
    buffer.push(["a", "b"])
    assert buffer.pop(1) == ["a"]
    buffer.push(["c", "d", "e"])
    assert buffer.pop(10) == ["b", "c", "d", "e"]
    assert buffer.pop(2) == [] and len(buffer) == 0
    with pytest.raises(ValueError):
        buffer.pop(-1)


def test_prompt_buffer_state_dict_round_trip_through_torch_save():
    # The trainer stores dataset rows; a checkpoint restores them in order into a fresh buffer.
    rows = [PromptRow(prompt=f"{i}+1=", ground_truth=str(i + 1), verifier="math", data_source="plain", index=i)
            for i in range(4)]
    buffer = PromptBuffer()
    buffer.push(rows)
    blob = io.BytesIO()
    torch.save(buffer.state_dict(), blob)
    blob.seek(0)
    restored = PromptBuffer()
    restored.load_state_dict(torch.load(blob, weights_only=False))
    assert len(restored) == 4 and restored.pop(4) == rows
    # The saved state is a snapshot: popping from the restored buffer left the original intact.
    assert len(buffer) == 4


def test_prompt_buffer_refuses_a_buffer_of_responses():
    with pytest.raises(ValueError, match="holds sampled responses"):
        PromptBuffer().load_state_dict({"groups": [], "max_groups": None, "num_dropped": 0})
