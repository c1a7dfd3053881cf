"""DeepSeek-V2 specifics: the router's scaling and group-limited top-k as transformers computes them, the
latent attention's projections quantized like attention, and the planner's KV cache of one latent per token.

(Parity for every cache size with prefetch on and off, conversion and the quickstart run for DeepSeek-V2 with
the other families in test_family_parity.py, test_convert_families.py and test_quickstart_families.py.)
"""

from __future__ import annotations

import json

import pytest
import torch

from colab_helpers.model import dequantized_reference, load_model
from colab_helpers.planning.planner import ModelSizes
from colab_helpers.sim.random_moe import random_model, small_config
from colab_helpers.weights.checkpoint import QuantConfig, save_checkpoint
from colab_helpers.weights.families import architecture
from colab_helpers.weights.families.configs import shipped
from colab_helpers.weights.model_spec import ModelSpec

pytestmark = pytest.mark.skipif(not hasattr(__import__("transformers"), "DeepseekV2Config"), reason="no DeepSeek-V2")
PROMPT = torch.tensor([[1, 17, 45, 99, 3, 64, 12, 7, 88, 23, 5, 41]])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "overrides",
    [dict(routed_scaling_factor=1.0), dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)],
    ids=["no_scaling", "group_limited"],
)
def test_routing_variants_match_transformers_and_change_the_logits(tmp_path, overrides) -> None:
    """The router runs as transformers' own module: another scaling or top-k method gives other logits, each
    equal to plain transformers on the same dequantized weights."""
    logits = []
    for i, cfg in enumerate((small_config("deepseek_v2"), small_config("deepseek_v2", **overrides))):
        save_checkpoint(random_model(cfg), tmp_path / str(i), optimize=False, progress=False)
        model = load_model(tmp_path / str(i), experts_on_device=3, progress=False)
        with torch.no_grad():
            logits.append(model(PROMPT).logits)
            assert rel_err(logits[-1], dequantized_reference(tmp_path / str(i))(PROMPT).logits) < 1e-3
    assert rel_err(logits[0], logits[1]) > 1e-3


def test_latent_attention_projections_are_quantized_and_its_norm_is_not() -> None:
    config = small_config("deepseek_v2")
    quantized = ModelSpec.of(config).quantized_trunk_shapes
    assert quantized["model.layers.1.self_attn.kv_a_proj_with_mqa"] == (128 + 64, 256)
    assert quantized["model.layers.1.self_attn.kv_b_proj"] == (8 * (32 + 32), 128)
    assert quantized["model.layers.1.mlp.shared_experts.down_proj"] == (256, 512)
    assert quantized["model.layers.0.mlp.gate_proj"] == (512, 256)  # the dense first layer
    assert not any("layernorm" in name for name in quantized)


def test_lite_plans_one_latent_per_token_and_layer_in_the_kv_cache() -> None:
    arch = architecture(json.loads(shipped()["deepseek-ai/DeepSeek-V2-Lite-Chat"].read_text()))
    s = ModelSizes.of(arch, QuantConfig.for_bits(4, 2))
    assert 2 * s.kv_heads * s.head_dim == 512 + 64  # kv_lora_rank + rope dims: what transformers caches
    assert arch.attention_shapes == {
        "q_proj": (16 * 192, 2048),
        "kv_a_proj_with_mqa": (576, 2048),
        "kv_b_proj": (16 * 256, 512),
        "o_proj": (2048, 16 * 128),
    }


def test_full_deepseek_v2_query_lora_matches_transformers(tmp_path) -> None:
    """DeepSeek-V2 (not Lite) compresses queries too: q_a_proj -> q_a_layernorm -> q_b_proj."""
    config = small_config("deepseek_v2", q_lora_rank=64)
    assert set(ModelSpec.of(config).quantized_trunk_shapes) >= {
        "model.layers.1.self_attn.q_a_proj",
        "model.layers.1.self_attn.q_b_proj",
    }
    save_checkpoint(random_model(config), tmp_path, optimize=False, progress=False)
    model = load_model(tmp_path, experts_on_device=2, progress=False)
    ref = dequantized_reference(tmp_path)
    with torch.no_grad():
        assert rel_err(model(PROMPT).logits, ref(PROMPT).logits) < 1e-3
    assert torch.equal(
        model.generate(PROMPT, max_new_tokens=6, do_sample=False),
        ref.generate(PROMPT, max_new_tokens=6, do_sample=False),
    )
