"""The mathematics of PRIME (Cui et al. 2025, arXiv 2502.01456) as pure, vectorised tensor functions.

Imports only torch: no process groups, no I/O, no Megatron. Tensors are ``[batch, response_len]``
with a 0/1 ``mask``; the K responses of one prompt are adjacent rows (``group_size=K``).
"""

from megatron_prime.algorithm.advantages import (
    ADVANTAGE_ESTIMATORS,
    OUTCOME_ONLY_ESTIMATORS,
    PROCESS_RETURNS,
    compute_advantages,
    grpo_advantages,
    min_form_returns,
    normalize_by_max_return,
    prime_official_advantages,
    prime_rloo_advantages,
    process_returns,
    reinforce_advantages,
    reinforce_pp_advantages,
    reinforce_returns,
    rloo_advantages,
)
from megatron_prime.algorithm.credit import advantage_flips
from megatron_prime.algorithm.filtering import PromptBuffer, filter_groups
from megatron_prime.algorithm.fusion import set_kernel_fusion
from megatron_prime.algorithm.masked_ops import discounted_reverse_cumsum, leave_one_out_mean, masked_whiten
from megatron_prime.algorithm.metrics import accumulate_metrics, metric, metric_means
from megatron_prime.algorithm.policy_loss import KL_ESTIMATORS, kl_penalty, policy_loss
from megatron_prime.algorithm.rewards import implicit_process_rewards, prm_loss
from megatron_prime.algorithm.rollout_correction import ROLLOUT_CORRECTIONS, rollout_correction_weights

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "OUTCOME_ONLY_ESTIMATORS",
    "PROCESS_RETURNS",
    "ROLLOUT_CORRECTIONS",
    "PromptBuffer",
    "accumulate_metrics",
    "advantage_flips",
    "compute_advantages",
    "discounted_reverse_cumsum",
    "filter_groups",
    "grpo_advantages",
    "implicit_process_rewards",
    "kl_penalty",
    "leave_one_out_mean",
    "masked_whiten",
    "metric",
    "metric_means",
    "min_form_returns",
    "normalize_by_max_return",
    "policy_loss",
    "prime_official_advantages",
    "prime_rloo_advantages",
    "process_returns",
    "prm_loss",
    "reinforce_advantages",
    "reinforce_pp_advantages",
    "reinforce_returns",
    "rloo_advantages",
    "rollout_correction_weights",
    "set_kernel_fusion",
]
