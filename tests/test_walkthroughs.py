"""Walkthrough helpers: every plotted figure is titled and labelled, and baselines are computed like the curves.

Static checks (AST, no plotting): every ``plot_*`` helper sets a title and axis labels, and no notebook
cell draws a figure of its own without a title. Plus the numbers behind the cache walkthrough's claims.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import numpy as np
import pytest

from colab_helpers.walkthroughs import cache

ROOT = Path(__file__).resolve().parents[1]
HELPERS = sorted((ROOT / "colab_helpers" / "walkthroughs").glob("*.py"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
DRAWS = {"plot", "bar", "barh", "imshow", "scatter", "hist", "figure", "subplots", "step", "fill_between"}
TITLES = {"title", "set_title", "suptitle"}


def _plot_helpers():
    for path in HELPERS:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("plot_"):
                yield pytest.param(node, id=f"{path.stem}.{node.name}")


def _called(node) -> set[str]:
    return {
        n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
        for n in ast.walk(node)
        if isinstance(n, ast.Call)
    }


@pytest.mark.parametrize("fn", list(_plot_helpers()))
def test_every_plot_helper_titles_and_labels_its_figure(fn) -> None:
    called = _called(fn)
    assert called & {"set_title", "suptitle"}, f"{fn.name} draws a figure without a title"
    assert "set_ylabel" in called, f"{fn.name}: y axis unlabelled"
    labelled_x = "set_xlabel" in called or any(
        isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "set_xticks" and len(n.args) == 2
        for n in ast.walk(fn)
    )
    assert labelled_x, f"{fn.name}: x axis unlabelled"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_notebook_cell_draws_an_untitled_figure(path: Path) -> None:
    for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
        if cell.cell_type != "code":
            continue
        tree = ast.parse(cell.source)
        draws = {
            n.func.attr
            for n in ast.walk(tree)
            if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and isinstance(n.func.value, ast.Name)
            and n.func.value.id in ("plt", "ax", "fig")
            and n.func.attr in DRAWS
        }
        if draws:
            assert _called(tree) & TITLES, f"{path.name} cell {i} draws ({draws}) without a title"


def _sticky_trace(steps: int = 60, layers: int = 4, experts: int = 8) -> dict[str, np.ndarray]:
    """Routing that mostly repeats the previous step's experts: what makes a cache worth having."""
    rng = np.random.default_rng(0)
    rows = np.zeros((steps, layers, 2), dtype=np.int8)
    rows[0] = [0, 1]
    for t in range(1, steps):
        for layer in range(layers):
            rows[t, layer] = rows[t - 1, layer] if rng.random() < 0.8 else rng.choice(experts, 2, replace=False)
    return {"top_k": np.array(2), "num_experts": np.array(experts), "s_decode_experts": rows}


def test_random_routing_keeps_the_trace_shape_and_draws_distinct_experts() -> None:
    trace = _sticky_trace()
    trace["s_decode_experts"][5, 1] = -1  # padding stays padding
    rand = cache.random_routing(trace, 8, seed=1)
    got = rand["s_decode_experts"]
    assert got.shape == trace["s_decode_experts"].shape and got.dtype == trace["s_decode_experts"].dtype
    assert (got[5, 1] == -1).all() and int(rand["num_experts"]) == 8
    valid = got[(got >= 0).all(axis=-1)]
    assert (valid[:, 0] != valid[:, 1]).all() and valid.min() >= 0 and valid.max() < 8
    assert abs(cache.reuse_rate(got) - 0.25) < 0.08, "uniform routing reuses about 2 of 8"


def test_the_random_baseline_is_replayed_like_the_curves_and_stays_under_belady() -> None:
    trace, ks = _sticky_trace(), range(2, 8)
    sweep = cache.hit_rate_sweep(trace, ks, ["lfu_decay", "belady"])
    rand = cache.hit_rate_sweep(cache.random_routing(trace, 8), ks, ["lfu_decay"])["lfu_decay"]
    assert all(r < b for r, b in zip(rand, sweep["belady"], strict=True)), (rand, sweep["belady"])


@pytest.mark.parametrize(
    "rate, words",
    [(0.36, "more often than chance"), (0.6, "far more often than chance"), (0.25, "about as often"), (0.1, "less")],
)
def test_the_stickiness_line_says_what_its_numbers_say(monkeypatch, rate: float, words: str) -> None:
    monkeypatch.setattr(cache, "reuse_rate", lambda experts: rate)
    line = cache.stickiness_line(np.zeros((3, 1, 2), dtype=np.int8), 8, 2)
    assert f"{rate:.0%}" in line and "25%" in line and f"({rate / 0.25:.1f}x)" in line and words in line
    if rate < 0.5:
        assert "far more" not in line  # 36% vs 25% is not "far more often than chance"


def test_prefetch_effect_calls_a_gap_noise_when_nothing_was_copied_or_within_two_percent() -> None:
    from colab_helpers.walkthroughs.benchmark import BenchRow, prefetch_effect

    rows = [
        BenchRow(8, True, 10.4, 1.0, 0.0, 0.0, 32),  # every expert resident: 1.04x is noise
        BenchRow(8, False, 10.0, 1.0, 0.0, 0.0, 32),
        BenchRow(2, True, 10.1, 0.8, 3.0, 0.5, 32),  # 1.01x with copies: within 2%
        BenchRow(2, False, 10.0, 0.6, 2.0, 0.0, 32),
        BenchRow(1, True, 8.0, 0.5, 3.0, 0.5, 32),  # 0.8x: slower
        BenchRow(1, False, 10.0, 0.4, 2.0, 0.0, 32),
    ]
    lines = dict(zip((1, 2, 8), prefetch_effect(rows).splitlines(), strict=True))
    assert "no difference (nothing was copied" in lines[8] and "faster" not in lines[8]
    assert "no difference (within 2%)" in lines[2]
    assert lines[1].endswith("slower")


def test_bits_breakdown_shows_where_three_bit_s_three_point_seven_five_come_from() -> None:
    from colab_helpers.walkthroughs.quantization import bits_breakdown
    from colab_helpers.weights.quant import DEFAULT_EXPERT_SPECS

    rows = {
        line.split()[0]: [float(v) for v in line.split()[2:]]
        for line in bits_breakdown(DEFAULT_EXPERT_SPECS).splitlines()[1:]
    }
    codes, packing, step_zero, _, total = rows["3"]
    assert (codes, packing, step_zero) == (3.0, 0.5, 0.25) and round(total, 2) == 3.75  # 7 int32 words per 64 codes
    assert rows["2"][1] == 0.0 and rows["2"][2] == 1.0 and round(rows["2"][4], 2) == 3.02


def test_prefetch_config_none_keeps_the_engine_default() -> None:
    from colab_helpers.runtime.moe import PrefetchConfig
    from colab_helpers.walkthroughs.setup import prefetch_config

    assert prefetch_config(None) == PrefetchConfig()
    assert prefetch_config(False).enabled is False and prefetch_config(True).enabled
