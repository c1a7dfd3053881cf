"""The memory planner: exact sizes of the real model, the free-T4 plan, refusals with reasons, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from colab_helpers.planning import planner
from colab_helpers.planning.plan_cli import cli_main
from colab_helpers.planning.planner import (
    GB,
    Budget,
    Margins,
    MemoryPlanError,
    ModelSizes,
    check_fits,
    plan_for_checkpoint,
    plan_memory,
    stock_config,
)
from colab_helpers.runtime.attention import NO_GQA, AttentionPath, choose_attention
from colab_helpers.weights.checkpoint import (
    INDEX_FILE,
    QUANT_CONFIG_KEY,
    QuantConfig,
)
from colab_helpers.weights.model_spec import ModelSpec

T4 = Budget.given(15, 12.7)


@pytest.fixture(scope="module")
def config():
    return stock_config()


def test_stock_config_is_mixtral_8x7b(config):
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 14336, 32)
    assert (config.num_attention_heads, config.num_key_value_heads, config.num_local_experts) == (32, 8, 8)
    assert (config.num_experts_per_tok, config.vocab_size) == (2, 32000)


def test_sizes_of_the_real_checkpoint(config):
    """The byte counts CHECKPOINT_FORMAT.md lists for the public 2-bit/4-bit repo."""
    s = ModelSizes.of(config, QuantConfig())
    assert s.expert_bytes == 66_404_364
    assert s.attention_layer_bytes == 22_292_496
    assert s.trunk_bytes == 1_240_277_504
    assert s.trunk_bytes + 256 * s.expert_bytes == 18_239_794_688  # whole model
    assert 0 <= s.slot_bytes - s.expert_bytes < 21 * 64  # 21 tensors, each padded to 64 bytes
    assert s.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2 == 131_072


def test_free_t4_gets_at_least_five_experts_per_layer(config):
    plan = plan_memory(config, QuantConfig(), T4, "cuda", context=4096)
    assert plan.fits, plan.report()
    assert min(plan.per_layer) >= 5
    assert max(plan.per_layer) - min(plan.per_layer) <= 1
    assert plan.vram_peak <= 15 * GB and plan.ram_peak <= 12.7 * GB
    assert plan.spare_slots == 2 and plan.host_experts == 256 - sum(plan.per_layer)
    assert plan.slots * plan.sizes.slot_bytes == next(r.vram for r in plan.rows if r.item.startswith("expert slots"))
    report = plan.report()
    assert "arithmetic:" in report and "FITS" in report and "66,404,364" in report


def test_free_t4_keeps_a_reserve_and_counts_the_chosen_attention_path(config):
    """>= 0.5 GB of VRAM never planned, and the prefill scratch of the path a T4 runs (attention.py)."""
    plan = plan_memory(config, QuantConfig(), T4, "cuda", context=4096)
    assert plan.fits and min(plan.per_layer) >= 5
    assert plan.vram_unplanned >= 0.5 * GB and plan.vram_reserve >= 0.5 * GB
    assert plan.vram_peak + plan.vram_unplanned - plan.vram_reserve == 15 * GB
    path = plan.attention
    assert (path.implementation, path.kernel, path.capability, path.prefill_chunk) == (
        NO_GQA,
        "memory_efficient",
        (7, 5),
        1024,
    )
    attn = next(r for r in plan.rows if "attention scratch" in r.item)
    assert attn.vram == path.scratch_bytes(4096, 32, 8, 128, 2)  # K/V expanded to 32 heads + one chunk's mask
    hidden = next(r for r in plan.rows if "hidden states" in r.item)
    assert hidden.vram == 8 * 1024 * 4096 * 2  # activations of one 1024-token chunk, not of 4096 tokens
    dequant = next(r for r in plan.rows if "dequantized weight" in r.item)
    assert dequant.vram == plan.sizes.dequant_peak_fp16 > 14336 * 4096 * 2


def test_the_gqa_math_path_would_cost_experts(config):
    """Stock transformers on a T4 (GQA flag -> math kernel, whole-prompt prefill): 4.3 GB of fp32 scores."""
    stock_t4 = AttentionPath("sdpa", "math", (7, 5), None, "stock transformers on a T4")
    math = plan_memory(config, QuantConfig(), T4, "cuda", context=4096, attention=stock_t4)
    chosen = plan_memory(config, QuantConfig(), T4, "cuda", context=4096)
    assert next(r.vram for r in math.rows if "attention scratch" in r.item) > 4.29 * GB
    assert math.device_experts < chosen.device_experts - 64
    flash = plan_memory(config, QuantConfig(), T4, "cuda", attention=choose_attention("cpu", capability=(8, 0)))
    assert flash.attention.kernel == "flash" and flash.fits


def test_a_measured_budget_counts_the_live_process(config):
    """No assumed import cost: the RSS measured now (CUDA build, an old model still alive, ...) is a row."""
    live = Budget(vram=15 * GB, ram=int(12.7 * GB), rss_now=2 * GB, measured=True)
    plan = plan_memory(config, QuantConfig(), live, "cuda")
    items = {r.item: r.ram for r in plan.rows}
    assert plan.process_rss == 2 * GB and items["CUDA host memory loaded after planning"] == Margins().cuda_host_later
    assert "Python + torch + transformers + colab_helpers" not in items
    what_if = plan_memory(config, QuantConfig(), T4, "cuda")
    assert what_if.process_rss == Margins().python_rss
    assert plan.ram_peak - what_if.ram_peak == 2 * GB + Margins().cuda_host_later - sum(
        r.ram for r in what_if.rows if r.item.startswith(("Python", "CUDA runtime host"))
    )


def test_more_vram_never_means_fewer_experts(config):
    ks = [sum(plan_memory(config, QuantConfig(), Budget.given(v, 40), "cuda").per_layer) for v in (8, 12, 15, 24)]
    assert ks == sorted(ks)
    full = plan_memory(config, QuantConfig(), Budget.given(80, 40), "cuda")
    assert full.per_layer == (8,) * 32 and full.spare_slots == 0 and full.host_experts == 0
    assert full.pinned_alloc_bytes == 0


def test_six_and_six_does_not_fit_and_says_what_would(config):
    plan = plan_memory(config, QuantConfig(), Budget.given(6, 6), "cuda")
    assert not plan.fits
    assert any(r.startswith("host RAM") for r in plan.reasons)
    text = " ".join(plan.suggestions)
    assert "bigger GPU" in text and "more host RAM" in text and "3-bit experts are larger" in text
    with pytest.raises(MemoryPlanError, match="host RAM"):
        check_fits(plan)


def test_check_fits_passes_a_plan_that_fits(config):
    plan = plan_memory(config, QuantConfig(), T4, "cuda")
    assert check_fits(plan) is plan


def test_long_context_suggests_a_shorter_one(config):
    plan = plan_memory(config, QuantConfig(), T4, "cuda", context=32768)
    assert not plan.fits
    assert any("--context" in s for s in plan.suggestions)


def test_pinned_rounding_is_counted_and_explained(config):
    """If pinning falls back to pin_memory=True (power-of-two blocks), 130+ host experts (> 8.6 GB) take 17.2 GB.

    The embedding table stays on the GPU here: in host RAM it would free 4 slots, leaving 126 host experts
    (8.37 GB, rounded to 8.6 GB), and the plan would fit."""
    plan = plan_memory(
        config,
        QuantConfig(),
        Budget.given(11.7, 12.7),
        "cuda",
        margins=Margins(pinned_pow2=True),
        embedding_on_host=False,
    )
    assert plan.host_experts >= 130 and plan.pinned_host_bytes == plan.host_experts * plan.sizes.slot_bytes
    assert plan.pinned_alloc_bytes == 2**34
    assert not plan.fits
    assert any("power-of-two" in s for s in plan.suggestions)
    no_round = plan_memory(config, QuantConfig(), Budget.given(11.7, 12.7), "cuda", margins=Margins(pinned_pow2=False))
    assert no_round.fits and no_round.pinned_alloc_bytes == no_round.pinned_host_bytes


def test_fixed_k_that_does_not_fit_points_to_the_planners_choice(config):
    plan = plan_memory(
        config, QuantConfig(), Budget.given(15, 14), "cuda", experts_on_device=3, margins=Margins(pinned_pow2=True)
    )
    assert not plan.fits and plan.pinned_alloc_bytes == 2**34
    assert plan.suggestions[0].startswith("let the planner choose")


def test_fixed_experts_beyond_vram_are_refused(config):
    plan = plan_memory(config, QuantConfig(), T4, "cuda", experts_on_device=8)
    assert not plan.fits and plan.reasons[0].startswith("VRAM")


def test_per_layer_list_is_accepted_and_returned(config):
    ks = (6,) * 10 + (5,) * 22
    plan = plan_memory(config, QuantConfig(), T4, "cuda", experts_on_device=ks)
    assert plan.experts_on_device == ks
    assert plan_memory(config, QuantConfig(), T4, "cuda", experts_on_device=5).experts_on_device == 5
    with pytest.raises(ValueError):
        plan_memory(config, QuantConfig(), T4, "cuda", experts_on_device=(5,) * 31)


def test_three_bit_experts_are_bigger(config):
    two = ModelSizes.of(config, QuantConfig.for_bits(4, 2))
    three = ModelSizes.of(config, QuantConfig.for_bits(4, 3))
    assert three.expert_bytes > two.expert_bytes
    p2 = plan_memory(config, QuantConfig.for_bits(4, 2), Budget.given(24, 20), "cuda")
    p3 = plan_memory(config, QuantConfig.for_bits(4, 3), Budget.given(24, 20), "cuda")
    assert sum(p3.per_layer) < sum(p2.per_layer)


def test_cpu_plan_keeps_everything_in_ram(config):
    plan = plan_memory(config, QuantConfig(), Budget.given(None, 64), "cpu", context=512, dense_on_cpu=False)
    assert plan.vram_peak == 0 and plan.pinned_host_bytes == 0
    buffers = next(r.ram for r in plan.rows if r.item.startswith("expert buffers"))
    assert buffers == (256 + 2) * plan.sizes.slot_bytes
    assert plan.fits


def test_cpu_dense_copies_are_counted(config):
    """OffloadConfig.dense_on_cpu keeps fp32 weights of attention and of every slot, lent ones too: 4 B per weight."""
    plan = plan_memory(config, QuantConfig(), Budget.given(None, 64), "cpu", context=512)
    dense = {r.item: r.ram for r in plan.rows if "dense_on_cpu" in r.item}
    # 512 tokens x 262,144 B of fp32 K/V = 134,217,728 B: two 66,404,736 B slots to lend
    assert plan.kv_lent_slot_starts == [258, 5] and plan.slots == 66  # offsets 67,812,864 and 1,408,000 B
    assert sum(dense.values()) == 4 * (32 * plan.sizes.attention_params + (66 + 2) * plan.sizes.expert_params)
    assert not plan.fits


def test_gpu_plan_needs_vram(config):
    with pytest.raises(ValueError, match="VRAM"):
        plan_memory(config, QuantConfig(), Budget.given(None, 12), "cuda")


def test_measure_budget_uses_mem_get_info_and_psutil(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (14_500_000_000, 15_000_000_000))
    b = planner.measure_budget("cuda")
    assert b.vram == 14_500_000_000 and b.measured
    assert b.ram >= b.rss_now > 0
    assert planner.measure_budget("cpu").vram is None


def test_margins_are_documented():
    doc = (planner.STOCK_CONFIG_FILE.parents[2] / "docs" / "memory_plan.md").read_text()
    m = Margins()
    numbers = ("0.53", "0.79", f"{m.python_rss / GB:.2f}", f"{m.vram_reserve / GB:.1f} GB", "499", "171")
    for number in (*numbers, f"{m.cuda_growth / GB:.1f}", f"{m.cuda_host_rss / GB:.1f}", "PowerOf2Ceil"):
        assert number in doc


# ---- plan_for_checkpoint and the CLI -------------------------------------------------------------


def _index_only_checkpoint(path, config, quant):
    """config.json + index: all ``Checkpoint.open(verify=False)`` reads."""
    cfg = {k: v for k, v in config.to_dict().items() if not isinstance(v, dict)} | {"model_type": "mixtral"}
    cfg[QUANT_CONFIG_KEY] = quant.to_dict()
    (path / "config.json").write_text(json.dumps(cfg))
    weight_map = {k: "model-00001.safetensors" for k in dict(ModelSpec.of(config, quant).trunk_tensors)}
    for layer in range(config.num_hidden_layers):
        for e in range(config.num_local_experts):
            prefix = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
            weight_map |= {
                prefix + k: f"expert-{layer}-{e}.safetensors" for k in dict(ModelSpec.of(config, quant).expert_tensors)
            }
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_plan_for_checkpoint_reads_bits_from_the_folder(tmp_path, config):
    quant = QuantConfig.for_bits(4, 3)
    _index_only_checkpoint(tmp_path, config, quant)
    plan = plan_for_checkpoint(tmp_path, device="cuda", budget=Budget.given(24, 20))
    assert plan.sizes.expert_bits == 3 and plan.sizes == ModelSizes.of(config, quant)
    assert plan.fits


def test_cli_t4_fits_with_json(capsys):
    assert cli_main(["--vram-gb", "15", "--ram-gb", "12.7", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # stdout is the JSON object alone: it pipes into json.tool
    assert data["fits"] is True
    ks = data["experts_on_device"]
    assert min(ks if isinstance(ks, list) else [ks]) >= 5
    assert data["vram_peak_gb"] <= 15 and data["ram_peak_gb"] <= 12.7
    assert data["vram_unplanned_gb"] >= 0.5 and data["vram_reserve_gb"] >= 0.5
    assert data["attention"] == {
        "implementation": NO_GQA,
        "kernel": "memory_efficient",
        "capability": [7, 5],
        "prefill_chunk": 1024,
    }
    assert data["prefill_tokens"] == 1024 and data["process_rss_gb"] == 0.85
    assert sum(r["vram_gb"] for r in data["rows"]) == pytest.approx(data["vram_peak_gb"], abs=0.01)
    assert "arithmetic" in captured.err


def test_cli_six_six_exits_2_with_reason(capsys):
    assert cli_main(["--vram-gb", "6", "--ram-gb", "6", "--json"]) == 2
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["fits"] is False and data["reasons"]
    assert "DOES NOT FIT" in captured.err


def test_cli_measures_this_machine(capsys):
    code = cli_main(["--json", "--context", "256"])
    data = json.loads(capsys.readouterr().out)
    assert code == (0 if data["fits"] else 2)
    assert data["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cli_through_python_m(capsys):
    from colab_helpers.cli import main

    assert main(["plan", "--vram-gb", "15", "--ram-gb", "12.7"]) == 0
    assert "FITS" in capsys.readouterr().out


def test_budget_given_is_decimal_gb():
    b = Budget.given(15, 12.7)
    assert b.vram == 15 * GB and b.ram == int(12.7 * GB) and not b.measured
    assert replace(b, vram=None).describe().startswith("no GPU")
