"""What ``read_hf_config`` refuses in a mixture-of-experts config, each in one line naming the
config file and the field (a config that would build and route differently from transformers
must not get through)."""

from __future__ import annotations

import pytest

from megatron_prime.models.hf_config import ModelConfigError, arch_from_dict

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
              max_position_embeddings=256, tie_word_embeddings=False)
QWEN3_MOE = dict(architectures=["Qwen3MoeForCausalLM"], head_dim=16, intermediate_size=96, num_experts=4,
                 num_experts_per_tok=2, moe_intermediate_size=40, norm_topk_prob=True, **COMMON)
MIXTRAL = dict(architectures=["MixtralForCausalLM"], intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
               **COMMON)


def test_routing_read_from_the_config():
    qwen3 = arch_from_dict(QWEN3_MOE)
    assert (qwen3.num_experts, qwen3.moe_topk, qwen3.moe_ffn_hidden_size, qwen3.moe_pre_softmax) == (4, 2, 40, False)
    assert arch_from_dict({**QWEN3_MOE, "norm_topk_prob": False}).moe_pre_softmax  # softmax over all, no renorm
    mixtral = arch_from_dict(MIXTRAL)
    assert (mixtral.num_experts, mixtral.moe_ffn_hidden_size, mixtral.moe_pre_softmax) == (4, 96, False)
    # top-1 without renormalisation: the expert weighs its softmax probability, as megatron-core's does
    assert arch_from_dict({**QWEN3_MOE, "num_experts_per_tok": 1, "norm_topk_prob": False}).moe_topk == 1


@pytest.mark.parametrize("cfg, message", [
    ({**QWEN3_MOE, "num_experts_per_tok": 1}, r"/m/config.json: num_experts_per_tok=1 with norm_topk_prob=true"),
    ({**MIXTRAL, "num_experts_per_tok": 1}, r"/m/config.json: num_experts_per_tok=1 with a Mixtral router"),
    ({**QWEN3_MOE, "num_experts_per_tok": 5}, r"num_experts_per_tok=5: expected 1 to num_experts \(4\)"),
    ({**QWEN3_MOE, "num_experts": 1}, r"needs num_experts \(or num_local_experts\) >= 2"),
    ({**QWEN3_MOE, "mlp_only_layers": [0]}, r"dense layers between the MoE layers"),
    ({**QWEN3_MOE, "decoder_sparse_step": 2}, r"dense layers between the MoE layers"),
    ({**QWEN3_MOE, "shared_expert_intermediate_size": 64}, r"shared experts are not supported"),
    ({**MIXTRAL, "router_jitter_noise": 0.1}, r"router_jitter_noise=0.1 is not supported"),
    ({**MIXTRAL, "sliding_window": 128}, r"sliding_window=128 is not supported"),
])
def test_moe_configs_we_cannot_build_are_refused(cfg, message):
    with pytest.raises(ModelConfigError, match=message):
        arch_from_dict(cfg, "/m/config.json")
