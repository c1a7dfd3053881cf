"""gpt-oss specifics: MXFP4 decoding against transformers' own, the clamped SwiGLU, openai's published
source converted byte for byte, and 3/4-bit experts on shapes that need a smaller scale group.

(Family-generic checks, parity for every cache size with prefetch on and off included, run for gpt-oss
with the other families in test_family_parity.py, test_convert_families.py and friends.)
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from colab_helpers.model import dequantized_reference, load_model
from colab_helpers.runtime.moe import PrefetchConfig
from colab_helpers.runtime.oss_experts import BiasedSwigluMoE, clamped_swiglu
from colab_helpers.sim.random_moe import random_model, save_mxfp4_source, small_config
from colab_helpers.weights import convert as cv
from colab_helpers.weights.checkpoint import Checkpoint, QuantConfig, save_checkpoint
from colab_helpers.weights.families import from_transformers
from colab_helpers.weights.families.source_names import source_names
from colab_helpers.weights.mxfp4 import dequantize, random_blocks

pytestmark = pytest.mark.skipif(not hasattr(__import__("transformers"), "GptOssConfig"), reason="no gpt-oss")
PROMPT = torch.tensor([[1, 17, 45, 99, 3, 64, 12, 7, 88, 23, 5, 41]])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def files_of(root) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and cv.STATE_DIR not in p.parts and p.name != "README.md"
    }


@pytest.mark.parametrize("shape", [(2, 64, 96), (3, 96, 32), (1, 8, 320)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_decoding_equals_transformers_on_random_blocks(shape, dtype) -> None:
    blocks, scales = random_blocks(shape, seed=sum(shape), exponent=(-30, 30))  # every code, wide exponents
    ours = dequantize(blocks, scales, dtype)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, cols, rows]: transposed
    assert ours.shape == shape and torch.equal(ours, theirs.transpose(1, 2))


def test_mxfp4_rejects_what_is_not_mxfp4() -> None:
    blocks, scales = random_blocks((1, 4, 64))
    with pytest.raises(ValueError, match="uint8"):
        dequantize(blocks.to(torch.int32), scales)
    with pytest.raises(ValueError, match="do not match"):
        dequantize(blocks, scales[:, :2])


def test_clamped_swiglu_is_transformers_apply_gate() -> None:
    model = random_model("gpt_oss")
    experts = model.model.layers[0].mlp.experts
    gate_up = torch.randn(5, 2 * experts.intermediate_size) * 3  # beyond the limit both ways
    want = experts._apply_gate(gate_up)
    got = clamped_swiglu(gate_up[:, ::2], gate_up[:, 1::2], experts.alpha, experts.limit)
    assert torch.equal(got, want)
    assert (gate_up.abs() > experts.limit).any()


def test_the_loaded_blocks_are_gpt_oss_blocks_with_biases_and_eager_attention(tmp_path) -> None:
    save_checkpoint(random_model("gpt_oss"), tmp_path, optimize=False, progress=False)
    model = load_model(tmp_path, experts_on_device=2, progress=False)
    blocks = [layer.mlp for layer in model.model.layers]
    assert all(isinstance(b, BiasedSwigluMoE) for b in blocks)
    assert blocks[0].gate.bias is not None and blocks[0].gate_bias.shape == (8, 256)
    assert model.config._attn_implementation == "eager"  # the only CPU/T4 path that adds the sinks
    assert (
        model.model.layers[0].self_attn.sliding_window == 4 and model.model.layers[1].self_attn.sliding_window is None
    )


def test_openai_published_mxfp4_source_converts_byte_identical_and_computes_the_same(tmp_path) -> None:
    src, model = save_mxfp4_source(tmp_path / "src")
    arch = from_transformers(model.config)
    names = source_names(arch)
    keys = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    kinds = {cv.classify(k, names).kind for k in keys}
    assert kinds == {"trunk", "mxfp4_blocks", "mxfp4_scales"}
    assert json.loads((src / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    kw = dict(expert_bits=3, optimize=False, progress=False, log=lambda _: None)
    out = cv.convert(src, tmp_path / "out", **kw)
    save_checkpoint(model, tmp_path / "ref", expert_bits=3, optimize=False, progress=False)
    assert files_of(out) == files_of(tmp_path / "ref")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert Checkpoint.open(out).family == "gpt_oss"
    ref = dequantized_reference(out)
    loaded = load_model(out, experts_on_device=3, progress=False)
    with torch.no_grad():
        assert rel_err(loaded(PROMPT).logits, ref(PROMPT).logits) < 1e-3
    greedy = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(loaded.generate(PROMPT, **greedy), ref.generate(PROMPT, **greedy))


def test_mxfp4_blocks_without_their_scales_are_one_clear_error(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    src, _ = save_mxfp4_source(tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    key = "model.layers.0.mlp.experts.down_proj_scales"
    here = index["weight_map"][key]
    there = next(f for f in set(index["weight_map"].values()) if f != here)
    a, b = load_file(src / here), load_file(src / there)
    b[key] = a.pop(key)
    save_file(a, src / here, metadata={"format": "pt"})
    save_file(b, src / there, metadata={"format": "pt"})
    index["weight_map"][key] = there
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(cv.ConvertError, match="need their scales") as err:
        cv.convert(src, tmp_path / "out", optimize=False, progress=False, log=lambda _: None)
    assert len(str(err.value).splitlines()) == 1


def test_other_quantized_sources_are_still_refused(tmp_path, capsys) -> None:
    src, _ = save_mxfp4_source(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq"}
    (src / "config.json").write_text(json.dumps(cfg))
    assert cv.cli_main([str(src), str(tmp_path / "out")]) == 2
    assert "already quantized (gptq)" in capsys.readouterr().err


def test_four_bit_experts_whose_groups_need_a_scale_group_of_64(tmp_path) -> None:
    """gpt-oss-20b's 2880 x 2880 experts at 3/4 bits: 129600 groups, not a multiple of the default 128.
    A tiny model of the same misfit (192 x 192: 576 groups) is written with scale groups of 64 and matches."""
    config = small_config("gpt_oss", hidden_size=192, intermediate_size=192)
    arch = from_transformers(config)
    with pytest.raises(ValueError, match="scale group 128"):
        QuantConfig.for_bits(2, 4).experts.num_groups(arch.expert_shapes["w1"])
    assert QuantConfig.for_bits(2, 4).fitted(arch).experts.scale_group_size == 64
    save_checkpoint(random_model(config), tmp_path, attn_bits=2, expert_bits=4, optimize=False, progress=False)
    assert Checkpoint.open(tmp_path).quant.experts.scale_group_size == 64
    ref = dequantized_reference(tmp_path)
    model = load_model(tmp_path, experts_on_device=2, prefetch=PrefetchConfig(enabled=True), progress=False)
    with torch.no_grad():
        assert rel_err(model(PROMPT).logits, ref(PROMPT).logits) < 1e-3


def test_chunked_prefill_over_sliding_window_layers_matches_the_whole_prompt(tmp_path) -> None:
    """The GPU path prefills in chunks (``generation.prefill``): with chunks of 4, layer 0's window of 4 and
    sinks, the next-token logits after a 12-token prompt are plain transformers' on the whole prompt."""
    from transformers import DynamicCache

    from colab_helpers.conversation.generation import _kv_cache_kwarg, prefill
    from colab_helpers.runtime.attention import AttentionPath

    save_checkpoint(random_model("gpt_oss"), tmp_path, optimize=False, progress=False)
    ref = dequantized_reference(tmp_path)
    chunked = AttentionPath("sdpa", "cpu", None, 4, "test: a GPU's chunked prefill on the CPU")
    model = load_model(tmp_path, experts_on_device=3, attention=chunked, progress=False)
    assert model.attention_path.implementation == "eager" and model.attention_path.prefill_chunk == 4
    cache = DynamicCache(config=model.config)
    prefill(model, PROMPT, cache, 4)
    mask = torch.ones(1, PROMPT.shape[1], dtype=torch.long)
    with torch.no_grad():
        last = model(input_ids=PROMPT[:, -1:], attention_mask=mask, **{_kv_cache_kwarg(model): cache}).logits[:, -1]
        want = ref(PROMPT).logits[:, -1]
    assert rel_err(last, want) < 1e-3
