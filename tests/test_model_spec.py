"""``model_spec.ModelSpec``, the one model description, agrees with every other place that derives shapes and sizes.

For every supported family (its tiny random config and its shipped flagship config) and the real Mixtral-8x7B
config, at 2/3/4-bit experts: the family adapter's ``MoEArchitecture`` (its own transformers state-dict names),
the planner's ``ModelSizes``, the cache's ``ExpertLayout``, the converter's size estimate, the checkpoint
functions and the files a writer really puts on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from colab_helpers.planning.planner import STOCK_CONFIG_FILE, ModelSizes
from colab_helpers.runtime.experts import ExpertLayout
from colab_helpers.sim import random_moe
from colab_helpers.weights import checkpoint as ck
from colab_helpers.weights.families import UnsupportedFamilyError, architecture
from colab_helpers.weights.families.configs import shipped
from colab_helpers.weights.model_spec import SLOT_ALIGN, ModelSpec, QuantConfig, arch_of

QUANTS = {bits: QuantConfig.for_bits(4, bits) for bits in (2, 3, 4)}
TINY = {f: random_moe.small_config(f) for f in random_moe.families()}
FLAGSHIPS = {repo: json.loads(path.read_text()) for repo, path in shipped().items()}
REAL_MIXTRAL = json.loads(STOCK_CONFIG_FILE.read_text())


def _configs() -> list:
    out = [pytest.param(c, id=f"tiny-{f}") for f, c in TINY.items()]
    out += [pytest.param(architecture(d), id=repo.split("/")[1]) for repo, d in FLAGSHIPS.items()]
    return out + [pytest.param(REAL_MIXTRAL, id="real-mixtral-dict")]


@pytest.mark.parametrize("bits", sorted(QUANTS))
@pytest.mark.parametrize("config", _configs())
def test_spec_agrees_with_every_other_derivation(config, bits: int) -> None:
    source = config if not isinstance(config, dict) else ck.config_from_dict(config)
    quant = QUANTS[bits].fitted(arch_of(source))  # the settings save_checkpoint and the planner use
    spec = ModelSpec.of(config, quant)
    arch = spec.arch

    # the family adapter and the checkpoint functions
    assert arch == arch_of(source)
    attention = {
        f"model.layers.{i}.self_attn.{p}": s for i in range(arch.num_layers) for p, s in arch.attention_shapes.items()
    }
    assert spec.quantized_trunk_shapes.items() >= attention.items()  # attention is quantized, in every layer
    assert spec.expert_shapes == arch.expert_shapes
    # every trunk tensor is one of the family's transformers state-dict tensors, with its shape
    # (Mixtral's layout stores lm_head even when tied; the others' lm_head is absent when tied)
    trunk = {e.model_name: e.shape for e in spec.trunk}
    assert trunk == {k: v for k, v in arch.trunk_shapes.items() if k in trunk}
    missing = set(arch.trunk_shapes) - set(trunk)
    assert missing == ({"lm_head.weight"} if arch.tie_embeddings and arch.family != "mixtral" else set())
    assert len(spec.expert_tensors) == 21  # 3 matrices x 7 stored tensors

    # the planner's sizes and the cache's flat buffer
    sizes = ModelSizes.of(source, quant)
    assert spec.expert_bytes == sizes.expert_bytes
    assert spec.expert_slot_bytes == sizes.slot_bytes == ExpertLayout.of(spec).nbytes
    assert spec.trunk_bytes == sizes.trunk_bytes
    assert spec.attention_layer_bytes == sizes.attention_layer_bytes
    assert spec.resident_mlp_bytes == sizes.resident_mlp_bytes
    assert (spec.num_layers, spec.num_experts, spec.top_k) == (sizes.num_layers, sizes.num_experts, sizes.top_k)
    assert len(spec.moe_layers) == sizes.expert_layers and spec.total_experts == sizes.total_experts

    # the index the writer emits says the same total
    assert ck.layout_index(source, quant)["metadata"]["total_size"] == spec.checkpoint_bytes


def test_the_real_mixtral_checkpoint_is_the_demo_repos_bytes() -> None:
    """18,239,794,688 B = 18.24 GB = 16.99 GiB: the public 2-bit demo repository (docs/checkpoint_format.md)."""
    spec = ModelSpec.of(REAL_MIXTRAL)
    assert (spec.family, spec.num_layers, spec.num_experts, spec.top_k) == ("mixtral", 32, 8, 2)
    assert spec.quant == QuantConfig()  # the demo's settings: no quantization key in its config.json
    assert spec.expert_bytes == 66_404_364 and spec.trunk_bytes == 1_240_277_504
    assert spec.checkpoint_bytes == 18_239_794_688
    assert 0 <= spec.expert_slot_bytes - spec.expert_bytes < 21 * SLOT_ALIGN


def test_the_spec_is_resolved_once_and_read_only() -> None:
    a = ModelSpec.of(TINY["mixtral"], QUANTS[2])
    assert ModelSpec.of(arch_of(TINY["mixtral"]), QUANTS[2]) is a
    with pytest.raises(TypeError):
        a.expert_tensors["w1.W_q"] = (torch.uint8, (1,))  # type: ignore[index]


def test_a_written_checkpoint_holds_exactly_what_the_spec_says(tmp_path: Path) -> None:
    """The tiny bundled checkpoint's own files: every header's tensors and the folder's spec agree."""
    from colab_helpers.weights.tiny import tiny_model_path

    root = Path(tiny_model_path())
    spec = ModelSpec.read(root)
    ckpt = ck.Checkpoint.open(root)
    assert spec is ModelSpec.of(ckpt.config, ckpt.quant)
    stored = {}
    for name in sorted(set(ckpt.trunk_files.values())):
        stored.update(ck.read_header(root / name))
    assert {k: (v.dtype, v.shape) for k, v in stored.items()} == dict(spec.trunk_tensors)
    layer, expert = next(iter(ckpt.expert_files))
    infos = ck.read_header(root / ckpt.expert_files[(layer, expert)])
    assert {k: (v.dtype, v.shape) for k, v in infos.items()} == dict(spec.expert_tensors)
    assert sum(v.nbytes for v in infos.values()) == spec.expert_bytes


def test_an_unsupported_family_is_refused_with_the_list() -> None:
    with pytest.raises(UnsupportedFamilyError, match="supported"):
        ModelSpec.of({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
