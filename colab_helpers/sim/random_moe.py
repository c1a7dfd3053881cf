"""Tiny random models of every supported MoE family, built from each family's own transformers config class.

For tests and the converter's fixtures: shapes satisfy every 2/3/4-bit group constraint of the layout
(hidden 256, expert intermediate 256 or 512, 8 heads, 2 KV heads), and each family's variant switches on
what sets it apart: Qwen2-MoE a shared expert with its gate, a dense (non-MoE) layer through
``mlp_only_layers`` and renormalization off; Qwen3-MoE ``head_dim`` unlike ``hidden / heads``, per-head q/k
norms, dense layers through ``decoder_sparse_step`` and renormalization on; OLMoE whole-projection q/k norms
and renormalization off; Phi-3.5-MoE sparsemixer routing, LayerNorm biases and attention / ``lm_head`` biases.
Weights are random but not the 0.02 init: routers are scaled up (varied routing) and every bias and norm
weight is perturbed (so a bias or norm lost on the way shows in the logits).
"""

from __future__ import annotations

import torch

COMMON = dict(
    hidden_size=256,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    tie_word_embeddings=False,
    initializer_range=0.1,  # not 0.02: greedy decoding of every family then varies instead of repeating a token
)
# family -> (transformers config class, model class, fields beyond COMMON)
VARIANTS: dict[str, tuple[str, str, dict]] = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_hidden_layers=2, intermediate_size=512, num_local_experts=8, num_experts_per_tok=2),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(num_hidden_layers=2, intermediate_size=256, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_hidden_layers=3,
            intermediate_size=512,  # the dense layer's MLP
            moe_intermediate_size=256,
            shared_expert_intermediate_size=512,
            num_experts=8,
            num_experts_per_tok=2,
            mlp_only_layers=[1],  # layers 0 and 2 are MoE: the cache's layer 1 is decoder layer 2
            decoder_sparse_step=1,
            norm_topk_prob=False,
            qkv_bias=True,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_hidden_layers=4,
            intermediate_size=512,
            moe_intermediate_size=256,
            head_dim=64,  # q is [512, 256]: not hidden / heads
            num_experts=8,
            num_experts_per_tok=2,
            decoder_sparse_step=2,  # layers 1 and 3 are MoE, 0 and 2 dense
            norm_topk_prob=True,
        ),
    ),
    "phimoe": (
        "PhimoeConfig",
        "PhimoeForCausalLM",
        dict(
            num_hidden_layers=2,
            intermediate_size=256,
            num_local_experts=8,
            num_experts_per_tok=2,
            attention_bias=True,
            lm_head_bias=True,
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            num_hidden_layers=3,
            num_key_value_heads=8,  # MLA: every head has its own keys and values
            intermediate_size=512,  # layer 0's dense MLP
            moe_intermediate_size=256,
            n_routed_experts=8,
            n_shared_experts=2,  # one shared MLP of 2 x 256
            num_experts_per_tok=3,
            first_k_dense_replace=1,
            kv_lora_rank=128,
            q_lora_rank=None,  # DeepSeek-V2-Lite's plain q_proj
            qk_nope_head_dim=32,
            qk_rope_head_dim=64,  # kv_a_proj_with_mqa out = 128 + 64 = 192: a multiple of the 4-bit group
            v_head_dim=32,
            routed_scaling_factor=1.5,  # not 1: a lost scaling shows in the logits
            topk_method="greedy",
            n_group=1,
            topk_group=1,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            num_hidden_layers=2,
            intermediate_size=256,
            head_dim=64,  # q is [512, 256], as gpt-oss-20b's [4096, 2880]: not hidden / heads
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=4,  # even layers slide over 4 tokens, odd ones are full (the config's default order)
            swiglu_limit=1.0,  # low enough that the clamps bite on these weights (gpt-oss-20b: 7.0)
            rope_parameters=dict(
                rope_type="yarn",
                factor=4.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
                original_max_position_embeddings=64,
                rope_theta=150000.0,
            ),
        ),
    ),
}


def families() -> list[str]:
    """The families of ``VARIANTS`` the installed transformers ships."""
    import transformers

    return [f for f, (cfg, _, _) in VARIANTS.items() if hasattr(transformers, cfg)]


def small_config(family: str, **overrides):
    """The tiny config of ``family`` (``VARIANTS``), with ``overrides`` applied."""
    import transformers

    cfg_name, _, fields = VARIANTS[family]
    return getattr(transformers, cfg_name)(**{**COMMON, **fields, **overrides})


def random_model(config_or_family, seed: int = 0) -> torch.nn.Module:
    """A random model of the config's (or the family's tiny config's) class, in eval mode.

    Routers get N(0, 0.5) weights (the 0.02 init routes almost uniformly), biases N(0, 0.1) and norm weights
    1 + N(0, 0.1): every tensor the layout stores then matters to the logits.
    """
    import transformers

    from ..weights.model_spec import ModelSpec

    config = small_config(config_or_family) if isinstance(config_or_family, str) else config_or_family
    arch = ModelSpec.of(config).arch
    torch.manual_seed(seed)
    model = getattr(transformers, arch.model_class)(config).eval()
    with torch.no_grad():
        for i in arch.moe_layers:
            getattr(model.model.layers[i].mlp, arch.router_param).weight.normal_(0, 0.5)
        for name, p in model.named_parameters():
            if name.endswith((".bias", "_bias", ".sinks")):  # gpt-oss: expert biases, attention sinks
                p.normal_(0, 0.1)
            elif "norm" in name.rsplit(".", 2)[-2]:
                p.normal_(1, 0.1)
    return model


def save_mxfp4_source(out, config=None, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny gpt-oss checkpoint as openai publishes gpt-oss-20b: experts as MXFP4 ``*_blocks``/``*_scales``
    (random codes, ``mxfp4.random_blocks``), everything else as tensors of ``dtype``, ``quantization_config``
    ``mxfp4`` in config.json, two shards (a layer's blocks beside their scales). Returns ``(folder, model)``:
    ``model`` holds the decoded experts, so ``save_checkpoint(model)`` is what converting the folder must give."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from ..weights.mxfp4 import dequantize, random_blocks

    model = random_model(config or "gpt_oss", seed)
    cfg = model.config
    e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    shards: dict[str, dict[str, torch.Tensor]] = {"model-00001-of-00002.safetensors": {}}
    shards["model-00002-of-00002.safetensors"] = {}
    names = list(shards)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts."
        for n, (name, shape) in enumerate((("gate_up_proj", (e, 2 * i, h)), ("down_proj", (e, h, i)))):
            blocks, scales = random_blocks(shape, seed=seed * 1000 + layer * 2 + n)
            with torch.no_grad():  # the model computes with what transformers decodes: [E, cols, rows]
                getattr(model.model.layers[layer].mlp.experts, name).copy_(dequantize(blocks, scales).transpose(1, 2))
            del sd[p + name]
            shard = shards[names[(layer + n) % 2]]
            shard[f"{p}{name}_blocks"], shard[f"{p}{name}_scales"] = blocks, scales
    for n, (k, v) in enumerate(sorted(sd.items())):
        shards[names[n % 2]][k] = v
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": sum(t.nbytes for s in shards.values() for t in s.values())}}
    (out / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}, indent=2))
    config_dict = {**cfg.to_dict(), "architectures": ["GptOssForCausalLM"]}
    config_dict["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn"],
    }
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    return out, model.eval()


__all__ = ["COMMON", "VARIANTS", "families", "random_model", "save_mxfp4_source", "small_config"]
