"""gpt-oss (``GptOssForCausalLM``; openai/gpt-oss-20b, gpt-oss-120b): every layer MoE, softmax over the
top-k router logits (= softmax top-k renormalized) of a router *with a bias*, experts *with biases* and
a clamped SwiGLU: ``gate = min(g, limit)``, ``up = clamp(u, -limit, limit)``,
``(up + 1) * gate * sigmoid(alpha * gate)`` (``GptOssExperts._apply_gate``), attention with q/k/v/o
biases and one learned *sink* logit per head, alternating sliding-window / full layers (``layer_types``;
transformers' own attention handles sinks and windows, so the model runs eager attention).

transformers 5 (and the bf16 checkpoints): router ``mlp.router.weight`` [E, H] + ``.bias`` [E];
``mlp.experts.gate_up_proj`` [E, H, 2I] (transposed, gate and up *interleaved* column by column:
gate = ``[..., ::2]``, up = ``[..., 1::2]``), ``gate_up_proj_bias`` [E, 2I], ``down_proj`` [E, I, H],
``down_proj_bias`` [E, H]; ``self_attn.sinks`` [heads]. The published openai checkpoints hold the expert
matrices as MXFP4 ``*_blocks`` [E, rows, cols/32, 16] and ``*_scales`` [E, rows, cols/32] (rows = 2I
for gate_up, H for down: not transposed), decoded by ``mxfp4.py`` exactly as transformers does.
The expert biases and sinks are small (gpt-oss-20b: 6.6 M + 1.5 K elements) and stay in the trunk.
"""

from __future__ import annotations

from .base import MoEArchitecture, architecture

NAME = "gpt-oss"
MODEL_TYPE = "gpt_oss"
MODEL_CLASS = "GptOssForCausalLM"
CONFIG_CLASS = "GptOssConfig"
SOURCE_NAMES = ()  # the hub spells everything as transformers 5 does (fused experts, or their MXFP4 blocks)


def from_config(config) -> MoEArchitecture:
    bias = bool(config.attention_bias)
    return architecture(
        config,
        family=MODEL_TYPE,
        name=NAME,
        model_class=MODEL_CLASS,
        num_experts=config.num_local_experts,
        norm_topk_prob=True,  # softmax over the top-k logits: the top-k probabilities renormalized
        expert_intermediate=config.intermediate_size,
        qkv_bias=bias,
        o_bias=bias,
        router_param="router",
        router_bias=True,
        expert_bias=True,
        expert_layout="interleaved",
        attn_sinks=True,
        sliding_window_layers=True,
    )
