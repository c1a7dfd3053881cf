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

Our engine's projection is ``twin_project.py``; ``python -m colab_helpers twin`` (``twin_cli.py``) is the
command-line face; see docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

import numpy as np

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
    "sync round trip on Colab's 2.2 GHz vCPUs -- an assumption to be measured, not a measurement "
    "(docs/benchmarks.md, reference facts); kernel floor 3 us (T4 launch-to-completion of an "
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
    kernel_efficiency=0.75,  # 240 GB/s achievable (docs/benchmarks.md); our fused GEMV is unmeasured on a T4
    eager_launch_s=9e-6,
    fused_launch_s=20e-6,
    copy_launch_s=9e-6,
    sync_s=15e-6,
    kernel_floor_s=3e-6,
    source="PCIe and HBM: measured pinned 12.3 / 13.1 GB/s, 320 GB/s peak, ~240 achievable "
    "(docs/benchmarks.md, reference facts); " + HOST_COST_SOURCE,
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
    from ..runtime.policies import make_policy
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
