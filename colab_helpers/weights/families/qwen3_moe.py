"""Qwen3-MoE (``Qwen3MoeForCausalLM``; Qwen3-30B-A3B, Qwen3-235B-A22B): no shared expert, softmax top-k
renormalized with ``norm_topk_prob`` (true for the released models), per-head q/k RMSNorm over
``head_dim`` (which is not ``hidden / heads``: 128 for Qwen3-30B-A3B with hidden 2048 and 32 heads).

Layers are MoE by the Qwen2-MoE rule (``mlp_only_layers``, ``decoder_sparse_step``). transformers 5:
router ``mlp.gate`` [E, H]; fused ``mlp.experts.gate_up_proj`` / ``down_proj`` with
I = ``moe_intermediate_size``; optional ``attention_bias`` on all four projections.
"""

from __future__ import annotations

from .base import MoEArchitecture, architecture, head_dim_of, sparse_layers
from .source_names import PER_EXPERT_MLP

NAME = "Qwen3-MoE"
MODEL_TYPE = "qwen3_moe"
MODEL_CLASS = "Qwen3MoeForCausalLM"
CONFIG_CLASS = "Qwen3MoeConfig"
SOURCE_NAMES = (PER_EXPERT_MLP,)  # published: mlp.experts.N.gate_proj/up_proj/down_proj + mlp.gate


def from_config(config) -> MoEArchitecture:
    moe = sparse_layers(config)
    hd = head_dim_of(config)
    bias = bool(getattr(config, "attention_bias", False))
    return architecture(
        config,
        family=MODEL_TYPE,
        name=NAME,
        model_class=MODEL_CLASS,
        moe_layers=moe,
        num_experts=config.num_experts,
        norm_topk_prob=bool(config.norm_topk_prob),
        expert_intermediate=config.moe_intermediate_size,
        dense_intermediate=config.intermediate_size if len(moe) < config.num_hidden_layers else 0,
        qkv_bias=bias,
        o_bias=bias,
        q_norm=hd,
        k_norm=hd,
    )
