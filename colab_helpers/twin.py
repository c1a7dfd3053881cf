"""A discrete-event twin of batch-1 decode on one GPU: the host, the compute stream and the copy engines.

The idealized bound (``timing.TimingModel``) assumes every copy hides behind compute and the host costs
nothing. This twin replays a *schedule* instead: every kernel with the bytes it reads, every copy with
its bytes, direction and stream, every event a stream waits on, and every host sync, in the order the
host issues them. The host pays a cost per launch (``Hardware``: stated, with its source) and runs ahead
of the GPU until a sync makes it wait; each stream runs its ops in order; a copy also waits for its
direction's copy engine. Seconds per token come out of the simulation, not out of a formula.

Two schedules are fed to it:
- the paper's implementation (arXiv 2312.17238, public code github.com/dvmazur/mixtral-offloading),
  rebuilt op for op from that code and driven by LRU replay of the real routing trace
  (``paper_schedule``): used to *calibrate* the twin against the paper's four measured T4 figures;
- our engine's own schedule, recorded while it decodes (``twin_record``), scaled to Mixtral's sizes.

``python -m colab_helpers twin [--paper] [--json]`` is the command-line face; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from .twin_family import TRACE_ENV, trace_path

# --------------------------------------------------------------------------------------------------
# hardware
# --------------------------------------------------------------------------------------------------

EXPERT_BYTES = 66_404_364  # one 2-bit HQQ expert, w1+w2+w3 with meta (docs/checkpoint_format.md)
ATTENTION_BYTES = 22_292_496  # 4-bit q/k/v/o of one layer with meta (planner, exact)
LM_HEAD_BYTES = 32000 * 4096 * 2  # fp16, read once per token
ROUTER_BYTES = 8 * 4096 * 2
LAYER_BYTES = 8 * EXPERT_BYTES + ATTENTION_BYTES  # one whole decoder layer (naive offloading moves this)
NUM_LAYERS, TOP_K, NUM_EXPERTS = 32, 2, 8

HOST_COST_SOURCE = (
    "host cost per launch: 9 us per eager PyTorch op, 20 us per Triton launch, 9 us per async copy, 15 us per "
    "sync round trip on Colab's 2.2 GHz vCPUs -- the assumption stated in shared/docs/PERFORMANCE.md "
    "('an assumption to be measured, not a measurement'); kernel floor 3 us (T4 launch-to-completion of an "
    "empty kernel, same status)"
)


@dataclass(frozen=True)
class Hardware:
    """What the twin needs to know about one GPU and the host driving it (seconds, bytes/s)."""

    name: str
    h2d_bytes_per_s: float  # pinned host->device
    d2h_bytes_per_s: float  # pinned device->host
    hbm_bytes_per_s: float  # peak memory bandwidth
    kernel_efficiency: float  # fraction of peak a bandwidth-bound kernel of ours reaches (stated)
    eager_launch_s: float  # host time to issue one eager PyTorch op
    fused_launch_s: float  # host time to issue one Triton kernel (Python launcher)
    copy_launch_s: float  # host time to issue one async copy (+ its event)
    sync_s: float  # host time of one sync once the GPU has caught up
    kernel_floor_s: float  # shortest GPU time of any kernel
    duplex: bool = True  # one copy engine per direction (H2D and D2H overlap)
    pageable_fraction: float = 1.0  # pageable copies run at this fraction of the pinned rate
    source: str = ""

    def with_measured(self, **measured: float) -> Hardware:
        """The same machine with some parameters replaced by measurements (gpu_check)."""
        return replace(self, **{k: v for k, v in measured.items() if v is not None})


T4 = Hardware(
    name="T4 (free Colab)",
    h2d_bytes_per_s=12.3e9,
    d2h_bytes_per_s=13.1e9,
    hbm_bytes_per_s=320e9,
    kernel_efficiency=0.75,  # 240 GB/s achievable (PERFORMANCE.md); our fused GEMV is unmeasured on a T4
    eager_launch_s=9e-6,
    fused_launch_s=20e-6,
    copy_launch_s=9e-6,
    sync_s=15e-6,
    kernel_floor_s=3e-6,
    source="PCIe and HBM: shared/docs/PERFORMANCE.md (measured pinned 12.3 / 13.1 GB/s, 320 GB/s peak, ~240 "
    "achievable); " + HOST_COST_SOURCE,
)

H200 = Hardware(
    name="H200",
    h2d_bytes_per_s=50e9,  # PCIe 5.0 x16 pinned, typical; gpu_check replaces it with the measured rate
    d2h_bytes_per_s=50e9,
    hbm_bytes_per_s=4.8e12,
    kernel_efficiency=0.5,  # batch-1 GEMV on 256 MB-scale weights rarely passes half of HBM3e peak
    eager_launch_s=5e-6,
    fused_launch_s=12e-6,
    copy_launch_s=5e-6,
    sync_s=10e-6,
    kernel_floor_s=2.5e-6,
    source="H200 datasheet 4.8 TB/s; PCIe 5.0 x16 ~50 GB/s pinned (typical, replaced by gpu_check's "
    "measurement when present); host costs: a fast server CPU assumed ~2x Colab's (assumption)",
)

PRESETS = {"t4": T4, "h200": H200}


# --------------------------------------------------------------------------------------------------
# schedule and simulation
# --------------------------------------------------------------------------------------------------

Kind = Literal["eager", "fused", "copy", "sync"]


class Op(NamedTuple):
    """One thing the host issues. ``after``: indices of earlier ops (events) this one waits for."""

    kind: Kind
    stream: str = "compute"
    nbytes: float = 0.0
    to_device: bool = True  # copies only
    after: tuple[int, ...] = ()
    pageable: bool = False  # copies only: synchronous pageable copy (the host waits for it)
    tag: str = ""  # what it is, for reports ("expert", "trunk", "demand", "guess", "writeback", ...)
    count: int = 1  # this many identical ops back to back (eager/fused/sync), simulated exactly


@dataclass
class Schedule:
    """Ops in host issue order, cut into decode tokens (``token_starts[i]`` = index of token i's first op)."""

    ops: list[Op] = field(default_factory=list)
    token_starts: list[int] = field(default_factory=list)
    fused_efficiency: float | None = None  # kernel efficiency of "fused" ops; None: the hardware's
    hit_rate: float = float("nan")
    notes: dict = field(default_factory=dict)

    def add(self, op: Op) -> int:
        self.ops.append(op)
        return len(self.ops) - 1

    def start_token(self) -> None:
        self.token_starts.append(len(self.ops))

    @property
    def tokens(self) -> int:
        return len(self.token_starts)

    def per_token(self, kind: Kind, tag: str | None = None) -> float:
        n = sum(op.count for op in self.ops if op.kind == kind and (tag is None or op.tag == tag))
        return n / max(self.tokens, 1)

    def bytes_per_token(self, kind: Kind, tag: str | None = None) -> float:
        n = sum(op.nbytes * op.count for op in self.ops if op.kind == kind and (tag is None or op.tag == tag))
        return n / max(self.tokens, 1)


@dataclass(frozen=True)
class Timeline:
    """What the simulation found: seconds per token and where the time went."""

    seconds: float  # first op issued -> last op done, over all tokens
    tokens: int
    compute_busy_s: float
    h2d_busy_s: float
    d2h_busy_s: float
    host_issue_s: float  # host time spent issuing launches
    host_wait_s: float  # host time spent waiting at syncs (and pageable copies)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def per_token_ms(self) -> dict[str, float]:
        f = 1e3 / max(self.tokens, 1)
        return {
            "total": self.seconds * f,
            "gpu compute busy": self.compute_busy_s * f,
            "H2D busy": self.h2d_busy_s * f,
            "D2H busy": self.d2h_busy_s * f,
            "host issuing": self.host_issue_s * f,
            "host waiting at syncs": self.host_wait_s * f,
        }


def simulate(schedule: Schedule, hw: Hardware) -> Timeline:
    """Run the schedule on ``hw``: the host issues ops in order; streams and copy engines run them."""
    fused_eff = schedule.fused_efficiency if schedule.fused_efficiency is not None else hw.kernel_efficiency
    launch = {"eager": hw.eager_launch_s, "fused": hw.fused_launch_s, "copy": hw.copy_launch_s, "sync": 0.0}
    host = 0.0
    tail: dict[str, float] = {}
    engine = {True: 0.0, False: 0.0}  # copy engine free at, per direction (one shared engine if not duplex)
    done = [0.0] * len(schedule.ops)
    busy = {"compute": 0.0, True: 0.0, False: 0.0}
    issue = wait = 0.0
    for i, op in enumerate(schedule.ops):
        n = op.count
        cost = launch[op.kind]
        if op.kind == "sync":  # the host waits for everything queued on the stream, then round-trips
            host += cost
            issue += cost
            caught_up = max(host, tail.get(op.stream, 0.0))
            wait += caught_up - host + n * hw.sync_s
            host = done[i] = caught_up + n * hw.sync_s
            continue
        ready = max(tail.get(op.stream, 0.0), *(done[j] for j in op.after)) if op.after else tail.get(op.stream, 0.0)
        if op.kind == "copy":
            host += cost
            issue += cost
            rate = hw.h2d_bytes_per_s if op.to_device else hw.d2h_bytes_per_s
            rate *= hw.pageable_fraction if op.pageable else 1.0
            dur = op.nbytes / rate
            lane = op.to_device if hw.duplex else True
            start = max(ready, host, engine[lane])
            engine[lane] = end = start + dur
            busy[op.to_device] += dur
        else:  # n kernels issued cost apart: the last ends at max(first's start + n*dur, last issue + dur)
            eff = fused_eff if op.kind == "fused" else hw.kernel_efficiency
            dur = max(op.nbytes / (hw.hbm_bytes_per_s * eff), hw.kernel_floor_s)
            end = max(max(ready, host + cost) + n * dur, host + n * cost + dur)
            host += n * cost
            issue += n * cost
            busy["compute"] += n * dur
        done[i] = end
        tail[op.stream] = end
        if op.pageable:  # cudaMemcpy from pageable memory returns when the copy is done
            wait += max(end - host, 0.0)
            host = max(host, end)
    end = max([host, *tail.values()])
    first = 0.0
    return Timeline(end - first, schedule.tokens, busy["compute"], busy[True], busy[False], issue, wait)


# --------------------------------------------------------------------------------------------------
# the paper's implementation, op for op (calibration)
# --------------------------------------------------------------------------------------------------

PAPER_T4 = {"full": 2.092, "no_prefetch": 1.567, "no_cache": 1.168, "naive": 0.661}  # Table 2, 2-bit experts
PAPER_RECALL = 0.8  # next-layer guesses, 2 experts prefetched 1 layer ahead: Fig. 2 (right), arXiv 2312.17238

Variant = Literal["full", "no_prefetch", "no_cache", "naive"]


@dataclass(frozen=True)
class PaperSetup:
    """The paper's runtime as its public code does it, plus the two calibrated factors.

    Read from github.com/dvmazur/mixtral-offloading (src/expert_cache.py, src/custom_layers.py):
    ``ExpertCache._swap`` issues ``copy_(non_blocking=True)`` host->device *and* the victim's
    device->host write-back on the current (compute) stream, so both serialize with the kernels;
    ``SparseMoeWrapper.forward`` syncs on ``unique().tolist()`` once per layer and on
    ``torch.where`` + two ``.tolist()`` per expert; every HQQ linear dequantizes its scale and zero
    (2 x 3 eager ops) before one Triton matmul. The public code has no speculative pre-loading: for
    "full" the guesses of the next layer's router are loaded on a separate copy stream (loads and
    write-backs serialized on it), ``recall`` of them right.
    """

    experts_on_device: int = 4
    recall: float = PAPER_RECALL
    paper_kernel_efficiency: float = 0.0369  # FITTED: their Triton 2/4-bit matmuls at batch 1, fraction of HBM peak
    pageable_fraction: float = 0.337  # FITTED: accelerate's pageable, per-tensor .to(device) vs pinned
    offloaded_layers: int = 8  # naive: whole layers that do not fit in 15 GB (24 x 554 MB + 1.2 GB trunk)
    context: int = 256  # tokens of KV cache read per layer
    seed: int = 0


FITTED = ("paper_kernel_efficiency", "pageable_fraction")

# eager ops per piece of the paper's per-token path (transformers 4.36 Mixtral, eager attention), read
# from the code: RMSNorm 8; rotary 10, kv-cache cat 2, repeat_kv 2, attention math 7; router softmax,
# top-k, sum, div, cast, zeros, one_hot, unique = 8; per expert: index 2, act 1, mul 1, weights 4, index_add 1
_HQQ_META_OPS = 6
_NORM, _ATTN_MATH, _ROUTER, _EXPERT_MISC = 8, 21, 8, 9
_GENERATE_OPS = 15  # HF greedy step: slice logits, argmax, cat ids and mask, stopping criteria


def _hqq_linear(nbytes: float, after: tuple[int, ...] = ()) -> list[Op]:
    return [Op("eager", tag="meta", count=_HQQ_META_OPS), Op("fused", nbytes=nbytes, after=after, tag="weights")]


def _eager(n: int, nbytes: float = 0.0, tag: str = "act") -> Op:
    return Op("eager", nbytes=nbytes / max(n, 1), tag=tag, count=n)


def _paper_attention(setup: PaperSetup) -> list[Op]:
    """Norm, q/k/v/o (shares of the layer's attention bytes by weight count), attention math, norm, router."""
    ops = [_eager(_NORM)]
    for share in (0.4, 0.1, 0.1):
        ops += _hqq_linear(ATTENTION_BYTES * share)
    ops.append(_eager(_ATTN_MATH, nbytes=2 * 1024 * 2 * setup.context, tag="kv"))
    ops += _hqq_linear(ATTENTION_BYTES * 0.4)
    ops += [_eager(1 + _NORM), Op("eager", nbytes=ROUTER_BYTES, tag="router"), _eager(_ROUTER)]
    return ops


def _paper_expert_rest() -> list[Op]:
    """An expert after its first matmul: act, w3, mul, w2, weighting and index_add."""
    third = EXPERT_BYTES / 3
    return [_eager(1), *_hqq_linear(third), _eager(1), *_hqq_linear(third), _eager(_EXPERT_MISC - 4)]


def _guesses(needed: Sequence[int], recall: float, rng: np.random.Generator) -> list[int]:
    """A next-layer guess of the same size as ``needed``: each needed expert right with prob. ``recall``."""
    out = [e for e in needed if rng.random() < recall]
    wrong = [e for e in range(NUM_EXPERTS) if e not in needed]
    rng.shuffle(wrong)
    return out + wrong[: len(needed) - len(out)]


def decode_rows(trace: dict, names: Sequence[str] | None = None) -> list[np.ndarray]:
    """Each sequence's decode steps ``[T, L, k]`` from a trace mapping (``*_decode_experts`` keys)."""
    from .trace import sequence_names

    known = sequence_names(trace)
    unknown = [n for n in names or () if n not in known]
    if unknown:
        raise ValueError(f"no sequence {unknown} in the trace; it has {known}")
    return [np.asarray(trace[f"{n}_decode_experts"]) for n in (names or known)]


def paper_schedule(variant: Variant, sequences: Sequence[np.ndarray], setup: PaperSetup = PaperSetup()) -> Schedule:
    """The paper's per-token op stream on the routing of ``sequences`` (each ``[T, L, k]``, -1 = skip)."""
    from .policies import make_policy
    from .trace import _LayerCache, _valid

    rng = np.random.default_rng(setup.seed)
    s = Schedule(fused_efficiency=setup.paper_kernel_efficiency)
    attention, expert_rest = _paper_attention(setup), _paper_expert_rest()
    token_head = [Op("eager", nbytes=4096 * 2, tag="embed")]
    token_tail = [_eager(_NORM), Op("eager", nbytes=LM_HEAD_BYTES, tag="lm_head"), _eager(_GENERATE_OPS)]
    token_tail.append(Op("sync", tag="stopping"))
    copy_stream = "copy" if variant == "full" else "compute"
    hits = accesses = 0
    for seq in sequences:
        n_layers = seq.shape[1]
        policy = make_policy("lru", n_layers, NUM_EXPERTS)
        k = setup.experts_on_device
        caches = [_LayerCache(policy, layer, k, range(NUM_EXPERTS - k, NUM_EXPERTS)) for layer in range(n_layers)]
        ready: dict[tuple[int, int], int] = {}  # (layer, expert) -> op index of its prefetch load
        for t in range(len(seq)):
            s.start_token()
            s.ops.extend(token_head)
            for layer in range(n_layers):
                used = _valid(seq[t, layer])
                if variant == "naive" and layer < setup.offloaded_layers:  # accelerate moves the whole layer in
                    s.add(Op("sync", tag="pageable"))
                    s.add(Op("copy", nbytes=LAYER_BYTES, pageable=True, tag="layer"))
                s.ops.extend(attention)
                if variant == "naive":  # transformers' MoE block: a torch.where sync for each unused expert too
                    s.add(Op("sync", tag="where", count=NUM_EXPERTS - len(used)))
                    order = used
                else:
                    s.add(Op("sync", tag="unique"))
                    if variant == "full" and layer + 1 < n_layers:
                        _prefetch(s, caches[layer + 1], seq[t, layer + 1], setup, rng, ready, layer + 1)
                    resident = caches[layer].resident
                    order = [e for e in used if e in resident] + [e for e in used if e not in resident]
                loaded: dict[int, int] = {}
                for i, e in enumerate(order):
                    if variant == "no_cache":
                        loaded[e] = s.add(Op("copy", stream=copy_stream, nbytes=EXPERT_BYTES, tag="demand"))
                    elif variant != "naive":
                        hit = caches[layer].fetch(e, keep=order[i + 1 :])
                        hits += hit
                        accesses += 1
                        if not hit:
                            loaded[e] = s.add(Op("copy", stream=copy_stream, nbytes=EXPERT_BYTES, tag="demand"))
                            s.add(Op("copy", stream=copy_stream, nbytes=EXPERT_BYTES, to_device=False, tag="writeback"))
                        elif (layer, e) in ready:
                            loaded[e] = ready[(layer, e)]
                for e in order:
                    s.add(Op("sync", tag="expert", count=3))  # torch.where (nonzero) and two .tolist()
                    s.add(_eager(2))
                    s.ops.extend(_hqq_linear(EXPERT_BYTES / 3, (loaded[e],) if e in loaded else ()))
                    s.ops.extend(expert_rest)
                if ready:
                    ready = {key: v for key, v in ready.items() if key[0] != layer}
                if variant in ("full", "no_prefetch"):
                    policy.on_step(layer)
            s.ops.extend(token_tail)
    s.hit_rate = hits / accesses if accesses else float("nan")
    return s


def _prefetch(s: Schedule, cache, row, setup: PaperSetup, rng, ready: dict, layer: int) -> None:
    """The next layer's router on this hidden state, then its guesses loaded on the copy stream."""
    from .trace import _valid

    s.add(Op("eager", nbytes=ROUTER_BYTES, tag="router"))
    s.add(_eager(2))
    s.add(Op("sync", tag="guess"))
    needed = _valid(row)
    guess = _guesses(needed, setup.recall, rng)
    for e in guess:
        if cache.prefetch(e, keep=guess):
            ready[(layer, e)] = s.add(Op("copy", stream="copy", nbytes=EXPERT_BYTES, tag="guess"))
            s.add(Op("copy", stream="copy", nbytes=EXPERT_BYTES, to_device=False, tag="writeback"))


def paper_tok_s(sequences: Sequence[np.ndarray], setup: PaperSetup = PaperSetup(), hw: Hardware = T4) -> dict:
    """Tokens/s of the four Table 2 variants, simulated on ``hw``."""
    hw_paper = replace(hw, pageable_fraction=setup.pageable_fraction)
    return {v: simulate(paper_schedule(v, sequences, setup), hw_paper).tok_s for v in PAPER_T4}


def calibrate(sequences: Sequence[np.ndarray], setup: PaperSetup = PaperSetup(), hw: Hardware = T4) -> PaperSetup:
    """Fit the two factors: the paper's kernel efficiency on its three cache variants (minimax relative
    error), then the pageable-copy fraction on naive offloading. Slow (tens of simulations); its result
    is frozen into ``PaperSetup``'s defaults, and ``tests/test_twin.py`` checks the fit still holds."""
    schedules = {v: paper_schedule(v, sequences, setup) for v in PAPER_T4}

    def err(eff: float) -> float:
        return max(
            abs(np.log(simulate(replace(schedules[v], fused_efficiency=eff), hw).tok_s / PAPER_T4[v]))
            for v in ("full", "no_prefetch", "no_cache")
        )

    lo, hi = 0.005, 0.3
    for _ in range(30):  # golden-section search in log space
        a, b = lo * (hi / lo) ** 0.382, lo * (hi / lo) ** 0.618
        lo, hi = (lo, b) if err(a) < err(b) else (a, hi)
    eff = (lo * hi) ** 0.5
    naive = replace(schedules["naive"], fused_efficiency=eff)
    lo, hi = 0.02, 1.0
    for _ in range(30):  # tok/s grows with the pageable rate
        mid = (lo * hi) ** 0.5
        fast = simulate(naive, replace(hw, pageable_fraction=mid)).tok_s > PAPER_T4["naive"]
        lo, hi = (lo, mid) if fast else (mid, hi)
    return replace(setup, paper_kernel_efficiency=round(eff, 4), pageable_fraction=round((lo * hi) ** 0.5, 3))


# --------------------------------------------------------------------------------------------------
# our engine at the planner's plan
# --------------------------------------------------------------------------------------------------

FREE_T4 = {"vram_gb": 15.0, "ram_gb": 12.7}  # what a fresh free Colab T4 reports (planner defaults)


def planned_experts(vram_gb: float = FREE_T4["vram_gb"], ram_gb: float = FREE_T4["ram_gb"]) -> tuple[int, ...]:
    """Experts per layer the planner puts on a GPU with this much free memory (2-bit Mixtral-8x7B)."""
    from .checkpoint import QuantConfig
    from .planner import Budget, plan_memory, stock_config

    plan = plan_memory(stock_config(), QuantConfig.for_bits(4, 2), Budget.given(vram_gb, ram_gb), "cuda")
    if not plan.fits:
        raise ValueError(f"the planner finds no fit for {vram_gb} GB VRAM / {ram_gb} GB RAM")
    return tuple(plan.per_layer)


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
    loads_per_token: float
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
) -> EngineProjection:
    """Record our engine decoding ``routing`` [T, L, k] at ``experts_on_device`` and simulate it on ``hw``.

    ``family``: a ``twin_family.FamilyTwin`` for another model (None: Mixtral-8x7B's narrow engine)."""
    from .twin_record import EngineRun, record_engine

    run = EngineRun(
        tuple(experts_on_device), policy, prefetch, recall, decode_tokens=tokens, warmup_tokens=warmup, family=family
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
        s.per_token("copy") / 2,
        notes,
    )


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


# --------------------------------------------------------------------------------------------------
# command line: python -m colab_helpers twin [--paper] [--json]
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from .usage import ArgumentParser, positive_float, positive_int

    p = ArgumentParser(
        prog="python -m colab_helpers twin",
        description="Discrete-event twin of decode on a GPU: calibrate on the paper (--paper) or project ours.",
    )
    p.add_argument("--paper", action="store_true", help="the paper's four T4 variants vs its Table 2")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument(
        "--model",
        default=None,
        help="project this model instead of Mixtral-8x7B: a folder, config.json or hub repo id, as for plan --model",
    )
    p.add_argument(
        "--trace",
        type=Path,
        default=None,
        help=f"routing trace .npz of the projected model (default: ${TRACE_ENV}; none is shipped)",
    )
    p.add_argument(
        "--routing",
        choices=("auto", "trace", "synthetic"),
        default="auto",
        help="auto: the trace when it is one of this model, else synthetic routing (other families only); "
        "Mixtral-8x7B without a trace is refused unless --routing synthetic",
    )
    p.add_argument("--sequences", default=None, help="comma-separated sequence names of the trace (default: all)")
    p.add_argument("--hardware", choices=sorted(PRESETS), default="t4")
    p.add_argument("--h2d-gbs", type=positive_float, default=None, help="override pinned host->device GB/s (measured)")
    p.add_argument("--d2h-gbs", type=positive_float, default=None, help="override pinned device->host GB/s (measured)")
    p.add_argument("--kernel-efficiency", type=positive_float, default=None, help="override: fraction of HBM peak")
    p.add_argument("--vram-gb", type=positive_float, default=FREE_T4["vram_gb"], help="plan for this much free VRAM")
    p.add_argument("--ram-gb", type=positive_float, default=FREE_T4["ram_gb"], help="plan for this much host RAM")
    p.add_argument("--experts-on-device", type=positive_int, default=None, help="fixed K per layer instead of the plan")
    p.add_argument("--recall", type=float, default=PAPER_RECALL, help="prefetch guess recall (= precision)")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--policy", default="lfu_decay")
    p.add_argument("--tokens", type=positive_int, default=48, help="decode steps recorded (default 48)")
    p.add_argument("--warmup", type=_non_negative_int, default=32, help="decode steps run first (default 32)")
    p.add_argument(
        "--compare-offload",
        type=Path,
        default=None,
        metavar="JSON",
        help="benchmarks/gpu_offload.py --json report: predict its 'ours (full)' tok/s with its measured bandwidth",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON object to this file")
    return p


def _trace_for(report: dict, path: Path | None) -> dict:
    """The routing trace a GPU run used (``path``, else the one its report names); a run on its model's own
    (random) routers gets seeded random routing."""
    used = (report.get("settings") or {}).get("trace")
    source = path or (Path(used) if used else None)
    if source is None:
        rng = np.random.default_rng(0)
        rows = np.argsort(rng.random((256, NUM_LAYERS, NUM_EXPERTS)), axis=2)[:, :, :TOP_K]
        return {"random_decode_experts": rows.astype(np.int8)}
    return dict(np.load(find_trace(source)))


def _non_negative_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def find_trace(path: Path | None) -> Path:
    """``--trace``, else ``$COLAB_HELPERS_TRACE``; FileNotFoundError saying how to give one."""
    found = trace_path(path)
    if found is None:
        raise FileNotFoundError(f"no routing trace: give --trace PATH or set {TRACE_ENV} (none is shipped)")
    if not found.is_file():
        raise FileNotFoundError(f"routing trace not found: {found}")
    return found


def _hardware(args: argparse.Namespace) -> Hardware:
    gbs = {"h2d_bytes_per_s": args.h2d_gbs, "d2h_bytes_per_s": args.d2h_gbs}
    return PRESETS[args.hardware].with_measured(
        **{k: v * 1e9 for k, v in gbs.items() if v is not None}, kernel_efficiency=args.kernel_efficiency
    )


def paper_report(figures: dict[str, float], setup: PaperSetup, hw: Hardware) -> str:
    lines = [
        f"twin of the paper's implementation on {hw.name}: K={setup.experts_on_device} LRU, loads and write-backs "
        "on the compute stream (its public code), 'full' = + next-layer guesses on a copy stream at recall "
        f"{setup.recall} (Fig. 2 of arXiv 2312.17238)",
        "fitted factors: " + ", ".join(f"{name} = {getattr(setup, name)}" for name in FITTED),
        "",
        f"{'variant':<14}{'paper tok/s':>12}{'twin tok/s':>12}{'error':>9}",
    ]
    for v, paper in PAPER_T4.items():
        lines.append(f"{v:<14}{paper:>12.3f}{figures[v]:>12.3f}{figures[v] / paper - 1:>+9.1%}")
    lines.append(f"\n{hw.source}")
    return "\n".join(lines)


def ours_report(p: EngineProjection) -> str:
    d = p.to_dict()
    ks = sorted(set(p.experts_on_device))
    k_text = ", ".join(f"{k} in {p.experts_on_device.count(k)} layers" for k in reversed(ks))
    lines = [
        f"twin of our engine on {p.hardware.name}, {p.notes.get('model', 'Mixtral-8x7B')}: {k_text}, {p.policy}, "
        f"prefetch recall {p.recall} ({p.tokens} decode steps recorded after warm-up)",
        f"routing: {p.notes.get('routing', 'the recorded routing trace')}",
        f"projected {d['tok_s']:.2f} tok/s   hit rate {d['hit_rate']:.3f}"
        f"   expert loads/token {d['loads_per_token']:.1f}"
        f"   syncs/token {d['syncs_per_token']:.0f}   launches/token {d['launches_per_token']:.0f}"
        f" (dispatch_count, forward only; simulated with generate's own: {d['simulated_syncs_per_token']:.0f}"
        f" and {d['simulated_launches_per_token']:.0f}, {d['fused_launches_per_token']:.0f} fused)",
        "per token (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in d["ms_per_token"].items()),
        f"\n{p.hardware.source}",
    ]
    return "\n".join(lines)


def cli_main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        names = [n.strip() for n in args.sequences.split(",")] if args.sequences else None
        hw = _hardware(args)
        if args.compare_offload is not None:
            report = json.loads(args.compare_offload.read_text())
            trace = _trace_for(report, args.trace)
            got = compare_with_offload(report, trace, args.tokens, args.warmup)
            print(
                f"twin vs {got['device']}: predicted {got['predicted_tok_s']:.2f} tok/s, measured "
                f"{got['measured_tok_s']:.2f} (x{got['predicted_over_measured']:.2f}); inputs {got['inputs']}"
            )
            _emit(got, args)
            return 0
        target = _target(args.model)
        if args.paper:
            if target is not None and target.family is not None:
                raise ValueError("--paper reproduces the paper's Mixtral-8x7B runs; it takes no other --model")
            trace = dict(np.load(find_trace(args.trace)))
            setup = PaperSetup()
            figures = paper_tok_s(decode_rows(trace, names), setup, hw)
            print(paper_report(figures, setup, hw))
            if args.json:
                fitted = {n: getattr(setup, n) for n in FITTED}
                _emit({**{k: round(v, 3) for k, v in figures.items()}, **fitted}, args)
            return 0
        proj = _project(args, target, names, hw)
    except (OSError, ValueError, KeyError) as err:
        print(f"twin: {err}", file=sys.stderr)
        return 2
    print(ours_report(proj))
    _emit(proj.to_dict(), args)
    return 0


@dataclass(frozen=True)
class Target:
    """The model ``--model`` names: its architecture and bit widths; ``family`` None when it is Mixtral-8x7B's shape
    at the demo's bit widths (the twin's own narrow Mixtral, exactly as without ``--model``)."""

    name: str
    arch: object  # families.MoEArchitecture
    quant: object  # checkpoint.QuantConfig
    family: object | None  # twin_family.FamilyTwin


def _target(model: str | None) -> Target | None:
    if model is None:
        return None
    from .families import MoEArchitecture, from_transformers
    from .planner import model_for_cli
    from .twin_family import FamilyTwin, is_stock_mixtral

    config, quant, _ = model_for_cli(model, 2)
    arch = config if isinstance(config, MoEArchitecture) else from_transformers(config)
    family = None if is_stock_mixtral(arch, quant) else FamilyTwin(arch, quant)
    return Target(f"{model} ({arch.name}, {quant.experts.nbits}-bit experts)", arch, quant, family)


def _routing(args: argparse.Namespace, target: Target | None, names: list[str] | None) -> tuple[np.ndarray, str]:
    """Decode rows ``[T, L, k]`` for the projected model and what they are (see ``twin_family``'s docstring)."""
    from .twin_family import STICKINESS, synthetic_routing, trace_mismatch

    arch = None if target is None else target.arch
    mixtral = target is None or target.family is None
    path = trace_path(args.trace)
    if args.routing != "synthetic" and path is not None:
        trace = dict(np.load(find_trace(path)))
        why = None if arch is None else trace_mismatch(trace, arch)
        if why is None:
            return np.concatenate(decode_rows(trace, names)), f"the recorded routing trace {path.name}"
        if args.trace is not None or args.routing == "trace" or mixtral:
            raise ValueError(f"{path}: a trace of another model ({why}); give this model's or --routing synthetic")
    if args.routing == "trace" or (mixtral and args.routing == "auto"):
        raise FileNotFoundError(
            f"no routing trace: give --trace PATH or set {TRACE_ENV} (Mixtral-8x7B's real trace is not shipped), "
            "or --routing synthetic"
        )
    if names:
        raise ValueError("--sequences names sequences of a trace; synthetic routing has none")
    if arch is None:
        from .families import from_transformers
        from .synthetic import mixtral_8x7b_config

        arch = from_transformers(mixtral_8x7b_config())
    tokens = max(256, args.tokens + args.warmup + 32)  # the prompt's 16 rows, warm-up and recorded steps
    rows = synthetic_routing(len(arch.moe_layers), arch.num_experts, arch.top_k, tokens)
    label = (
        f"SYNTHETIC routing (not a recorded trace of this model): each of a token's {arch.top_k} experts repeats "
        f"one the previous token used at that layer with probability {STICKINESS} (fitted to Mixtral-8x7B's trace), "
        f"else is uniform over the {arch.num_experts}"
    )
    return rows, label


def _project(args: argparse.Namespace, target: Target | None, names: list[str] | None, hw: Hardware):
    from .twin_family import planned_experts as family_plan

    routing, label = _routing(args, target, names)
    layers = NUM_LAYERS if target is None else len(target.arch.moe_layers)
    if args.experts_on_device:
        experts = NUM_EXPERTS if target is None else target.arch.num_experts
        if args.experts_on_device > experts:
            raise ValueError(f"--experts-on-device {args.experts_on_device}: the model has {experts} experts per layer")
        ks = (args.experts_on_device,) * layers
    elif target is None or target.family is None:
        ks = planned_experts(args.vram_gb, args.ram_gb)
    else:
        ks = family_plan(target.arch, target.quant, args.vram_gb, args.ram_gb)
    family = None if target is None else target.family
    proj = project_ours(
        routing, ks, hw, args.recall, args.policy, not args.no_prefetch, args.tokens, args.warmup, family
    )
    proj.notes["model"] = "Mixtral-8x7B (2-bit experts)" if target is None else target.name
    proj.notes["routing"] = label
    return proj


def _emit(obj: dict, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(obj))
    if args.out is not None:
        args.out.write_text(json.dumps(obj, indent=2))
