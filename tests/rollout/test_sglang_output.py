"""What we read from an SGLang generate output (the dict ``Engine.generate`` and ``/generate``
return), and what we ask for: the routed experts only when asked, and a clear error naming the
server flag when they were asked for and are missing."""

from __future__ import annotations

import pytest

from megatron_prime.rollout.base import RolloutError, SamplingParams
from megatron_prime.rollout.sglang_engine import parse_output, routes_request

OUT = {"output_ids": [5, 6], "text": "ab",
       "meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": [[-0.5, 5, None], [-1.25, 6, None]],
                     "routed_experts": "AAAAAAEAAAA="}}


def test_routes_only_when_asked():
    assert routes_request(SamplingParams()) == {}
    assert routes_request(SamplingParams(return_routes=True)) == {"return_routed_experts": True,
                                                                 "routed_experts_start_len": 0}
    plain = parse_output("sglang", "req", OUT, 3)
    assert (plain.prompt_index, plain.token_ids, plain.logprobs, plain.routes) == (3, [5, 6], [-0.5, -1.25], None)
    assert parse_output("sglang", "req", OUT, 3, routes=True).routes == "AAAAAAEAAAA="


def test_asked_for_routes_a_server_without_them_is_named():
    out = {**OUT, "meta_info": {k: v for k, v in OUT["meta_info"].items() if k != "routed_experts"}}
    with pytest.raises(RolloutError, match="start the SGLang server with --enable-return-routed-experts"):
        parse_output("sglang", "req", out, 0, routes=True)
