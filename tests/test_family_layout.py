"""The checkpoint layout for every supported family: what is stored where, the family read back, refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from colab_helpers.planning.planner import ModelSizes, _tensor_bytes
from colab_helpers.sim.random_moe import families, random_model, small_config
from colab_helpers.weights.checkpoint import (
    CONFIG_FILE,
    INDEX_FILE,
    Checkpoint,
    CheckpointError,
    QuantConfig,
    expert_file,
    save_checkpoint,
    trunk_file,
)
from colab_helpers.weights.families import UnsupportedFamilyError
from colab_helpers.weights.model_spec import ModelSpec

FAMILIES = families()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(family) -> (model, path)``: each family's tiny random model, written once (4/2-bit)."""
    done: dict[str, tuple] = {}

    def make(family: str):
        if family not in done:
            model = random_model(family)
            out = tmp_path_factory.mktemp(f"layout_{family}")
            save_checkpoint(model, out, optimize=False, progress=False)
            done[family] = (model, out)
        return done[family]

    return make


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_of_the_model_is_stored_once(family):
    """Trunk entries plus the fused experts of the MoE layers are exactly the model's state dict."""
    model = random_model(family)
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight")
    arch = ModelSpec.of(model.config).arch
    names = [e.model_name for e in ModelSpec.of(model.config).trunk]
    experts = [f"model.layers.{i}.mlp.experts.{n}" for i in arch.moe_layers for n in ("gate_up_proj", "down_proj")]
    assert sorted(names + experts) == sorted(sd)
    for e in ModelSpec.of(model.config).trunk:
        assert tuple(sd[e.model_name].shape) == e.shape, e.name


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_checkpoint_opens_as_its_family(saved, family):
    model, path = saved(family)
    arch = ModelSpec.of(model.config).arch
    ck = Checkpoint.open(path)
    assert ck.family == family and ck.arch == arch
    assert type(ck.config) is type(model.config)
    config = json.loads((path / CONFIG_FILE).read_text())
    assert config["model_type"] == family and config["architectures"] == [arch.model_class]
    # experts: one file each, indexed by the real decoder layer; only the MoE layers have them
    assert sorted(ck.expert_files) == [(i, e) for i in arch.moe_layers for e in range(arch.num_experts)]
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(files) == 1 + len(arch.moe_layers) * arch.num_experts
    last = arch.moe_layers[-1]
    index = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    assert index[f"model.layers.{last}.{block}.experts.7.w2.W_q"] == expert_file(ck.config, last, 7) == files[-1]
    expert = load_file(path / files[-1])
    assert set(expert) == set(dict(ModelSpec.of(ck.config, ck.quant).expert_tensors)) and len(expert) == 21
    trunk = load_file(path / trunk_file(ck.config))
    assert set(trunk) == set(dict(ModelSpec.of(ck.config, ck.quant).trunk_tensors))


def test_family_specific_trunk_tensors(saved):
    """What each family adds to the trunk, quantized or float16, under transformers 5 names."""
    want = {
        "olmoe": ["model.layers.0.self_attn.q_norm.weight", "model.layers.1.mlp.gate.weight"],
        "qwen2_moe": [
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.mlp.shared_expert.down_proj.W_q",
            "model.layers.2.mlp.shared_expert_gate.weight",
            "model.layers.1.mlp.gate_proj.W_q",  # the dense layer's MLP, quantized like attention
        ],
        "qwen3_moe": ["model.layers.0.mlp.up_proj.W_q", "model.layers.3.self_attn.k_norm.weight"],
        "phimoe": [
            "lm_head.bias",
            "model.norm.bias",
            "model.layers.1.mlp.router.weight",
            "model.layers.0.self_attn.o_proj.bias",
        ],
    }
    for family, names in want.items():
        if family not in FAMILIES:
            continue
        trunk = load_file(saved(family)[1] / "model-00001-of-00017.safetensors")
        for name in names:
            assert name in trunk, (family, name)
            assert trunk[name].dtype == (torch.uint8 if name.endswith("W_q") else torch.float16)
    if "qwen2_moe" in FAMILIES:
        assert not any(
            ".layers.1.mlp.gate." in k for k in load_file(saved("qwen2_moe")[1] / "model-00001-of-00017.safetensors")
        )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", [(4, 2), (2, 3), (3, 4)])
def test_the_planner_sizes_are_the_layout(family, bits):
    """The planner's trunk and expert bytes equal what the layout stores, for every family and bit width."""
    config = small_config(family)
    quant = QuantConfig.for_bits(*bits)
    sizes = ModelSizes.of(config, quant)
    assert sizes.trunk_bytes == _tensor_bytes(dict(ModelSpec.of(config, quant).trunk_tensors))
    assert sizes.expert_bytes == _tensor_bytes(dict(ModelSpec.of(config, quant).expert_tensors))


def test_a_mixtral_config_without_model_type_opens_as_mixtral(saved, tmp_path):
    path = tmp_path / "ck"
    shutil.copytree(saved("mixtral")[1], path)
    config = json.loads((path / CONFIG_FILE).read_text())
    del config["model_type"], config["architectures"]
    (path / CONFIG_FILE).write_text(json.dumps(config))
    assert Checkpoint.open(path).family == "mixtral"


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "mixtral"])
def test_the_family_comes_from_config_json(saved, family, tmp_path):
    """The same files with another supported family named fail on the first tensor that family lacks."""
    path = tmp_path / "ck"
    shutil.copytree(saved(family)[1], path)
    config = json.loads((path / CONFIG_FILE).read_text())
    config["model_type"] = "mixtral"
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError):
        Checkpoint.open(path)


def test_an_unsupported_family_is_refused_with_the_supported_list(saved, tmp_path):
    path = tmp_path / "ck"
    shutil.copytree(saved("mixtral")[1], path)
    config = json.loads((path / CONFIG_FILE).read_text())
    config["model_type"], config["architectures"] = "granitemoe", ["GraniteMoeForCausalLM"]
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(UnsupportedFamilyError) as err:
        Checkpoint.open(path)
    assert isinstance(err.value, CheckpointError)  # the loaders' and the CLI's one error type
    assert str(err.value).startswith("config.json: model family 'granitemoe' is not supported; supported:")
    for family in FAMILIES:
        assert f"({family})" in str(err.value)


def test_saving_an_unsupported_model_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=32
    )
    with pytest.raises(UnsupportedFamilyError, match="'llama' is not supported"):
        save_checkpoint(LlamaForCausalLM(config), tmp_path, optimize=False, progress=False)
    assert not list(tmp_path.glob("*.safetensors"))
