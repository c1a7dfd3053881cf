"""The benchmarks run end to end (tiny sizes): every variant of the GPU benchmark, and the CPU overhead ratio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
    for variant in (
        "everything resident",
        "ours (full)",
        "ours, no prefetch",
        "ours, smallest cache",
        "naive whole-layer offload",
        "h2d_gbs",
        "kernel_gbs",
        "projected on a free T4",
    ):
        assert variant in out.stdout, variant
    assert (tmp_path / "r.json").is_file()


def test_cpu_overhead_prints_the_ratio_last() -> None:
    out = run("benchmarks/cpu_overhead.py", "--tokens", "8", "--repeats", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert re.fullmatch(r"ratio offloaded/resident tokens/s: \d+\.\d\d", lines[-1])
    assert "greedy outputs identical: True" in out.stdout
