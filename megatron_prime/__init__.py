"""megatron-prime: PRIME (Process Reinforcement through Implicit Rewards) on megatron-core."""

__version__ = "0.1.0"
