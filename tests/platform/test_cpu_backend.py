import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_prime.platform.distributed import detect_launch_env, expand_slurm_nodelist
from tests.helpers import requires_cpp_compiler


def test_slurm_nodelist_expansion():
    assert expand_slurm_nodelist("gpu[001-003,007],login1") == ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]
    assert expand_slurm_nodelist("node7") == ["node7"]
    assert expand_slurm_nodelist("a[9-11]") == ["a9", "a10", "a11"]


def test_launch_env_from_slurm_and_torchrun():
    env = detect_launch_env({
        "SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
        "SLURM_JOB_NODELIST": "h100-[12-13]", "SLURM_JOB_ID": "4242",
    })
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 16, 5, "h100-12")
    assert env.master_port == 20000 + 4242 and env.launcher == "slurm"
    env = detect_launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                             "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234", "SLURM_PROCID": "9"})
    assert (env.rank, env.master_addr, env.master_port, env.launcher) == (1, "10.0.0.1", 1234, "torchrun")
    assert detect_launch_env({}).launcher == "single"


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour; tests/e2e/test_gpu.py checks the GPU side")
def test_cpu_backend_active_without_cuda():
    out = _run("""
        import torch
        from megatron_prime.platform import cpu_backend
        assert cpu_backend.enable() and cpu_backend.is_active()
        t = torch.zeros(2, device="cuda")
        print(t.device, torch.ones(1).cuda().device, torch.cuda.current_device(), torch.ones(1).type())
    """)
    assert out == "cpu cpu 0 torch.cuda.FloatTensor"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_non_leaf_grad_warning_is_silenced_in_megatrons_optimizer_only():
    """megatron-core's distributed optimizer reads ``.grad`` of its (non-leaf) main parameters on
    every zero_grad (here: on CPU, fp32): that warning must not reach the user, while the same read
    in user code still warns."""
    out = _run("""
        import os, warnings
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(__import__("megatron_prime.platform.distributed",
                          fromlist=["free_port"]).free_port()), RANK="0", WORLD_SIZE="1")
        from megatron_prime.platform import distributed
        distributed.setup()
        import torch
        from megatron_prime.config import OptimizerConfig
        from megatron_prime.models.gpt import ModelOptions
        from megatron_prime.models.hf_config import HFArch
        from megatron_prime.passes.trainable import build_trainable
        arch = HFArch(architecture="Qwen2ForCausalLM", family="qwen2", num_layers=1, hidden_size=32, num_heads=4,
                      num_kv_heads=2, head_dim=8, ffn_hidden_size=64, vocab_size=64, max_position_embeddings=32,
                      rms_norm_eps=1e-6, rope_theta=10000.0)
        model = build_trainable(arch, ModelOptions(), OptimizerConfig(), total_steps=1, distributed_optimizer=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.zero_grad()
            optimizer_warnings = [str(w.message) for w in caught if "not a leaf" in str(w.message)]
            view = torch.ones(2, requires_grad=True) * 2
            view.grad
            user_warnings = [str(w.message) for w in caught if "not a leaf" in str(w.message)]
        print(len(optimizer_warnings), len(user_warnings))
    """)
    assert out.splitlines()[-1] == "0 1"


def test_cpu_backend_inactive_when_cuda_present():
    # Pretend CUDA is available: enable() must not patch torch.cuda or install the mode.
    out = _run("""
        import torch
        torch.cuda.is_available = lambda: True
        original = torch.cuda.current_device
        from megatron_prime.platform import cpu_backend
        print(cpu_backend.enable(), cpu_backend.is_active(), torch.cuda.current_device is original,
              torch.ones(1).type())
    """)
    assert out == "False False True torch.FloatTensor"


@requires_cpp_compiler
def test_megatron_core_imports_without_dynamo_and_its_kernels_still_compile():
    # megatron-core wraps its fused kernels in torch.compile at import; importing dynamo and
    # inductor for that cost every process ~2.5 s. Deferred, a kernel that runs must still compile.
    out = _run("""
        import sys, torch
        import megatron_prime.bridge.convert  # imports megatron.core
        dynamo_at_import = "torch._dynamo" in sys.modules
        from megatron.core.fusions.fused_bias_swiglu import swiglu
        y = torch.randn(4, 8)
        out = swiglu(y)
        from torch._dynamo.utils import counters
        exact = torch.allclose(out, torch.nn.functional.silu(y[:, :4]) * y[:, 4:], atol=1e-6)
        print(dynamo_at_import, counters["stats"]["unique_graphs"], exact)
    """)
    assert out == "False 1 True"
