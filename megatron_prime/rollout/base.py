"""The one interface every rollout engine implements.

Log-probability convention (all engines, and what the trainer recomputes):
    logprob(y_t) = log_softmax(logits_t / T)[y_t]
i.e. the temperature-scaled distribution *before* any top-k / top-p truncation. At
temperature 0 (greedy) T is taken as 1: log_softmax(logits_t)[y_t]. The trainer never
trusts these numbers for the loss (old log-probs are recomputed by Megatron); they feed
the train/rollout mismatch metric and optional truncated importance sampling.

Stop tokens: a response ends when it samples any of ``SamplingParams.stop_token_ids`` or
the model's end tokens (``end_token_ids``: the tokenizer's eos and the generation config's,
as vLLM and SGLang read them; the trainer passes them as ``stop_token_ids`` to every engine). The stop token is *kept* in ``Response.token_ids`` (with its
log-prob) and ``finish_reason`` is "stop"; hitting ``max_new_tokens`` first gives "length".

Order: ``generate`` returns ``len(prompts) * n`` responses, prompt-major: the n samples of
prompt 0, then the n samples of prompt 1, ...
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import torch


class RolloutError(RuntimeError):
    """An engine failed, died or timed out. The message names the engine and the request,
    so that the trainer's log says what was lost; the trainer may then ``restart()`` the
    engine and push the current policy weights again."""

    def __init__(self, engine: str, request: str, reason: str):
        self.engine = engine
        self.request = request
        self.reason = reason
        super().__init__(f"rollout engine '{engine}' failed on {request}: {reason}")

    def __reduce__(self):  # picklable, so other ranks can raise it too
        return (type(self), (self.engine, self.request, self.reason))


def end_token_ids(model_dir: str, tokenizer) -> tuple[int, ...]:
    """The tokens that end a response of the model in ``model_dir``: the tokenizer's eos and the
    generation config's ``eos_token_id`` (an id or a list: chat models list their end-of-turn token
    there), from ``generation_config.json``, else ``config.json`` — what vLLM and SGLang stop at."""
    ids = [getattr(tokenizer, "eos_token_id", None)]
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            ids += eos if isinstance(eos, list) else [eos]
            break
    return tuple(sorted({int(t) for t in ids if t is not None}))


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # 1 disables nucleus filtering
    top_k: int = -1  # -1 (or 0) disables top-k filtering
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None  # None: engine-chosen randomness, not reproducible
    # Index of this request's first prompt in the whole batch. Per-sample seeds use the
    # global index, so a batch split over several engines samples exactly what one
    # engine would have sampled for the whole batch.
    prompt_offset: int = 0
    # Return the experts a mixture-of-experts model routed every token to (``Response.routes``);
    # SGLang only (algorithm.replay_engine_routes).
    return_routes: bool = False

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1, 0 or positive, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.prompt_offset < 0:
            raise ValueError(f"SamplingParams.prompt_offset must be >= 0, got {self.prompt_offset}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def seed_of(self, prompt_index: int, sample_index: int) -> int | None:
        """The seed of sample ``sample_index`` of this request's prompt ``prompt_index``."""
        if self.seed is None:
            return None
        return sample_seed(self.seed, self.prompt_offset + prompt_index, sample_index)


@dataclass
class Response:
    prompt_index: int
    token_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: list[float]
    # With ``SamplingParams.return_routes``: the experts of every position of prompt + response but the
    # last, as SGLang returns them (base64 of int32 [positions, layers, top-k]); None otherwise.
    routes: str | None = None


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A distinct, stable 63-bit seed per (request seed, prompt, sample).

    Engines that seed each sequence separately (SGLang's ``sampling_seed``, vLLM's
    ``seed``) get independent streams per sample instead of one seed shared by all of
    them, which would correlate samples of different prompts."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def describe_request(prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> str:
    """Short human description of a generate request, for error messages."""
    lengths = [len(p) for p in prompts]
    span = f"{min(lengths)}..{max(lengths)}" if lengths else "-"
    return (
        f"generate({len(prompts)} prompts, prompt tokens {span}, n={sampling.n}, "
        f"max_new_tokens={sampling.max_new_tokens}, T={sampling.temperature}, seed={sampling.seed})"
    )


def check_prompts(engine: str, prompts: Sequence[Sequence[int]]) -> None:
    if any(len(p) == 0 for p in prompts):
        raise RolloutError(engine, f"generate({len(prompts)} prompts)", "empty prompt (no token ids)")


# What ``wake(tags)`` can restore separately: weights first (to receive an update while the
# training state is still on the GPU), the KV cache once training state is offloaded.
MEMORY_TAGS = ("weights", "kv_cache")


class RolloutEngine(abc.ABC):
    """Generate responses with the current policy and receive new policy weights.

    Lifecycle in a PRIME step: ``wake(["weights"])`` -> ``update_weights(bridge.export())``
    -> ``wake(["kv_cache"])`` -> ``generate(...)`` -> ``sleep()`` while Megatron trains.
    ``restart()`` rebuilds a dead engine; the caller must push the current weights again
    afterwards.

    An engine may span several trainer ranks (its group, e.g. one rank per GPU of a TP=2
    engine). ``update_weights``/``sleep``/``wake``/``restart``/``shutdown`` are then called
    on every rank of the group, each with the full tensors; ``generate`` on the group's
    first rank only, or on every rank of the group (same prompts) when
    ``generate_on_every_group_rank`` is set (vLLM's SPMD external launcher). When
    ``restarts_together`` is true the engines of every group form one collective (vLLM's
    data-parallel replicas under the external launcher): a failure restarts them all, and an engine
    with nothing to generate still joins a round with an empty request."""

    name: str = "engine"
    generate_on_every_group_rank: bool = False
    restarts_together: bool = False

    @abc.abstractmethod
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Response]:
        """``len(prompt_token_ids) * sampling.n`` responses in prompt-major order."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Consume a stream of ``(hf_name, full_tensor)`` pairs (the bridge's export)."""

    def update_adapter(self, tensors: dict[str, torch.Tensor], peft_config: dict) -> None:
        """Replace the policy's LoRA adapter (shared-base LoRA, ``rollout.lora_sync=adapter``): PEFT's
        tensor names (``base_model.model.<module>.lora_A.weight``) and ``adapter_config.json``
        contents; later ``generate`` calls use it on the base weights the engine loaded. Only
        engines started with LoRA take it."""
        raise RolloutError(self.name, "update_adapter", "this engine takes full weights only (rollout.lora_sync=merged)")

    @abc.abstractmethod
    def sleep(self) -> None:
        """Release the engine's accelerator memory (weights and KV cache)."""

    @abc.abstractmethod
    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Restore what ``sleep()`` released: ``tags`` from ``MEMORY_TAGS`` (None: all, weights
        first)."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the engine and free everything; the object is unusable afterwards."""

    def restart(self) -> None:
        """Rebuild the engine after a failure. Weights come back as the engine loads them
        at start (the checkpoint on disk), so call ``update_weights`` after this."""
        raise NotImplementedError(f"{type(self).__name__} cannot restart")
