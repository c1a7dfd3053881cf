"""The converter for every family: detection from config.json, the source names, the written layout, parity.

Sources are the tiny random models of each family (``random_moe``) saved with ``save_pretrained`` in small
shards (so one layer's experts span files), which writes the published hub names (checked here, since
transformers could change that), or with the transformers 5 fused names. Checked per family: the conversion
is byte-identical to ``save_checkpoint`` of the same model, passes the layout's own checks, and loads into an
offloaded model matching plain transformers on the dequantized weights (greedy tokens identical); an
interrupted conversion resumes to the same bytes; other families are refused with the supported list.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colab_helpers.model import dequantized_reference, load_model
from colab_helpers.sim.random_mixtral import save_hub_format
from colab_helpers.sim.random_moe import families, random_model, small_config
from colab_helpers.weights import convert as cv
from colab_helpers.weights.checkpoint import Checkpoint, save_checkpoint
from colab_helpers.weights.families import adapters, from_transformers
from colab_helpers.weights.families.source_names import source_names
from colab_helpers.weights.model_spec import ModelSpec

# every tiny family variant (shared expert, dense layers, biases, sparsemixer ...) and one with tied embeddings
CASES = {f: (f, {}) for f in families()} | {"qwen3_moe-tied": ("qwen3_moe", {"tie_word_embeddings": True})}
FAMILIES = families()
# the published spelling of layer 0's (or the first MoE layer's) expert 0 gate matrix and router
PUBLISHED = {
    "mixtral": ("block_sparse_moe.experts.0.w1.weight", "block_sparse_moe.gate.weight"),
    "phimoe": ("block_sparse_moe.experts.0.w1.weight", "block_sparse_moe.gate.weight"),
    "olmoe": ("mlp.experts.0.gate_proj.weight", "mlp.gate.weight"),
    "qwen2_moe": ("mlp.experts.0.gate_proj.weight", "mlp.gate.weight"),
    "qwen3_moe": ("mlp.experts.0.gate_proj.weight", "mlp.gate.weight"),
    # save_pretrained (and the bf16 releases) keep gpt-oss's experts fused; openai's MXFP4 spelling: test_gpt_oss.py
    "gpt_oss": ("mlp.experts.gate_up_proj", "mlp.router.weight"),
    "deepseek_v2": ("mlp.experts.0.gate_proj.weight", "mlp.gate.weight"),
}


def tiny_model(case: str, seed: int = 0):
    family, overrides = CASES[case]
    return random_model(small_config(family, **overrides), seed)


@pytest.fixture(scope="module")
def hub_sources(tmp_path_factory):
    """``{case: {"bf16" | "fp32" | "fused": folder}}``: each case's model saved as a hub source three ways."""
    root = tmp_path_factory.mktemp("family_sources")
    out = {}
    for case in CASES:
        out[case] = {
            "bf16": save_hub_format(tiny_model(case), root / case / "bf16", "300KB", torch.bfloat16),
            "fp32": save_hub_format(tiny_model(case), root / case / "fp32", "300KB", torch.float32),
            "fused": save_hub_format(tiny_model(case), root / case / "fused", "300KB", torch.float32, fused=True),
        }
    return out


def files_of(root: Path) -> dict[str, bytes]:
    """Every output file's bytes but the model card (it names the source) and the resume state."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and cv.STATE_DIR not in p.parts and p.name != "README.md"
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("case", CASES)
def test_source_is_in_the_published_naming_with_experts_across_files(hub_sources, case) -> None:
    family = CASES[case][0]
    weight_map = json.loads((hub_sources[case]["bf16"] / "model.safetensors.index.json").read_text())["weight_map"]
    arch = from_transformers(tiny_model(case).config)
    layer = f"model.layers.{arch.moe_layers[0]}."
    expert, router = PUBLISHED[family]
    assert layer + expert in weight_map and layer + router in weight_map
    files = {f for k, f in weight_map.items() if k.startswith(layer) and ".experts." in k}
    assert len(files) > 1, "one layer's experts should span shards"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("naming", ["published", "fused"])
def test_every_source_tensor_is_classified(hub_sources, case, naming) -> None:
    """Each trunk tensor maps to its transformers 5 name, each expert matrix to (layer, expert, w1/w2/w3)."""
    model = tiny_model(case)
    arch = from_transformers(model.config)
    names = source_names(arch)
    if naming == "published":
        keys = json.loads((hub_sources[case]["bf16"] / "model.safetensors.index.json").read_text())["weight_map"]
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
    if naming == "published" and adapters()[arch.family].SOURCE_NAMES:  # per-expert names on the hub
        want = {(la, e, m) for la in arch.moe_layers for e in range(arch.num_experts) for m in ("w1", "w2", "w3")}
        assert experts == want and not fused
    else:
        assert fused == {(la, m) for la in arch.moe_layers for m in ("gate_up", "w2")} and not experts


def test_published_router_names_map_to_each_familys_module() -> None:
    phi = source_names(from_transformers(tiny_model("phimoe").config))
    assert phi.classify("model.layers.1.block_sparse_moe.gate.weight").name == "model.layers.1.mlp.router.weight"
    assert phi.classify("model.layers.1.mlp.router.weight").name == "model.layers.1.mlp.router.weight"
    mix = source_names(from_transformers(tiny_model("mixtral").config))
    assert mix.classify("model.layers.1.block_sparse_moe.gate.weight").name == "model.layers.1.mlp.gate.weight"
    assert mix.classify("model.layers.1.mlp.experts.3.up_proj.weight") == cv.SourceKey("expert", "w3", 1, 3)
    qwen2 = source_names(from_transformers(tiny_model("qwen2_moe").config))
    assert qwen2.classify("model.layers.1.mlp.gate_proj.weight").name == "model.layers.1.mlp.gate_proj.weight"
    with pytest.raises(cv.ConvertError, match="unexpected tensor"):
        cv.classify("model.layers.0.mlp.gate_proj.weight", qwen2)  # layer 0 is MoE: no dense MLP there
    with pytest.raises(cv.ConvertError, match="unexpected tensor"):
        cv.classify("model.layers.0.block_sparse_moe.experts.0.w1.weight", qwen2)  # not a Qwen spelling
    with pytest.raises(cv.ConvertError, match="Qwen2MoeForCausalLM"):
        cv.classify("model.layers.1.mlp.shared_expert.gate_proj.qweight", qwen2)


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "model family 'llama' is not supported"),
        ({"model_type": "granitemoe"}, "model family 'granitemoe' is not supported"),
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


# ---- converting: the layout written, byte for byte, and what it computes ---------------------------------


def test_the_layout_stores_what_the_source_names_cover() -> None:
    """The converter's trunk (source side) and the layout's trunk entries agree, but for a tied ``lm_head``."""
    for case in CASES:
        config = tiny_model(case).config
        arch = from_transformers(config)
        stored = {e.model_name for e in ModelSpec.of(config).trunk}
        dropped = {"lm_head.weight"} if arch.tie_embeddings and arch.family != "mixtral" else set()
        assert stored == set(arch.trunk_shapes) - dropped, case


@pytest.mark.parametrize("case", CASES)
def test_conversion_is_byte_identical_to_save_checkpoint(hub_sources, tmp_path, case) -> None:
    """Published and fused source names, streamed shard by shard, give the in-memory writer's bytes."""
    kw = dict(expert_bits=3, optimize=False, progress=False, log=lambda _: None)
    save_checkpoint(tiny_model(case), tmp_path / "ref", expert_bits=3, optimize=False, progress=False)
    ref = files_of(tmp_path / "ref")
    for naming in ("fp32", "fused"):
        out = cv.convert(hub_sources[case][naming], tmp_path / naming, **kw)
        got = files_of(out)
        assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
        assert [k for k in ref if ref[k] != got[k]] == [], naming
    ckpt = Checkpoint.open(tmp_path / "fp32", verify=True)  # the layout's own checks
    assert ckpt.family == CASES[case][0]
    assert f"tags: [{ckpt.family}," in (tmp_path / "fp32" / "README.md").read_text()


PROMPT = torch.tensor([[1, 17, 45, 99, 3, 64, 12, 7]])


@pytest.mark.parametrize("case", CASES)
def test_converted_model_matches_transformers_on_the_dequantized_weights(hub_sources, tmp_path, case) -> None:
    out = cv.convert(hub_sources[case]["bf16"], tmp_path / "out", progress=False, log=lambda _: None)
    ref = dequantized_reference(out)
    model = load_model(out, device="cpu", experts_on_device=3, progress=False)
    assert type(model).__name__ == from_transformers(ref.config).model_class
    with torch.no_grad():
        assert rel_err(model(PROMPT).logits, ref(PROMPT).logits) < 1e-3
    greedy = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(PROMPT, **greedy), ref.generate(PROMPT, **greedy))


class Interrupt(Exception):
    pass


def test_interrupted_conversion_of_a_family_with_dense_layers_resumes_byte_identical(
    hub_sources, tmp_path, monkeypatch
) -> None:
    kw = dict(expert_bits=2, optimize=False, progress=False, log=lambda _: None)
    src = hub_sources["qwen2_moe"]["bf16"]
    whole = files_of(cv.convert(src, tmp_path / "whole", **kw))
    real, count = cv.write_shard, [0]

    def flaky(tensors, path):
        count[0] += 1
        if count[0] == 9:
            raise Interrupt
        real(tensors, path)

    monkeypatch.setattr(cv, "write_shard", flaky)
    with pytest.raises(Interrupt):
        cv.convert(src, tmp_path / "resumed", **kw)
    monkeypatch.setattr(cv, "write_shard", real)
    cv.convert(src, tmp_path / "resumed", **kw)
    assert files_of(tmp_path / "resumed") == whole


SHIPPED = sorted((Path(cv.__file__).parents[1] / "data" / "configs").glob("*.json"))


@pytest.mark.parametrize("config", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_flagship_configs_plan_a_conversion(tmp_path, config) -> None:
    """Each family's real shapes pass the 2/3/4-bit group checks, and the plan sizes the real output:
    Mixtral-8x7B-Instruct at 2-bit experts is exactly the public demo repo's total size."""
    import shutil

    from safetensors.torch import save_file

    shutil.copyfile(config, tmp_path / "config.json")
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")  # the plan reads only the listing
    for bits in (2, 3, 4):
        plan = cv.plan_conversion(tmp_path, expert_bits=bits, optimize=False)
        assert plan.output_files == 1 + plan.arch.total_experts
        assert plan.report().split(": ", 1)[1].startswith(f"{plan.arch.name} {plan.arch.num_layers} layers")
        if config.stem == "mistralai--Mixtral-8x7B-Instruct-v0.1" and bits == 2:
            assert plan.output_bytes == 18_239_794_688  # the demo repo's whole model (docs/checkpoint_format.md)
