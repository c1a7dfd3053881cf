"""Mixtral (``MixtralForCausalLM``): every layer MoE, softmax top-k renormalized, no shared expert.

transformers 5: ``model.layers.N.mlp.gate`` (router, [E, H], no bias) and ``mlp.experts.gate_up_proj``
[E, 2I, H] / ``down_proj`` [E, H, I]; old checkpoints call the block ``block_sparse_moe`` with
``experts.N.w1/w2/w3``. ``router_jitter_noise`` applies in training only.
"""

from __future__ import annotations

from .base import MoEArchitecture, head_dim_of

NAME = "Mixtral"
MODEL_TYPE = "mixtral"
MODEL_CLASS = "MixtralForCausalLM"
CONFIG_CLASS = "MixtralConfig"


def from_config(config) -> MoEArchitecture:
    return MoEArchitecture(
        family=MODEL_TYPE,
        name=NAME,
        model_class=MODEL_CLASS,
        num_layers=config.num_hidden_layers,
        moe_layers=tuple(range(config.num_hidden_layers)),
        num_experts=config.num_local_experts,
        top_k=config.num_experts_per_tok,
        norm_topk_prob=True,  # MixtralTopKRouter always renormalizes
        router="softmax_topk",
        router_jitter=float(getattr(config, "router_jitter_noise", 0.0) or 0.0),
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
        qkv_bias=False,
        o_bias=False,
        q_norm=0,
        k_norm=0,
        norm_bias=False,
        lm_head_bias=False,
        router_param="gate",
    )
