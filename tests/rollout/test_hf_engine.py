"""The hf rollout engine on a tiny random Qwen2 (CPU)."""

from __future__ import annotations

import pytest
import torch
import transformers

from megatron_prime.rollout import ENGINES, RolloutError, SamplingParams, build_engine
from megatron_prime.rollout.hf_engine import HFEngine

torch.set_num_threads(2)

PROMPTS = [[5, 9, 13], [2], [7, 3, 3, 8, 1, 4, 6, 11, 12, 40, 41, 42], [20, 21, 22, 23, 24, 25, 26]]


def tiny_qwen2(seed: int, tie: bool = True) -> transformers.Qwen2ForCausalLM:
    """Random weights with std 0.2, so logits are O(1) and weight errors show."""
    config = transformers.Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        eos_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2(0)


@pytest.fixture(scope="module")
def engine(model):
    return HFEngine(model, max_batch_size=16)


def naive_greedy(model, prompt, steps):
    """Full recompute every step, no cache, no padding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def full_forward_logprobs(model, prompt, response, temperature):
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    scaled = logits / (temperature if temperature > 0 else 1.0)
    logp = torch.log_softmax(scaled, dim=-1)[len(prompt) - 1 : -1]
    return logp.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(engine):
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=1234)
    rng_before = torch.get_rng_state()
    first = engine.generate(PROMPTS, sp)
    assert torch.equal(torch.get_rng_state(), rng_before)
    second = engine.generate(PROMPTS, sp)
    assert [r.token_ids for r in first] == [r.token_ids for r in second]
    assert [r.logprobs for r in first] == [r.logprobs for r in second]
    other = engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=99))
    assert [r.token_ids for r in first] != [r.token_ids for r in other]


def test_n_samples_grouped_in_prompt_order_and_independent_of_batching(model, engine):
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=7)
    responses = engine.generate(PROMPTS, sp)
    assert [r.prompt_index for r in responses] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for p in range(len(PROMPTS)):  # the n samples of a prompt are different draws
        group = [tuple(r.token_ids) for r in responses[3 * p : 3 * p + 3]]
        assert len(set(group)) > 1
    # Per-sequence generators: one sequence per batch gives the same samples.
    one_by_one = HFEngine(model, max_batch_size=1).generate(PROMPTS, sp)
    assert [r.token_ids for r in one_by_one] == [r.token_ids for r in responses]


def test_split_request_with_prompt_offset_samples_the_same(engine):
    """A batch cut over engines (each told where its shard starts) samples what one request does."""
    sp = SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=5)
    whole = engine.generate(PROMPTS, sp)
    head = engine.generate(PROMPTS[:1], sp)
    tail = engine.generate(PROMPTS[1:], SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=5,
                                                        prompt_offset=1))
    assert [r.token_ids for r in head + tail] == [r.token_ids for r in whole]
    unshifted = engine.generate(PROMPTS[1:], sp)  # without the offset the shard draws other samples
    assert [r.token_ids for r in unshifted] != [r.token_ids for r in tail]


def test_greedy_matches_naive_full_recompute_loop(model, engine):
    responses = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=15))
    for prompt, response in zip(PROMPTS, responses):
        assert response.token_ids == naive_greedy(model, prompt, 15)
        assert response.finish_reason == "length"


def test_batched_greedy_equals_per_prompt_greedy_with_mixed_lengths(engine):
    sp = SamplingParams(temperature=0.0, max_new_tokens=15)
    batched = engine.generate(PROMPTS, sp)
    for prompt, response in zip(PROMPTS, batched):
        alone = engine.generate([prompt], sp)[0]
        assert response.token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(response.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)


def test_top_k_1_equals_greedy(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12))
    top1 = engine.generate(PROMPTS, SamplingParams(temperature=0.8, top_k=1, max_new_tokens=12, seed=3))
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]


@pytest.mark.parametrize(
    "sp",
    [
        SamplingParams(n=2, temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=12, seed=11),
        SamplingParams(n=2, temperature=1.3, max_new_tokens=12, seed=12),
        SamplingParams(temperature=0.0, max_new_tokens=12),
    ],
)
def test_logprobs_equal_full_forward_log_softmax_of_scaled_logits(model, engine, sp):
    for r in engine.generate(PROMPTS, sp):
        expected = full_forward_logprobs(model, PROMPTS[r.prompt_index], r.token_ids, sp.temperature)
        torch.testing.assert_close(torch.tensor(r.logprobs), expected, atol=1e-5, rtol=0)


def test_stop_tokens_finish_reasons_and_max_new_tokens(model):
    engine = HFEngine(model)
    free = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=20))[0]
    assert len(free.token_ids) == 20 and free.finish_reason == "length"
    stop = free.token_ids[5]
    cut = free.token_ids.index(stop) + 1  # the first occurrence ends the response
    stopped = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=20, stop_token_ids=(stop,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[:cut]  # the stop token is kept ...
    assert stopped.logprobs == pytest.approx(free.logprobs[:cut], abs=1e-6)  # ... with its log-prob
    # The tokenizer's/model's eos counts as a stop token too.
    with_eos = HFEngine(model, eos_token_ids=[stop]).generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=20))[0]
    assert with_eos.token_ids == stopped.token_ids and with_eos.finish_reason == "stop"
    # In a batch, one row stopping early does not disturb the others.
    batch = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=20, stop_token_ids=(stop,)))
    assert batch[0].token_ids == stopped.token_ids
    for prompt, r in zip(PROMPTS[1:], batch[1:]):
        full = naive_greedy(model, prompt, 20)
        expect = full[: full.index(stop) + 1] if stop in full else full
        assert r.token_ids == expect
        assert r.finish_reason == ("stop" if stop in full else "length")
    # No stop token at all (the test model has no eos): every response runs to the limit.
    short = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=3, seed=5))
    assert [(len(r.token_ids), r.finish_reason) for r in short] == [(3, "length")] * 8


def test_update_weights_in_place_makes_outputs_equal_other_model(model):
    other = tiny_qwen2(1)
    engine = HFEngine(tiny_qwen2(0))
    params_before = {n: p for n, p in engine.model.named_parameters()}
    sp_greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    sp_sampled = SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=21)
    reference = HFEngine(other)
    assert engine.generate(PROMPTS, sp_greedy) != reference.generate(PROMPTS, sp_greedy)
    # A tied HF checkpoint has no lm_head.weight; stream it without one, strictly.
    stream = ((n, t.clone()) for n, t in other.state_dict().items() if n != "lm_head.weight")
    engine.update_weights(stream, strict=True)
    assert all(p is params_before[n] for n, p in engine.model.named_parameters())  # same objects
    for sp in (sp_greedy, sp_sampled):
        got, want = engine.generate(PROMPTS, sp), reference.generate(PROMPTS, sp)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert [r.logprobs for r in got] == [r.logprobs for r in want]
    # lm_head.weight is accepted as the tied alias of the embedding.
    engine.update_weights([("lm_head.weight", model.model.embed_tokens.weight.detach().clone())])
    assert torch.equal(engine.model.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_update_weights_errors_are_clear():
    engine = HFEngine(tiny_qwen2(0))
    with pytest.raises(ValueError, match=r"unknown parameter 'model.layers.9.mlp.up_proj.weight'"):
        engine.update_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(128, 64))])
    with pytest.raises(ValueError, match=r"shape mismatch for 'model.norm.weight'.*\(64,\).*\(65,\)"):
        engine.update_weights([("model.norm.weight", torch.zeros(65))])
    with pytest.raises(ValueError, match=r"strict=True\) left 1 parameters unwritten: \['model.norm.weight'\]"):
        state = tiny_qwen2(1).state_dict()
        engine.update_weights(((n, t) for n, t in state.items() if n != "model.norm.weight"), strict=True)
    untied = HFEngine(tiny_qwen2(2, tie=False))
    with pytest.raises(ValueError, match=r"unwritten: \['lm_head.weight'\]"):
        state = tiny_qwen2(3, tie=False).state_dict()
        untied.update_weights(((n, t) for n, t in state.items() if n != "lm_head.weight"), strict=True)


def test_engine_failures_raise_rollout_error_naming_engine_and_request(model):
    engine = HFEngine(model)
    with pytest.raises(RolloutError, match=r"'hf' failed on generate\(2 prompts.*IndexError"):
        engine.generate([[1, 2], [1, 10_000]], SamplingParams(max_new_tokens=2, seed=0))
    engine.sleep()
    with pytest.raises(RolloutError, match=r"'hf' failed on generate\(1 prompts.*asleep"):
        engine.generate([[1]], SamplingParams(max_new_tokens=2))
    engine.wake()
    assert len(engine.generate([[1]], SamplingParams(max_new_tokens=2, seed=0))) == 1
    with pytest.raises(RolloutError, match="empty prompt"):
        engine.generate([[]], SamplingParams())


def test_load_from_directory_and_registry(model, tmp_path):
    model.save_pretrained(tmp_path)
    engine = build_engine("hf", model_dir_or_model=str(tmp_path))
    sp = SamplingParams(temperature=0.0, max_new_tokens=8)
    assert engine.generate(PROMPTS, sp) == HFEngine(model).generate(PROMPTS, sp)
    engine.restart()  # reloads from disk
    assert engine.generate(PROMPTS, sp) == HFEngine(model).generate(PROMPTS, sp)
    with pytest.raises(ValueError, match="unknown rollout engine 'tgi'; known kinds: hf, sglang, sglang-remote, vllm"):
        build_engine("tgi")
    assert set(ENGINES) == {"hf", "sglang", "sglang-remote", "vllm"}


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)
