"""The planner for every supported MoE family: sizes from the family adapter, ``plan --model`` offline."""

from __future__ import annotations

import json

import pytest
import transformers
from huggingface_hub import constants

from colab_helpers.cli import main
from colab_helpers.planning.plan_cli import cli_main
from colab_helpers.planning.planner import GB, Budget, ModelSizes, _tensor_bytes, plan_memory, stock_config
from colab_helpers.runtime.experts import ExpertLayout
from colab_helpers.weights.checkpoint import QuantConfig
from colab_helpers.weights.families import architecture, from_transformers
from colab_helpers.weights.families.configs import shipped
from colab_helpers.weights.model_spec import ModelSpec

T4 = Budget.given(15, 12.7)
QUANTS = [QuantConfig(), *(QuantConfig.for_bits(a, e) for a in (2, 3, 4) for e in (2, 3, 4))]
TINY_MIXTRAL = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    vocab_size=101,
    head_dim=64,
)


def _checkpoint_sizes(config, quant):
    """What the Mixtral checkpoint layout and the expert cache allocate (the planner's former source)."""
    return (
        _tensor_bytes(dict(ModelSpec.of(config, quant).expert_tensors)),
        ExpertLayout.of(ModelSpec.of(config, quant)).nbytes,
        _tensor_bytes(dict(ModelSpec.of(config, quant).trunk_tensors)),
    )


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("tied", [False, True])
def test_mixtral_sizes_equal_the_checkpoint_layout(quant, tied):
    for config in (stock_config(), transformers.MixtralConfig(**TINY_MIXTRAL, tie_word_embeddings=tied)):
        s = ModelSizes.of(config, quant)
        assert (s.expert_bytes, s.slot_bytes, s.trunk_bytes) == _checkpoint_sizes(config, quant)
        assert s == ModelSizes.of(from_transformers(config), quant)


def test_stock_mixtral_numbers_are_unchanged():
    """Numbers the planner printed before the family adapters (demo quantization: 4-bit attention, 2-bit experts)."""
    s = ModelSizes.of(stock_config(), QuantConfig())
    assert (s.expert_bytes, s.slot_bytes, s.trunk_bytes) == (66_404_364, 66_404_736, 1_240_277_504)
    assert (s.num_layers, s.moe_layers, s.num_experts, s.intermediate, s.family) == (32, 32, 8, 14336, "Mixtral")


def test_shipped_mixtral_plans_exactly_like_the_default(capsys):
    assert cli_main(["--vram-gb", "15", "--ram-gb", "12.7", "--json"]) == 0
    default = capsys.readouterr().out
    assert (
        cli_main(["--model", "mistralai/Mixtral-8x7B-Instruct-v0.1", "--vram-gb", "15", "--ram-gb", "12.7", "--json"])
        == 0
    )
    assert capsys.readouterr().out == default


@pytest.mark.parametrize("repo", sorted(shipped()))
def test_plan_model_offline_for_every_shipped_config(repo, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import; the download checks this
    rc = cli_main(["--model", repo, "--vram-gb", "15", "--ram-gb", "12.7", "--json"])
    out, err = capsys.readouterr()
    plan = json.loads(out)
    assert rc == (0 if plan["fits"] else 2)
    arch = architecture(json.loads(shipped()[repo].read_text()))
    assert f"memory plan: {arch.name} {arch.num_layers} layers" in err
    assert (
        plan["host_experts"]
        + sum(
            plan["experts_on_device"]
            if isinstance(plan["experts_on_device"], list)
            else [plan["experts_on_device"]] * len(arch.moe_layers)
        )
        == arch.total_experts
    )


def test_dense_layers_and_shared_experts_are_in_the_trunk():
    """Qwen2-MoE with dense layers: experts per MoE layer only; shared expert + dense MLPs quantized in the trunk."""
    cfg = transformers.Qwen2MoeConfig(
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        mlp_only_layers=[0],
        vocab_size=128,
    )
    arch = from_transformers(cfg)
    quant = QuantConfig()
    s = ModelSizes.of(arch, quant)
    assert (s.num_layers, s.moe_layers, s.total_experts) == (4, 3, 24)
    mlp = 3 * sum(quant.attention.nbytes(x) for x in arch.shared_expert_shapes.values())
    mlp += sum(quant.attention.nbytes(x) for x in arch.dense_mlp_shapes.values())
    assert s.resident_mlp_bytes == mlp
    assert s.intermediate == 512  # the widest MLP sets the prefill activations
    plan = plan_memory(arch, quant, Budget.given(None, 64), "cpu")
    assert plan.fits and len(plan.per_layer) == 3
    gpu = plan_memory(arch, quant, Budget.given(15, 12.7), "cuda")
    assert gpu.per_layer == (8, 8, 8) and gpu.host_experts == 0
    assert "memory plan: Qwen2-MoE 4 layers (3 MoE) x 8 experts" in gpu.report()


def test_qwen3_30b_a3b_fits_a_free_t4_at_two_bits():
    arch = architecture(json.loads(shipped()["Qwen/Qwen3-30B-A3B"].read_text()))
    plan = plan_memory(arch, QuantConfig.for_bits(4, 2), T4, "cuda")
    assert plan.fits and plan.host_experts == 0 and plan.vram_peak < 15 * GB


def _run(argv, capsys):
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_unsupported_family_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    rc, out, err = _run(["--model", str(tmp_path), "--vram-gb", "15", "--ram-gb", "12.7"], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "'llama' is not supported" in err and "Qwen3MoeForCausalLM" in err


@pytest.mark.parametrize(
    "model, says",
    [("./no/such/folder", "no such folder or file"), ("nobody/NoSuchMoE-1B", "could not get its config.json")],
)
def test_missing_config_is_one_line_exit_2(model, says, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import; the download checks this
    rc, out, err = _run(["--model", model, "--vram-gb", "15", "--ram-gb", "12.7"], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1 and says in err
    assert "Qwen/Qwen3-30B-A3B" in err  # the shipped configs are named


def test_folder_without_config_is_one_line(tmp_path, capsys):
    rc, _, err = _run(["--model", str(tmp_path), "--vram-gb", "15", "--ram-gb", "12.7"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "config.json: file is missing" in err


def test_a_config_file_is_planned(tmp_path, capsys):
    path = tmp_path / "olmoe.json"
    path.write_text(shipped()["allenai/OLMoE-1B-7B-0924"].read_text())
    rc, out, err = _run(["--model", str(path), "--vram-gb", "15", "--ram-gb", "12.7", "--json"], capsys)
    assert rc == 0 and json.loads(out)["experts_on_device"] == 64 and "memory plan: OLMoE" in err


def _trace(path, steps: int, layers: int, k: int, experts: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    routed = np.stack([rng.permutation(experts)[:k] for _ in range(steps * layers)]).reshape(steps, layers, k)
    np.savez(path, s_decode_experts=routed.astype(np.int16))
    return path


def test_replay_takes_experts_and_top_k_from_the_model(tmp_path, capsys):
    trace = _trace(tmp_path / "olmoe.npz", steps=6, layers=16, k=8, experts=64)
    model = "allenai/OLMoE-1B-7B-0924"
    assert main(["replay", str(trace), "--model", model, "--experts-on-device", "64", "--policies", "lru"]) == 0
    out = capsys.readouterr().out
    assert "top-8" in out and "timing.TimingModel of OLMoE 2-bit: no host cost" in out
    assert main(["replay", str(trace), "--model", model, "--experts-on-device", "64", "--json"]) == 0
    rates = json.loads(capsys.readouterr().out)
    import numpy as np

    routed = np.load(trace)["s_decode_experts"]
    cold = sum(len(np.unique(routed[:, layer])) for layer in range(16))  # every expert fits: only first uses miss
    assert rates["lru"] == rates["belady"] == pytest.approx(1 - cold / routed.size)


def test_replay_refuses_a_trace_of_another_model(tmp_path, capsys):
    trace = _trace(tmp_path / "mixtral.npz", steps=4, layers=32, k=2, experts=8)
    rc = main(["replay", str(trace), "--model", "Qwen/Qwen3-30B-A3B", "--experts-on-device", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "top-8 in 48 MoE layers" in err and "top-2 in 32 layers" in err


def test_a_broken_config_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "olmoe", "num_hidden_layers": "many"}))
    rc, out, err = _run(["--model", str(tmp_path), "--vram-gb", "15", "--ram-gb", "12.7"], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: --model")


# ---- a hub repo's config.json (the fake hub on 127.0.0.1, tests/fake_hub.py) -----------------------------


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return monkeypatch


def test_plan_model_reads_a_hub_config_then_its_cached_copy_offline(hub_env, capsys):
    from fake_hub import FakeHub

    olmoe = shipped()["allenai/OLMoE-1B-7B-0924"].read_bytes()
    server = FakeHub()
    server.add_repo("someone/my-olmoe", files={"config.json": olmoe})
    server.start()
    try:
        hub_env.setenv("HF_ENDPOINT", server.url)
        argv = ["--model", "someone/my-olmoe", "--vram-gb", "15", "--ram-gb", "12.7", "--json"]
        cli_main(argv)
        out, err = capsys.readouterr()
        assert "hub someone/my-olmoe config.json" in err and json.loads(out)["experts_on_device"]
    finally:
        server.stop()
    hub_env.setenv("HF_HUB_OFFLINE", "1")  # the hub is gone: the cached config.json still plans
    cli_main(argv)
    out, err = capsys.readouterr()
    assert "config.json (cached)" in err and json.loads(out)["experts_on_device"]


def test_an_unreachable_hub_is_one_line_without_the_librarys_retries(hub_env, capsys):
    import socket

    from colab_helpers.usage import UsageError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(UsageError, match="unreachable.*shipped for offline planning") as info:
        cli_main(["--model", "someone/not-cached", "--vram-gb", "15", "--ram-gb", "12.7"])
    assert "\n" not in str(info.value)
    assert "Retrying" not in capsys.readouterr().err


# ---- no Mixtral-only claims for other families -----------------------------------------------------


@pytest.mark.parametrize("repo", sorted(shipped()))
def test_upgrade_suggestions_quote_the_papers_mmlu_for_mixtral_only(repo):
    """The paper's MMLU figures were measured on Mixtral-8x7B: another family's upgrade says its bytes and fit."""
    from colab_helpers.planning.multigpu import plan_gpus, single_gpu_upgrades

    arch = architecture(json.loads(shipped()[repo].read_text()))
    quant = QuantConfig.for_bits(4, 2)
    big = Budget.given(80, 400)  # every family fits at 2 bits and can upgrade
    plan = single_gpu_upgrades(plan_memory(arch, quant, big, "cuda"), arch, quant)
    reports = [plan.report()]
    assert any(x.startswith("3-bit experts fit (") for x in plan.suggestions)
    if arch.num_layers >= 2 and not arch.dense_layers:
        reports.append(plan_gpus(arch, quant, [40 * GB, 40 * GB], 400 * GB).report())
    for report in reports:
        assert ("MMLU" in report) == (arch.family == "mixtral"), report
        assert f"memory plan: {arch.name} " in report
        if arch.family != "mixtral":
            assert "Mixtral" not in report.replace("assumed: as counted on Mixtral's decoder layer", "")


def test_trunk_row_names_the_quantized_mlps_of_families_that_have_them():
    arch = architecture(json.loads(shipped()["Qwen/Qwen1.5-MoE-A2.7B"].read_text()))
    plan = plan_memory(arch, QuantConfig(), T4, "cuda")
    assert "trunk: 4-bit attention and shared/dense MLPs + fp16" in plan.report()
    assert "trunk: 4-bit attention + fp16" in plan_memory(stock_config(), QuantConfig(), T4, "cuda").report()


# ---- a CPU run's dense copies, as load_model allocates them -------------------------------------------


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", __import__("colab_helpers.sim.random_moe", fromlist=["x"]).families())
def test_cpu_plan_counts_the_dense_copies_a_loaded_model_holds(family, tied, tmp_path):
    """dense_on_cpu: the plan's fp32 rows equal what a loaded tiny model holds after a forward (every QuantLinear
    dequantized: attention, shared experts, dense-layer MLPs; every fp32 parameter; one slot's expert)."""
    import torch

    from colab_helpers.model import close_model, load_model
    from colab_helpers.planning.planner import plan_for_checkpoint
    from colab_helpers.runtime.linear import QuantLinear
    from colab_helpers.sim.random_moe import random_model, small_config
    from colab_helpers.weights.checkpoint import save_checkpoint

    save_checkpoint(random_model(small_config(family, tie_word_embeddings=tied)), tmp_path, progress=False)
    model = load_model(tmp_path, device="cpu", experts_on_device=2, progress=False)
    with torch.no_grad():
        model(torch.tensor([[1, 5, 9, 17, 33, 65, 3, 7]]))
    held = {"attention": 0, "mlp": 0}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            assert mod.weight_q.dense is not None, name  # one forward dequantized every resident weight
            held["attention" if ".self_attn." in name else "mlp"] += _nbytes(mod.weight_q.dense)
    params = {id(t): t for n, t in [*model.named_parameters(), *model.named_buffers()] if "rotary" not in n}
    fp32 = sum(_nbytes(t) for t in params.values() if t.dtype == torch.float32)
    cache = model.expert_cache
    slot = next(i for i, dense in enumerate(cache._slot_dense) if dense)
    expert = sum(_nbytes(w.dense) for w in cache._slot_weights[slot].values())
    close_model(model)

    plan = plan_for_checkpoint(tmp_path, "cpu", experts_on_device=2, budget=Budget.given(None, 64))
    rows = {r.item: r.ram for r in plan.rows}
    assert rows["fp32 copies of embed/lm_head/norms/router"] == fp32
    assert rows["fp32 attention weights (dense_on_cpu)"] == held["attention"]
    assert rows.get("fp32 shared-expert/dense-layer MLPs (dense_on_cpu)", 0) == held["mlp"]
    assert (held["mlp"] > 0) == (family in ("qwen2_moe", "qwen3_moe", "deepseek_v2"))
    lent = len(plan.kv_lent_slot_starts)  # slots the KV cache lends get their dense copies too
    what = f"{plan.slots} slots" + (f" + {lent} lent by the KV cache" if lent else "")
    assert rows[f"fp32 experts in {what} (dense_on_cpu)"] == (plan.slots + lent) * expert
    assert (lent > 0) == (family not in ("gpt_oss", "deepseek_v2"))  # sliding windows, MLA: nothing lent
    off = plan_for_checkpoint(tmp_path, "cpu", experts_on_device=2, budget=Budget.given(None, 64), dense_on_cpu=False)
    assert not any("dense_on_cpu" in r.item for r in off.rows)
