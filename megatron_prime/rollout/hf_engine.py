"""Rollout engine on a plain ``transformers`` causal LM: the CPU demo's engine and every
CPU test's. Also usable on one GPU for debugging.

Decoding is our own loop (not ``model.generate``) so that we control exactly what the
trainer depends on: the log-prob convention, stop handling, per-sequence seeding, and
in-place weight updates. Prompts are left-padded into a batch; the attention mask hides
the pads and position ids count only real tokens, so a padded row computes what the same
prompt computes alone. A ``DynamicCache`` holds keys/values between steps.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import random
import re
from typing import Iterable, Sequence

import torch

from .base import (
    Response,
    RolloutEngine,
    RolloutError,
    SamplingParams,
    check_prompts,
    describe_request,
)
from .sampling import choose_tokens

# one expert's projection in a checkpoint: Qwen3-MoE (gate/up/down_proj) and Mixtral (w1/w3/w2)
_CHECKPOINT_EXPERT = re.compile(
    r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")


class HFEngine(RolloutEngine):
    """``HFEngine(model_dir_or_model, device="cpu", dtype=torch.float32, tokenizer=None,
    max_batch_size=64, eos_token_ids=None)``.

    ``model_dir_or_model``: a Hugging Face checkpoint directory or an already built
    ``PreTrainedModel`` (used as is, moved to ``device``/``dtype``).
    ``tokenizer``: used for ``Response.text`` and its eos; loaded from the directory when
    omitted and present there; without one, ``text`` is "".
    ``eos_token_ids``: tokens that always stop a response; default: the tokenizer's eos and the
    model's generation config eos (``base.end_token_ids``, as vLLM and SGLang).
    """

    name = "hf"

    def __init__(
        self,
        model_dir_or_model,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        tokenizer=None,
        max_batch_size: int = 64,
        eos_token_ids: Iterable[int] | None = None,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self._source = model_dir_or_model
        self.tokenizer = tokenizer
        self._eos_override = None if eos_token_ids is None else tuple(int(t) for t in eos_token_ids)
        self._asleep = False
        self._load()

    # ---- construction ---------------------------------------------------------------

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = self._source
        if isinstance(source, (str, os.PathLike)):
            model = AutoModelForCausalLM.from_pretrained(str(source))
            has_tokenizer = any(
                os.path.exists(os.path.join(source, f)) for f in ("tokenizer.json", "tokenizer_config.json")
            )
            if self.tokenizer is None and has_tokenizer:
                self.tokenizer = AutoTokenizer.from_pretrained(str(source))
        else:
            model = source
        # Casting after loading works the same on every transformers version (the
        # from_pretrained dtype keyword was renamed in 4.56).
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.eos_token_ids = self._eos_override if self._eos_override is not None else self._default_eos()
        forward_params = inspect.signature(self.model.forward).parameters
        # transformers 5.x renamed `past_key_values` to `cache` (old name deprecated,
        # removed in 5.40); 4.x only knows `past_key_values`.
        self._cache_kw = "cache" if "cache" in forward_params else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in forward_params), None)
        # Every name a weight can be addressed by, tied aliases included (lm_head.weight
        # is the embedding's Parameter when embeddings are tied).
        self._params = dict(self.model.named_parameters(remove_duplicate=False))

    def _default_eos(self) -> tuple[int, ...]:
        # transformers fills the generation config from generation_config.json, else config.json
        config = getattr(self.model, "generation_config", None) or self.model.config
        ids = [getattr(self.tokenizer, "eos_token_id", None)]
        eos = getattr(config, "eos_token_id", None)
        ids += list(eos) if isinstance(eos, (list, tuple)) else [eos]
        return tuple(sorted({int(t) for t in ids if t is not None}))

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # transformers < 4.56 has no config argument
            return DynamicCache()

    # ---- generation -------------------------------------------------------------------

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Response]:
        check_prompts(self.name, prompt_token_ids)
        if self._asleep:
            raise RolloutError(self.name, describe_request(prompt_token_ids, sampling), "engine is asleep; call wake()")
        if sampling.seed is None:  # unseeded: fresh randomness, still one stream per sample
            sampling = dataclasses.replace(sampling, seed=random.SystemRandom().getrandbits(62))
        rows = [(p, j) for p in range(len(prompt_token_ids)) for j in range(sampling.n)]
        # Batching order does not change any sequence (per-sequence generators), so
        # group rows of similar prompt length to waste less compute on padding.
        order = sorted(range(len(rows)), key=lambda r: len(prompt_token_ids[rows[r][0]]))
        results: list[Response | None] = [None] * len(rows)
        try:
            for start in range(0, len(order), self.max_batch_size):
                chunk = order[start : start + self.max_batch_size]
                prompts = [prompt_token_ids[rows[r][0]] for r in chunk]
                seeds = [sampling.seed_of(*rows[r]) for r in chunk]
                for r, (tokens, logprobs, reason) in zip(chunk, self._generate_batch(prompts, seeds, sampling)):
                    results[r] = Response(rows[r][0], tokens, self._decode(tokens), reason, logprobs)
        except RolloutError:
            raise
        except Exception as exc:  # the request is lost; say which one and why
            raise RolloutError(self.name, describe_request(prompt_token_ids, sampling), repr(exc)) from exc
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], seeds: list[int], sp: SamplingParams):
        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's last token is at -1
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = None
        if not sp.greedy:
            generators = [torch.Generator().manual_seed(s) for s in seeds]
        stop_ids = torch.tensor(sorted(set(sp.stop_token_ids) | set(self.eos_token_ids)), dtype=torch.long)

        cache = self._new_cache()
        out_tokens = [[] for _ in range(batch)]
        out_logprobs = [[] for _ in range(batch)]
        reasons: list[str | None] = [None] * batch
        live = list(range(batch))
        step_ids, step_pos = ids, positions
        for _ in range(sp.max_new_tokens):
            logits = self._forward(step_ids, mask, step_pos, cache)
            gens = [generators[i] for i in live] if generators is not None else None
            tokens, logprobs = choose_tokens(logits[live], sp.temperature, sp.top_k, sp.top_p, gens)
            tokens_cpu, logprobs_cpu = tokens.cpu(), logprobs.cpu()
            next_ids = torch.zeros(batch, dtype=torch.long)  # finished rows feed a dummy token
            for i, t, lp in zip(live, tokens_cpu.tolist(), logprobs_cpu.tolist()):
                out_tokens[i].append(t)
                out_logprobs[i].append(lp)
                next_ids[i] = t
            hit_stop = torch.isin(tokens_cpu, stop_ids).tolist()
            for i, stopped in zip(list(live), hit_stop):
                if stopped:
                    reasons[i] = "stop"
                    live.remove(i)
            if not live:
                break
            # Finished rows stay in the batch (their outputs are ignored) so the cache keeps
            # one shape; the mask still grows for them, which is harmless.
            step_ids = next_ids.unsqueeze(-1).to(self.device)
            step_pos = positions[:, -1:] + 1
            positions = step_pos
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=mask.device)], dim=-1)
        return [(out_tokens[i], out_logprobs[i], reasons[i] or "length") for i in range(batch)]

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if self._keep_kw is not None:
            kwargs[self._keep_kw] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -1, :]

    def _decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ---- weights and memory -------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], strict: bool = False) -> None:
        """Copy each ``(hf_name, tensor)`` into the matching parameter in place (the model
        object, its parameters and any references to them survive). Unknown names and
        shape mismatches raise ``ValueError`` at that tensor; tensors before it are
        already applied. ``strict=True`` also checks, at the end, that every parameter of
        the model was written (tied aliases count once)."""
        written: set[int] = set()
        for name, tensor in named_tensors:
            param, place = self._place_of(name)
            if param is None:
                raise ValueError(
                    f"hf engine: update_weights got unknown parameter '{name}' "
                    f"(model has {len(self._params)} names, e.g. {sorted(self._params)[:3]})"
                )
            if tuple(tensor.shape) != tuple(place.shape):
                raise ValueError(
                    f"hf engine: update_weights shape mismatch for '{name}': "
                    f"model has {tuple(place.shape)}, got {tuple(tensor.shape)}"
                )
            place.copy_(tensor)  # casts dtype and crosses devices as needed
            written.add(id(param))
        if strict:
            missing = sorted(
                n for n, p in self.model.named_parameters() if id(p) not in written
            )
            if missing:
                raise ValueError(
                    f"hf engine: update_weights(strict=True) left {len(missing)} parameters "
                    f"unwritten: {missing[:10]}{' ...' if len(missing) > 10 else ''}"
                )

    def _place_of(self, name: str):
        """(parameter, the view of it that checkpoint tensor ``name`` fills). transformers holds a
        mixture-of-experts layer's experts fused in memory (``mlp.experts.gate_up_proj``
        ``[E, 2I, H]``, gate first, and ``mlp.experts.down_proj`` ``[E, H, I]``; Mixtral's
        ``block_sparse_moe`` renamed ``mlp``) while checkpoints hold one tensor per expert."""
        param = self._params.get(name)
        if param is not None:
            return param, param.data
        match = _CHECKPOINT_EXPERT.match(name)
        if match:
            layer, expert, part = match.group(1), int(match.group(2)), match.group(3)
            fused = self._params.get(f"{layer}.mlp.experts.{'down_proj' if part in ('down_proj', 'w2') else 'gate_up_proj'}")
            if fused is None:
                return None, None
            view = fused.data[expert]
            if part in ("gate_proj", "w1", "up_proj", "w3"):
                half = view.shape[0] // 2
                view = view[:half] if part in ("gate_proj", "w1") else view[half:]
            return fused, view
        renamed = name.replace(".block_sparse_moe.gate.", ".mlp.gate.")
        param = self._params.get(renamed) if renamed != name else None
        return (param, param.data) if param is not None else (None, None)

    def sleep(self) -> None:
        """On CUDA: move the weights to CPU and return cached blocks to the driver (the KV
        cache lives only inside ``generate``, so nothing else holds memory). On CPU there is
        nothing to release: only the asleep flag is set."""
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._asleep = True

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Weights come back with "weights" (or all); there is no KV cache to restore: it
        lives only inside ``generate``. Generation needs the weights back."""
        if tags is None or "weights" in tags:
            if self.device.type == "cuda":
                self.model.to(self.device)
            self._asleep = False

    def shutdown(self) -> None:
        self.model = None
        self._params = {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def restart(self) -> None:
        """Rebuild from the original source (reloaded from disk for a directory; a model
        object given at construction is reused as is)."""
        self._asleep = False
        self._load()
