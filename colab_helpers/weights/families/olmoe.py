"""OLMoE (``OlmoeForCausalLM``): every layer MoE, softmax top-k (renormalized only with ``norm_topk_prob``,
false for OLMoE-1B-7B), q/k RMSNorm over the whole q and k projections, no shared expert.

transformers 5: router ``mlp.gate`` [E, H]; fused ``mlp.experts.gate_up_proj`` / ``down_proj`` as Mixtral;
``self_attn.q_norm`` [heads * head_dim], ``k_norm`` [kv_heads * head_dim]; optional ``attention_bias``.
"""

from __future__ import annotations

from .base import MoEArchitecture, architecture, head_dim_of
from .source_names import PER_EXPERT_MLP

NAME = "OLMoE"
MODEL_TYPE = "olmoe"
MODEL_CLASS = "OlmoeForCausalLM"
CONFIG_CLASS = "OlmoeConfig"
SOURCE_NAMES = (PER_EXPERT_MLP,)  # published: mlp.experts.N.gate_proj/up_proj/down_proj + mlp.gate


def from_config(config) -> MoEArchitecture:
    hd = head_dim_of(config)
    bias = bool(getattr(config, "attention_bias", False))
    return architecture(
        config,
        family=MODEL_TYPE,
        name=NAME,
        model_class=MODEL_CLASS,
        num_experts=config.num_experts,
        norm_topk_prob=bool(config.norm_topk_prob),
        expert_intermediate=config.intermediate_size,
        qkv_bias=bias,
        o_bias=bias,
        q_norm=config.num_attention_heads * hd,
        k_norm=config.num_key_value_heads * hd,
    )
