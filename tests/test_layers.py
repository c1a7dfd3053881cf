"""Imports point one way: conversation -> runtime -> weights; planning and sim read the model description.

The package is layered (lowest first in ``LAYERS``); a module may import from its own layer and the layers
before it, never from a later one, lazy imports inside functions included. The runtime never imports the
planner (``colab_helpers.model.load_model`` is where the plan meets the engine) nor the simulation apparatus.
tests/test_imports.py checks for circles with the same graph.
"""

from __future__ import annotations

from test_imports import import_graph

LAYERS: tuple[tuple[str, ...], ...] = (  # lowest first
    ("colab_helpers.usage",),  # CLI usage errors: a leaf every layer may use
    ("colab_helpers.weights",),  # model description, families, quantized format, checkpoint, download
    ("colab_helpers.runtime",),  # kernels, attention, expert cache, MoE layer, placement
    ("colab_helpers.planning",),  # memory plan, multi-GPU split
    ("colab_helpers.model",),  # load_model: weights + plan + runtime
    ("colab_helpers.conversation",),  # generation, session, chat widget
    ("colab_helpers.sim",),  # twin, traces, dispatch counts, random models
    ("colab_helpers.walkthroughs",),  # the notebooks' helpers
    ("colab_helpers.cli", "colab_helpers.notebook", "colab_helpers.__main__"),  # entry points
)


def layer_of(module: str, layers=LAYERS) -> int | None:
    for rank, prefixes in enumerate(layers):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def violations(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """``"a -> b"`` for every import of a later layer (the root package's lazy ``__init__`` is no layer)."""
    found = []
    for module, targets in sorted(graph.items()):
        here = layer_of(module, layers)
        for target in sorted(targets):
            there = layer_of(target, layers)
            if here is not None and there is not None and there > here:
                found.append(f"{module} -> {target}")
    return found


def test_the_checker_finds_an_upward_import() -> None:
    layers = (("p.low",), ("p.high",))
    graph = {"p.low.a": {"p.high.b"}, "p.high.b": {"p.low.a"}, "p.low.c": {"p.low.a"}}
    assert violations(graph, layers) == ["p.low.a -> p.high.b"]


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in import_graph() if m != "colab_helpers" and layer_of(m) is None]
    assert unplaced == [], f"add these modules' package to LAYERS: {unplaced}"


def test_imports_point_down_the_layers() -> None:
    graph = import_graph()
    assert "colab_helpers.weights.checkpoint" in graph["colab_helpers.model"]  # the graph is really read
    assert violations(graph) == []


def test_the_runtime_never_imports_sim_or_conversation() -> None:
    graph = import_graph()
    below = [m for m in graph if m.startswith(("colab_helpers.runtime", "colab_helpers.weights"))]
    assert below, "the runtime and weights packages are read"
    for module in below:
        bad = {t for t in graph[module] if t.startswith(("colab_helpers.sim", "colab_helpers.conversation"))}
        assert not bad, f"{module} imports {sorted(bad)}"
