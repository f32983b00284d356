"""Rollout checks that need a GPU (skipped without CUDA): the hf engine on CUDA, and the
CUDA-IPC payload the colocated SGLang engine builds, opened in another process the way
SGLang's TP worker opens it (needs the sglang package importable; skipped otherwise)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_prime.rollout import SamplingParams
from megatron_prime.rollout.hf_engine import HFEngine
from tests.rollout.test_hf_engine import PROMPTS, full_forward_logprobs, tiny_qwen2

pytestmark = pytest.mark.gpu

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_hf_engine_on_cuda_matches_cpu_sleeps_and_updates_while_asleep():
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = HFEngine(tiny_qwen2(0))
    gpu = HFEngine(tiny_qwen2(0), device="cuda")
    for sp in (SamplingParams(temperature=0.0, max_new_tokens=12), SamplingParams(n=2, max_new_tokens=12, seed=4)):
        want, got = cpu.generate(PROMPTS, sp), gpu.generate(PROMPTS, sp)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        for a, b in zip(got, want):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)

    awake = torch.cuda.memory_allocated()
    gpu.sleep()
    assert torch.cuda.memory_allocated() < awake - 100_000  # the weights left the GPU
    other = tiny_qwen2(1)
    gpu.update_weights(((n, t) for n, t in other.state_dict().items() if n != "lm_head.weight"), strict=True)
    gpu.wake()
    assert next(gpu.model.parameters()).is_cuda
    sp = SamplingParams(temperature=0.0, max_new_tokens=12)
    assert [r.token_ids for r in gpu.generate(PROMPTS, sp)] == [r.token_ids for r in HFEngine(other).generate(PROMPTS, sp)]

    bf16 = HFEngine(tiny_qwen2(0), device="cuda", dtype=torch.bfloat16)
    model32 = tiny_qwen2(0).to(torch.bfloat16).float()  # the same rounded weights, in fp32
    for r in bf16.generate(PROMPTS, SamplingParams(n=2, temperature=0.9, max_new_tokens=10, seed=8)):
        expected = full_forward_logprobs(model32, PROMPTS[r.prompt_index], r.token_ids, 0.9)
        torch.testing.assert_close(torch.tensor(r.logprobs), expected, atol=0.1, rtol=0)


def _open_payload(payload: str, names: list[str], sums: list[float], result_queue) -> None:
    """What an SGLang TP worker does with its payload (tp_worker.deserialize_own_rank and
    weight_updater._update_weights_from_flattened_bucket), then compares the tensors."""
    try:
        from sglang.srt.utils.common import MultiprocessingSerializer, normalize_serialized_named_tensor_payloads
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

        monkey_patch_torch_reductions()
        data = MultiprocessingSerializer.deserialize(normalize_serialized_named_tensor_payloads([payload])[0])
        bucket = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=data["metadata"])
        got = bucket.reconstruct_tensors()
        ok = [n for n, _ in got] == names and all(
            t.is_cuda and abs(t.float().sum().item() - s) < 1e-3 for (_, t), s in zip(got, sums)
        )
        result_queue.put("ok" if ok else f"mismatch: {[(n, t.float().sum().item()) for n, t in got]} vs {sums}")
    except Exception as exc:  # report to the parent instead of dying silently
        result_queue.put(repr(exc))


@cuda
@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs sglang")
def test_sglang_bucket_payload_opens_in_another_process_via_cuda_ipc():
    from megatron_prime.rollout.sglang_engine import serialize_bucket
    from megatron_prime.rollout.weight_buckets import iter_buckets

    stream = [
        ("model.layers.0.mlp.up_proj.weight", torch.randn(256, 64, dtype=torch.bfloat16, device="cuda")),
        ("model.norm.weight", torch.randn(64, dtype=torch.bfloat16, device="cuda")),
        ("model.embed_tokens.weight", torch.randn(96, 64)),  # fp32 on CPU: staged to GPU
    ]
    buckets = list(iter_buckets(stream, bucket_bytes=1 << 20))
    assert len(buckets) == 2  # bf16 and fp32 travel apart
    ctx = torch.multiprocessing.get_context("spawn")
    for bucket in buckets:
        flat, payload = serialize_bucket(bucket)
        assert isinstance(payload, str)
        queue = ctx.Queue()
        proc = ctx.Process(
            target=_open_payload,
            args=(payload, [n for n, _ in bucket], [t.float().sum().item() for _, t in bucket], queue),
        )
        proc.start()
        result = queue.get(timeout=300)
        proc.join(timeout=60)
        assert result == "ok", result
        del flat
