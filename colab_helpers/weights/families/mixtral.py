"""Mixtral (``MixtralForCausalLM``): every layer MoE, softmax top-k renormalized, no shared expert.

transformers 5: ``model.layers.N.mlp.gate`` (router, [E, H], no bias) and ``mlp.experts.gate_up_proj``
[E, 2I, H] / ``down_proj`` [E, H, I]; old checkpoints call the block ``block_sparse_moe`` with
``experts.N.w1/w2/w3``. ``router_jitter_noise`` applies in training only.
"""

from __future__ import annotations

from .base import MoEArchitecture, architecture
from .source_names import CLASSIC, PER_EXPERT_MLP

NAME = "Mixtral"
MODEL_TYPE = "mixtral"
MODEL_CLASS = "MixtralForCausalLM"
CONFIG_CLASS = "MixtralConfig"
# hub: block_sparse_moe.experts.N.w1/w2/w3 + block_sparse_moe.gate; mlp.experts.N.*_proj accepted as before
SOURCE_NAMES = (CLASSIC, PER_EXPERT_MLP)


def from_config(config) -> MoEArchitecture:
    return architecture(
        config,
        family=MODEL_TYPE,
        name=NAME,
        model_class=MODEL_CLASS,
        num_experts=config.num_local_experts,
        norm_topk_prob=True,  # MixtralTopKRouter always renormalizes
        router_jitter=float(getattr(config, "router_jitter_noise", 0.0) or 0.0),
        expert_intermediate=config.intermediate_size,
    )
