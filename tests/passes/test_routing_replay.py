"""Routing replay (R2) for a mixture-of-experts policy: the routes recorded per row in one pass are
used again in another pass over other micro-batches, and what that changes is checked against a
prediction worked out by hand.

A Qwen3-MoE (4 experts, top-2, std 0.2 weights; routed as Qwen3-30B-A3B: a token's expert weights
are the softmax of its k chosen experts' router logits). Pass A records the routes and the log-probs.
Then one expert's router row e* is made large, so that the router, left to itself, sends most tokens to
e*. With replay, every token keeps its recorded experts, so a token's log-prob can change only if
some token at or before it in its sequence (attention is causal) was routed through e* in the
recorded routes, in any layer: every other log-prob equals pass A's, however the rows are cut into
micro-batches. Without replay (observe), the routes flip and the log-probs change, and the pass
reports how many routes flipped.

(On CPU a pass's routes do not depend on how rows are batched: measured, none of 1,280 routes
flipped between micro-batch compositions, with router logits exactly tied or 1e-7 apart; so here a
weight change is what makes routes drift, as an optimizer step between mini-batches does.)
"""

from __future__ import annotations

import base64

import pytest
import torch

from tests.helpers import make_trainer_fixture, run_distributed

pytestmark = pytest.mark.multi_rank

PROMPTS = [[5, 17, 3], [9, 1, 4, 2, 8, 6, 11], [7, 3, 3, 19, 2], [4, 4], [12, 13, 14, 15, 16, 17, 18, 19]]
RESPONSES = [[12, 9, 4, 4, 3, 0], [5, 7], [1, 2, 3, 8, 5, 6, 7, 8, 9], [3, 3, 3, 3], [2, 1]]


def _run(rank, world_size, hf_dir):
    from megatron_prime.bridge.hf_io import SafetensorsSource
    from megatron_prime.bridge.transfer import load_hf_weights
    from megatron_prime.config import OptimizerConfig
    from megatron_prime.models.gpt import ModelOptions
    from megatron_prime.models.hf_config import read_hf_config
    from megatron_prime.passes import routing_replay
    from megatron_prime.passes.batch import build_rollout_batch
    from megatron_prime.passes.forward_backward import run_pass
    from megatron_prime.passes.trainable import build_trainable
    from megatron_prime.platform import distributed

    distributed.init_model_parallel()
    arch = read_hf_config(hf_dir)
    policy = build_trainable(arch, ModelOptions(dtype="fp32", routing_replay=True), OptimizerConfig(), total_steps=1,
                             distributed_optimizer=False)
    load_hf_weights(policy.model, arch, SafetensorsSource(hf_dir, arch))
    batch = build_rollout_batch(PROMPTS, RESPONSES, [1.0] * 5, None, [False] * 5, group_size=5)
    record = run_pass(policy.model, batch, temperature=1.0, token_budget=64, routing="record")
    batch.extras["routes"] = record.routes
    out = {"routes": record.routes.clone(), "old": record.logprobs}
    # the same weights, other micro-batches (one row each): replayed and free choices agree
    out["replay_same"] = run_pass(policy.model, batch, temperature=1.0, token_budget=12, routing="replay")
    routers = routing_replay.routers(policy.model.module)
    counts = torch.bincount(record.routes.long().flatten(), minlength=arch.num_experts)
    hijacker = int(counts.argmin())  # the expert the fewest recorded routes went through
    with torch.no_grad():
        for router in routers:
            router.weight[hijacker] *= 25.0
    out["hijacker"] = hijacker
    out["replay"] = run_pass(policy.model, batch, temperature=1.0, token_budget=12, routing="replay")
    # R3: the recorded routes as SGLang returns them (positions 0 .. len - 2, every layer), replayed
    seq_lens = batch.attention_mask.sum(dim=1).tolist()
    encoded = [base64.b64encode(record.routes[i, :, :n - 1].transpose(0, 1).numpy().astype("int32").tobytes()).decode()
               for i, n in enumerate(seq_lens)]
    out["stage_layers"] = routing_replay.stage_layers(policy.model.module)
    engine_batch = build_rollout_batch(PROMPTS, RESPONSES, [1.0] * 5, None, [False] * 5, group_size=5)
    engine_batch.extras["routes"] = routing_replay.engine_routes(
        encoded, seq_lens, num_layers=arch.num_layers, num_experts=arch.num_experts, topk=arch.moe_topk,
        layers=out["stage_layers"], width=engine_batch.input_ids.shape[1])
    out["engine"] = run_pass(policy.model, engine_batch, temperature=1.0, token_budget=12, routing="replay")
    out["observe"] = run_pass(policy.model, batch, temperature=1.0, token_budget=12, routing="observe")
    out["free"] = run_pass(policy.model, batch, temperature=1.0, token_budget=12)
    out["response_index"] = batch.response_index
    out["response_mask"] = batch.response_mask
    return out


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("routing_replay"))
    fixture = make_trainer_fixture(root, moe=True)
    return run_distributed(_run, fixture["hf"], world_size=1, timeout_s=300)


def test_replay_with_the_same_weights_reproduces_the_old_logprobs(replay):
    same = replay["replay_same"]
    # other micro-batches sum in another order: fp32 rounding only (ratio within 1e-5 of 1)
    torch.testing.assert_close(same.logprobs, replay["old"], rtol=0, atol=1e-5)
    flipped, compared = same.metrics["routing/flipped_frac"]
    assert compared > 0 and flipped == 0


def test_replayed_routes_change_only_the_tokens_after_the_changed_expert(replay):
    """The hand-worked prediction: with replay, response token j of row i (logits at position
    p = response_index[i, j]) keeps its old log-prob unless a position <= p of row i went through
    the hijacked expert in some layer."""
    routes, hijacker = replay["routes"].long(), replay["hijacker"]
    used = (routes == hijacker).any(-1).any(1)  # [rows, positions]: any layer, any of the k choices
    touched_by = used.cumsum(dim=1) > 0  # a position at or before it used the hijacker
    mask = replay["response_mask"].bool()
    position = replay["response_index"]
    unaffected = mask & ~touched_by.gather(1, position)
    affected = mask & touched_by.gather(1, position)
    assert unaffected.sum() >= 4 and affected.sum() >= 4, (unaffected.sum(), affected.sum())
    new, old = replay["replay"].logprobs, replay["old"]
    torch.testing.assert_close(new[unaffected], old[unaffected], rtol=0, atol=1e-5)
    assert (new[affected] - old[affected]).abs().max() > 1e-3  # the hijacker's own tokens did change
    flipped, compared = replay["replay"].metrics["routing/flipped_frac"]
    assert flipped > 0.2 * compared  # what the router would have chosen instead: replay prevented it


def test_without_replay_routes_flip_and_logprobs_move(replay):
    observe, free, old = replay["observe"], replay["free"], replay["old"]
    torch.testing.assert_close(observe.logprobs, free.logprobs, rtol=0, atol=0)  # observing changes nothing
    flipped, compared = observe.metrics["routing/flipped_frac"]
    assert flipped > 0.2 * compared
    routes, hijacker = replay["routes"].long(), replay["hijacker"]
    used = (routes == hijacker).any(-1).any(1).cumsum(dim=1) > 0
    mask = replay["response_mask"].bool()
    unaffected_with_replay = mask & ~used.gather(1, replay["response_index"])
    # where replay kept the old log-probs, free routing moved them
    assert (free.logprobs[unaffected_with_replay] - old[unaffected_with_replay]).abs().max() > 1e-3


def test_the_engines_routes_replayed_give_the_recorded_routes_logprobs(replay):
    """R3's path: the routes in SGLang's format (the last position missing) decoded for this stage's
    layers and replayed give what replaying the trainer's own recorded routes gives. (Not bit for bit:
    the last position's route, which SGLang does not return, changes how many tokens each expert's
    matmul takes, and with it the rounding of the others.)"""
    assert replay["stage_layers"] == [0, 1]
    mask = replay["response_mask"].bool()
    engine, recorded, free = (replay[k].logprobs[mask] for k in ("engine", "replay", "free"))
    torch.testing.assert_close(engine, recorded, rtol=0, atol=1e-5)
    assert (free - recorded).abs().max() > 0.1  # replay mattered: free routing moves them far more
