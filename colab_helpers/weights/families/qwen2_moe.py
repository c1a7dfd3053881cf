"""Qwen2-MoE (``Qwen2MoeForCausalLM``; Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): routed experts plus a dense
shared expert whose output is scaled by ``sigmoid(shared_expert_gate(x))``; softmax top-k, renormalized
only with ``norm_topk_prob``; q/k/v biases (``qkv_bias``).

Which layers are MoE: every layer not in ``mlp_only_layers`` with ``(i + 1) % decoder_sparse_step == 0``;
the others hold a dense ``Qwen2MoeMLP`` of ``intermediate_size``. transformers 5: router ``mlp.gate``
[E, H]; fused ``mlp.experts.gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I] with
I = ``moe_intermediate_size``; ``mlp.shared_expert.{gate,up,down}_proj``, ``mlp.shared_expert_gate`` [1, H].
"""

from __future__ import annotations

from .base import MoEArchitecture, architecture, sparse_layers
from .source_names import PER_EXPERT_MLP

NAME = "Qwen2-MoE"
MODEL_TYPE = "qwen2_moe"
MODEL_CLASS = "Qwen2MoeForCausalLM"
CONFIG_CLASS = "Qwen2MoeConfig"
# hub: mlp.experts.N.*_proj + mlp.gate; mlp.shared_expert.*_proj + mlp.shared_expert_gate as transformers names them
SOURCE_NAMES = (PER_EXPERT_MLP,)


def from_config(config) -> MoEArchitecture:
    moe = sparse_layers(config)
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
        shared_intermediate=config.shared_expert_intermediate_size,
        shared_expert_gate=config.shared_expert_intermediate_size > 0,
        qkv_bias=bool(getattr(config, "qkv_bias", True)),
    )
