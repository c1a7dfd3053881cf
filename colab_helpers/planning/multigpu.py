"""Memory plans for several GPUs (Kaggle's 2 x T4) and the bit-width upgrade a bigger machine allows.

Each GPU holds a contiguous range of whole decoder layers (``placement.LayerPlacement``). The per-GPU
arithmetic is the single-GPU planner's, applied to that GPU's share: its layers' attention, routers and
norms (plus the embeddings on the first GPU, the final norm and ``lm_head`` on the last), its layers' KV
cache, the same prefill activations, CUDA growth and reserve, and its expert slots. When every expert of
every layer fits on some GPU, layers are packed greedily and nothing is offloaded; otherwise layers are
split evenly and each GPU offloads what its slots cannot hold to pinned host RAM (one store for all).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from transformers import MixtralConfig

from ..runtime.placement import split_refusal
from ..weights.checkpoint import QuantConfig
from ..weights.families import MoEArchitecture
from ..weights.model_spec import ModelSpec
from ..weights.quant import DEFAULT_EXPERT_SPECS
from .planner import (
    GB,
    MB,
    SOURCES,
    Budget,
    Margins,
    MemoryPlan,
    ModelSizes,
    Row,
    _cuda_fixed_rows,
    _default_attention,
    _load_rows,
    _process_rows,
    _spread,
    plan_memory,
)

# The paper's quality numbers for the upgrade suggestion (Eliseev & Mazur, arXiv 2312.17238, Table 1), measured
# on Mixtral-8x7B only: quoted for Mixtral, never for another family (nothing measured them there).
MMLU = {2: 65.6, 3: 68.5}
MMLU_FAMILY = "Mixtral"


@dataclass(frozen=True)
class GpuShare:
    """One GPU: its layers, experts per layer on it, and its VRAM rows."""

    index: int
    vram: int  # free bytes
    first_layer: int
    per_layer: tuple[int, ...]
    spare_slots: int
    rows: tuple[Row, ...]

    @property
    def num_layers(self) -> int:
        return len(self.per_layer)

    @property
    def vram_peak(self) -> int:
        return sum(r.vram for r in self.rows)


@dataclass(frozen=True)
class MultiGpuPlan:
    """Layers per GPU, experts per layer on each, host RAM, and whether it all fits."""

    sizes: ModelSizes
    context: int
    ram_budget: int
    gpus: tuple[GpuShare, ...]
    ram_rows: tuple[Row, ...]
    offloading: bool
    reasons: tuple[str, ...] = ()
    suggestions: tuple[str, ...] = field(default=())

    @property
    def fits(self) -> bool:
        return not self.reasons

    @property
    def per_layer(self) -> tuple[int, ...]:
        return tuple(k for g in self.gpus for k in g.per_layer)

    @property
    def experts_on_device(self) -> int | tuple[int, ...]:
        return self.per_layer[0] if len(set(self.per_layer)) == 1 else self.per_layer

    @property
    def layers_per_gpu(self) -> tuple[int, ...]:
        return tuple(g.num_layers for g in self.gpus)

    @property
    def host_experts(self) -> int:
        return self.sizes.total_experts - sum(self.per_layer)

    @property
    def spare_slots(self) -> int:
        return max(g.spare_slots for g in self.gpus)

    @property
    def vram_peaks(self) -> list[int]:
        return [g.vram_peak for g in self.gpus]

    @property
    def ram_peak(self) -> int:
        return sum(r.ram for r in self.ram_rows)

    def placement(self, devices: Sequence[str] | None = None):
        """The ``LayerPlacement`` ``load_model`` uses (devices ``cuda:0..n-1`` unless given)."""
        from ..runtime.placement import LayerPlacement

        names = tuple(devices) if devices else tuple(f"cuda:{g.index}" for g in self.gpus)
        return LayerPlacement(names, self.layers_per_gpu)

    def report(self) -> str:
        s = self.sizes
        lines = [
            f"memory plan: {s.family} {s.num_layers} layers x {s.num_experts} experts on {len(self.gpus)} GPUs, "
            f"context {self.context} tokens (GB = 10^9 B)",
            f"  one {s.expert_bits}-bit expert {s.expert_bytes:,} B (cache slot {s.slot_bytes:,} B); "
            f"{s.attention_bits}-bit attention {s.attention_layer_bytes:,} B/layer",
            "",
        ]
        for g in self.gpus:
            last = g.first_layer + g.num_layers - 1
            lines.append(
                f"  GPU {g.index}: layers {g.first_layer}-{last}, {sum(g.per_layer)} experts + {g.spare_slots} spare "
                f"slots; peak {g.vram_peak / GB:.3f} of {g.vram / GB:.3f} GB"
            )
            for r in g.rows:
                lines.append(f"      {r.item:<60}{r.vram / GB:8.3f}  {r.source}")
        lines.append(f"  host RAM: peak {self.ram_peak / GB:.3f} of {self.ram_budget / GB:.3f} GB")
        for r in self.ram_rows:
            lines.append(f"      {r.item + (' (load only)' if r.load_only else ''):<60}{r.ram / GB:8.3f}  {r.source}")
        lines.append("")
        if self.fits:
            how = (
                f"offloading: {self.host_experts} experts in pinned host RAM"
                if self.offloading
                else "every expert on a GPU, nothing offloaded"
            )
            lines.append(f"FITS: layers per GPU {list(self.layers_per_gpu)}; {how}")
            lines += [f"  better: {x}" for x in self.suggestions]
        else:
            lines.append("DOES NOT FIT:")
            lines += [f"  - {r}" for r in self.reasons]
            lines += [f"  - {x}" for x in self.suggestions]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        k = self.experts_on_device
        return {
            "fits": self.fits,
            "device": "cuda",
            "gpus": len(self.gpus),
            "layers_per_gpu": list(self.layers_per_gpu),
            "offloading": self.offloading,
            "experts_on_device": k if isinstance(k, int) else list(k),
            "host_experts": self.host_experts,
            "expert_bits": self.sizes.expert_bits,
            "context": self.context,
            "vram_peak_gb": [round(v / GB, 3) for v in self.vram_peaks],
            "vram_budget_gb": [round(g.vram / GB, 3) for g in self.gpus],
            "ram_peak_gb": round(self.ram_peak / GB, 3),
            "ram_budget_gb": round(self.ram_budget / GB, 3),
            "reasons": list(self.reasons),
            "suggestions": list(self.suggestions),
        }


def _share_sizes(s: ModelSizes, layers: int, first: bool, last: bool) -> ModelSizes:
    """The model as one GPU sees it: ``layers`` layers, the embeddings only if first, ``lm_head`` (its bias and
    the final norm) only if last. Every layer is MoE (``placement.split_refusal``), so layers weigh alike."""
    per_layer, rest = divmod(s.trunk_bytes - s.embed_bytes - s.head_bytes, s.num_layers)
    assert rest == 0 and s.expert_layers == s.num_layers, "layers of unequal trunk bytes cannot be split"
    trunk = layers * per_layer + (s.embed_bytes if first else 0) + (s.head_bytes if last else 0)
    resident = s.resident_mlp_bytes * layers // s.num_layers  # shared experts: the same in every layer
    return replace(
        s,
        num_layers=layers,
        moe_layers=layers,
        trunk_bytes=trunk,
        resident_mlp_bytes=resident,
        resident_mlp_params=s.resident_mlp_params * layers // s.num_layers,
    )


def _share(
    s: ModelSizes, index: int, vram: int, first: int, layers: int, n_gpus: int, context: int, m: Margins, attention
) -> tuple[ModelSizes, list[Row]]:
    sub = _share_sizes(s, layers, index == 0, index == n_gpus - 1)
    return sub, _cuda_fixed_rows(sub, context, m, attention)


def _proportional(num_layers: int, vram: Sequence[int]) -> tuple[int, ...]:
    total = sum(vram)
    counts = [max(1, round(num_layers * v / total)) for v in vram]
    counts[-1] = num_layers - sum(counts[:-1])
    return tuple(counts)


def _all_resident_fits(s: ModelSizes, vrams: Sequence[int], counts: Sequence[int], context: int, m, attention) -> bool:
    first = 0
    for i, (vram, n) in enumerate(zip(vrams, counts, strict=True)):
        if n < 1:
            return False
        _, rows = _share(s, i, vram, first, n, len(vrams), context, m, attention)
        if sum(r.vram for r in rows) + n * s.num_experts * s.slot_bytes > vram:
            return False
        first += n
    return True


def _whole_layers(s: ModelSizes, vrams: Sequence[int], context: int, m: Margins, attention) -> tuple[int, ...] | None:
    """Layers per GPU with every expert resident: split by VRAM when that fits (balanced headroom), else
    packing GPU 0 first; None when no split holds them all."""
    even = _proportional(s.num_layers, vrams)
    if _all_resident_fits(s, vrams, even, context, m, attention):
        return even
    counts, placed = [], 0
    for i, vram in enumerate(vrams):
        best = 0
        for n in range(1, s.num_layers - placed + 1):
            remaining_gpus = len(vrams) - i - 1
            if remaining_gpus == 0 and n < s.num_layers - placed:
                continue
            sub, rows = _share(s, i, vram, placed, n, len(vrams), context, m, attention)
            if sum(r.vram for r in rows) + n * s.num_experts * s.slot_bytes <= vram:
                best = n
        if best == 0:
            return None
        counts.append(best)
        placed += best
        if placed == s.num_layers:
            break
    if placed < s.num_layers or len(counts) < len(vrams):
        return None
    return tuple(counts)


def plan_gpus(
    config: MixtralConfig | MoEArchitecture,
    quant: QuantConfig,
    vram: Sequence[int],
    ram: int,
    context: int = 4096,
    spare_slots: int = 2,
    margins: Margins | None = None,
    attention=None,
    rss_now: int = 0,
    suggest: bool = True,
) -> MultiGpuPlan:
    """Whole layers per GPU, no offloading, when that fits; else an even split with offloading."""
    m = margins or Margins()
    spec = ModelSpec.of(config, quant)
    if why := split_refusal(spec.arch):
        raise ValueError(why)
    s = ModelSizes.of(spec)
    n = len(vram)
    if n < 1:
        raise ValueError("plan_gpus needs at least one GPU")
    if n > s.num_layers:
        raise ValueError(f"{n} GPUs for {s.num_layers} layers: at most one GPU per layer")
    attention = attention or _default_attention("cuda", Budget(vram[0], ram))
    counts = _whole_layers(s, vram, context, m, attention)
    offloading = counts is None
    if counts is None:
        counts = _proportional(s.num_layers, vram)
    gpus, first = [], 0
    for i, (v, layers) in enumerate(zip(vram, counts, strict=True)):
        sub, rows = _share(s, i, v, first, layers, n, context, m, attention)
        fixed = sum(r.vram for r in rows)
        if not offloading:
            ks, spare = (s.num_experts,) * layers, 0
        else:
            slots = max(0, v - fixed) // s.slot_bytes
            if slots >= layers * s.num_experts:
                ks, spare = (s.num_experts,) * layers, 0
            else:
                ks, spare = _spread(max(0, slots - spare_slots), layers, s.num_experts), spare_slots
        n_slots = sum(ks) + spare
        rows.insert(1, Row(f"expert slots: {n_slots} x {s.slot_bytes / MB:.2f} MB", n_slots * s.slot_bytes, 0, "exact"))
        gpus.append(GpuShare(i, v, first, ks, spare, tuple(rows)))
        first += layers
    host = s.total_experts - sum(k for g in gpus for k in g.per_layer)
    budget = Budget(None, ram, rss_now=rss_now, measured=rss_now > 0)
    ram_rows = _process_rows("cuda", budget, m)
    if n > 1 and rss_now == 0:
        ram_rows.append(Row(f"CUDA host memory of {n - 1} more GPU contexts", 0, (n - 1) * m.cuda_host_rss, "assumed"))
    ram_rows.append(Row(f"pinned host experts: {host} x {s.slot_bytes / MB:.2f} MB", 0, host * s.slot_bytes, "exact"))
    ram_rows += _load_rows(s)
    plan = MultiGpuPlan(s, context, ram, tuple(gpus), tuple(ram_rows), offloading)
    reasons = []
    for g in plan.gpus:
        if g.vram_peak > g.vram:
            reasons.append(
                f"GPU {g.index}: layers {g.first_layer}-{g.first_layer + g.num_layers - 1} need "
                f"{g.vram_peak / GB:.2f} GB, only {g.vram / GB:.2f} GB free"
            )
    if plan.ram_peak > ram:
        reasons.append(f"host RAM: the plan peaks at {plan.ram_peak / GB:.2f} GB, only {ram / GB:.2f} GB available")
    plan = replace(plan, reasons=tuple(reasons))
    if suggest:
        again = lambda q: plan_gpus(config, q, vram, ram, context, spare_slots, m, attention, rss_now, False)  # noqa: E731
        plan = replace(plan, suggestions=tuple(upgrade_suggestions(plan, quant, again)))
    return plan


def upgrade_suggestions(plan: MemoryPlan | MultiGpuPlan, quant: QuantConfig, again) -> list[str]:
    """Wider experts that still fit, with their bytes and where they go. For Mixtral the paper's quality figure
    is quoted (3-bit experts: MMLU 68.5% vs 65.6%); it was measured on Mixtral-8x7B only, so other families
    get the bytes and the fit alone."""
    out = []
    if not plan.fits:
        return out
    for bits in sorted(DEFAULT_EXPERT_SPECS):
        if bits <= plan.sizes.expert_bits:
            continue
        p = again(replace(quant, experts=DEFAULT_EXPERT_SPECS[bits]))
        if not p.fits:
            continue
        where = (
            "every expert on a GPU"
            if not p.host_experts
            else f"{sum(p.per_layer)} of {p.sizes.total_experts} experts on the GPU"
        )
        mixtral = plan.sizes.family == MMLU_FAMILY
        quality = f" (MMLU {MMLU[bits]}% vs {MMLU[2]}% at 2 bits in the paper)" if mixtral and bits in MMLU else ""
        out.append(
            f"{bits}-bit experts fit ({p.sizes.expert_bytes / MB:.1f} MB each, {where}){quality}: "
            f"make them with `python -m colab_helpers convert SRC OUT --expert-bits {bits}`"
        )
    return out


def single_gpu_upgrades(plan: MemoryPlan, config: MixtralConfig, quant: QuantConfig) -> MemoryPlan:
    """A fitting single-device plan with the wider-expert suggestion added (shown under FITS)."""
    if not plan.fits or plan.device != "cuda":
        return plan

    def again(q: QuantConfig) -> MemoryPlan:
        return plan_memory(
            config, q, plan.budget, plan.device, plan.context, None, 2, plan.margins, False, attention=plan.attention
        )

    return replace(plan, suggestions=tuple(upgrade_suggestions(plan, quant, again)))


__all__ = ["GpuShare", "MultiGpuPlan", "plan_gpus", "single_gpu_upgrades", "upgrade_suggestions", "SOURCES"]
