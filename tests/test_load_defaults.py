"""``load_model``'s defaults: experts on the device are the planner's choice ("auto"), explicit numbers kept."""

from __future__ import annotations

import torch

import colab_helpers.model as model_mod
from colab_helpers.planning import planner
from colab_helpers.runtime.attention import choose_attention
from colab_helpers.weights.checkpoint import Checkpoint
from colab_helpers.weights.convert import model_card


def _captured_config(monkeypatch, path, device, **kwargs):
    """Run ``load_model`` up to ``assemble_model`` (a CUDA load cannot run here) and return the config it gets."""
    seen = {}

    def fake_assemble(mcfg, quant, trunk, experts, cfg):
        seen["cfg"] = cfg
        return torch.nn.Module()

    monkeypatch.setattr(model_mod, "assemble_model", fake_assemble)
    monkeypatch.setattr(planner, "measure_budget", lambda dev: planner.Budget.given(15.0, 12.7))  # a free T4
    t4_attention = choose_attention(device, capability=(7, 5))  # no GPU here to ask
    model_mod.load_model(path, device=device, progress=False, attention=t4_attention, **kwargs)
    return seen["cfg"]


def test_cuda_default_is_the_planners_choice_not_two(monkeypatch, make_checkpoint) -> None:
    path = make_checkpoint(layers=2)
    cfg = _captured_config(monkeypatch, path, "cuda")
    ckpt = Checkpoint.open(path, verify=False)
    context = model_mod.context_tokens(cfg, ckpt.config)
    plan = planner.plan_memory(
        ckpt.config, ckpt.quant, planner.Budget.given(15.0, 12.7), "cuda", context, attention=cfg.attention
    )
    assert plan.chosen and cfg.experts_on_device == plan.experts_on_device
    assert cfg.experts_on_device != 2  # the tiny model fits whole on a T4: all 8 experts per layer
    assert cfg.device == "cuda"


def test_explicit_numbers_are_kept_on_cuda(monkeypatch, make_checkpoint) -> None:
    cfg = _captured_config(monkeypatch, make_checkpoint(layers=2), "cuda", experts_on_device=3)
    assert cfg.experts_on_device == 3
    cfg = _captured_config(monkeypatch, make_checkpoint(layers=2), "cuda", experts_on_device=[2, 5])
    assert cfg.experts_on_device == (2, 5)


def test_cpu_default_is_the_planners_cpu_choice(make_checkpoint) -> None:
    """On CPU the planner keeps 2 per layer (offloading exercised; the host RAM is the same either way)."""
    model = model_mod.load_model(make_checkpoint(layers=2), device="cpu", progress=False)
    assert model.offload_config.experts_on_device == 2 == model.memory_plan.experts_on_device


def test_assemble_model_refuses_auto_on_cuda_without_a_plan() -> None:
    import pytest

    with pytest.raises(ValueError, match="memory plan"):
        model_mod.resolved_experts("auto", torch.device("cuda"))
    assert model_mod.resolved_experts("auto", torch.device("cpu")) == 2
    with pytest.raises(ValueError, match="'auto'"):
        model_mod.resolved_experts("many", torch.device("cpu"))


def test_model_card_loads_with_the_planners_choice() -> None:
    """The card ``convert`` writes must not fix the experts on the GPU (the default plans them)."""
    import inspect

    source = inspect.getsource(model_card)
    assert 'ch.load_model(ch.download("OWNER/THIS-REPO"), device="cuda")' in source
    assert "experts_on_device=" not in source
    assert inspect.signature(model_mod.load_model).parameters["experts_on_device"].default == "auto"
