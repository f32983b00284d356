"""What the tests share: running a function on real gloo ranks, tiny Hugging Face models written
to disk, what a Megatron policy itself says about token sequences, and a tiny trainer setup.

* ``run_distributed``: launch ``fn(rank, world_size, *args)`` on N real gloo ranks
  (torch.multiprocessing spawn). Starting processes costs seconds (imports), so put many checks
  into one launched function. Whatever rank 0 returns is handed back (it must be picklable).
* ``make_tiny_hf``: tiny random HF models (no download) whose logits are O(1).
* ``megatron_logprobs`` / ``megatron_greedy``: full-recompute references for the rollout engines.
* ``make_trainer_fixture`` / ``overrides``: the toy tokenizer, a small random Qwen2 and prompt files.
  Random models almost never solve arithmetic, so the RL prompts use a test verifier that rewards
  responses containing a "7": outcomes are mixed from the first step, the accuracy filter keeps
  groups and the advantages are not trivially zero.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

from megatron_prime.platform.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


# ---- real gloo ranks --------------------------------------------------------------------------------

def _worker(rank, world_size, port, result_path, backend, fn, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            torch.save(result, result_path)
    except Exception:
        # mp.spawn reports the exception, but print the full rank-tagged trace for humans.
        print(f"[rank {rank}]\n{traceback.format_exc()}", flush=True)
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, *args, world_size: int = 2, backend: str = "gloo", timeout_s: float = 900.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks (gloo, or nccl for GPU tests);
    return rank 0's result. Ranks still running after ``timeout_s`` are killed and the test fails
    (a deadlock must fail the test, not hang the suite)."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.pt")
        context = mp.start_processes(
            _worker,
            args=(world_size, free_port(), result_path, backend, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world_size} ranks still running after "
                                   f"{timeout_s:.0f} s: killed (a deadlock?)")
        if os.path.exists(result_path):
            return torch.load(result_path, weights_only=False)
        return None


# ---- tiny Hugging Face models -----------------------------------------------------------------------

VOCAB = 100  # deliberately not a multiple of the 128-row padding unit

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA, and TP=2 splits the KV groups
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)

FAMILIES = {
    # Llama 3 rope scaling with a short original context so scaling changes the logits.
    "llama": lambda: transformers.LlamaConfig(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        tie_word_embeddings=False,
        **_COMMON,
    ),
    "qwen2": lambda: transformers.Qwen2Config(rope_theta=1000000.0, tie_word_embeddings=False, **_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(head_dim=24, tie_word_embeddings=True, **_COMMON),
}


# Mixture-of-experts bases: 4 experts, 2 per token; Qwen3-MoE with the softmax over all experts
# (norm_topk_prob=false), Mixtral with the k chosen ones renormalised. head_dim 32: vLLM's CPU
# attention refuses 16.
_MOE_COMMON = dict(_COMMON, hidden_size=64, num_attention_heads=2, num_key_value_heads=2, num_experts_per_tok=2)
MOE_FAMILIES = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=48, norm_topk_prob=False,
                                                     head_dim=32, tie_word_embeddings=False, **_MOE_COMMON),
    "mixtral": lambda: transformers.MixtralConfig(num_local_experts=4, tie_word_embeddings=False,
                                                  **{**_MOE_COMMON, "intermediate_size": 48}),
}


def make_tiny_hf(family: str, out_dir: str, seed: int = 0, dtype=torch.float32):
    """Save a random model whose logits are O(1) (weights std 0.2, norms around 1)."""
    torch.manual_seed(seed)
    config = {**FAMILIES, **MOE_FAMILIES}[family]()
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out_dir)
    return model


# ---- what a Megatron policy says --------------------------------------------------------------------

def right_padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of ``seqs`` right-padded with 0 to the longest."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def megatron_logprobs(model, vocab: int, seqs: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
    """log_softmax(logits / T) of each token of ``seqs`` given its prefix (positions 1..)."""
    from megatron_prime.models.forward import full_logits

    ids, mask = right_padded(seqs)
    logprobs = torch.log_softmax(full_logits(model, ids, mask, vocab) / temperature, dim=-1)
    return [[logprobs[i, t - 1, s[t]].item() for t in range(1, len(s))] for i, s in enumerate(seqs)]


def megatron_greedy(model, vocab: int, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy decoding with full recompute: right-padded batch, next token from each row's last
    valid position. Returns the new tokens and the smallest top-1 / top-2 logit gap seen."""
    from megatron_prime.models.forward import full_logits

    seqs = [list(p) for p in prompts]
    min_gap = float("inf")
    for _ in range(new_tokens):
        logits = full_logits(model, *right_padded(seqs), vocab)
        for i, s in enumerate(seqs):
            top2 = logits[i, len(s) - 1].topk(2).values
            min_gap = min(min_gap, (top2[0] - top2[1]).item())
            s.append(int(logits[i, len(s) - 1].argmax()))
    return [s[len(p):] for s, p in zip(seqs, prompts)], min_gap


# ---- a tiny trainer setup ---------------------------------------------------------------------------

CONTAINS7 = "test_contains7"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


# torch.compile (algorithm.compile_kernels) builds C++ kernels on CPU.
requires_cpp_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                                           reason="torch.compile on CPU needs a C++ compiler")


def contains7(response: str, ground_truth: str) -> float:
    return 1.0 if ground_truth in response else 0.0


def register_test_verifier() -> None:
    """Call in every process that loads or scores the test prompts."""
    from megatron_prime.rewards import register_data_source, register_verifier
    from megatron_prime.rewards.registry import known_verifiers

    if CONTAINS7 not in known_verifiers():
        register_verifier(CONTAINS7, contains7)
    register_data_source(CONTAINS7, CONTAINS7)


def make_trainer_fixture(root: str, seed: int = 0, moe: bool = False) -> dict:
    """The toy task's files, the tiny model (``moe``: a Qwen3-MoE of 4 experts, top-2, routed as
    Qwen3-30B-A3B is, its weights drawn with std 0.2 so that routing matters) and a perturbed copy for
    the implicit PRM."""
    import torch
    import transformers

    from megatron_prime.data import build_toy_task

    task = build_toy_task(os.path.join(root, "data"), seed=seed, num_sft=64, num_rl=64, num_eval=16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(task.tokenizer))
    torch.manual_seed(seed)
    special = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if moe:
        config = MOE_FAMILIES["qwen3_moe"]()
        # Qwen3-30B-A3B's routing: the softmax of the k chosen experts' logits
        for key, value in {**special, "max_position_embeddings": 64, "norm_topk_prob": True}.items():
            setattr(config, key, value)
    else:
        config = transformers.Qwen2Config(**special, **TINY)
    hf_dir = os.path.join(root, "hf")
    model = transformers.AutoModelForCausalLM.from_config(config)
    if moe:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0.0, 0.2)
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    # A different starting point for the implicit PRM, so q_t != 0 from the first step.
    prm_dir = os.path.join(root, "prm_hf")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(prm_dir)
    tokenizer.save_pretrained(prm_dir)
    files = {}
    for name, split in (("rl", task.rl), ("eval7", task.eval)):
        files[name] = os.path.join(root, f"{name}_contains7.jsonl")
        with open(files[name], "w") as f:
            for line in open(split):
                row = json.loads(line)
                f.write(json.dumps({"prompt": row["prompt"], "answer": "7", "verifier": CONTAINS7}) + "\n")
    # eval7: the held-out prompts graded by the same test verifier (a random model's greedy
    # accuracy on them is neither 0 nor 1); eval: graded as arithmetic
    return {"hf": hf_dir, "prm_hf": prm_dir, "sft": str(task.sft), "eval": str(task.eval), **files}


def greedy_contains7_accuracy(model_dir: str, eval_file: str, max_new_tokens: int) -> float:
    """The trainer's held-out greedy accuracy on ``eval_file`` worked out independently: transformers'
    own greedy ``generate`` one prompt at a time, stopping at eos, graded by ``contains7``."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [json.loads(line) for line in open(eval_file)]
    correct = 0
    for row in rows:
        ids = torch.tensor([tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        correct += contains7(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), "7")
    return correct / len(rows)


def overrides(fixture: dict, root: str, *extra: str) -> list[str]:
    return [
        f"model.hf_path={fixture['hf']}",
        "model.dtype=fp32",
        f"data.train_files=[{fixture['rl']}]",
        "data.max_prompt_len=16",
        "data.max_response_len=12",
        "train.prompts_per_step=8",
        "train.mini_batch_responses=16",
        "train.micro_batch_tokens=256",
        "train.max_rollout_rounds=3",
        "algorithm.filter_low=0.0",
        "algorithm.filter_high=1.0",
        f"checkpoint.dir={os.path.join(root, 'ckpt')}",
        f"checkpoint.export_dir={os.path.join(root, 'export')}",
        f"logging.dir={os.path.join(root, 'logs')}",
        "logging.progress=false",
        *extra,
    ]


@contextlib.contextmanager
def vllm_tp_engines_one_at_a_time():
    """Hold while a vLLM engine over several ranks may run. vLLM's CPU build names the shared-memory
    segment of a TP group after the launcher's init method, which is "env://" for every in-process
    (external launcher) engine: two such engines on one machine at once fail with EEXIST ("create shm
    in SHMManager failed. errno: 17"). The suite's workers take turns on a lock file."""
    with open(os.path.join(tempfile.gettempdir(), "megatron-prime-vllm-tp.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# head_dim 32 (128 / 4): vLLM's CPU attention refuses head_dim 16 ("Unsupported CPU attention configuration").
VLLM_TINY = dict(TINY, hidden_size=128, intermediate_size=256)


def make_vllm_trainer_fixture(root: str, seed: int = 0, tied: bool = False) -> dict:
    """``make_trainer_fixture``'s files and prompts with a model that vLLM's CPU build runs (head_dim
    32; ``tied``: the output layer is the embedding). Weights are drawn with std 0.2 (norms around
    1), so logits are O(1): a weight sync that did not land, or a stale tensor, moves log-probs by
    far more than the 1e-4 the tests allow."""
    import torch
    import transformers

    fixture = make_trainer_fixture(root, seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(fixture["hf"])
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, **{**VLLM_TINY, "tie_word_embeddings": tied})
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config)
    for target, noise in ((fixture["hf"], 0.0), (fixture["prm_hf"], 0.02)):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if noise:
                    p.add_(noise * torch.randn_like(p))
                elif "norm" in name:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.2)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    return fixture


# ---- a real engine's own log-probs -------------------------------------------------------------------

def vllm_prompt_logprobs(engine, prompt_token_ids: list[list[int]]) -> list[list[float]]:
    """log p(token_i | tokens_<i) for i >= 1 of every sequence, as a ``VLLMEngine`` computes it
    (vLLM's ``prompt_logprobs``, temperature 1): what checks of a weight sync compare."""
    from megatron_prime.rollout.vllm_engine import import_vllm, trainer_state_kept

    params = import_vllm().SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    llm = engine._running(f"prompt_logprobs({len(prompt_token_ids)} sequences)")
    with trainer_state_kept():
        outs = llm.generate(prompts=[{"prompt_token_ids": list(p)} for p in prompt_token_ids],
                            sampling_params=params, use_tqdm=False)
    return [[float(pos[t].logprob) for pos, t in zip(out.prompt_logprobs[1:], ids[1:])]
            for out, ids in zip(outs, prompt_token_ids)]


# ---- a training run's logs, and a trainer run in a process of its own --------------------------------

def run_scalars(run_dir: str) -> dict[int, dict]:
    """``logs/scalars.jsonl`` of a run as {step: its records merged}."""
    rows = {}
    for line in open(os.path.join(run_dir, "logs", "scalars.jsonl")):
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def run_samples(run_dir: str, step: int) -> list[tuple[str, str]]:
    """The (prompt, response) pairs a run logged at ``step``."""
    return [(r["prompt"], r["response"]) for r in map(json.loads, open(os.path.join(run_dir, "logs", "samples.jsonl")))
            if r["step"] == step]


# The trainer, with the rollout engine shut down (as if it had died) before step $KILL_ENGINE_BEFORE_STEP.
TRAIN_KILLING_THE_ENGINE = """
import os, sys
sys.path.insert(0, {root!r})
from tests.helpers import register_test_verifier
from megatron_prime.config import load_config
from megatron_prime.training import trainer

kill_before = int(os.environ.get("KILL_ENGINE_BEFORE_STEP", "-1"))
step = trainer.prime_step

def prime_step(ctx, index):
    if index == kill_before:
        ctx.fleet.engine.shutdown()
    return step(ctx, index)

trainer.prime_step = prime_step
if __name__ == "__main__":
    register_test_verifier()
    trainer.train(load_config(None, sys.argv[1:]))
"""


def train_in_subprocess(args: list[str], tmp, ranks: int = 1, kill_before: int = -1) -> str:
    """``megatron-prime train`` with ``args`` in a process of its own (``ranks`` > 1: under torchrun);
    its output. ``kill_before``: the rollout engine is shut down before that step."""
    script = os.path.join(tmp, "train.py")
    with open(script, "w") as f:
        f.write(TRAIN_KILLING_THE_ENGINE.format(root=ROOT))
    launcher = [script] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                            str(ranks), script]
    env = dict(os.environ, KILL_ENGINE_BEFORE_STEP=str(kill_before), VLLM_LOGGING_LEVEL="WARNING")
    proc = subprocess.run([sys.executable, *launcher, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.stdout
