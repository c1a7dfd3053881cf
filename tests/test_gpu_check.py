"""scripts/gpu_check.sh: its CPU smoke run (the same steps, tiny) and the runner's time boxes and reports."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
ENV = {**os.environ, "PYTHON": sys.executable}  # the script runs this interpreter, not whatever python3 is


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()


def test_help_documents_steps_and_options() -> None:
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 0, out.stderr
    for word in ("--cpu-smoke", "--out", "--t4", "--budget-s", "$OUT", "gpu_check.json", "gpu_check.md"):
        assert word in out.stdout, word
    for step in gpu_check.STEPS:
        assert step.name in out.stdout, step.name


def test_cpu_smoke_runs_every_step_and_writes_json_and_markdown(tmp_path: Path) -> None:
    cmd = ["bash", str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert out.returncode == 0 and report["ok"], json.dumps(report, indent=1)[-3000:]
    assert list(steps) == [s.name for s in gpu_check.STEPS]
    assert report["mode"] == "cpu-smoke" and all(s["status"] == "ok" for s in steps.values())
    assert steps["cuda_tests"]["data"]["tests"] > 0  # the CUDA tests were found (and skipped: no GPU here)
    margins = steps["memory_margins"]["data"]
    assert margins["rss_after_load"]["measured_gb"] > margins["rss_after_imports"]["measured_gb"] > 0
    assert margins["plan"]["fits"] and margins["prefill_seconds"] > 0
    assert steps["kernel_bench"]["data"]["rows"]
    offload = {r["name"]: r for r in steps["offload_bench"]["data"]["results"]}
    assert offload["ours (full)"]["tokens_per_s"] > 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| step | status | s | measurement | value |" in md and "all steps passed" in md
    # a GPU run brings back at most 8 files, two folders deep: logs and step files travel in one archive
    files = [f.relative_to(tmp_path) for f in tmp_path.rglob("*") if f.is_file()]
    assert len(files) <= 8 and all(len(f.parts) <= 3 for f in files), files
    assert sorted(map(str, files)) == ["gpu_check.json", "gpu_check.md", "gpu_check_logs.tar.gz"]
    with tarfile.open(tmp_path / "gpu_check_logs.tar.gz") as tar:
        names = tar.getnames()
    assert {f"logs/{s.name}.log" for s in gpu_check.STEPS} <= set(names) and "steps/offload_bench.json" in names
    assert steps["host_cost"]["data"]["eager_launch_s"] > 0
    twin_inputs = steps["twin"]["data"]["inputs"]  # this run's measurements, fed to the twin
    assert twin_inputs["eager_launch_s"] == steps["host_cost"]["data"]["eager_launch_s"]


def _ctx(tmp_path: Path):
    for sub in ("logs", "steps"):
        (tmp_path / sub).mkdir(exist_ok=True)
    return gpu_check.Context(out=tmp_path, smoke=False, emulate_t4=False)


def _python(code: str):
    return lambda ctx: [sys.executable, "-c", code]


def test_a_hung_step_is_killed_at_its_time_box_and_the_next_step_still_runs(tmp_path: Path) -> None:
    steps = [
        gpu_check.Step("hangs", "sleeps", 2, _python("import time; print('started', flush=True); time.sleep(60)")),
        gpu_check.Step("fails", "exits 3", 30, _python("import sys; print('boom'); sys.exit(3)")),
        gpu_check.Step(
            "writes",
            "writes its json",
            30,
            lambda ctx: [
                sys.executable,
                "-c",
                f"import json; open({str(ctx.step_json('writes'))!r}, 'w').write(json.dumps({{'x': 1.5}}))",
            ],
        ),
    ]
    report = gpu_check.run_steps(_ctx(tmp_path), steps, budget_s=120)
    got = {s["name"]: s for s in report["steps"]}
    assert got["hangs"]["status"] == "timeout" and got["hangs"]["seconds"] < 30
    assert got["hangs"]["tail"] == ["started"]
    assert got["fails"]["status"] == "failed" and got["fails"]["returncode"] == 3
    assert got["writes"]["status"] == "ok" and got["writes"]["data"] == {"x": 1.5}
    assert not report["ok"]
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["status"] for s in written["steps"]] == ["timeout", "failed", "ok"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| hangs | timeout |" in md and "boom" in md and "NOT all steps passed" in md


def test_steps_past_the_budget_are_skipped_not_started(tmp_path: Path) -> None:
    steps = [gpu_check.Step(name, "", 30, _python("pass")) for name in ("a", "b")]
    report = gpu_check.run_steps(_ctx(tmp_path), steps, budget_s=1)
    assert [s["status"] for s in report["steps"]] == ["skipped", "skipped"]
    assert "time budget" in report["steps"][0]["why"]
    assert report["ok"] and report["skipped"] == ["a", "b"]  # a skip is a skip, not a failure
    assert "2 skipped: a, b" in (tmp_path / "gpu_check.md").read_text()


def test_a_killed_pytest_still_reports_the_tests_it_finished(tmp_path: Path) -> None:
    log = "tests/test_kernels.py::test_a[x] PASSED   [ 10%]\ntests/test_kernels.py::test_b FAILED   [ 20%]\n"
    got = gpu_check._collect_junit(_ctx(tmp_path), log)  # no junit XML: the run was killed
    assert got["tests"] == 2 and got["passed"] == 1 and got["failed"] == ["tests/test_kernels.py::test_b"]
    assert got["from_log"]


def test_time_boxes_fit_the_default_budget_and_offload_runs_before_the_slow_steps() -> None:
    names = [s.name for s in gpu_check.STEPS]
    assert sum(s.timeout_s for s in gpu_check.STEPS) <= 400 < 450  # well inside a 7.5-minute slot
    assert names.index("offload_bench") < min(names.index("cuda_tests"), names.index("memory_margins"))


def test_help_says_how_to_bring_the_trace() -> None:
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120, env=ENV)
    assert "--trace" in out.stdout and "gpu_traces" in out.stdout and "carry" in out.stdout
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "gpu_traces/" in ignored


def test_step_names_are_unique_and_each_has_a_summary_or_generic_rows() -> None:
    names = [s.name for s in gpu_check.STEPS]
    assert len(names) == len(set(names))
    step = {"name": "new_step", "status": "ok", "seconds": 1, "data": {"predicted": 2.0, "measured": 1.5}}
    assert gpu_check._summary_rows(step) == [("predicted", "2.0"), ("measured", "1.5")]


@pytest.mark.parametrize("flag", ["--steps=nope"])
def test_unknown_step_is_refused(flag: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        gpu_check.main([flag, "--out", str(tmp_path)])
    assert info.value.code == 2


def test_sigterm_stops_the_running_step_and_still_writes_the_report(tmp_path: Path) -> None:
    """A run killed from outside (a time limit) ends its step's processes and leaves gpu_check.json behind."""
    import signal
    import time

    code = f"""
import sys, time
sys.path.insert(0, {str(ROOT / "scripts")!r})
import gpu_check
gpu_check.STEPS[:] = [
    gpu_check.Step("sleeps", "", 60, lambda ctx: [sys.executable, "-c", "import time; time.sleep(60)"]),
    gpu_check.Step("after", "", 60, lambda ctx: [sys.executable, "-c", "pass"]),
]
raise SystemExit(gpu_check.main(["--out", {str(tmp_path)!r}, "--t4", "off"]))
"""
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (tmp_path / "gpu_check.json").exists():
        time.sleep(0.2)
    time.sleep(2)  # the first step has started
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["interrupted", "skipped"]
