"""Phi-3.5-MoE (``PhimoeForCausalLM``; the hub config says ``PhiMoEForCausalLM``): every layer MoE with
16 experts, top-2 chosen by *sparsemixer* (not softmax top-k: each pick is masked by a jitter threshold,
``router_jitter_noise``, which applies at inference too), LayerNorm with bias instead of RMSNorm, and
optional biases on attention (``attention_bias``) and the lm_head (``lm_head_bias``), both true in
Phi-3.5-MoE-instruct.

transformers 5: router ``mlp.router`` [E, H] (not ``gate``); fused ``mlp.experts.gate_up_proj`` /
``down_proj`` as Mixtral; ``input_jitter_noise`` applies in training only.
"""

from __future__ import annotations

from .base import MoEArchitecture, architecture
from .source_names import CLASSIC

NAME = "Phi-3.5-MoE"
MODEL_TYPE = "phimoe"
MODEL_CLASS = "PhimoeForCausalLM"
CONFIG_CLASS = "PhimoeConfig"
# hub: block_sparse_moe.experts.N.w1/w2/w3 + block_sparse_moe.gate (transformers 5 calls the router mlp.router)
SOURCE_NAMES = (CLASSIC,)


def from_config(config) -> MoEArchitecture:
    bias = bool(config.attention_bias)
    return architecture(
        config,
        family=MODEL_TYPE,
        name=NAME,
        model_class=MODEL_CLASS,
        num_experts=config.num_local_experts,
        norm_topk_prob=False,  # sparsemixer's weights come from masked softmaxes, not renormalized
        router="sparsemixer",
        router_jitter=float(config.router_jitter_noise),
        expert_intermediate=config.intermediate_size,
        qkv_bias=bias,
        o_bias=bias,
        norm_bias=True,
        lm_head_bias=bool(config.lm_head_bias),
        router_param="router",
    )
