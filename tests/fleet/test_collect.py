"""The accuracy filter's loop (``collect_groups``) with scripted outcomes: extra rounds, surplus
prompts to the buffer, buffered prompts generated afresh first at the next step, the unfiltered
fill, and the buffer crossing a checkpoint.

The engine is scripted (it answers "1" or "0" per sample, by a table of which prompt is being
generated for the how-many-th time) and a registered verifier turns the answer into the outcome,
so every branch of the loop is reached on purpose. No Megatron: the fleet is one real
``RolloutFleet`` on one rank around the scripted engine.
"""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch

from megatron_prime.algorithm import PromptBuffer
from megatron_prime.config import load_config
from megatron_prime.data import PromptRow, render_prompt
from megatron_prime.rewards import register_verifier
from megatron_prime.rewards.registry import known_verifiers
from megatron_prime.rollout.base import Response, RolloutEngine
from megatron_prime.fleet.collect import collect_groups, collect_groups_on_rank0
from megatron_prime.fleet.fleet import RolloutFleet

SCRIPTED = "test_scripted_answer"
K = 4
NEED = 4  # prompts per step


class ScriptedEngine(RolloutEngine):
    """Answers the n samples of a prompt from ``script[prompt index][how many times generated]``
    (a string of K "1"/"0"), and records every prompt it was asked to generate."""

    name = "scripted"

    def __init__(self, tokenizer, script: dict[int, list[str]]):
        self.tokenizer, self.script = tokenizer, script
        self.generated: list[list[int]] = []  # prompt indices of each generate call
        self.times = Counter()

    def generate(self, prompt_token_ids, sampling):
        indices = [int(self.tokenizer.decode(ids).split("+")[0]) for ids in prompt_token_ids]
        self.generated.append(indices)
        out = []
        for p, index in enumerate(indices):
            answers = self.script[index][self.times[index]]
            self.times[index] += 1
            for answer in answers:
                ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
                out.append(Response(p, ids, answer, "stop", [-0.5] * len(ids)))
        return out

    def update_weights(self, named_tensors):
        raise AssertionError("not used")

    def sleep(self):
        pass

    def wake(self, tags=None):
        pass

    def shutdown(self):
        pass


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import transformers

    from megatron_prime.data import build_toy_task

    if SCRIPTED not in known_verifiers():
        register_verifier(SCRIPTED, lambda response, _truth: float(response == "1"))
    task = build_toy_task(tmp_path_factory.mktemp("toy"), num_sft=1, num_rl=1, num_eval=1)
    return transformers.AutoTokenizer.from_pretrained(str(task.tokenizer))


class Sampler:
    """The dataset's prompts in order, like PromptSampler without the shuffle."""

    def __init__(self, rows):
        self.rows, self.position = rows, 0

    def next_batch(self, size):
        batch = self.rows[self.position:self.position + size]
        self.position += size
        return batch


def rows(n: int) -> list[PromptRow]:
    return [PromptRow(prompt=f"{i}+0=", ground_truth="", verifier=SCRIPTED, data_source=SCRIPTED, index=i)
            for i in range(n)]


PASS, EASY, HARD = "1100", "1111", "0000"  # mean 0.5 is in the band [0.2, 0.8]; 1 and 0 are not


def collect(engine, sampler, buffer, step=0, rounds=3, on_rank0=False):
    """One step's collection: through the fleet (every rank's path), or on rank 0 alone (the one-step-off
    rollouts' path, which must give exactly the same rounds and groups)."""
    cfg = load_config(None, [f"rollout.n={K}", f"train.prompts_per_step={NEED}", f"train.mini_batch_responses={K}",
                             "algorithm.filter_low=0.2", "algorithm.filter_high=0.8",
                             f"train.max_rollout_rounds={rounds}", "data.max_prompt_len=16",
                             "data.max_response_len=4"])
    if on_rank0:
        return collect_groups_on_rank0(engine, (), sampler, buffer, engine.tokenizer, cfg, step, render_prompt,
                                       version=step - 1)
    fleet = RolloutFleet(groups=[[0]], engine=engine, policy=None, arch=None, export_to_all_ranks=True)
    return collect_groups(fleet, sampler, buffer, engine.tokenizer, cfg, step, render_prompt)


def index_of(group) -> int:
    return group.data_index


@pytest.mark.parametrize("on_rank0", [False, True])
def test_extra_rounds_surplus_prompts_to_the_buffer_then_generated_afresh_first(tokenizer, on_rank0):
    script = {
        # round 1: prompts 0-3, two pass; round 2: prompts 4-7, three pass -> 5 kept, 1 surplus
        0: [PASS], 1: [EASY], 2: [PASS], 3: [HARD],
        4: [PASS], 5: [PASS], 6: [HARD], 7: [PASS, PASS],  # 7 is the surplus; next step it passes again
        8: [PASS], 9: [PASS], 10: [PASS],
    }
    engine, sampler, buffer = ScriptedEngine(tokenizer, script), Sampler(rows(11)), PromptBuffer()
    groups, stats = collect(engine, sampler, buffer, on_rank0=on_rank0)
    assert engine.generated == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert {g.policy_version for g in groups} == {-1 if on_rank0 else 0}  # whose weights sampled them
    assert [index_of(g) for g in groups] == [0, 2, 4, 5]
    assert (stats.rounds, stats.sampled_groups, stats.kept_groups, stats.from_buffer) == (2, 8, 5, 0)
    assert stats.unfiltered_fill == 0 and stats.buffer_size == 1
    # The buffer holds the surplus *prompt*, not its sampled responses.
    assert len(buffer) == 1 and isinstance(buffer._items[0], PromptRow) and buffer._items[0].index == 7

    # Next step: the buffered prompt comes first and is generated again by the (new) policy.
    groups, stats = collect(engine, sampler, buffer, step=1, on_rank0=on_rank0)
    assert engine.generated[2] == [7, 8, 9, 10]
    assert [index_of(g) for g in groups] == [7, 8, 9, 10]
    assert engine.times[7] == 2 and stats.from_buffer == 1 and len(buffer) == 0
    assert stats.accuracy_sampled == pytest.approx(0.5)


@pytest.mark.parametrize("on_rank0", [False, True])
def test_unfiltered_fill_uses_this_steps_latest_rejected_groups(tokenizer, on_rank0):
    script = {0: [PASS], 1: [EASY], 2: [HARD], 3: [EASY], 4: [HARD], 5: [EASY], 6: [PASS], 7: [HARD]}
    engine, buffer = ScriptedEngine(tokenizer, script), PromptBuffer()
    groups, stats = collect(engine, Sampler(rows(8)), buffer, rounds=2, on_rank0=on_rank0)
    assert stats.rounds == 2 and stats.kept_groups == 2 and stats.unfiltered_fill == 2
    # kept first (0, 6), then the two most recent rejected groups (5, 7), all from this step
    assert [index_of(g) for g in groups] == [0, 6, 5, 7]
    assert len(buffer) == 0


def test_max_rollout_rounds_below_one_is_refused():
    from megatron_prime.config import ConfigError, validate

    with pytest.raises(ConfigError, match="train.max_rollout_rounds"):
        validate(load_config(None, ["train.max_rollout_rounds=0", "train.prompts_per_step=4",
                                    "train.mini_batch_responses=4"]))


def test_buffer_crossing_a_checkpoint_gives_the_same_next_step(tokenizer):
    script = {i: [PASS, PASS] for i in range(12)}
    script.update({0: [HARD], 1: [PASS], 2: [HARD], 3: [HARD]})  # round 1 keeps one: a second round
    engine, sampler, buffer = ScriptedEngine(tokenizer, script), Sampler(rows(12)), PromptBuffer()
    collect(engine, sampler, buffer)
    assert [r.index for r in buffer._items] == [7]  # 1, 4, 5, 6 kept; 7 is surplus

    blob = io.BytesIO()
    torch.save(buffer.state_dict(), blob)
    blob.seek(0)
    restored = PromptBuffer()
    restored.load_state_dict(torch.load(blob, weights_only=False))

    def next_step(buf):
        twin = ScriptedEngine(tokenizer, script)
        twin.times = Counter(engine.times)
        twin_sampler = Sampler(sampler.rows)
        twin_sampler.position = sampler.position
        groups, _ = collect(twin, twin_sampler, buf, step=1)
        return [(g.data_index, g.texts) for g in groups], twin.generated

    resumed, uninterrupted = next_step(restored), next_step(buffer)
    assert resumed == uninterrupted
    assert resumed[1][0][0] == 7  # the buffered prompt is generated first
