"""What the notebooks call, so their cells stay one or two lines: environment, model choice, tables, plots.

Three kinds of helpers: facts about the machine (``environment_report``), the one decision every
notebook makes (``choose_model``: the real Mixtral on a GPU with a network, else the embedded tiny
model, said out loud), and small computations + matplotlib figures for the walkthroughs. matplotlib,
IPython and ipywidgets are imported inside the functions that need them.
"""

from __future__ import annotations

import html
import os
import platform
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
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
    from .hub import DEMO_REPO, DownloadError, download
    from .tiny import TINY_ENV, tiny_forced, tiny_model_path

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


def plan_for(choice: ModelChoice, context: int = 4096, experts_on_device: int | None = None):
    """The memory plan for ``choice`` on this machine; the context is capped to what the model supports."""
    from .checkpoint import Checkpoint
    from .planner import plan_for_checkpoint

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


# --------------------------------------------------------------------------------------------------
# walkthrough 1: where Mixtral's bytes go
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    name: str
    params: int
    stored_bytes: int  # as the pre-quantized checkpoint stores it
    note: str

    @property
    def fp16_bytes(self) -> int:
        return 2 * self.params

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / self.params


def mixtral_components(config=None, quant=None) -> list[Component]:
    """Every parameter of Mixtral grouped by role, with its fp16 size and its size in the quantized checkpoint."""
    from .checkpoint import QuantConfig
    from .planner import ModelSizes
    from .synthetic import mixtral_8x7b_config

    config = config or mixtral_8x7b_config()
    quant = quant or QuantConfig()
    s = ModelSizes.of(config, quant)
    L, E, H, V = s.num_layers, s.num_experts, s.hidden, s.vocab
    return [
        Component("experts (w1, w2, w3)", L * E * s.expert_params, L * E * s.expert_bytes, f"{L}x{E} experts"),
        Component("attention (q, k, v, o)", L * s.attention_params, L * s.attention_layer_bytes, f"{L} layers"),
        Component("token embeddings", V * H, 2 * V * H, "fp16"),
        Component("lm_head", V * H, 2 * V * H, "fp16"),
        Component("routers", L * E * H, 2 * L * E * H, "fp16"),
        Component("norms", (2 * L + 1) * H, 2 * (2 * L + 1) * H, "fp16"),
    ]


def components_table(components: Sequence[Component]) -> str:
    """Text table: parameters, fp16 GB, stored GB, bits per weight."""
    lines = [f"{'component':<26}{'params':>16}{'fp16 GB':>10}{'stored GB':>11}{'bits/weight':>13}"]
    for c in components:
        lines.append(
            f"{c.name:<26}{c.params:>16,}{c.fp16_bytes / GB:>10.2f}{c.stored_bytes / GB:>11.2f}"
            f"{c.bits_per_weight:>13.2f}"
        )
    p, f, q = (sum(getattr(c, a) for c in components) for a in ("params", "fp16_bytes", "stored_bytes"))
    lines.append(f"{'total':<26}{p:>16,}{f / GB:>10.2f}{q / GB:>11.2f}{8 * q / p:>13.2f}")
    return "\n".join(lines)


def _category(item: str) -> str:
    """Group plan rows into a few colours for the stacked bars."""
    item = item.lower()
    for key, name in (
        ("expert slots", "experts on GPU"),
        ("pinned", "experts in host RAM"),
        ("expert buffers", "experts in host RAM"),
        ("trunk", "trunk (attention, embeddings)"),
        ("kv cache", "KV cache"),
        ("prefill", "activations"),
        ("cuda", "CUDA runtime"),
        ("python", "Python + libraries"),
    ):
        if key in item:
            return name
    return "other"


def plan_by_category(plan) -> dict[str, tuple[float, float]]:
    """``{category: (VRAM GB, RAM GB)}`` of a plan, in a stable order."""
    out: dict[str, list[float]] = {}
    for r in plan.rows:
        v = out.setdefault("while loading only" if r.load_only else _category(r.item), [0.0, 0.0])
        v[0] += r.vram / GB
        v[1] += r.ram / GB
    return {k: (v[0], v[1]) for k, v in out.items()}


def plot_plan(plan, ax=None, title: str | None = None):
    """Two stacked bars (GPU VRAM, host RAM) coloured by what the bytes are for, with the budget lines."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    cats = plan_by_category(plan)
    bottoms = [0.0, 0.0]
    for name, (vram, ram) in cats.items():
        ax.bar([0, 1], [vram, ram], bottom=bottoms, label=name, width=0.55)
        bottoms = [bottoms[0] + vram, bottoms[1] + ram]
    if plan.budget.vram is not None:
        ax.hlines(plan.budget.vram / GB, -0.35, 0.35, colors="k", linestyles="--")
        ax.text(0, plan.budget.vram / GB, f" {plan.budget.vram / GB:.1f} GB free", va="bottom", ha="center")
    ax.hlines(plan.budget.ram / GB, 0.65, 1.35, colors="k", linestyles="--")
    ax.text(1, plan.budget.ram / GB, f" {plan.budget.ram / GB:.1f} GB", va="bottom", ha="center")
    ax.set_xticks([0, 1], ["GPU VRAM", "host RAM"])
    ax.set_ylabel("GB (10^9 bytes)")
    ax.set_title(title or f"{plan.device_experts} of {plan.sizes.total_experts} experts on the GPU")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


def sweep_experts_on_gpu(config, quant, budget, ks: Iterable[int], context: int = 4096) -> list:
    """One plan per experts-per-layer value (checked, not chosen): how VRAM and RAM trade as k grows."""
    from .planner import plan_memory

    return [plan_memory(config, quant, budget, "cuda", context, k, suggest=False) for k in ks]


def plot_sweep(plans: Sequence, ax=None):
    """VRAM and host RAM peaks against experts per layer on the GPU, with the budget lines."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    ks = [p.per_layer[0] for p in plans]
    ax.plot(ks, [p.vram_peak / GB for p in plans], "o-", label="GPU VRAM peak")
    ax.plot(ks, [p.ram_peak / GB for p in plans], "s-", label="host RAM peak")
    b = plans[0].budget
    ax.axhline(b.vram / GB, color="C0", ls="--", lw=1, label=f"VRAM budget {b.vram / GB:.1f} GB")
    ax.axhline(b.ram / GB, color="C1", ls="--", lw=1, label=f"RAM budget {b.ram / GB:.1f} GB")
    for p, k in zip(plans, ks, strict=True):
        ax.annotate("fits" if p.fits else "no", (k, p.vram_peak / GB), textcoords="offset points", xytext=(0, 6))
    ax.set_xticks(ks)
    ax.set_xlabel("experts per layer kept on the GPU (of 8)")
    ax.set_ylabel("GB")
    ax.legend(fontsize=8)
    return ax


# --------------------------------------------------------------------------------------------------
# walkthrough 2: quantization
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantResult:
    bits: int
    group_size: int
    optimized: bool
    weight_error: float  # ||W - Wq|| / ||W||
    output_error: float  # ||X W^T - X Wq^T|| / ||X W^T|| on random inputs
    bits_per_weight: float  # stored bytes * 8 / weights, scales and zeros included
    seconds: float


def quantization_errors(weight: torch.Tensor, specs: dict, optimize: Sequence[bool] = (False, True), inputs: int = 64):
    """Quantize ``weight`` with each spec (min-max and/or HQQ-optimized); relative errors and true bit cost."""
    import time

    from .quant import quantize

    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(inputs, weight.shape[1], generator=gen).to(weight.device, weight.dtype)
    ref = x @ weight.T
    out = []
    for bits, spec in sorted(specs.items()):
        for opt in optimize:
            start = time.perf_counter()
            q = quantize(weight, spec, optimize=opt)
            w = q.dequantize(weight.dtype)
            seconds = time.perf_counter() - start
            out.append(
                QuantResult(
                    bits,
                    spec.group_size,
                    opt,
                    float((weight - w).norm() / weight.norm()),
                    float((ref - x @ w.T).norm() / ref.norm()),
                    8 * q.nbytes() / weight.numel(),
                    seconds,
                )
            )
    return out


def quant_table(results: Sequence[QuantResult]) -> str:
    lines = [
        f"{'bits':>4} {'group':>6} {'method':>8} {'weight err':>11} {'output err':>11} {'bits/weight':>12} {'time':>7}"
    ]
    for r in results:
        lines.append(
            f"{r.bits:>4} {r.group_size:>6} {'hqq' if r.optimized else 'min-max':>8} {r.weight_error:>11.4f} "
            f"{r.output_error:>11.4f} {r.bits_per_weight:>12.3f} {r.seconds:>6.1f}s"
        )
    return "\n".join(lines)


def plot_quant_errors(results: Sequence[QuantResult], ax=None):
    """Relative output error against stored bits per weight, one line per method."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    for opt, marker in ((False, "s--"), (True, "o-")):
        rs = [r for r in results if r.optimized == opt]
        if rs:
            label = "HQQ" if opt else "min-max"
            ax.plot([r.bits_per_weight for r in rs], [r.output_error for r in rs], marker, label=label)
    for r in results:
        if r.optimized == results[0].optimized:  # one label per bit width
            text = f"{r.bits}-bit, g={r.group_size}"
            ax.annotate(
                text, (r.bits_per_weight, r.output_error), fontsize=8, textcoords="offset points", xytext=(4, 4)
            )
    ax.set_xlabel("stored bits per weight (codes + 8-bit scales and zeros)")
    ax.set_ylabel("relative output error ||XW - XWq|| / ||XW||")
    ax.set_yscale("log")
    ax.legend()
    return ax


def group_ids(shape: tuple[int, int], group_size: int) -> np.ndarray:
    """Which quantization group each weight of ``W[out, in]`` belongs to in this layout.

    The weight is read row-major as ``[g, M]`` and each column of that view is a group, so group ``j``
    holds flat positions ``j, j+M, j+2M, ...``: one input column, every ``out/g``-th row (strided).
    """
    out_f, in_f = shape
    m = out_f * in_f // group_size
    return (np.arange(out_f * in_f) % m).reshape(out_f, in_f)


def plot_groups(shape: tuple[int, int] = (12, 4), group_size: int = 4, ax=None):
    """A small weight coloured by group id, with the id written in each cell."""
    import matplotlib.pyplot as plt

    ids = group_ids(shape, group_size)
    if ax is None:
        _, ax = plt.subplots(figsize=(3.5, 5))
    ax.imshow(ids % 20, cmap="tab20", aspect="auto", vmin=0, vmax=19)
    for (r, c), g in np.ndenumerate(ids):
        ax.text(c, r, str(g), ha="center", va="center", fontsize=7)
    ax.set_xlabel("input column")
    ax.set_ylabel("output row")
    ax.set_title(f"W{list(shape)}, g={group_size}: group id of each weight")
    return ax


# --------------------------------------------------------------------------------------------------
# walkthrough 3: routing, caching, prefetch
# --------------------------------------------------------------------------------------------------


def record_routing(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32):
    """Answer each prompt in a fresh conversation while a ``RoutingRecorder`` listens.

    Returns the recorder (one sequence per prompt) and each answer's ``GenerationResult`` (its stats
    hold the live cache's hit rate and prefetch precision/recall).
    """
    from .generation import SamplingConfig
    from .session import ChatSession
    from .trace import RoutingRecorder

    recorder = RoutingRecorder(model, name="prompt0")
    results = []
    with recorder:
        for i, prompt in enumerate(prompts):
            if i:
                recorder.new_sequence(f"prompt{i}")
            session = ChatSession(model, tokenizer, SamplingConfig(max_new_tokens=max_new_tokens))
            results.append(session.send(prompt))
    return recorder, results


def expert_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """``[L, E]`` share of decode steps in which each layer used each expert (``experts``: ``[T, L, k]``)."""
    t, n_layers, _ = experts.shape
    counts = np.zeros((n_layers, num_experts))
    for layer in range(n_layers):
        ids = experts[:, layer].reshape(-1)
        counts[layer] = np.bincount(ids[ids >= 0], minlength=num_experts)[:num_experts]
    return counts / max(t, 1)


def reuse_rate(experts: np.ndarray) -> float:
    """Share of a step's experts that the same layer also used one step before: why an expert cache works."""
    same = total = 0
    for t in range(1, len(experts)):
        for layer in range(experts.shape[1]):
            now = {int(e) for e in experts[t, layer] if e >= 0}
            before = {int(e) for e in experts[t - 1, layer] if e >= 0}
            same += len(now & before)
            total += len(now)
    return same / total if total else 0.0


def plot_expert_heatmap(counts: np.ndarray, ax=None, title: str = "expert use per layer (share of decode steps)"):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, max(2.5, 0.35 * counts.shape[0] + 1)))
    im = ax.imshow(counts, cmap="viridis", aspect="auto", vmin=0)
    if counts.size <= 128:
        for (r, c), v in np.ndenumerate(counts):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < counts.max() / 2 else "k")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    plt.colorbar(im, ax=ax)
    return ax


def hit_rate_sweep(
    trace, ks: Iterable[int], policies: Sequence[str] = ("lru", "lfu_decay", "lfu", "belady"), options=None
):
    """``{policy: [hit rate for each k]}`` replaying every sequence of ``trace`` (arrays or an .npz path)."""
    from .trace import replay_file

    ks = list(ks)
    return {p: [replay_file(trace, p, k, options).hit_rate for k in ks] for p in policies}


def plot_hit_rates(ks: Sequence[int], sweep: dict[str, list[float]], num_experts: int = 8, top_k: int = 2, ax=None):
    """Hit rate against experts per layer on the GPU, one line per policy, plus the random-routing line."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    for name, rates in sweep.items():
        ax.plot(ks, rates, "o-" if name != "belady" else "k:", label=name if name != "belady" else "belady (ceiling)")
    ax.plot(ks, [k / num_experts for k in ks], color="gray", lw=1, ls="--", label="uniformly random routing")
    ax.set_xticks(list(ks))
    ax.set_xlabel(f"experts per layer on the GPU (of {num_experts}, top-{top_k} routing)")
    ax.set_ylabel("cache hit rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return ax


# --------------------------------------------------------------------------------------------------
# benchmark
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchRow:
    experts_on_device: int
    prefetch: bool
    tokens_per_s: float
    hit_rate: float
    mib_in_per_token: float  # expert bytes copied in (prefill included) per generated token
    prefetch_precision: float
    new_tokens: int


def benchmark(
    path: str | os.PathLike,
    device: str,
    ks: Iterable[int],
    prompt: str = "Recite the Zen of Python.",
    max_new_tokens: int = 32,
    progress: bool = False,
    cpu_threads: int | None = 1,
) -> list[BenchRow]:
    """Decode speed and cache behaviour for each experts-per-layer value, prefetch on and off.

    One load per value (prefetch is switched on the loaded blocks); the same greedy prompt every time,
    after one untimed warm-up answer so first-call costs are not counted. A CPU run uses ``cpu_threads``
    torch threads (restored afterwards): small matrices gain nothing from more, and on a busy machine
    extra threads mostly wait on each other.
    """
    threads = torch.get_num_threads()
    if device == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    try:
        return _benchmark(path, device, ks, prompt, max_new_tokens, progress)
    finally:
        torch.set_num_threads(threads)


def _benchmark(
    path, device: str, ks: Iterable[int], prompt: str, max_new_tokens: int, progress: bool
) -> list[BenchRow]:
    import gc
    from dataclasses import replace

    from .generation import SamplingConfig
    from .model import load_model, load_tokenizer
    from .planner import MemoryPlanError
    from .session import ChatSession

    tok = load_tokenizer(path)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    rows = []
    for k in ks:
        try:
            model = load_model(path, device=device, experts_on_device=k, progress=progress)
        except MemoryPlanError as err:
            print(f"k={k}: does not fit this machine, skipped ({str(err).splitlines()[0]})")
            continue
        ChatSession(model, tok, SamplingConfig(max_new_tokens=4)).send(prompt)  # warm-up
        for enabled in (True, False):
            for layer in model.model.layers:
                layer.mlp.prefetch = replace(layer.mlp.prefetch, enabled=enabled)
            st = ChatSession(model, tok, sampling).send(prompt).stats
            rows.append(
                BenchRow(
                    k,
                    enabled,
                    st.tokens_per_s,
                    st.hit_rate,
                    st.h2d_bytes / 2**20 / max(st.new_tokens, 1),
                    st.prefetch_precision,
                    st.new_tokens,
                )
            )
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def bench_table(rows: Sequence[BenchRow]) -> str:
    lines = [f"{'k':>3} {'prefetch':>9} {'tok/s':>7} {'hit rate':>9} {'MiB in/token':>13} {'precision':>10}"]
    for r in rows:
        lines.append(
            f"{r.experts_on_device:>3} {'on' if r.prefetch else 'off':>9} {r.tokens_per_s:>7.2f} {r.hit_rate:>9.1%} "
            f"{r.mib_in_per_token:>13.2f} {r.prefetch_precision:>10.1%}"
        )
    return "\n".join(lines)


def plot_benchmark(rows: Sequence[BenchRow]):
    """tokens/s and hit rate against experts per layer, prefetch on vs off."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for enabled, style in ((True, "o-"), (False, "s--")):
        rs = [r for r in rows if r.prefetch == enabled]
        label = "prefetch on" if enabled else "prefetch off"
        a.plot([r.experts_on_device for r in rs], [r.tokens_per_s for r in rs], style, label=label)
        b.plot([r.experts_on_device for r in rs], [r.hit_rate for r in rs], style, label=label)
    ks = sorted({r.experts_on_device for r in rows})
    a.set_xticks(ks)
    b.set_xticks(ks)
    a.set_xlabel("experts per layer on the device")
    a.set_ylabel("decode tokens/s")
    b.set_xlabel("experts per layer on the device")
    b.set_ylabel("cache hit rate")
    b.set_ylim(0, 1.05)
    a.legend()
    b.legend()
    fig.tight_layout()
    return fig
