"""Several GPUs: the plan's arithmetic for Kaggle 2 x T4, Colab L4 and A100, the bit-width upgrade it
suggests, and the placement code path (layers split across devices, hidden states moved at the boundary)
run with a device list of identical CPU devices (no machine here has two GPUs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from colab_helpers.conversation.generation import SamplingConfig, generate_stream
from colab_helpers.model import OffloadConfig, dequantized_reference, load_model
from colab_helpers.planning.multigpu import plan_gpus
from colab_helpers.planning.planner import GB, Budget, ModelSizes, plan_memory, stock_config
from colab_helpers.runtime.placement import ExpertCacheGroup, LayerPlacement
from colab_helpers.weights.checkpoint import QuantConfig
from colab_helpers.weights.model_spec import ModelSpec

PROMPT = torch.tensor([[1, 5, 9, 17, 33, 65, 3, 7]])


def quant(bits: int) -> QuantConfig:
    return QuantConfig.for_bits(4, bits)


# ---- the plan ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3])
def test_kaggle_two_t4s_hold_every_expert_without_offloading(bits: int) -> None:
    plan = plan_gpus(stock_config(), quant(bits), [15 * GB, 15 * GB], 29 * GB)
    assert plan.fits and not plan.offloading and plan.host_experts == 0
    assert plan.experts_on_device == 8 and plan.layers_per_gpu == (16, 16)
    s = ModelSizes.of(stock_config(), quant(bits))
    for g in plan.gpus:
        assert g.vram_peak <= 15 * GB
        slots = next(r for r in g.rows if r.item.startswith("expert slots"))
        assert slots.vram == 16 * 8 * s.slot_bytes  # every expert of its 16 layers, no spare slots
    # the two shares of the trunk add up to the whole trunk exactly
    trunks = [next(r for r in g.rows if r.item.startswith("trunk")).vram for g in plan.gpus]
    assert sum(trunks) == s.trunk_bytes
    assert plan.to_dict()["vram_peak_gb"] == [round(v / GB, 3) for v in plan.vram_peaks]


def test_small_gpus_split_layers_and_offload_the_rest() -> None:
    plan = plan_gpus(stock_config(), quant(2), [8 * GB, 8 * GB], 29 * GB)
    s = ModelSizes.of(stock_config(), quant(2))
    assert plan.fits and plan.offloading and plan.layers_per_gpu == (16, 16)
    assert 0 < plan.host_experts < s.total_experts
    pinned = next(r for r in plan.ram_rows if r.item.startswith("pinned"))
    assert pinned.ram == plan.host_experts * s.slot_bytes
    assert all(g.spare_slots == 2 for g in plan.gpus)


def test_too_little_ram_is_refused_with_the_reason() -> None:
    plan = plan_gpus(stock_config(), quant(2), [4 * GB, 4 * GB], 8 * GB)
    assert not plan.fits and any(r.startswith("host RAM") for r in plan.reasons)


def test_uneven_gpus_get_layers_by_their_size() -> None:
    plan = plan_gpus(stock_config(), quant(2), [24 * GB, 12 * GB], 29 * GB)
    assert plan.fits and plan.layers_per_gpu[0] > plan.layers_per_gpu[1]


def test_l4_fits_every_2bit_expert_and_suggests_3bit() -> None:
    from colab_helpers.planning.multigpu import single_gpu_upgrades

    plan = plan_memory(stock_config(), quant(2), Budget.given(24, 50), "cuda")
    assert plan.fits and plan.experts_on_device == 8
    plan = single_gpu_upgrades(plan, stock_config(), quant(2))
    assert any(x.startswith("3-bit experts fit") for x in plan.suggestions)
    assert "better: 3-bit" in plan.report()


def test_a100_holds_every_3bit_and_4bit_expert() -> None:
    for bits in (3, 4):
        plan = plan_memory(stock_config(), quant(bits), Budget.given(40, 80), "cuda")
        assert plan.fits and plan.experts_on_device == 8 and plan.host_experts == 0


def _plan_json(*args: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-m", "colab_helpers", "plan", *args, "--json"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


def test_cli_contract_kaggle_and_l4() -> None:
    kaggle = _plan_json("--gpus", "2", "--vram-gb", "15", "--ram-gb", "29")
    assert {"fits", "experts_on_device", "expert_bits", "vram_peak_gb", "ram_peak_gb"} <= kaggle.keys()
    assert kaggle["fits"] and kaggle["experts_on_device"] == 8 and len(kaggle["vram_peak_gb"]) == 2
    l4 = _plan_json("--vram-gb", "24", "--ram-gb", "50")
    assert {"fits", "experts_on_device", "expert_bits", "vram_peak_gb", "ram_peak_gb"} <= l4.keys()
    assert l4["fits"] and any(s.startswith("3-bit experts fit") for s in l4["suggestions"])


# ---- the placement, on identical CPU devices -----------------------------------------------------------


def test_placement_map() -> None:
    p = LayerPlacement.even(["cpu", "cpu", "cpu"], 8)
    assert p.counts == (3, 3, 2) and p.starts == (0, 3, 6)
    assert [p.device_index(i) for i in range(8)] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert p.same_device(1, 2) and not p.same_device(2, 3)
    with pytest.raises(IndexError):
        p.device_index(8)
    with pytest.raises(ValueError):
        LayerPlacement(("cpu", "cpu"), (4, 0))


def test_split_model_matches_the_reference_and_crosses_the_boundary(make_checkpoint) -> None:
    path = make_checkpoint(expert_bits=3, layers=4)
    placement = LayerPlacement.even(["cpu", "cpu"], 4)
    cfg = OffloadConfig(device="cpu", experts_on_device=(2, 3, 2, 1), placement=placement, progress=False)
    model = load_model(path, config=cfg)
    ref = dequantized_reference(path)
    assert isinstance(model.expert_cache, ExpertCacheGroup)
    assert [c.num_layers for c in model.expert_cache.caches] == [2, 2]
    assert [c.capacity for c in model.expert_cache.caches] == [[2, 3], [2, 1]]
    blocks = [layer.mlp for layer in model.model.layers]
    assert [len(b._following) for b in blocks] == [1, 0, 1, 0]  # no prefetch guess across the boundary
    with torch.no_grad():
        out, want = model(PROMPT).logits, ref(PROMPT).logits
    assert ((out - want).norm() / want.norm()).item() < 1e-3
    assert model.boundary_hooks.crossings == 1  # one forward, one boundary
    stats = model.expert_cache.stats
    assert stats.accesses > 0 and len(stats.hits) == 4
    result = generate_stream(model, _tokenizer_stub(), PROMPT, SamplingConfig(4))
    assert result.error is None and model.boundary_hooks.crossings > 1
    model.expert_cache.check_invariants()
    from colab_helpers.model import close_model

    close_model(model)
    assert model.expert_cache.closed


def _tokenizer_stub():
    class Tok:
        def decode(self, ids, **kw):
            return " ".join(str(i) for i in ids)

    return Tok()


def test_every_gpu_path_plans_one_range_per_visible_gpu(make_checkpoint, monkeypatch) -> None:
    """``load_model(device="cuda")`` with two visible GPUs: the config it builds (no GPU here to load onto)."""
    from colab_helpers import model as model_mod
    from colab_helpers.weights.checkpoint import Checkpoint

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (15 * GB, 15 * GB))
    ckpt = Checkpoint.open(make_checkpoint(expert_bits=2, layers=4))
    plan, cfg = model_mod._every_gpu(ckpt, OffloadConfig(device="cuda", progress=False))
    assert plan.fits and cfg.placement.devices == ("cuda:0", "cuda:1") and cfg.placement.counts == (2, 2)
    assert cfg.experts_on_device == (8, 8, 8, 8)


# ---- every all-MoE family, and the ones a split refuses -------------------------------------------------


def _family_config(family: str, **overrides):
    from colab_helpers.sim.random_moe import small_config

    # Qwen's tiny variants have dense layers on purpose; these overrides make every layer MoE
    all_moe = {"qwen2_moe": dict(mlp_only_layers=[]), "qwen3_moe": dict(decoder_sparse_step=1)}
    all_moe = {**all_moe, "deepseek_v2": dict(first_k_dense_replace=0)}.get(family, {})
    return small_config(family, **{**all_moe, **overrides})


def _families() -> list[str]:
    from colab_helpers.sim.random_moe import families

    return families()


@pytest.mark.parametrize("family", _families())
def test_each_gpus_trunk_share_is_the_bytes_of_its_layers(family) -> None:
    """A GPU's trunk row = the checkpoint's trunk tensors of its layers, + the embeddings on the first GPU,
    + lm_head, its bias and the final norm on the last (read from the layout, not from the planner)."""
    from colab_helpers.planning.planner import _tensor_bytes

    config = _family_config(family, num_hidden_layers=5)
    q = quant(2)
    plan = plan_gpus(config, q, [15 * GB] * 3, 64 * GB)
    assert plan.fits and plan.host_experts == 0 and sum(plan.layers_per_gpu) == 5
    tensors = dict(ModelSpec.of(config, q).trunk_tensors)
    for g in plan.gpus:
        layers = range(g.first_layer, g.first_layer + g.num_layers)
        mine = {n: t for n, t in tensors.items() if n.startswith("model.layers.") and int(n.split(".")[2]) in layers}
        if g.index == 0:
            mine.update({n: t for n, t in tensors.items() if n.startswith("model.embed_tokens.")})
        if g.index == len(plan.gpus) - 1:
            mine.update({n: t for n, t in tensors.items() if n.startswith(("lm_head.", "model.norm."))})
        trunk = next(r for r in g.rows if r.item.startswith("trunk"))
        assert trunk.vram == _tensor_bytes(mine), (family, g.index)


@pytest.mark.parametrize("repo", ["Qwen/Qwen3-30B-A3B", "allenai/OLMoE-1B-7B-0924", "microsoft/Phi-3.5-MoE-instruct"])
def test_cli_plans_other_families_on_two_gpus(repo) -> None:
    plan = _plan_json("--model", repo, "--gpus", "2", "--vram-gb", "15", "--ram-gb", "29")
    assert plan["fits"] and plan["gpus"] == 2 and sum(plan["layers_per_gpu"]) > 2
    assert not any("MMLU" in s for s in plan["suggestions"])


@pytest.mark.parametrize(
    "family, overrides, why",
    [
        ("qwen3_moe", dict(decoder_sparse_step=2), "Qwen3-MoE with dense layers cannot be split across devices yet"),
        ("qwen2_moe", dict(mlp_only_layers=[1]), "Qwen2-MoE with dense layers cannot be split across devices yet"),
        ("olmoe", dict(tie_word_embeddings=True), "OLMoE with tied embeddings cannot be split across devices yet"),
    ],
)
def test_a_split_is_refused_alike_by_the_plan_the_cli_and_the_loader(family, overrides, why, tmp_path, capsys):
    from colab_helpers.cli import main
    from colab_helpers.sim.random_moe import random_model
    from colab_helpers.weights.checkpoint import save_checkpoint

    config = _family_config(family, **overrides)
    with pytest.raises(ValueError, match=why):
        plan_gpus(config, quant(2), [15 * GB, 15 * GB], 29 * GB)
    save_checkpoint(random_model(config), tmp_path, progress=False)
    rc = main(["plan", "--model", str(tmp_path), "--gpus", "2", "--vram-gb", "15", "--ram-gb", "29"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1 and why in err
    placement = LayerPlacement.even(["cpu", "cpu"], config.num_hidden_layers)
    with pytest.raises(ValueError, match=why):
        load_model(tmp_path, config=OffloadConfig(device="cpu", placement=placement, progress=False))


@pytest.mark.parametrize("family", _families())
def test_every_all_moe_family_splits_across_devices_and_matches_the_reference(family, tmp_path) -> None:
    """The placement the plan hands ``load_model``, on identical CPU devices: same logits as one device."""
    from colab_helpers.model import close_model
    from colab_helpers.sim.random_moe import random_model
    from colab_helpers.weights.checkpoint import save_checkpoint

    config = _family_config(family, num_hidden_layers=4)
    save_checkpoint(random_model(config), tmp_path, progress=False)
    plan = plan_gpus(config, quant(2), [15 * GB, 15 * GB], 29 * GB)
    placement = plan.placement(["cpu", "cpu"])
    assert placement.counts == (2, 2)
    cfg = OffloadConfig(device="cpu", experts_on_device=(2, 3, 2, 1), placement=placement, progress=False)
    model = load_model(tmp_path, config=cfg)
    ref = dequantized_reference(tmp_path)
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 3, 7]])
    with torch.no_grad():
        out, want = model(ids).logits, ref(ids).logits
    assert ((out - want).norm() / want.norm()).item() < 1e-3
    assert model.boundary_hooks.crossings == 1
    close_model(model)
