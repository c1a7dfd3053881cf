"""Phi-3.5-MoE (``PhimoeForCausalLM``; the hub config says ``PhiMoEForCausalLM``): every layer MoE with
16 experts, top-2 chosen by *sparsemixer* (not softmax top-k: each pick is masked by a jitter threshold,
``router_jitter_noise``, which applies at inference too), LayerNorm with bias instead of RMSNorm, and
optional biases on attention (``attention_bias``) and the lm_head (``lm_head_bias``), both true in
Phi-3.5-MoE-instruct.

transformers 5: router ``mlp.router`` [E, H] (not ``gate``); fused ``mlp.experts.gate_up_proj`` /
``down_proj`` as Mixtral; ``input_jitter_noise`` applies in training only.
"""

from __future__ import annotations

from .base import MoEArchitecture, head_dim_of

NAME = "Phi-3.5-MoE"
MODEL_TYPE = "phimoe"
MODEL_CLASS = "PhimoeForCausalLM"
CONFIG_CLASS = "PhimoeConfig"


def from_config(config) -> MoEArchitecture:
    bias = bool(config.attention_bias)
    return MoEArchitecture(
        family=MODEL_TYPE,
        name=NAME,
        model_class=MODEL_CLASS,
        num_layers=config.num_hidden_layers,
        moe_layers=tuple(range(config.num_hidden_layers)),
        num_experts=config.num_local_experts,
        top_k=config.num_experts_per_tok,
        norm_topk_prob=False,  # sparsemixer's weights come from masked softmaxes, not renormalized
        router="sparsemixer",
        router_jitter=float(config.router_jitter_noise),
        hidden=config.hidden_size,
        expert_intermediate=config.intermediate_size,
        dense_intermediate=0,
        shared_intermediate=0,
        shared_expert_gate=False,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=head_dim_of(config),
        vocab=config.vocab_size,
        tie_embeddings=bool(config.tie_word_embeddings),
        qkv_bias=bias,
        o_bias=bias,
        q_norm=0,
        k_norm=0,
        norm_bias=True,
        lm_head_bias=bool(config.lm_head_bias),
        router_param="router",
    )
