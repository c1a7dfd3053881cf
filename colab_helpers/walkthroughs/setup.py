"""Every notebook's first steps: what this runtime has, which model to run, and its memory plan.

Used by the quickstart and by every walkthrough (``choose_model``: the real Mixtral on a GPU with a network,
else the embedded tiny model, said out loud).
"""

from __future__ import annotations

import html
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

GB = 10**9
MB = 10**6
T4_VRAM_GB = 15.0  # what mem_get_info reports free on a fresh Colab T4 (docs/memory_plan.md)
T4_RAM_GB = 12.7  # a free Colab VM's RAM; what is *available* is less (docs/memory_plan.md)


def in_colab() -> bool:
    return "google.colab" in sys.modules


# --------------------------------------------------------------------------------------------------
# the machine
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvironmentReport:
    """GPU, memory and disk of this runtime: what decides the model and the cache size."""

    gpu: str | None
    capability: tuple[int, int] | None
    vram_total: int | None
    vram_free: int | None
    ram_total: int
    ram_available: int
    disk_free: int
    colab: bool
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def dtype(self) -> str:
        """fp16 below compute capability 8 (a T4 has no real bf16, whatever ``is_bf16_supported`` says)."""
        if self.capability is None:
            return "float32 (CPU)"
        return "bfloat16 or float16" if self.capability[0] >= 8 else "float16"

    def lines(self) -> list[str]:
        if self.gpu is None:
            gpu = "GPU = none (CPU only): the notebook uses the embedded tiny model"
        else:
            major, minor = self.capability or (0, 0)
            gpu = (
                f"GPU = {self.gpu} (compute {major}.{minor}, {self.dtype}). "
                f"Max memory = {self.vram_total / GB:.1f} GB ({self.vram_free / GB:.1f} GB free)"
            )
        return [
            gpu,
            f"Host RAM = {self.ram_total / GB:.1f} GB ({self.ram_available / GB:.1f} GB available). "
            f"Disk = {self.disk_free / GB:.1f} GB free. Colab: {'yes' if self.colab else 'no'}",
            ", ".join(f"{k} {v}" for k, v in self.versions.items()),
        ]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def environment_report(disk_path: str | os.PathLike | None = None) -> EnvironmentReport:
    """Measure GPU, VRAM, host RAM and free disk (where the hub cache lives, by default)."""
    import psutil

    gpu = cap = total = free = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        cap = torch.cuda.get_device_capability(0)
        free, total = torch.cuda.mem_get_info(0)
    if disk_path is None:
        disk_path = os.environ.get("HF_HOME", Path.home() / ".cache")
    path = Path(disk_path)
    while not path.exists() and path != path.parent:
        path = path.parent
    versions = {"python": platform.python_version()}
    versions.update({m: _version(m) for m in ("torch", "transformers", "ipywidgets", "colab_helpers")})
    return EnvironmentReport(
        gpu,
        cap,
        total,
        free,
        psutil.virtual_memory().total,
        psutil.virtual_memory().available,
        shutil.disk_usage(path).free,
        in_colab(),
        versions,
    )


# --------------------------------------------------------------------------------------------------
# which model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelChoice:
    """Which checkpoint this run uses, on which device, and why (printed, never silent)."""

    path: Path
    name: str
    device: str
    tiny: bool
    reason: str

    def line(self) -> str:
        if self.tiny:
            return (
                f"MODEL: the embedded TINY model ({_shape(self.path)}; toy answers), NOT Mixtral-8x7B, on "
                f"{self.device}, because {self.reason}. On a Colab T4 with a network the same cells run the real model."
            )
        return f"MODEL: {self.name} on {self.device} ({self.reason})"


def _shape(path: Path) -> str:
    import json

    c = json.loads((path / "config.json").read_text())
    return f"{c['num_hidden_layers']} layers x {c['num_local_experts']} experts, hidden {c['hidden_size']}"


def choose_model(
    model: str | os.PathLike | None = None, revision: str | None = None, force_tiny: bool = False
) -> ModelChoice:
    """The real pre-quantized Mixtral on a GPU (downloading it with progress bars), else the embedded model.

    ``model``: None for the demo repo, a local folder, or a hub id. Falls back to the embedded model,
    and says why, when there is no GPU, ``COLAB_HELPERS_TINY=1`` / ``force_tiny`` is set, or the download
    fails (no network, no disk space: the error is printed).
    """
    from ..weights.hub import DEMO_REPO, DownloadError, download
    from ..weights.tiny import TINY_ENV, tiny_forced, tiny_model_path

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def tiny(reason: str) -> ModelChoice:
        choice = ModelChoice(tiny_model_path(), "embedded tiny model", device, True, reason)
        print(choice.line())
        return choice

    if force_tiny or tiny_forced():
        return tiny(f"{TINY_ENV}=1 is set" if tiny_forced() else "FORCE_TINY is set")
    if model is not None and Path(model).expanduser().is_dir():
        choice = ModelChoice(Path(model).expanduser(), str(model), device, False, "a local checkpoint folder")
        print(choice.line())
        return choice
    if device == "cpu":
        return tiny("there is no GPU (Runtime → Change runtime type → T4 GPU to run Mixtral)")
    repo = str(model) if model is not None else DEMO_REPO
    try:
        path = download(repo, revision=revision)
    except DownloadError as err:
        print(f"download failed: {err}", file=sys.stderr)
        return tiny("the download failed (message above)")
    choice = ModelChoice(path, repo, device, False, f"downloaded to {path}")
    print(choice.line())
    return choice


def prefetch_config(setting: bool | None = None):
    """The quickstart's ``PREFETCH``: None keeps the engine's default ``PrefetchConfig()``; False copies only
    what a layer asks for; True turns prefetch on with the engine's default settings otherwise."""
    from dataclasses import replace

    from ..runtime.moe import PrefetchConfig

    default = PrefetchConfig()
    return default if setting is None else replace(default, enabled=bool(setting))


def plan_for(choice: ModelChoice, context: int = 4096, experts_on_device: int | None = None):
    """The memory plan for ``choice`` on this machine; the context is capped to what the model supports."""
    from ..planning.planner import plan_for_checkpoint
    from ..weights.checkpoint import Checkpoint

    max_pos = int(Checkpoint.open(choice.path, verify=False).config.max_position_embeddings)
    return plan_for_checkpoint(choice.path, choice.device, min(context, max_pos), experts_on_device)


def plan_html(plan) -> str:
    """A ``MemoryPlan`` as an HTML table (component, VRAM, RAM, where the number comes from) and its verdict."""
    cuda = plan.device == "cuda"

    def gb(n: int) -> str:
        return f"{n / GB:.3f}" if n else "-"

    rows = [
        f"<tr><td>{html.escape(r.item)}{' (load only)' if r.load_only else ''}</td>"
        f'<td style="text-align:right">{gb(r.vram)}</td><td style="text-align:right">{gb(r.ram)}</td>'
        f'<td style="color:#666">{html.escape(r.source)}</td></tr>'
        for r in plan.rows
    ]
    b = plan.budget
    rows.append(
        f"<tr><td><b>peak</b></td><td style='text-align:right'><b>{gb(plan.vram_peak) if cuda else '-'}</b></td>"
        f"<td style='text-align:right'><b>{gb(plan.ram_peak)}</b></td><td></td></tr>"
    )
    rows.append(
        f"<tr><td>available</td><td style='text-align:right'>{gb(b.vram or 0) if cuda else '-'}</td>"
        f"<td style='text-align:right'>{gb(b.ram)}</td><td>{html.escape(b.describe())}</td></tr>"
    )
    report = plan.report().splitlines()
    start = next((i for i, line in enumerate(report) if line.startswith("arithmetic")), len(report))
    verdict = "\n".join(line for line in report[start:] if line.strip())
    head = html.escape(report[0])
    return (
        f"<p>{head}</p><table><tr><th>component</th><th>VRAM GB</th><th>RAM GB</th><th>source</th></tr>"
        + "".join(rows)
        + f"</table><pre>{html.escape(verdict)}</pre>"
    )


def show_plan(plan) -> None:
    """Display the plan table (HTML in a notebook; the text report elsewhere)."""
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        print(plan.report())
        return
    if get_ipython() is None:
        print(plan.report())
    else:
        display(HTML(plan_html(plan)))
