"""megatron-prime: PRIME (Process Reinforcement through Implicit Rewards) on megatron-core."""

import warnings

# megatron-core warns at import time that optional Apex / Transformer Engine kernels are missing
# and replaced by torch ones; the README documents that both are optional.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed")
# megatron-core 0.16 calls torch.distributed APIs that torch 2.13 deprecates; nothing for users to do.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
warnings.filterwarnings("ignore", message=r"full scope is deprecated")

__version__ = "0.1.0"

from megatron_prime.platform.megatron_import import defer_megatron_kernel_compiles  # noqa: E402

# megatron-core wraps its fused kernels in torch.compile at import, which costs every process that
# imports it 2.5-3 s; compile each on its first call instead (none runs on the CPU path).
defer_megatron_kernel_compiles()
