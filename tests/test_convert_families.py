"""The converter for every family: detection from config.json, refusal of other families, and the source names.

Sources are tiny random models of each family saved with ``save_pretrained`` in small shards (so one layer's
experts span files), which writes the published hub names (checked here, since transformers could change
that), and the same models' transformers 5 fused state dicts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from colab_helpers import convert as cv
from colab_helpers.families import adapters, from_transformers
from colab_helpers.families.source_names import source_names
from colab_helpers.random_mixtral import save_hub_format

COMMON = dict(
    hidden_size=256,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)
# shapes that meet every 2/3/4-bit group constraint; each family's own features switched on
TINY = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=512, num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=256, num_experts=6, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            intermediate_size=512,
            moe_intermediate_size=256,
            shared_expert_intermediate_size=512,
            num_experts=6,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            intermediate_size=512,
            moe_intermediate_size=256,
            head_dim=32,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            norm_topk_prob=True,
            tie_word_embeddings=True,
        ),
    ),
    "phimoe": (
        "PhimoeConfig",
        dict(intermediate_size=512, num_local_experts=4, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True),
    ),
}
FAMILIES = [f for f in TINY if f in adapters()]
# the published spelling of layer 0's (or the first MoE layer's) expert 0 gate matrix and router
PUBLISHED = {
    "mixtral": ("block_sparse_moe.experts.0.w1.weight", "block_sparse_moe.gate.weight"),
    "phimoe": ("block_sparse_moe.experts.0.w1.weight", "block_sparse_moe.gate.weight"),
    "olmoe": ("mlp.experts.0.gate_proj.weight", "mlp.gate.weight"),
    "qwen2_moe": ("mlp.experts.0.gate_proj.weight", "mlp.gate.weight"),
    "qwen3_moe": ("mlp.experts.0.gate_proj.weight", "mlp.gate.weight"),
}


def tiny_model(family: str, seed: int = 0):
    cfg_name, kw = TINY[family]
    config = getattr(transformers, cfg_name)(**COMMON, **kw)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def hub_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_sources")
    return {f: save_hub_format(tiny_model(f), root / f, "300KB", torch.bfloat16) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_source_is_in_the_published_naming_with_experts_across_files(hub_sources, family) -> None:
    weight_map = json.loads((hub_sources[family] / "model.safetensors.index.json").read_text())["weight_map"]
    arch = from_transformers(tiny_model(family).config)
    layer = f"model.layers.{arch.moe_layers[0]}."
    expert, router = PUBLISHED[family]
    assert layer + expert in weight_map and layer + router in weight_map
    files = {f for k, f in weight_map.items() if k.startswith(layer) and ".experts." in k}
    assert len(files) > 1, "one layer's experts should span shards"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("naming", ["published", "fused"])
def test_every_source_tensor_is_classified(hub_sources, family, naming) -> None:
    """Each trunk tensor maps to its transformers 5 name, each expert matrix to (layer, expert, w1/w2/w3)."""
    model = tiny_model(family)
    arch = from_transformers(model.config)
    names = source_names(arch)
    if naming == "published":
        keys = json.loads((hub_sources[family] / "model.safetensors.index.json").read_text())["weight_map"]
    else:
        keys = model.state_dict()
    trunk, experts, fused = set(), set(), set()
    for key in keys:
        kind = cv.classify(key, names)
        if kind.kind == "trunk":
            trunk.add(kind.name)
        elif kind.kind == "expert":
            experts.add((kind.layer, kind.expert, kind.name))
        else:
            fused.add((kind.layer, kind.name))
    want_trunk = set(arch.trunk_shapes)
    if arch.tie_embeddings and naming == "published":
        want_trunk.discard("lm_head.weight")  # tied: save_pretrained leaves it out
    assert trunk == want_trunk
    if naming == "published":
        want = {(la, e, m) for la in arch.moe_layers for e in range(arch.num_experts) for m in ("w1", "w2", "w3")}
        assert experts == want and not fused
    else:
        assert fused == {(la, m) for la in arch.moe_layers for m in ("gate_up", "w2")} and not experts


def test_published_router_names_map_to_each_familys_module() -> None:
    phi = source_names(from_transformers(tiny_model("phimoe").config))
    assert phi.classify("model.layers.2.block_sparse_moe.gate.weight").name == "model.layers.2.mlp.router.weight"
    assert phi.classify("model.layers.2.mlp.router.weight").name == "model.layers.2.mlp.router.weight"
    mix = source_names(from_transformers(tiny_model("mixtral").config))
    assert mix.classify("model.layers.1.block_sparse_moe.gate.weight").name == "model.layers.1.mlp.gate.weight"
    assert mix.classify("model.layers.1.mlp.experts.3.up_proj.weight") == cv.SourceKey("expert", "w3", 1, 3)
    qwen2 = source_names(from_transformers(tiny_model("qwen2_moe").config))
    assert qwen2.classify("model.layers.0.mlp.gate_proj.weight").name == "model.layers.0.mlp.gate_proj.weight"
    with pytest.raises(cv.ConvertError, match="unexpected tensor"):
        cv.classify("model.layers.1.mlp.gate_proj.weight", qwen2)  # layer 1 is MoE: no dense MLP there
    with pytest.raises(cv.ConvertError, match="unexpected tensor"):
        cv.classify("model.layers.0.block_sparse_moe.experts.0.w1.weight", qwen2)  # not a Qwen spelling
    with pytest.raises(cv.ConvertError, match="Qwen2MoeForCausalLM"):
        cv.classify("model.layers.1.mlp.shared_expert.gate_proj.qweight", qwen2)


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "model family 'llama' is not supported"),
        ({"model_type": "deepseek_v2"}, "model family 'deepseek_v2' is not supported"),
        ({"model_type": "mixtral", "architectures": ["MixtralForSequenceClassification"]}, "only causal"),
    ],
)
def test_other_families_are_refused_with_the_supported_list(tmp_path, capsys, config, needle) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    assert cv.cli_main([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    if "not supported" in needle:
        for module in adapters().values():
            assert f"{module.MODEL_CLASS} ({module.MODEL_TYPE})" in err


def test_refusal_from_the_command_line_is_one_line_and_exit_2(tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    run = subprocess.run(
        [sys.executable, "-m", "colab_helpers", "convert", str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "supported: MixtralForCausalLM (mixtral)" in run.stderr
    assert not Path(tmp_path / "out" / "config.json").exists()
