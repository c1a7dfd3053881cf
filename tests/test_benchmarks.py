"""The benchmarks run end to end (tiny sizes): every variant of the GPU benchmark, and the CPU overhead ratio."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from colab_helpers.weights.quant import DEFAULT_EXPERT_SPECS

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_gpu_offload_cpu_smoke_runs_every_variant(tmp_path: Path) -> None:
    out = run(
        "benchmarks/gpu_offload.py",
        "--cpu-smoke",
        "--new-tokens",
        "4",
        "--routing",
        "model",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {r["name"]: r for r in report["results"]}
    assert set(rows) == {
        "everything resident",
        "ours (full)",
        "ours, no prefetch",
        "ours, LRU + prefetch",
        "ours, LRU, no prefetch (paper's public code)",
        "ours, smallest cache",
        "naive whole-layer offload",
    }
    layers, experts = 4, 8  # the --cpu-smoke model
    resident, naive, full, small = (
        rows[n] for n in ("everything resident", "naive whole-layer offload", "ours (full)", "ours, smallest cache")
    )
    assert (resident["hit_rate"], resident["misses_per_token"], resident["h2d_mb_per_token"]) == (1.0, 0.0, 0.0)
    assert (naive["hit_rate"], naive["misses_per_token"]) == (0.0, layers * experts)  # every expert, every token
    slot_bytes = naive["h2d_mb_per_token"] * 1e6 / (layers * experts)
    payload = 2 * DEFAULT_EXPERT_SPECS[2].nbytes((512, 256)) + DEFAULT_EXPERT_SPECS[2].nbytes((256, 512))
    assert payload <= slot_bytes < payload + 1024  # one expert's bytes (plus slot alignment) per copy
    for r in rows.values():
        assert 0.0 <= r["hit_rate"] <= 1.0, r
        if r["prefetch"] == "off":
            assert r["prefetch_loads_per_token"] == 0.0, r
        h2d = r["h2d_mb_per_token"] * 1e6
        if r["prefetch"] == "off":  # each miss copies one expert
            assert h2d == pytest.approx(r["misses_per_token"] * slot_bytes, rel=1e-6), r
        else:  # guesses' bytes (in expert units, chunks count) are part of it; a used guess saves its miss's copy
            speculative = r["prefetch_loads_per_token"] * slot_bytes
            assert speculative * (1 - 1e-6) <= h2d <= (r["misses_per_token"] * slot_bytes + speculative) * (1 + 1e-6), r
    assert small["hit_rate"] < full["hit_rate"]  # 1 expert per layer misses more than 5
    assert report["bandwidth"]["h2d_gbs"] > 0 and report["kernel"]["expert_us"] > 0


def test_cpu_overhead_prints_the_ratio_last() -> None:
    out = run("benchmarks/cpu_overhead.py", "--tokens", "8", "--repeats", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert re.fullmatch(r"ratio offloaded/resident tokens/s: \d+\.\d\d", lines[-1])
    assert "greedy outputs identical: True" in out.stdout


def _benchmark(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_gpu_offload_skips_what_cannot_fit_a_t4_and_plans_the_t4_cache() -> None:
    """The all-resident variant needs ~18 GB: on a 15 GB GPU (or the T4 emulation) it is skipped, with the reason."""
    from colab_helpers.planning.planner import Budget
    from colab_helpers.sim.synthetic import mixtral_8x7b_config
    from colab_helpers.weights.checkpoint import QuantConfig

    bench = _benchmark("gpu_offload")
    config, quant = mixtral_8x7b_config(), QuantConfig()
    t4 = bench.BenchSettings("cuda", None, 32, 16, 5, 1, "lfu_decay", 15.0, None, 2, 12.7)
    budget = Budget.given(15.0, 12.7)
    assert "VRAM" in bench.plan_reasons(config, quant, budget, t4, config.num_local_experts)
    planned = bench.planned_experts(config, quant, budget)
    assert min(planned if isinstance(planned, list) else [planned]) >= 5
    assert bench.plan_reasons(config, quant, budget, t4, planned) is None
    assert "host RAM" in bench.plan_reasons(config, quant, budget, t4, 1)  # 224 experts do not fit 12.7 GB


def test_kernel_bench_cpu_smoke_writes_its_rows(tmp_path: Path) -> None:
    out = run("benchmarks/kernel_bench.py", "--cpu-smoke", "--json", str(tmp_path / "k.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert rows and all(r["dequant_matmul_us"] > 0 for r in rows)


def test_gpu_offload_variant_with_per_layer_experts_runs_on_cpu() -> None:
    """The planner gives one k per layer (6 in some layers, 5 in others on a T4); a variant takes that list."""
    from colab_helpers.sim.synthetic import smoke_config
    from colab_helpers.weights.checkpoint import QuantConfig

    bench = _benchmark("gpu_offload")
    settings = bench.BenchSettings("cpu", None, 3, 8, [5, 4, 5, 4], 1, "lfu_decay", None, None, 2)
    r = bench.run_variant("per layer", smoke_config(), QuantConfig(), settings, None, [5, 4, 5, 4], True, "lru")
    assert r.tokens_per_s > 0 and r.experts_on_device == [5, 4, 5, 4] and 0 < r.hit_rate <= 1
    assert bench._k_text([6, 6, 5, 5, 5]) == "6x2, 5x3"
