from setuptools import find_packages, setup

setup(
    name="megatron-prime",
    version="0.1.0",
    description="PRIME (Process Reinforcement through Implicit Rewards) trainer on megatron-core",
    packages=find_packages(include=["megatron_prime", "megatron_prime.*"]),
    python_requires=">=3.11",
    install_requires=[
        # Install the CPU build first (`pip install torch==2.13.0`); any torch >= 2.4 works.
        "torch>=2.4",
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
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "sglang==0.5.23", "sglang-router==0.3.2"],  # as tests/test_sglang_contract.py checks
        "vllm": ["vllm"],
        "test": ["pytest", "hypothesis"],
    },
    entry_points={"console_scripts": ["megatron-prime=megatron_prime.cli:main"]},
)
