"""The real vLLM engine (the registry's CPU build, fp32, a tiny Qwen2 with head_dim 32 and a tied
output layer) on two real gloo ranks, against the Megatron policy the trainer would feed it.

* One engine over both ranks (tp=2, vLLM's external launcher) starts from *other* weights; the
  policy is built at TP=2 and streamed in with ``update_weights`` (the bridge's buckets). Then
  vLLM's prompt log-probs equal Megatron's on every position (<= 1e-4) and greedy decoding equals
  Megatron's greedy decoding (full recompute). The same again from a PP=2 policy of other weights.
* The engine alone: ``n`` samples per prompt in prompt order, the same seed gives the same
  samples (another seed other ones), finish reasons say what ended each response, and every
  sampled token's log-prob equals the Megatron policy's ``log_softmax(logits / T)`` (<= 1e-4;
  T = 1 for greedy).
* ``restart()`` leaves nothing behind: the trainer's process group still works, the restarted
  engine holds the checkpoint's weights again and takes a new sync. Starting the engine leaves
  the trainer's random generators, thread count and ``torch.set_num_threads`` as they were.
* Two engines (tp=1 each, vLLM data-parallel replicas) with uneven shards, one of them empty,
  sample what the tp=2 engine samples for the same global prompt indices.

Everything runs in one launched process group; the engine starts three times in all.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import megatron_greedy, megatron_logprobs, run_distributed, vllm_prompt_logprobs

pytestmark = [pytest.mark.multi_rank, pytest.mark.slow]

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup.sh installs its CPU build)")

PROMPTS = [[2, 5, 6, 7, 8, 9], [2, 10, 11, 12], [2, 13, 14, 15, 16, 17, 18, 19, 20, 5], [2, 6]]
NEW_TOKENS = 6
SAMPLES = 3
TEMPERATURE = 0.7


def _megatron_greedy(model, vocab, prompts, new_tokens, eos):
    """Megatron's greedy tokens, each row cut after its first eos."""
    out, _ = megatron_greedy(model, vocab, prompts, new_tokens)
    return [new[: new.index(eos) + 1] if eos in new else new for new in out]


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def _checks(rank, world_size, fixture, policy_dirs):
    import random

    import numpy
    import torch.distributed as dist

    from megatron_prime.bridge.convert import build_from_hf
    from megatron_prime.bridge.transfer import iter_hf_tensors
    from megatron_prime.platform import distributed
    from megatron_prime.rollout.base import SamplingParams
    from megatron_prime.rollout.vllm_engine import VLLMEngine

    out = {}
    eos = 1  # the toy tokenizer's <eos>

    # Starting the engine must not change what the trainer sees.
    random.seed(3), numpy.random.seed(3), torch.manual_seed(3)
    before = (random.getstate(), numpy.random.get_state()[1].copy(), torch.get_rng_state(), torch.get_num_threads(),
              torch.set_num_threads)
    engine = VLLMEngine(fixture["prm_hf"], tp_size=2, seed=0, dtype="float32", enforce_eager=True, max_model_len=64)
    after = (random.getstate(), numpy.random.get_state()[1], torch.get_rng_state(), torch.get_num_threads(),
             torch.set_num_threads)
    out["state_kept"] = [before[0] == after[0], bool((before[1] == after[1]).all()), torch.equal(before[2], after[2]),
                         before[3] == after[3], before[4] is after[4]]
    out["sleep_mode"] = engine.sleep_mode
    out["stale_logprobs"] = vllm_prompt_logprobs(engine, PROMPTS)

    results = {}
    for (tp, pp), hf_dir in zip([(2, 1), (1, 2)], policy_dirs):
        distributed.init_model_parallel(tp=tp, pp=pp)
        model, arch = build_from_hf(hf_dir)
        r = {"megatron": megatron_logprobs(model, arch.vocab_size, PROMPTS)}
        r["before_sync"] = _max_diff(vllm_prompt_logprobs(engine, PROMPTS), r["megatron"])
        engine.sleep(), engine.wake(["weights"])  # what the fleet does around a sync (no-ops on CPU)
        engine.update_weights(iter_hf_tensors(model, arch, bucket_bytes=40_000, to_all_ranks=True))
        engine.wake(["kv_cache"])
        r["after_sync"] = _max_diff(vllm_prompt_logprobs(engine, PROMPTS), r["megatron"])
        greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS))
        r["greedy"] = [g.token_ids for g in greedy]
        r["megatron_greedy"] = _megatron_greedy(model, arch.vocab_size, PROMPTS, NEW_TOKENS, eos)
        # Greedy log-probs follow the convention with T = 1.
        r["greedy_logprob_diff"] = _max_diff(
            [g.logprobs for g in greedy],
            [lp[len(p) - 1:] for lp, p in zip(megatron_logprobs(model, arch.vocab_size, [p + g.token_ids for p, g in
                                                                                             zip(PROMPTS, greedy)]),
                                              PROMPTS)])
        results[(tp, pp)] = r
    out["layouts"] = results

    # The engine alone (holding the PP=2 policy's weights; ``model`` is that policy).
    stop = (3, 4, 7, 9, 12, 15)
    sampling = SamplingParams(n=SAMPLES, temperature=TEMPERATURE, max_new_tokens=NEW_TOKENS, stop_token_ids=stop,
                              seed=11)
    first = engine.generate(PROMPTS, sampling)
    again = engine.generate(PROMPTS, sampling)
    other = engine.generate(PROMPTS, SamplingParams(**{**vars(sampling), "seed": 12}))
    out["prompt_order"] = [r.prompt_index for r in first]
    out["samples"] = [r.token_ids for r in first]
    out["samples_again"] = [r.token_ids for r in again]
    out["samples_other_seed"] = [r.token_ids for r in other]
    out["finish"] = [(r.finish_reason, r.token_ids) for r in first]
    out["stop"] = stop + (eos,)
    seqs = [PROMPTS[r.prompt_index] + r.token_ids for r in first]
    megatron = megatron_logprobs(model, arch.vocab_size, seqs, TEMPERATURE)
    out["sampled_logprob_diff"] = _max_diff([r.logprobs for r in first],
                                            [m[len(PROMPTS[r.prompt_index]) - 1:] for m, r in zip(megatron, first)])

    # Restart: nothing dangling. The trainer's world still works, the engine is back at the
    # checkpoint's weights and takes a sync again.
    engine.restart()
    probe = torch.ones(1)
    dist.all_reduce(probe)
    out["world_after_restart"] = probe.item()
    out["restarted_vs_stale"] = _max_diff(vllm_prompt_logprobs(engine, PROMPTS), out["stale_logprobs"])
    engine.update_weights(iter_hf_tensors(model, arch, to_all_ranks=True))
    out["restarted_after_sync"] = _max_diff(vllm_prompt_logprobs(engine, PROMPTS), results[(1, 2)]["megatron"])
    engine.shutdown()

    # Two engines (tp=1, data-parallel replicas), uneven shards: rank 0 takes prompts 0..2 and
    # rank 1 prompt 3, then rank 1 nothing. Same seeds by global prompt index as the tp=2 engine.
    engine = VLLMEngine(fixture["prm_hf"], tp_size=1, seed=0, dtype="float32", enforce_eager=True, max_model_len=64)
    engine.update_weights(iter_hf_tensors(model, arch, to_all_ranks=True))
    shard, offset = (PROMPTS[:3], 0) if rank == 0 else (PROMPTS[3:], 3)
    mine = engine.generate(shard, SamplingParams(**{**vars(sampling), "prompt_offset": offset}))
    gathered = [None] * world_size
    dist.all_gather_object(gathered, [r.token_ids for r in mine])
    out["two_engines"] = gathered[0] + gathered[1]
    part = PROMPTS[:2] if rank == 0 else []
    uneven = engine.generate(part, sampling)
    out["empty_shard"] = len(uneven)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, [r.token_ids for r in uneven])
    out["uneven"] = gathered[0]
    engine.shutdown()
    probe = torch.ones(1)
    dist.all_reduce(probe)
    out["world_after_shutdown"] = probe.item()
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import os

    from tests.helpers import make_vllm_trainer_fixture as make
    from tests.helpers import vllm_tp_engines_one_at_a_time

    root = str(tmp_path_factory.mktemp("rollout_vllm"))
    fixture = make(root, tied=True)  # tied output layer: the case vLLM's reload alone leaves stale on CPU
    # Two more policies of other weights: the engine starts from prm_hf, the TP=2 policy is hf,
    # the PP=2 policy a third model, so each sync must overwrite every tensor.
    third = make(os.path.join(root, "third"), seed=1, tied=True)
    with vllm_tp_engines_one_at_a_time():
        return run_distributed(_checks, fixture, [fixture["hf"], third["hf"]], world_size=2)


def test_starting_the_engine_keeps_the_trainers_rng_and_threads(run):
    assert run["state_kept"] == [True] * 5
    assert run["sleep_mode"] is False  # CPU: vLLM has no sleep mode; sleep()/wake() were no-ops


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_prompt_logprobs_match_megatron_after_sync(run, layout):
    r = run["layouts"][layout]
    assert r["before_sync"] > 0.1  # the engine started from other weights
    assert r["after_sync"] <= 1e-4


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_greedy_matches_megatron_greedy_after_sync(run, layout):
    r = run["layouts"][layout]
    assert r["greedy"] == r["megatron_greedy"]
    assert r["greedy_logprob_diff"] <= 1e-4


def test_n_samples_per_prompt_in_prompt_order(run):
    assert run["prompt_order"] == [p for p in range(len(PROMPTS)) for _ in range(SAMPLES)]


def test_seeded_samples_reproduce(run):
    assert run["samples_again"] == run["samples"]
    assert run["samples_other_seed"] != run["samples"]
    # The n samples of one prompt are not copies of each other.
    assert any(len({tuple(s) for s in run["samples"][p * SAMPLES:(p + 1) * SAMPLES]}) > 1 for p in range(len(PROMPTS)))


def test_finish_reasons(run):
    stop = set(run["stop"])
    reasons = set()
    for reason, tokens in run["finish"]:
        reasons.add(reason)
        if reason == "stop":  # ends with its stop token, kept, and none before it
            assert tokens[-1] in stop and not stop & set(tokens[:-1])
        else:
            assert reason == "length" and len(tokens) == NEW_TOKENS and not stop & set(tokens)
    assert reasons == {"stop", "length"}


def test_sampled_logprobs_match_megatron(run):
    assert run["sampled_logprob_diff"] <= 1e-4


def test_restart_leaves_nothing_dangling(run):
    assert run["world_after_restart"] == 2.0
    assert run["restarted_vs_stale"] <= 1e-5  # back at the checkpoint's weights
    assert run["restarted_after_sync"] <= 1e-4
    assert run["world_after_shutdown"] == 2.0


def test_two_tp1_engines_sample_what_one_tp2_engine_samples(run):
    assert run["two_engines"] == run["samples"]
    assert run["uneven"] == run["samples"][: 2 * SAMPLES]
