"""One GPU check: run everything that needs a GPU, in one go, and write one JSON file and one markdown table.

Steps, in this order (each in its own process with its own time box, so a crash, a hang or an
out-of-memory in one step costs only that step; the time boxes add up to the whole run's --budget-s,
400 s by default, well inside a 7.5-minute device slot; a step the budget leaves no time for is
recorded as skipped, not failed):

  environment     GPU, compute capability, memory, driver, torch/CUDA/triton versions, host RAM
  host_cost       host time per eager launch, Triton launch, async copy and sync, with the process
                  pinned to 2 cores (taskset -c 0,1: a Colab VM's CPUs) -- the twin's host inputs
  offload_bench   benchmarks/gpu_offload.py --quick: tokens/s of resident, ours (full), the paper's
                  baseline and naive; copy bandwidth; decode's expert kernels (kernels.expert_mlp) GB/s
  twin            python -m colab_helpers twin --compare-offload: the twin fed this run's measured copy and
                  kernel bandwidth and host costs, same plan and routing: predicted vs measured tok/s of
                  "ours (full)" on one line
  kernel_bench    benchmarks/kernel_bench.py: fused low-bit GEMV GB/s (CUDA events over CUDA graphs)
  memory_margins  what the planner assumes, measured: CUDA context size (device and host), RSS after
                  imports, free VRAM after loading a full-size Mixtral-shaped model with the planned
                  cache, runtime growth at the first token, peak VRAM during a 4096-token prefill,
                  pinned host bytes; each next to the planner's number
  cuda_tests      pytest -m "requires_cuda or gpu_kernels": the CUDA tests plus the kernel tests that run
                  in Triton's interpreter on CPUs (float64 comparisons, now on the GPU); per-test results
                  are read from the log when a time box kills pytest before its junit XML

On a GPU bigger than a T4 (more than 17 GB) the memory and offload steps emulate a free Colab T4
(--t4 auto): the caching allocator is capped to the T4's free 15.0 GB minus what the CUDA runtime
measurably holds outside the allocator (cuBLAS, Triton modules: loaded, then measured), flash attention
is off (SDPA's memory-efficient kernel, as on a T4) with the T4 attention path (chunked prefill), and
the cache is planned for Colab's 12.7 GB of host RAM. PCIe and memory bandwidth stay this GPU's.

The routing trace (--trace): without it the offload benchmark routes with random routers, so its hit
rate and prefetch figures say nothing about Mixtral. The trace is not in the repository and a GPU
machine gets only the checkout: copy it into the git-ignored folder gpu_traces/ of the checkout
(mkdir -p gpu_traces && cp ../shared/traces/mixtral-8x7b-instruct-routing.npz gpu_traces/), name
gpu_traces in the run's carry, and pass --trace gpu_traces/mixtral-8x7b-instruct-routing.npz (the
default when that file is there). Never commit it.

Output (default: $OUT when set, else ./gpu_check_out), three files: gpu_check.json (every step's status,
seconds, log tail and data; rewritten after each step, so it exists even if the run is killed),
gpu_check.md (a table ready for docs/benchmarks.md) and gpu_check_logs.tar.gz (logs/<step>.log and
steps/<step>.json, re-packed after each step). Exit code 0 when no step failed, 1 otherwise. Nothing
is downloaded or installed: the models are random, made on the GPU.

--cpu-smoke runs the same steps tiny on the CPU (CI runs it): it checks this script, not a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve()
T4_VRAM_GB = 15.0  # what mem_get_info reports free on a fresh Colab T4
TRACE_DIR = "gpu_traces"  # git-ignored: where a trace brought to the GPU machine lives in the checkout
DEFAULT_TRACE = f"{TRACE_DIR}/mixtral-8x7b-instruct-routing.npz"
ARCHIVE = "gpu_check_logs.tar.gz"
KERNEL_TESTS = ("test_kernels.py", "test_expert_kernels.py", "test_dequant_kernel.py", "test_warm_up_keys.py")
COLAB_RAM_GB = 12.7
EMULATE_ABOVE_GB = 17.0  # a GPU with more memory than this is not a T4: emulate one
PREFILL_TOKENS = 4096  # the quickstart's context
GB = 1e9


# --------------------------------------------------------------------------------------------------
# steps: a list; adding one is one line (a name, what it measures, a time box, a command)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What a step's command may depend on: where to write, CPU smoke or GPU, T4 emulation."""

    out: Path
    smoke: bool
    emulate_t4: bool
    python: str = sys.executable
    facts: dict = field(default_factory=dict)  # the environment step's data, once it ran
    work: Path | None = None  # logs/ and steps/ (packed into ARCHIVE in ``out``); default: ``out``
    trace: str | None = None  # the routing trace, if one was brought along

    @property
    def scratch(self) -> Path:
        return self.work or self.out

    def step_json(self, name: str) -> Path:
        return self.scratch / "steps" / f"{name}.json"


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    timeout_s: int  # on a GPU; the CPU smoke run shares --budget-s only
    command: Callable[[Context], list[str]]
    collect: Callable[[Context, str], dict | None] | None = None  # default: read steps/<name>.json


def _in_process(name: str) -> Callable[[Context], list[str]]:
    """A step implemented in this file (``IN_PROCESS``), run as ``gpu_check.py --run-step NAME``."""

    def command(ctx: Context) -> list[str]:
        flags = ["--cpu-smoke"] if ctx.smoke else []
        flags += ["--t4", "on" if ctx.emulate_t4 else "off", "--work", str(ctx.scratch)]
        return [ctx.python, str(SELF), "--run-step", name, "--out", str(ctx.out), *flags]

    return command


def _pinned_to_two_cores(name: str) -> Callable[[Context], list[str]]:
    """An in-process step under ``taskset -c 0,1`` (a Colab VM has 2 vCPUs), when taskset and 2 cores exist."""
    inner = _in_process(name)

    def command(ctx: Context) -> list[str]:
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        pin = shutil.which("taskset") and {0, 1} <= cores
        return (["taskset", "-c", "0,1"] if pin else []) + inner(ctx)

    return command


def _cuda_tests_command(ctx: Context) -> list[str]:
    """The CUDA tests and the kernel tests (unmarked: on CPUs they run in Triton's interpreter), verbose, so a
    killed run still leaves each finished test's result in its log."""
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").glob("test_*.py")
        if "requires_cuda" in p.read_text() or p.name in KERNEL_TESTS
    )
    marks = "requires_cuda" if ctx.smoke else "requires_cuda or gpu_kernels"  # CI runs the kernel tests anyway
    cmd = [ctx.python, "-m", "pytest", "-v", "-rfEs", "-m", marks]
    cmd += ["--continue-on-collection-errors", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={ctx.scratch / 'steps' / 'cuda_tests.xml'}", *files]
    if _has_module("pytest_timeout"):
        cmd.append("--timeout=120")  # one hung test fails alone
    return cmd


def _kernel_command(ctx: Context) -> list[str]:
    cmd = [ctx.python, str(ROOT / "benchmarks" / "kernel_bench.py"), "--json", str(ctx.step_json("kernel_bench"))]
    return cmd + (["--cpu-smoke"] if ctx.smoke else [])


def _offload_command(ctx: Context) -> list[str]:
    cmd = [ctx.python, str(ROOT / "benchmarks" / "gpu_offload.py"), "--json", str(ctx.step_json("offload_bench"))]
    routing = ["--trace", ctx.trace, "--routing", "trace"] if ctx.trace else ["--routing", "model"]
    if ctx.smoke:
        return cmd + ["--cpu-smoke", "--quick", "--new-tokens", "2", *routing]
    return cmd + ["--quick", "--new-tokens", "32", *routing] + (["--emulate-t4"] if ctx.emulate_t4 else [])


def _twin_command(ctx: Context) -> list[str]:
    """The twin fed this run's measurements: the offload benchmark's copy and kernel bandwidth and the
    host_cost step's launch and sync costs, predicting the same run's 'ours (full)'."""
    inputs = _read_json(ctx.step_json("offload_bench")) or {}
    host = _read_json(ctx.step_json("host_cost")) or {}
    inputs["host_costs"] = {k: host[k] for k in HOST_COSTS if isinstance(host.get(k), (int, float))}
    merged = ctx.step_json("twin_inputs")
    merged.write_text(json.dumps(inputs, indent=2))
    cmd = [ctx.python, "-m", "colab_helpers", "twin", "--compare-offload", str(merged)]
    cmd += ["--out", str(ctx.step_json("twin"))] + (["--trace", ctx.trace] if ctx.trace else [])
    return cmd + (["--tokens", "2", "--warmup", "0"] if ctx.smoke else [])


def _collect_junit(ctx: Context, log: str) -> dict | None:
    path = ctx.scratch / "steps" / "cuda_tests.xml"
    if not path.is_file():
        return _results_from_log(log)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                message = (bad.get("message") or bad.text or "").strip().splitlines()
                failed.append(f"{case.get('classname')}::{case.get('name')}: {message[0][:200] if message else ''}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


def _results_from_log(log: str) -> dict | None:
    """Per-test results from pytest -v lines (``path::test PASSED``) when no junit XML was written (killed)."""
    import re

    outcomes = re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", log, flags=re.M)
    if not outcomes:
        return None
    count = {o: sum(1 for _, x in outcomes if x == o) for o in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    return {
        "tests": len(outcomes),
        "passed": count["PASSED"],
        "failures": count["FAILED"],
        "errors": count["ERROR"],
        "skipped": count["SKIPPED"],
        "failed": [name for name, o in outcomes if o in ("FAILED", "ERROR")],
        "from_log": True,  # pytest was stopped before writing its XML: the tests it finished
    }


# A new step is one line here: its command runs with cwd = the repository root and PYTHONPATH set; it
# exits 0 on success and may write ``ctx.step_json(name)`` (earlier steps' files are there to read, e.g.
# ``ctx.step_json("offload_bench")``); that JSON lands in the report, and in the markdown through
# ``SUMMARIES[name]`` when one is given, else as its scalar fields.
STEPS: list[Step] = [  # the time boxes add up to the default budget (400 s); the slow steps come last
    Step("environment", "GPU, driver, versions, free memory", 20, _in_process("environment")),
    Step("host_cost", "host time per launch, copy and sync on 2 cores", 25, _pinned_to_two_cores("host_cost")),
    Step("offload_bench", "decode tok/s: resident, ours, baseline, naive", 110, _offload_command),
    Step("twin", "the twin fed this run's measurements vs measured", 30, _twin_command),
    Step("kernel_bench", "fused low-bit GEMV GB/s", 40, _kernel_command),
    Step("memory_margins", "the planner's assumptions, measured", 75, _in_process("memory_margins")),
    Step("cuda_tests", "pytest: CUDA tests and the kernel tests", 100, _cuda_tests_command, _collect_junit),
]
HOST_COSTS = ("eager_launch_s", "fused_launch_s", "copy_launch_s", "sync_s")  # the twin's Hardware fields


# --------------------------------------------------------------------------------------------------
# the runner: time boxes, logs, one JSON and one markdown file, always written
# --------------------------------------------------------------------------------------------------


def run_steps(ctx: Context, steps: list[Step], budget_s: float) -> dict:
    started = time.monotonic()
    report = {
        "tool": "scripts/gpu_check.py",
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "mode": "cpu-smoke" if ctx.smoke else ("gpu, T4 emulation" if ctx.emulate_t4 else "gpu"),
        "host": {"hostname": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "budget_s": budget_s,
        "steps": [],
        "ok": False,
    }
    (ctx.scratch / "logs").mkdir(parents=True, exist_ok=True)
    (ctx.scratch / "steps").mkdir(parents=True, exist_ok=True)
    write_outputs(ctx, report)
    for step in steps:
        left = budget_s - (time.monotonic() - started)
        if ctx.facts.get("interrupted"):
            result = {"name": step.name, "what": step.what, "status": "skipped", "why": "the run was interrupted"}
        elif left < 5:
            result = {"name": step.name, "what": step.what, "status": "skipped", "why": "the time budget ran out"}
        else:
            result = run_step(ctx, step, left if ctx.smoke else min(step.timeout_s, left))
        report["steps"].append(result)
        if step.name == "environment" and result.get("data"):
            ctx.facts.update(result["data"])
            if report["mode"] != "cpu-smoke" and ctx.facts.get("gpu"):
                report["gpu"] = ctx.facts["gpu"]
        print(f"[gpu_check] {step.name}: {result['status']} ({result.get('seconds', 0):.0f} s)", flush=True)
        report["wall_s"] = round(time.monotonic() - started, 1)
        write_outputs(ctx, report)
    report["ok"] = all(s["status"] in ("ok", "skipped") for s in report["steps"])
    report["skipped"] = [s["name"] for s in report["steps"] if s["status"] == "skipped"]
    write_outputs(ctx, report)
    return report


def run_step(ctx: Context, step: Step, timeout_s: float) -> dict:
    """Run one step's command in its own process group; kill the group at the time box."""
    log_path = ctx.scratch / "logs" / f"{step.name}.log"
    for stale in (ctx.scratch / "steps").glob(f"{step.name}.*"):  # an earlier run's files must not pass for this one's
        stale.unlink()
    log = f"{ARCHIVE}:logs/{step.name}.log"
    result: dict = {"name": step.name, "what": step.what, "timeout_s": round(timeout_s), "log": log}
    start = time.monotonic()
    try:
        cmd = step.command(ctx)
        result["command"] = " ".join(cmd)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_child_env(), start_new_session=True
            )
            try:
                result["returncode"] = proc.wait(timeout=timeout_s)
                result["status"] = "ok" if result["returncode"] == 0 else "failed"
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                result["status"] = "timeout"
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the step's processes too, keep the report
                _kill_group(proc)
                result["status"] = "interrupted"
                ctx.facts["interrupted"] = True
    except Exception as err:  # the step could not even start: say why, keep going
        result["status"] = "failed"
        result["error"] = f"{type(err).__name__}: {err}"
    result["seconds"] = round(time.monotonic() - start, 1)
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    result["tail"] = text.splitlines()[-15:]
    try:
        data = step.collect(ctx, text) if step.collect else _read_json(ctx.step_json(step.name))
    except Exception as err:
        data = {"collect_error": f"{type(err).__name__}: {err}"}
    if data is not None:
        result["data"] = data
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub; never wait on a network that is not there
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def write_outputs(ctx: Context, report: dict) -> None:
    """gpu_check.json, gpu_check.md and, when the scratch is elsewhere, the logs and step files in one archive
    (a GPU run brings back at most 8 files, two folders deep: these are three)."""
    out = ctx.out
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    if ctx.work is not None and ctx.work != out:
        import tarfile

        tmp = out / f".{ARCHIVE}.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for sub in ("logs", "steps"):
                if (ctx.work / sub).is_dir():
                    tar.add(ctx.work / sub, arcname=sub)
        tmp.replace(out / ARCHIVE)  # whole or not at all, even if the run is killed while packing


# --------------------------------------------------------------------------------------------------
# the markdown table
# --------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    gpu = report.get("gpu") or {}
    where = gpu.get("name", "no GPU") if gpu else "no GPU"
    lines = [
        f"### GPU check, {report['date_utc']} UTC, {where} ({report['mode']})",
        "",
        f"`scripts/gpu_check.sh` on {report['host']['hostname']} ({report['host']['cpus']} CPUs); "
        f"{_verdict(report)}; "
        f"wall time {report.get('wall_s', 0):.0f} s of a {report['budget_s']:.0f} s budget.",
        "",
        "| step | status | s | measurement | value |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in report["steps"]:
        rows = _summary_rows(s) or [("", "")]
        status = s["status"] if s["status"] != "skipped" else f"skipped ({s.get('why', '')})"
        for i, (metric, value) in enumerate(rows):
            head = f"| {s['name']} | {status} | {s.get('seconds', 0):.0f} |" if i == 0 else "| | | |"
            lines.append(f"{head} {metric} | {value} |")
    if report["mode"] == "cpu-smoke":
        lines += ["", "(CPU smoke run: tiny sizes; it checks the script, none of these numbers is about a GPU)"]
    return "\n".join(lines) + "\n"


def _verdict(report: dict) -> str:
    skipped = [s["name"] for s in report["steps"] if s["status"] == "skipped"]
    if not report.get("ok"):
        return "NOT all steps passed"
    return "all steps passed" + (f" that ran ({len(skipped)} skipped: {', '.join(skipped)})" if skipped else "")


def _summary_rows(step: dict) -> list[tuple[str, str]]:
    data = step.get("data") or {}
    rows: list[tuple[str, str]] = []
    if "error" in step:
        rows.append(("could not start", step["error"]))
    if data.get("error"):
        rows.append(("error", str(data["error"])[:200]))
    summarize = SUMMARIES.get(step["name"])
    try:
        rows += summarize(data) if summarize else _scalar_rows(data)
    except Exception as err:  # a summary must never cost the report
        rows.append(("summary failed", f"{type(err).__name__}: {err}"))
    if step["status"] in ("failed", "timeout") and step.get("tail"):
        rows.append(("last output line", _cell(step["tail"][-1])))
    return rows


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:300]


def _num(v, spec: str = ".2f", unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def _scalar_rows(data: dict, limit: int = 20) -> list[tuple[str, str]]:
    return [(k, _cell(v)) for k, v in data.items() if isinstance(v, (int, float, str, bool))][:limit]


def _env_rows(d: dict) -> list[tuple[str, str]]:
    gpu = d.get("gpu") or {}
    rows = [("GPU", f"{gpu.get('name', 'none')}, cc {gpu.get('capability', '-')}, {_num(gpu.get('total_gb'))} GB")]
    rows += [("free VRAM at start", _num(gpu.get("free_gb"), unit=" GB")), ("driver", gpu.get("driver", "-"))]
    rows.append(("torch / CUDA / triton", f"{d.get('torch')} / {d.get('cuda')} / {d.get('triton')}"))
    rows.append(("transformers", str(d.get("transformers"))))
    rows.append(("host RAM total / available", f"{_num(d.get('ram_total_gb'))} / {_num(d.get('ram_available_gb'))} GB"))
    return rows


def _test_rows(d: dict) -> list[tuple[str, str]]:
    rows = [
        (
            "passed / failed / errors / skipped",
            f"{d.get('passed')} / {d.get('failures')} / {d.get('errors')} / {d.get('skipped')}",
        )
    ]
    rows += [("failed", _cell(f)) for f in d.get("failed", [])[:8]]
    return rows


def _margin_rows(d: dict) -> list[tuple[str, str]]:
    rows = []
    for key, label in MARGINS:
        if key in d:
            m = d[key]
            planned = f" (plan: {_num(m['planned_gb'])} GB)" if m.get("planned_gb") is not None else ""
            rows.append((label, f"{_num(m.get('measured_gb'), '.3f')} GB{planned}"))
    if "plan" in d:
        k = d["plan"].get("experts_on_device")
        rows.append(("planned experts per layer", _cell(k)))
    return rows


def _kernel_rows(d: dict) -> list[tuple[str, str]]:
    rows = []
    for r in d.get("rows", []):
        if "kernel_gbps" in r:
            frac = r.get("fraction_of_peak")
            value = f"{r['kernel_gbps']:.0f} GB/s" + (f" ({frac:.0%} of peak)" if frac else "")
            value += f", {r['kernel_us']:.1f} us; dequant+matmul {r['dequant_matmul_us']:.1f} us"
            if not r.get("correct", True):
                value += f"; WRONG (rel err {r['rel_err']:.1e})"
        else:
            value = f"dequant+matmul {r['dequant_matmul_us']:.1f} us"
        rows.append((f"{r['shape']} ({r['bits']}-bit)", value))
    return rows


def _offload_rows(d: dict) -> list[tuple[str, str]]:
    rows = []
    for r in d.get("results", []):
        if r["tokens_per_s"] is None:
            rows.append((r["name"], _cell(r["note"])))
        else:
            rows.append(
                (r["name"], f"{r['tokens_per_s']:.2f} tok/s, hit rate {r['hit_rate']:.3f}, k={r['experts_on_device']}")
            )
    bw, kb = d.get("bandwidth", {}), d.get("kernel", {})
    if bw:
        rows.append(("H2D / D2H GB/s", f"{bw.get('h2d_gbs', 0):.1f} / {bw.get('d2h_gbs', 0):.1f}"))
    if kb:
        value = f"{kb.get('kernel_gbs', 0):.0f} GB/s ({kb.get('timing', '')})"
        rows.append(("decode's expert MLP (expert_mlp)", value))
    if d.get("partial"):
        rows.append(("partial", "stopped before every variant ran"))
    return rows


def _twin_rows(d: dict) -> list[tuple[str, str]]:
    t = d.get("twin") or {}
    tok_s = f"{_num(d.get('predicted_tok_s'))} / {_num(d.get('measured_tok_s'))} tok/s"
    per_token = f"{t.get('loads_per_token')}, {t.get('syncs_per_token')}, {t.get('launches_per_token')}"
    return [
        ("ours (full), this run: twin predicted / measured", tok_s),
        ("predicted / measured", _num(d.get("predicted_over_measured"), ".2f", "x")),
        ("twin inputs (measured)", _cell(d.get("inputs"))),
        ("twin: loads, syncs, launches per token", per_token),
    ]


def _host_rows(d: dict) -> list[tuple[str, str]]:
    us = {k: d.get(k) for k in HOST_COSTS}
    line = ", ".join(
        f"{k.removesuffix('_s').replace('_', ' ')} {_num(v * 1e6 if v else None, '.1f')} us" for k, v in us.items()
    )
    return [("host cost per op (2 cores)", line), ("CPUs the process ran on", _cell(d.get("cpus")))]


SUMMARIES: dict[str, Callable[[dict], list[tuple[str, str]]]] = {
    "environment": _env_rows,
    "host_cost": _host_rows,
    "cuda_tests": _test_rows,
    "memory_margins": _margin_rows,
    "kernel_bench": _kernel_rows,
    "offload_bench": _offload_rows,
    "twin": _twin_rows,
}
MARGINS = [  # keys of the memory_margins step, each {"measured_gb": x, "planned_gb": y}
    ("cuda_context", "CUDA context, device"),
    ("cuda_context_host", "CUDA context, host RSS"),
    ("rss_after_imports", "RSS after imports"),
    ("free_vram_after_load", "free VRAM after load"),
    ("runtime_growth", "CUDA runtime growth at the first tokens"),
    ("prefill_peak", f"peak VRAM during a {PREFILL_TOKENS}-token prefill"),
    ("prefill_transient", "prefill transient over the loaded model"),
    ("headroom_after_prefill", "VRAM left at the prefill peak"),
    ("pinned_host", "pinned host bytes"),
    ("rss_after_load", "RSS after load"),
]


# --------------------------------------------------------------------------------------------------
# steps that run in this file (each in a fresh process: ``--run-step NAME``)
# --------------------------------------------------------------------------------------------------


def step_environment(ctx: Context, data: dict, save: Callable[[], None]) -> None:
    import psutil
    import torch

    vm = psutil.virtual_memory()
    data.update(
        python=sys.version.split()[0],
        torch=torch.__version__,
        cuda=torch.version.cuda,
        ram_total_gb=vm.total / GB,
        ram_available_gb=vm.available / GB,
        triton=_version("triton"),
        transformers=_version("transformers"),
        huggingface_hub=_version("huggingface_hub"),
    )
    save()
    if ctx.smoke or not torch.cuda.is_available():
        data["gpu"] = None
        return
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    data["gpu"] = {
        "name": torch.cuda.get_device_name(0),
        "count": torch.cuda.device_count(),
        "capability": f"{props.major}.{props.minor}",
        "total_gb": total / GB,
        "free_gb": free / GB,
        "multiprocessors": props.multi_processor_count,
        "driver": _nvidia_smi("driver_version"),
    }


def step_memory_margins(ctx: Context, data: dict, save: Callable[[], None]) -> None:
    """Measure, next to the planner's number, each memory margin it assumes (see docs/memory_plan.md).

    Order matters: the CUDA context is measured before anything else touches the GPU; the plan is made
    as the loader makes it (measured free VRAM, or a T4's 15.0 / 12.7 GB when emulating one).
    """
    import psutil
    import torch

    from colab_helpers.conversation.generation import _kv_cache_kwarg
    from colab_helpers.conversation.generation import prefill as prefill_in_chunks
    from colab_helpers.planning.planner import Budget, Margins, measure_budget, plan_memory
    from colab_helpers.runtime.kv_cache import new_kv_cache
    from colab_helpers.sim.synthetic import mixtral_8x7b_config, smoke_config
    from colab_helpers.weights.checkpoint import QuantConfig

    proc = psutil.Process()
    cuda = torch.cuda.is_available() and not ctx.smoke
    device = "cuda" if cuda else "cpu"
    assumed = dataclasses.asdict(Margins())  # the planner's defaults, whatever fields it has
    data["margins"] = assumed

    def planned(name: str) -> float | None:
        value = assumed.get(name)
        return value / GB if isinstance(value, (int, float)) else None

    def record(key: str, measured: float | None, plan_gb: float | None = None, note: str = "") -> None:
        data[key] = {"measured_gb": None if measured is None else measured / GB, "planned_gb": plan_gb, "note": note}
        save()

    record("rss_after_imports", proc.memory_info().rss, planned("python_rss"), "torch, transformers, colab_helpers")
    if cuda:
        rss0 = proc.memory_info().rss
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        free0, total = torch.cuda.mem_get_info()
        note = "total - free - reserved after the first allocation (assumes no other process on the GPU)"
        record("cuda_context", total - free0 - torch.cuda.memory_reserved(), None, note)
        record("cuda_context_host", proc.memory_info().rss - rss0, planned("cuda_host_rss"), "RSS growth at CUDA init")
        if ctx.emulate_t4:  # 15.0 GB minus what the runtime holds outside the allocator; T4 attention, no flash
            from colab_helpers.sim.t4_emulation import cap_like_t4

            cap = cap_like_t4("cuda", int(T4_VRAM_GB * GB))
            data["emulation"] = (
                f"caching allocator capped to {cap['cap_bytes'] / GB:.3f} GB ({T4_VRAM_GB} GB - "
                f"{cap['runtime_outside_bytes'] / GB:.3f} GB the runtime holds outside it) of {total / GB:.1f} GB; "
                "flash attention off, the T4 attention path"
            )
            data["t4_cap"] = cap

    config = mixtral_8x7b_config() if cuda else smoke_config()
    prefill = PREFILL_TOKENS if cuda else 64
    quant = QuantConfig()
    budget = Budget.given(T4_VRAM_GB, COLAB_RAM_GB) if (cuda and ctx.emulate_t4) else measure_budget(device)
    plan = plan_memory(config, quant, budget, device, context=prefill)
    data["plan"] = plan.to_dict()
    data["plan_rows"] = [{"item": r.item, "vram_gb": r.vram / GB, "ram_gb": r.ram / GB} for r in plan.rows]
    save()
    if not plan.fits:
        data["error"] = "the planner says this does not fit: " + "; ".join(plan.reasons)
        raise SystemExit(1)

    model = _random_model(config, quant, device, plan.experts_on_device, cuda and ctx.emulate_t4)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the random generator's temporaries are not the model
        limit = data["t4_cap"]["cap_bytes"] if ctx.emulate_t4 else None
        free_after = limit - torch.cuda.memory_reserved() if limit else torch.cuda.mem_get_info()[0]
        weights = _rows_vram(plan, "trunk", "expert slots")
        plan_free = (plan.budget.vram - weights) / GB if weights else None
        record("free_vram_after_load", free_after, plan_free, "cap - reserved (emulated T4) or mem_get_info")
        data["allocated_after_load_gb"] = torch.cuda.memory_allocated() / GB
    host = model.expert_cache.host_buf
    pinned_note = f"is_pinned={bool(host.is_pinned())}" if cuda else "CPU run: nothing pinned"
    record("pinned_host", host.numel() * host.element_size(), plan.pinned_alloc_bytes / GB, pinned_note)
    record("rss_after_load", proc.memory_info().rss, plan.ram_steady / GB, "plan: steady host RAM")

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (1, prefill), generator=gen).to(device)
    if cuda:
        free_before, reserved_before = torch.cuda.mem_get_info()[0], torch.cuda.memory_reserved()
    with torch.no_grad():  # the first tokens load cuBLAS, Triton and attention kernels
        model.generate(ids[:, :16], max_new_tokens=2, do_sample=False)
    if cuda:
        torch.cuda.synchronize()
        outside = (free_before - torch.cuda.mem_get_info()[0]) - (torch.cuda.memory_reserved() - reserved_before)
        record("runtime_growth", outside, planned("cuda_growth"), "device memory taken outside the allocator")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start, oom = time.perf_counter(), None
    try:
        with torch.no_grad():  # the path a chat turn takes: generate_stream prefills in the attention path's
            kv = new_kv_cache(model, prefill + 1)  # chunks (generation.prefill), then generate adds a token
            prefill_in_chunks(model, ids, kv, model.attention_path.prefill_chunk or prefill)
            model.generate(ids, max_new_tokens=1, do_sample=False, **{_kv_cache_kwarg(model): kv})
        if cuda:
            torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError as err:  # a finding, not a crash: keep the peak it reached
        oom = str(err).splitlines()[0]
    data["prefill_tokens"] = prefill
    data["prefill_seconds"] = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_reserved()
        record("prefill_peak", peak, plan.vram_peak / GB, "max_memory_reserved; plan: its VRAM peak")
        transient = _rows_vram(plan, "KV", "prefill") / GB or None
        record("prefill_transient", torch.cuda.max_memory_allocated() - base, transient, "peak allocated - before")
        if ctx.emulate_t4:
            unplanned = (plan.budget.vram - plan.vram_peak + _rows_vram(plan, "reserve")) / GB
            note = "T4 budget - peak reserved; plan: VRAM unplanned (reserve + headroom)"
            record("headroom_after_prefill", data["t4_cap"]["cap_bytes"] - peak, unplanned, note)
    if oom is not None:
        data["error"] = f"out of memory during the {prefill}-token prefill the plan allows: {oom}"
        raise SystemExit(1)
    save()


def _rows_vram(plan, *prefixes: str) -> int:
    return sum(r.vram for r in plan.rows if r.item.startswith(prefixes))


def _random_model(config, quant, device: str, k, t4_attention: bool = False):
    """A full-size (or smoke-size) Mixtral-shaped model with random weights, as the offload benchmark builds it."""
    from colab_helpers.model import OffloadConfig, assemble_model
    from colab_helpers.sim.synthetic import random_experts, random_trunk
    from colab_helpers.sim.t4_emulation import t4_attention as t4_path

    cfg = OffloadConfig(
        device=device, experts_on_device=k, progress=False, attention=t4_path() if t4_attention else None
    )
    return assemble_model(
        config, quant, random_trunk(config, quant, device), random_experts(config, quant, device), cfg
    )


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def _nvidia_smi(field_name: str) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={field_name}", "--format=csv,noheader"], capture_output=True, text=True, timeout=15
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def step_host_cost(ctx: Context, data: dict, save: Callable[[], None]) -> None:
    """Host seconds to issue one eager op, one Triton launch, one async copy (+ event) and one sync of an idle
    GPU: each the mean over many issues whose kernels are tiny (so the GPU never holds the host back).
    Run pinned to 2 cores (``_pinned_to_two_cores``), a Colab VM's count, so the twin gets Colab-like costs
    from this machine's CPU (a faster server CPU still makes them optimistic)."""
    import torch

    from colab_helpers.runtime import kernels
    from colab_helpers.weights.quant import DEMO_EXPERT_SPEC, quantize

    data["cpus"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cuda = torch.cuda.is_available() and not ctx.smoke
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = 2000 if cuda else 50
    x = torch.zeros(16, device=dev)

    def per_issue(fn, count: int = n) -> float:
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(count):
            fn()
        seconds = (time.perf_counter() - start) / count
        sync()
        return seconds

    data["eager_launch_s"] = per_issue(lambda: x.add_(1.0))
    save()
    w = quantize(torch.randn(64, 256) * 0.02, DEMO_EXPERT_SPEC, optimize=False)
    w = type(w).from_tensors(w.spec, w.shape, {k: v.to(dev) for k, v in w.tensors().items()})
    xv = torch.zeros(1, 256, device=dev, dtype=torch.float16 if cuda else torch.float32)
    fused = kernels.triton_gemv if cuda and kernels.HAS_TRITON else kernels.reference_gemv
    data["fused_launch_s"] = per_issue(lambda: fused(xv, w))
    data["fused_timed"] = fused.__name__
    save()
    if cuda:
        src = torch.zeros(4096, dtype=torch.uint8).pin_memory()
        dst = torch.empty(4096, dtype=torch.uint8, device=dev)
        stream = torch.cuda.Stream()

        def copy() -> None:
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
                torch.cuda.Event().record(stream)

        data["copy_launch_s"] = per_issue(copy)
        data["sync_s"] = per_issue(torch.cuda.synchronize, 500)
    else:
        src, dst = torch.zeros(4096, dtype=torch.uint8), torch.empty(4096, dtype=torch.uint8)
        data["copy_launch_s"] = per_issue(lambda: dst.copy_(src))
        data["sync_s"] = None
    save()


IN_PROCESS: dict[str, Callable[[Context, dict, Callable[[], None]], None]] = {
    "environment": step_environment,
    "host_cost": step_host_cost,
    "memory_margins": step_memory_margins,
}


def run_in_process(ctx: Context, name: str) -> int:
    """Run one ``IN_PROCESS`` step, writing its data after every measurement and the error if it fails."""
    data: dict = {}
    path = ctx.step_json(name)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        path.write_text(json.dumps(data, indent=2, default=str))

    try:
        IN_PROCESS[name](ctx, data, save)
    except SystemExit as stop:
        save()
        return int(stop.code or 0)
    except BaseException as err:
        data["error"] = f"{type(err).__name__}: {err}".strip()
        data["traceback"] = traceback.format_exc()
        save()
        traceback.print_exc()
        return 1
    save()
    return 0


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def _gpu_total_gb() -> float | None:
    """The first GPU's memory, without creating a CUDA context in this process (nvidia-smi, else a child)."""
    text = _nvidia_smi("memory.total")
    try:
        if text:
            return float(text.split()[0]) * 2**20 / GB  # "143771 MiB"
    except ValueError:
        pass
    code = "import torch; print(torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else '')"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip()) / GB if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/gpu_check.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=None, help="output folder (default: $OUT if set, else ./gpu_check_out)")
    ap.add_argument("--cpu-smoke", action="store_true", help="the same steps, tiny, on the CPU (CI)")
    ap.add_argument(
        "--t4",
        choices=("auto", "on", "off"),
        default="auto",
        help="emulate a free T4 (15.0 GB VRAM, 12.7 GB RAM): auto = when the GPU has more than 17 GB",
    )
    ap.add_argument(
        "--budget-s", type=float, default=400.0, help="the whole run's time budget (default 400 s: the time boxes' sum)"
    )
    ap.add_argument(
        "--trace",
        default=None,
        help=f"routing trace .npz for the offload benchmark and the twin (default: {DEFAULT_TRACE} when present). "
        f"Bring it along: copy it into {TRACE_DIR}/ in the checkout (git-ignored), name {TRACE_DIR} in the run's "
        "carry; never commit it. Without one the routers are random",
    )
    ap.add_argument("--steps", default=None, help=f"comma-separated subset of: {', '.join(s.name for s in STEPS)}")
    ap.add_argument("--run-step", default=None, help=argparse.SUPPRESS)  # internal: one IN_PROCESS step
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)  # internal: the run's logs/ and steps/
    args = ap.parse_args(argv)

    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    if args.t4 == "auto":
        total = None if args.cpu_smoke else _gpu_total_gb()
        emulate = total is not None and total > EMULATE_ABOVE_GB
    else:
        emulate = args.t4 == "on" and not args.cpu_smoke
    trace = args.trace or (DEFAULT_TRACE if (ROOT / DEFAULT_TRACE).is_file() else None)
    if trace is not None and not Path(trace).is_absolute() and not Path(trace).is_file():
        trace = str(ROOT / trace)  # steps run from the checkout's root
    if trace is not None and not Path(trace).is_file():
        ap.error(f"--trace {args.trace}: no such file")
    if args.run_step:
        ctx = Context(out=out, smoke=args.cpu_smoke, emulate_t4=emulate, work=Path(args.work) if args.work else None)
        return run_in_process(ctx, args.run_step)
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # logs and step files: packed into one archive in out
    if args.steps and (out / ARCHIVE).is_file():  # a rerun of some steps builds on the last run's step files
        import tarfile

        with tarfile.open(out / ARCHIVE) as tar:
            tar.extractall(work, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    ctx = Context(out=out, smoke=args.cpu_smoke, emulate_t4=emulate, work=work, trace=trace)

    steps = STEPS
    if args.steps:
        wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {s.name for s in STEPS})
        if unknown:
            ap.error(f"unknown steps {unknown}; choose from {[s.name for s in STEPS]}")
        steps = [s for s in STEPS if s.name in wanted]
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a killed run still ends its steps and writes its report
    print(f"[gpu_check] {len(steps)} steps, budget {args.budget_s:.0f} s, writing {out}", flush=True)
    print(f"[gpu_check] routing trace: {trace or 'none (random routers; see --help: --trace)'}", flush=True)
    try:
        report = run_steps(ctx, steps, args.budget_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # packed into the archive after every step
    print(f"[gpu_check] {'all steps passed' if report['ok'] else 'some steps did not pass'}: {out / 'gpu_check.md'}")
    return 130 if ctx.facts.get("interrupted") else 0 if report["ok"] else 1


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
