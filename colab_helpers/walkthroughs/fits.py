"""Walkthrough ``how_mixtral_fits``: where Mixtral's bytes go and how the planner splits them on a T4."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .setup import GB


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
    from ..sim.synthetic import mixtral_8x7b_config
    from ..weights.model_spec import ModelSpec, QuantConfig

    config = config or mixtral_8x7b_config()
    quant = quant or QuantConfig()
    s = ModelSpec.of(config, quant)
    a = s.arch
    L, E, H, V = a.num_layers, a.num_experts, a.hidden, a.vocab
    return [
        Component("experts (w1, w2, w3)", L * E * a.expert_params, L * E * s.expert_bytes, f"{L}x{E} experts"),
        Component("attention (q, k, v, o)", L * a.attention_params, L * s.attention_layer_bytes, f"{L} layers"),
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
    from ..planning.planner import plan_memory

    return [plan_memory(config, quant, budget, "cuda", context, k, suggest=False) for k in ks]


def plot_sweep(plans: Sequence, ax=None, title: str = "memory peaks against experts per layer on the GPU"):
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
    ax.set_title(title)
    ax.legend(fontsize=8)
    return ax
