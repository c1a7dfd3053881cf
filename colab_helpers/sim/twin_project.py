"""Our engine on the twin: record its schedule at the planner's plan (``twin_record``) and simulate it.

Apart from ``twin.py`` (the event model and the paper's calibration) because it needs the recorder, which
builds on the twin's ops: together they made an import circle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from .twin import EXPERT_BYTES, H200, NUM_LAYERS, PAPER_RECALL, T4, Hardware, Timeline, decode_rows, simulate
from .twin_record import EngineRun, record_engine

FREE_T4 = {"vram_gb": 15.0, "ram_gb": 12.7}  # what a fresh free Colab T4 reports (planner defaults)


def planned_experts(
    vram_gb: float = FREE_T4["vram_gb"], ram_gb: float = FREE_T4["ram_gb"], embedding_on_host: bool | None = None
) -> tuple[int, ...]:
    """Experts per layer the planner puts on a GPU with this much free memory (2-bit Mixtral-8x7B)."""
    return tuple(planned(vram_gb, ram_gb, embedding_on_host).per_layer)


def planned(
    vram_gb: float = FREE_T4["vram_gb"], ram_gb: float = FREE_T4["ram_gb"], embedding_on_host: bool | None = None
):
    """The planner's ``MemoryPlan`` for 2-bit Mixtral-8x7B on a GPU with this much free memory.

    ``embedding_on_host``: as ``plan_memory`` takes it; None (default) is the planner's choice, which on a free
    T4 puts the embedding table in host RAM (4 more expert slots); False is the plan with it on the GPU."""
    from ..planning.planner import Budget, plan_memory, stock_config
    from ..weights.checkpoint import QuantConfig

    budget = Budget.given(vram_gb, ram_gb)
    plan = plan_memory(stock_config(), QuantConfig.for_bits(4, 2), budget, "cuda", embedding_on_host=embedding_on_host)
    if not plan.fits:
        raise ValueError(f"the planner finds no fit for {vram_gb} GB VRAM / {ram_gb} GB RAM")
    return plan


@dataclass(frozen=True)
class EngineProjection:
    """The twin's projection for our engine: tokens/s and every input that produced it."""

    hardware: Hardware
    experts_on_device: tuple[int, ...]
    policy: str
    recall: float
    tokens: int
    timeline: Timeline
    hit_rate: float
    syncs_per_token: float  # dispatch_count's harness: the engine's forward per decode token
    launches_per_token: float
    fused_per_token: float
    loads_per_token: float  # expert-sized host->device copies per token (demand + speculative chunks)
    notes: dict

    def to_dict(self) -> dict:
        return {
            "tok_s": round(self.timeline.tok_s, 3),
            "experts_on_device": list(self.experts_on_device),
            "hit_rate": round(self.hit_rate, 4),
            "syncs_per_token": round(self.syncs_per_token, 2),
            "launches_per_token": round(self.launches_per_token, 1),
            "fused_launches_per_token": round(self.fused_per_token, 1),
            "loads_per_token": round(self.loads_per_token, 2),
            "ms_per_token": {k: round(v, 2) for k, v in self.timeline.per_token_ms().items()},
            "policy": self.policy,
            "prefetch_recall_assumed": self.recall,
            "recorded_tokens": self.tokens,
            "hardware": self.hardware.name,
            "h2d_gbs": self.hardware.h2d_bytes_per_s / 1e9,
            "kernel_efficiency": self.hardware.kernel_efficiency,
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in self.notes.items()},
        }


def project_ours(
    routing: np.ndarray,
    experts_on_device: Sequence[int],
    hw: Hardware = T4,
    recall: float = PAPER_RECALL,
    policy: str = "lfu_decay",
    prefetch: bool = True,
    tokens: int = 48,
    warmup: int = 32,
    family=None,
    prefetch_config=None,
    embedding_on_host: bool = False,
    kv_lending: bool = True,
    prompt_tokens: int = 16,
) -> EngineProjection:
    """Record our engine decoding ``routing`` [T, L, k] at ``experts_on_device`` and simulate it on ``hw``.

    ``family``: a ``twin_family.FamilyTwin`` for another model (None: Mixtral-8x7B's narrow engine, which lends
    the KV cache's unreached tail as ``load_model`` does unless ``kv_lending`` is False; families do not)."""
    run = EngineRun(
        tuple(experts_on_device),
        policy,
        prefetch,
        recall,
        decode_tokens=tokens,
        warmup_tokens=warmup,
        family=family,
        prefetch_config=prefetch_config,
        embedding_on_host=embedding_on_host,
        kv_lending=kv_lending and family is None,
        prompt_tokens=prompt_tokens,
    )
    s = record_engine(run, routing)
    notes = dict(s.notes)
    notes["simulated_syncs_per_token"] = s.per_token("sync")  # engine + HF generate's per-token ops
    notes["simulated_launches_per_token"] = s.per_token("eager") + s.per_token("fused")
    return EngineProjection(
        hw,
        tuple(experts_on_device),
        policy,
        recall if prefetch else 0.0,
        s.tokens,
        simulate(s, hw),
        s.hit_rate,
        notes.pop("harness_syncs_per_token"),
        notes.pop("harness_launches_per_token"),
        s.per_token("fused"),
        s.bytes_per_token("copy", "demand") / EXPERT_BYTES + s.bytes_per_token("copy", "speculative") / EXPERT_BYTES,
        notes,
    )


HOST_COST_FIELDS = ("eager_launch_s", "fused_launch_s", "copy_launch_s", "sync_s")  # Hardware's host costs


def compare_with_offload(report: dict, trace: dict, tokens: int = 48, warmup: int = 32) -> dict:
    """The twin next to a GPU run of ``benchmarks/gpu_offload.py`` (its ``--json`` report): same plan, policy
    and routing, this GPU's measured copy and kernel bandwidth; predicted vs measured tok/s of "ours (full)".

    The benchmark scripts its routers from the trace, so their prefetch guesses are an oracle: recall 1.0.
    """
    results = {r["name"]: r for r in report.get("results", [])}
    full = results.get("ours (full)")
    if not full or not full.get("tokens_per_s"):
        raise ValueError("the offload report has no measured 'ours (full)' tokens/s")
    device = str(report.get("device", ""))
    bw, kb = report.get("bandwidth") or {}, report.get("kernel") or {}
    base = T4 if "T4" in device else H200
    measured = {
        "h2d_bytes_per_s": bw["h2d_gbs"] * 1e9 if bw.get("h2d_gbs") else None,
        "d2h_bytes_per_s": bw["d2h_gbs"] * 1e9 if bw.get("d2h_gbs") else None,
        "hbm_bytes_per_s": kb["peak_gbs"] * 1e9 if kb.get("peak_gbs") else None,
        "kernel_efficiency": kb.get("fraction_of_peak") if kb.get("fused_kernel", True) else None,
        # host seconds per eager op, Triton launch, async copy and sync, measured in the same run (gpu_check)
        **{k: (report.get("host_costs") or {}).get(k) for k in HOST_COST_FIELDS},
    }
    hw = replace(base.with_measured(**measured), name=f"{device or base.name} (measured copies and kernel)")
    ks = full["experts_on_device"]
    ks = [int(ks)] * NUM_LAYERS if isinstance(ks, int) else [int(k) for k in ks]
    settings = report.get("settings") or {}
    names = ["gsm8k0"] if settings.get("trace") and "gsm8k0_decode_experts" in trace else None
    routing = np.concatenate(decode_rows(trace, names))
    proj = project_ours(routing, ks, hw, 1.0, settings.get("policy", "lfu_decay"), True, tokens, warmup)
    predicted = proj.timeline.tok_s
    return {
        "predicted_tok_s": round(predicted, 3),
        "measured_tok_s": round(full["tokens_per_s"], 3),
        "predicted_over_measured": round(predicted / full["tokens_per_s"], 3),
        "device": device,
        "inputs": {k: v for k, v in measured.items() if v is not None},
        "twin": proj.to_dict(),
    }
