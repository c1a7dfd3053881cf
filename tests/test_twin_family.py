"""``twin --model``: the T4 twin for any family (sizes, resident MLPs, plan), and whose routing it replays."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from colab_helpers.planning.planner import ModelSizes
from colab_helpers.sim import twin_cli
from colab_helpers.sim.twin_family import (
    STICKINESS,
    FamilyTwin,
    repeat_fraction,
    synthetic_routing,
    trace_mismatch,
)
from colab_helpers.sim.twin_record import EngineRun, build_narrow_engine, record_engine
from colab_helpers.weights.checkpoint import QuantConfig
from colab_helpers.weights.families import architecture
from colab_helpers.weights.families import from_transformers as architecture_of
from colab_helpers.weights.families.configs import load_config

TRACE = Path(os.environ.get("COLAB_HELPERS_TRACE") or "/work/shared/traces/mixtral-8x7b-instruct-routing.npz")
Q2 = QuantConfig.for_bits(4, 2)


def _arch(repo: str):
    return architecture(load_config(repo)[0])


def _mixtral_shaped_trace(path: Path, tokens: int = 40) -> Path:
    """A stand-in of the real trace's shape: 32 layers, top-2 of 8 experts."""
    np.savez(path, seq_decode_experts=synthetic_routing(32, 8, 2, tokens, seed=3).astype(np.int8))
    return path


def _small_qwen2_moe(tmp_path: Path) -> Path:
    """A Qwen2-MoE config with a shared expert and one dense layer (mlp_only_layers), small full size."""
    cfg = {
        "model_type": "qwen2_moe",
        "architectures": ["Qwen2MoeForCausalLM"],
        "hidden_size": 1024,
        "intermediate_size": 2048,
        "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 1024,
        "num_hidden_layers": 3,
        "mlp_only_layers": [1],
        "decoder_sparse_step": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
        "vocab_size": 4096,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


# ---- synthetic routing ----------------------------------------------------------------------------


def test_synthetic_routing_is_distinct_in_range_deterministic_and_as_local_as_stated():
    rows = synthetic_routing(4, 64, 8, tokens=300, seed=1)
    assert rows.shape == (300, 4, 8) and rows.min() >= 0 and rows.max() < 64
    assert all(len(set(r.tolist())) == 8 for r in rows.reshape(-1, 8))
    assert np.array_equal(rows, synthetic_routing(4, 64, 8, tokens=300, seed=1))
    # Mixtral's shape: the stated model gives the repeat fraction it was fitted to (0.376 on the real trace)
    f = repeat_fraction(synthetic_routing(32, 8, 2, tokens=400, seed=0))
    assert f == pytest.approx(STICKINESS + (1 - STICKINESS) * 2 / 8, abs=0.02)
    assert f == pytest.approx(0.376, abs=0.02)


@pytest.mark.skipif(not TRACE.is_file(), reason=f"the real routing trace ({TRACE}) is absent")
def test_stickiness_is_the_excess_repeat_fraction_of_the_real_mixtral_trace():
    z = np.load(TRACE)
    names = ["gsm8k0", "gsm8k1", "humaneval0", "humaneval1"]
    same = sum(repeat_fraction(z[f"{n}_decode_experts"]) * (len(z[f"{n}_decode_experts"]) - 1) for n in names)
    f = same / sum(len(z[f"{n}_decode_experts"]) - 1 for n in names)
    assert f == pytest.approx(0.376, abs=0.005)
    assert STICKINESS == pytest.approx((f - 2 / 8) / (1 - 2 / 8), abs=0.005)


# ---- whose trace ----------------------------------------------------------------------------------


def test_a_mixtral_trace_is_never_taken_for_another_family(tmp_path):
    arrays = dict(np.load(_mixtral_shaped_trace(tmp_path / "t.npz")))
    assert trace_mismatch(arrays, _arch("mistralai/Mixtral-8x7B-Instruct-v0.1")) is None
    # Phi-3.5-MoE has Mixtral's 32 layers and top-2, but 16 experts: the ids give the trace away
    assert "8 experts" in trace_mismatch(arrays, _arch("microsoft/Phi-3.5-MoE-instruct"))
    assert "top-2 in 32 layers" in trace_mismatch(arrays, _arch("allenai/OLMoE-1B-7B-0924"))
    arrays["num_experts"] = np.array(16)  # a recorder that saved the expert count is believed
    assert trace_mismatch(arrays, _arch("microsoft/Phi-3.5-MoE-instruct")) is None


def test_cli_refuses_another_models_trace_in_one_line(capsys, tmp_path):
    path = _mixtral_shaped_trace(tmp_path / "mixtral.npz")
    assert twin_cli.cli_main(["--model", "microsoft/Phi-3.5-MoE-instruct", "--trace", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a trace of another model" in err[0] and "16" in err[0]


def test_other_family_with_the_mixtral_trace_in_the_environment_runs_on_labelled_synthetic_routing(
    capsys, monkeypatch, tmp_path
):
    monkeypatch.setenv("COLAB_HELPERS_TRACE", str(_mixtral_shaped_trace(tmp_path / "mixtral.npz")))
    argv = ["--model", "allenai/OLMoE-1B-7B-0924", "--json", "--tokens", "1", "--warmup", "0"]
    assert twin_cli.cli_main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    got = json.loads(out[-1])
    assert got["routing"].startswith("SYNTHETIC routing") and "Mixtral" not in got["routing"].split("(")[0]
    assert any(line.startswith("routing: SYNTHETIC") for line in out)
    assert got["model"].startswith("allenai/OLMoE-1B-7B-0924 (OLMoE")
    assert got["experts_on_device"] == [64] * 16 and got["tok_s"] > 0  # the free-T4 plan: every expert fits
    assert got["loads_per_token"] == 0 and got["hit_rate"] == 1.0


@pytest.mark.parametrize(
    "model, message",
    [
        ("no/such/place", "--model no/such/place"),
        ("llama", "not supported"),  # a folder holding a config of another family
        ("Qwen/Qwen2-57B-A14B", "does not fit"),  # nothing to project on a free T4
    ],
)
def test_bad_model_is_one_line_exit_2(capsys, tmp_path, model, message):
    if model == "llama":
        llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
        (tmp_path / "config.json").write_text(json.dumps(llama))
        model = str(tmp_path)
    assert twin_cli.cli_main(["--model", model, "--routing", "synthetic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("twin:") and message in err[0], err


def test_paper_takes_no_other_model(capsys):
    assert twin_cli.cli_main(["--paper", "--model", "allenai/OLMoE-1B-7B-0924"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--paper" in err[0]


def test_mixtral_8x7b_by_name_is_the_twins_own_narrow_mixtral():
    """``--model mistralai/Mixtral-8x7B-Instruct-v0.1`` takes exactly the path without ``--model``."""
    target = twin_cli._target("mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert target.family is None
    assert twin_cli._target("microsoft/Phi-3.5-MoE-instruct").family is not None


# ---- the narrow engine of another family ----------------------------------------------------------


def _full_bytes_per_token(arch, quant) -> float:
    """What one decode token reads at full size: attention, resident MLPs, lm_head, and top-k experts per MoE layer."""
    s = ModelSizes.of(arch, quant)
    experts = len(arch.moe_layers) * arch.top_k * s.expert_bytes
    return arch.num_layers * s.attention_layer_bytes + s.resident_mlp_bytes + 2 * arch.vocab * arch.hidden + experts


@pytest.mark.parametrize(
    "repo",
    [
        "allenai/OLMoE-1B-7B-0924",
        "microsoft/Phi-3.5-MoE-instruct",
        "qwen2-small",
        "openai/gpt-oss-20b",
    ],  # not DeepSeek-V2: its latent attention re-expands K/V through kv_b_proj over the context every step
)
def test_recorded_bytes_are_the_full_size_models(repo, tmp_path):
    """With every expert resident, a token reads the model's full-size weights: within 5% (1-2% measured;
    activations, norms, routers and the KV cache are the rest)."""
    path = str(_small_qwen2_moe(tmp_path)) if repo == "qwen2-small" else repo
    arch = architecture(load_config(path)[0])
    fam = FamilyTwin(arch, Q2)
    routing = synthetic_routing(len(arch.moe_layers), arch.num_experts, arch.top_k, 64)
    ks = (arch.num_experts,) * len(arch.moe_layers)
    s = record_engine(EngineRun(ks, decode_tokens=2, prompt_tokens=4, family=fam), routing)
    read = s.bytes_per_token("fused") + s.bytes_per_token("eager")
    assert read == pytest.approx(_full_bytes_per_token(arch, Q2), rel=0.05)
    assert s.per_token("copy") == 0 and s.hit_rate == 1.0
    assert s.per_token("sync") >= len(arch.moe_layers)  # one routing readback per MoE layer at least


def test_shared_experts_and_dense_layers_are_the_familys_own_modules(tmp_path):
    from colab_helpers.runtime.linear import QuantLinear
    from colab_helpers.runtime.moe import OffloadedMoE

    arch = architecture(load_config(str(_small_qwen2_moe(tmp_path)))[0])
    assert arch.moe_layers == (0, 2) and arch.dense_layers == (1,) and arch.shared_intermediate == 1024
    fam = FamilyTwin(arch, Q2)
    routing = synthetic_routing(2, 8, 2, 64)
    model = build_narrow_engine(EngineRun((3, 3), decode_tokens=1, family=fam), routing)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    mlps = [layer.mlp for layer in model.model.layers]
    assert isinstance(mlps[0], OffloadedMoE) and type(mlps[0].shared_expert).__name__ == "Qwen2MoeMLP"
    assert isinstance(mlps[0].shared_expert.down_proj, QuantLinear) and mlps[0].shared_expert_gate is not None
    assert type(mlps[1]).__name__ == "Qwen2MoeMLP" and isinstance(mlps[1].down_proj, QuantLinear)  # dense layer
    assert mlps[0]._following == [mlps[2]] and mlps[2]._following == []  # prefetch links MoE layers only
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2-MoE's q/k/v biases
    # every resident weight is scaled to its full-size bytes
    scale = model.twin_scale
    down = mlps[1].down_proj
    narrow = sum(b.nbytes for b in down.buffers())
    full = Q2.attention.nbytes(arch.dense_mlp_shapes["down_proj"])
    assert scale.weights[down.W_q.untyped_storage().data_ptr()] * narrow == pytest.approx(full)
    # with experts offloaded (3 of 8 per layer), only the MoE layers load experts
    s = record_engine(EngineRun((3, 3), decode_tokens=4, prompt_tokens=4, family=fam), routing)
    loads = [op for op in s.ops if op.kind == "copy" and op.to_device]
    expert = ModelSizes.of(arch, Q2).expert_bytes  # whole experts, or a guess's chunks (eighths)
    assert loads and all(round(op.nbytes / expert * 8) in range(1, 9) for op in loads)


@pytest.mark.parametrize(
    "repo, extras",
    [
        ("allenai/OLMoE-1B-7B-0924", ["self_attn.q_norm", "self_attn.k_norm"]),
        ("Qwen/Qwen3-30B-A3B", ["self_attn.q_norm", "self_attn.k_norm"]),
        ("microsoft/Phi-3.5-MoE-instruct", ["self_attn.q_proj.bias", "self_attn.o_proj.bias", "input_layernorm.bias"]),
        (
            "openai/gpt-oss-20b",
            ["self_attn.sinks", "self_attn.o_proj.bias", "mlp.router.bias", "mlp.experts.down_proj_bias"],
        ),
        ("deepseek-ai/DeepSeek-V2-Lite-Chat", ["self_attn.kv_a_proj_with_mqa", "self_attn.kv_a_layernorm"]),
    ],
)
def test_the_narrow_engine_is_the_familys_own_class_with_its_extras(repo, extras):
    """q/k norms, biases and LayerNorm are the family's own modules, so their launches are recorded."""
    arch = _arch(repo)
    config = FamilyTwin(arch, Q2).narrow_config()
    assert type(config).__name__.removesuffix("Config") == arch.model_class.removesuffix("ForCausalLM")
    narrow = architecture_of(config)
    assert (narrow.moe_layers, narrow.num_experts, narrow.top_k, narrow.router) == (
        arch.moe_layers,
        arch.num_experts,
        arch.top_k,
        arch.router,
    )
    names = set(narrow.trunk_shapes)
    assert all(f"model.layers.0.{e}" in names or f"model.layers.0.{e}.weight" in names for e in extras)
    assert narrow.lm_head_bias == arch.lm_head_bias and narrow.norm_bias == arch.norm_bias


# ---- the README's families table ------------------------------------------------------------------


def _readme_family_rows() -> dict[str, list[str]]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Other MoE families", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| `")]
    return {r.split("`")[1]: [c.strip() for c in r.strip("|").split("|")] for r in rows}


def test_readme_families_table_agrees_with_the_planner_and_labels_its_projections():
    """The 2-bit plan cell of each shipped family is the planner's; a projection is labelled with its routing."""
    from colab_helpers.planning.planner import Budget, plan_memory
    from colab_helpers.weights.families.configs import shipped

    rows = _readme_family_rows()
    assert set(rows) == set(shipped())
    for repo, cells in rows.items():
        arch = _arch(repo)
        plan = plan_memory(arch, Q2, Budget.given(15, 12.7), "cuda")
        plan_cell, twin_cell = cells[2], cells[-1]
        if not plan.fits:
            assert plan_cell.startswith("does not fit") and twin_cell.startswith("none")
            continue
        ks = sorted(set(plan.per_layer))
        want = f"all {arch.num_experts}" if ks == [arch.num_experts] else "-".join(map(str, ks))
        assert plan_cell.startswith("fits") and want in plan_cell, (repo, plan_cell, want)
        routing = "real routing trace" if arch.family == "mixtral" else "synthetic routing"
        assert routing in twin_cell, (repo, twin_cell)
