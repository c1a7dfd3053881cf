"""DeepSeek-V2 (``DeepseekV2ForCausalLM``; DeepSeek-V2-Lite(-Chat)): the first ``first_k_dense_replace``
layers dense (a ``DeepseekV2MLP`` of ``intermediate_size``), the others 64 routed experts top-6 plus
``n_shared_experts`` always-on experts fused into one ``mlp.shared_experts`` MLP (no gate), and
multi-head latent attention (MLA): ``q_proj`` (or ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``),
``kv_a_proj_with_mqa`` [kv_lora + rope, H] -> ``kv_a_layernorm`` -> ``kv_b_proj`` [heads (nope + v), kv_lora],
``o_proj`` [H, heads v]; every projection is quantized like attention, the two norms stay fp16.

The router (``DeepseekV2TopkRouter``): softmax over all experts in fp32, top-k (greedy, or group-limited),
*not* renormalized, times ``routed_scaling_factor``; it runs as its own module. transformers 5: router
``mlp.gate`` [E, H]; fused ``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first) / ``down_proj``; the hub
checkpoints spell experts ``mlp.experts.N.{gate,up,down}_proj`` (as Qwen's).

KV cache: transformers 5 caches the compressed latent (``kv_a_layernorm`` output, kv_lora, plus the rope key)
per token and layer, 576 elements for DeepSeek-V2-Lite, and re-expands keys and values through ``kv_b_proj``
over the whole context at every step (the planner counts the latent; the twin records the re-expansion:
a ``kv_b_proj`` matmul over the context, not a GEMV, per layer per token).
"""

from __future__ import annotations

from .base import MoEArchitecture, architecture
from .source_names import PER_EXPERT_MLP

NAME = "DeepSeek-V2"
MODEL_TYPE = "deepseek_v2"
MODEL_CLASS = "DeepseekV2ForCausalLM"
CONFIG_CLASS = "DeepseekV2Config"
# hub: mlp.experts.N.*_proj + mlp.gate; mlp.shared_experts.*_proj, as transformers names them
SOURCE_NAMES = (PER_EXPERT_MLP,)


def from_config(config) -> MoEArchitecture:
    if config.attention_bias or getattr(config, "mlp_bias", False):
        raise ValueError("DeepSeek-V2 with attention or MLP biases is not supported (the released models have none)")
    n = config.num_hidden_layers
    first = config.first_k_dense_replace
    moe = tuple(i for i in range(first, n))
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    return architecture(
        config,
        family=MODEL_TYPE,
        name=NAME,
        model_class=MODEL_CLASS,
        moe_layers=moe,
        num_experts=config.n_routed_experts,
        norm_topk_prob=False,  # the top-k softmax weights times routed_scaling_factor, not renormalized
        expert_intermediate=config.moe_intermediate_size,
        dense_intermediate=config.intermediate_size if first else 0,
        shared_intermediate=config.moe_intermediate_size * config.n_shared_experts,
        shared_name="shared_experts",
        kv_heads=config.num_attention_heads,  # MLA: every head gets its keys and values (from the latent)
        head_dim=qk,
        mla=(config.q_lora_rank or 0, config.kv_lora_rank, config.qk_rope_head_dim, config.v_head_dim),
    )
