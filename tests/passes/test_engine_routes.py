"""Decoding the engine's routed experts (SGLang's ``meta_info["routed_experts"]``: base64 int32
``[prompt + response - 1, layers, top-k]``) into the layout the policy's passes replay, worked by
hand on a 3-layer, top-2 model."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from megatron_prime.passes.routing_replay import engine_routes


def _encode(rows: list[list[list[int]]]) -> str:
    return base64.b64encode(np.array(rows, dtype=np.int32).tobytes()).decode()


# a 4-token sequence: positions 0, 1, 2 routed (position 3, the last, is never fed back); 3 layers, top-2
ROW = [[[0, 1], [2, 3], [4, 5]],
       [[1, 2], [3, 0], [5, 4]],
       [[6, 7], [7, 6], [0, 7]]]


def test_positions_layers_and_the_filled_tail():
    routes = engine_routes([_encode(ROW)], [4], num_layers=3, num_experts=8, topk=2, layers=[1, 2], width=6)
    assert routes.shape == (1, 2, 6, 2) and routes.dtype == torch.int16
    # layer 1 (this stage's first): positions 0, 1, 2 as given, then the last route repeated for the
    # last token (3) and the padding (4, 5)
    assert routes[0, 0].tolist() == [[2, 3], [3, 0], [7, 6], [7, 6], [7, 6], [7, 6]]
    assert routes[0, 1].tolist() == [[4, 5], [5, 4], [0, 7], [0, 7], [0, 7], [0, 7]]


def test_a_narrower_batch_cuts_and_a_one_token_row_routes_to_real_experts():
    routes = engine_routes([_encode(ROW), ""], [4, 1], num_layers=3, num_experts=8, topk=2, layers=[0], width=2)
    assert routes[0, 0].tolist() == [[0, 1], [1, 2]]
    assert routes[1, 0].tolist() == [[0, 1], [0, 1]]  # nothing routed: experts 0 and 1, distinct


@pytest.mark.parametrize("encoded, seq_len, message", [
    (_encode(ROW), 5, r"rollout row 0: the engine returned 18 routed-expert ids, expected \(prompt \+ response - 1 = 4\) "
                      r"x 3 layers x top-2 = 24"),
    (_encode([[[0, 9], [2, 3], [4, 5]]]), 2, r"rollout row 0: routed-expert ids outside 0..7 \(0..9\)"),
    (None, 4, r"rollout row 0: the engine returned no routed experts"),
])
def test_what_does_not_fit_the_model_is_refused(encoded, seq_len, message):
    with pytest.raises(ValueError, match=message):
        engine_routes([encoded], [seq_len], num_layers=3, num_experts=8, topk=2, layers=[0, 1, 2], width=8)
