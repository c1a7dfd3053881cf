"""A CPU simulator of asynchronous copies, to catch stream-ordering bugs without a GPU.

``SimCopyEngine`` stands in for ``CopyEngine`` on a CPU. Each copy kind is its own stream (as on
CUDA) and the compute stream is a fourth; ordering exists only where CUDA would give it: issue order
within a stream, and the events passed as ``after`` or waited on by compute. The simulator tracks
that ordering with vector clocks and

- fills a copy's destination with poison (``0xFF`` bytes: NaN in every fp16 scale) when the copy is
  issued, and lands the bytes (the source's value as ordered at issue) only when compute waits on an
  event ordered after the copy (or on ``synchronize``), so compute that skipped its wait reads NaN;
- raises ``CopyHazard`` when an operation touches a buffer that an unordered operation may still be
  writing or reading: a slot reloaded before its write-back drained or before compute finished with
  it, a host buffer overwritten while a load still reads it, compute reading a slot before waiting
  for its copy.

Buffers are tracked as byte ranges, so a chunked copy (prefetch "auto" issues a guess in chunks) orders
against a compute that reads the whole slot, and a copy out of a slot carries every chunk landed in it.

It also keeps simulated time (copies take ``bytes / bandwidth`` on their direction's one DMA engine,
each expert's compute ``compute_s``), so schedules can be compared: ``stats`` has the time demand
copies spent queued behind speculative ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..runtime.experts import COPY_KINDS, DEMAND, MOVE, SPECULATIVE, CopyEngine

COMPUTE = "compute"
STREAMS = (COMPUTE, *COPY_KINDS)
POISON = 0xFF


class CopyHazard(AssertionError):
    """Two operations on one buffer with no ordering between them (a race on a real GPU)."""


@dataclass(frozen=True)
class SimEvent:
    clock: tuple[int, ...]  # per stream, the last operation this event covers
    end: float  # simulated time at which it fires


@dataclass
class _Access:
    stream: int
    step: int
    what: str


@dataclass
class _Copy:
    dst: torch.Tensor
    payload: torch.Tensor  # the bytes it will leave in ``dst``
    stream: int
    step: int
    what: str
    landed: bool = False


@dataclass
class SimStats:
    copies: int = 0
    landed: int = 0
    demand_wait_behind_speculative_s: float = 0.0  # demand copies queued behind a speculative one
    longest_demand_wait_behind_speculative_s: float = 0.0  # the longest one such wait
    busy_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COPY_KINDS, 0.0))


def _covers(clock, access: _Access) -> bool:
    return clock[access.stream] >= access.step


def _key(t: torch.Tensor) -> tuple[int, int]:
    """A buffer as its byte range (start, end): chunked copies write parts of a slot, compute reads it whole."""
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _inside(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return b[0] <= a[0] and a[1] <= b[1]


class SimCopyEngine(CopyEngine):
    """``CopyEngine`` with asynchronous copies simulated on a CPU (see the module docstring).

    ``strict=False`` skips the hazard checks and relies on poison alone (to show what a race computes).
    """

    def __init__(
        self,
        h2d_bytes_per_s: float = 12.3e9,
        d2h_bytes_per_s: float = 13.1e9,
        compute_s: float = 0.0,
        d2d_bytes_per_s: float = 120e9,  # a move reads and writes device memory (T4: ~240 GB/s, both ways)
        strict: bool = True,
    ) -> None:
        super().__init__("cpu")
        self.h2d_bytes_per_s, self.d2h_bytes_per_s, self.compute_s = h2d_bytes_per_s, d2h_bytes_per_s, compute_s
        self.d2d_bytes_per_s = d2d_bytes_per_s
        self._lane_rate = {
            "h2d": h2d_bytes_per_s,
            "d2h": d2h_bytes_per_s,
            "d2d": d2d_bytes_per_s,
        }  # bytes/s per DMA lane
        self.strict = strict
        n = len(STREAMS)
        self._steps = [0] * n  # operations issued per stream
        self._tail = [tuple([0] * n) for _ in range(n)]  # what each stream's next operation is ordered after
        self._free_at = [0.0] * n  # when each stream (and its DMA engine) is next idle
        self._engine_free = {"h2d": (0.0, None), "d2h": (0.0, None), "d2d": (0.0, None)}  # lane -> (free at, kind)
        self._pending: list[_Copy] = []
        self._writer: dict[tuple[int, int], _Access] = {}  # by byte range; ranges may overlap (chunks, slots)
        self._readers: dict[tuple[int, int], list[_Access]] = {}
        self._value: dict[tuple[int, int], torch.Tensor] = {}  # a range's bytes once every copy so far landed
        self.stats = SimStats()

    # ---- CopyEngine --------------------------------------------------------------------------------

    def _issue(self, dst: torch.Tensor, src: torch.Tensor, kind: str, after: list) -> SimEvent:
        s = STREAMS.index(kind)
        clock = list(self._tail[s])
        ready = 0.0
        for ev in after:
            clock = [max(a, b) for a, b in zip(clock, ev.clock, strict=True)]
            ready = max(ready, ev.end)
        self._steps[s] += 1
        clock[s] = self._steps[s]
        clock = tuple(clock)
        what = f"{kind} copy #{self._steps[s]}"
        self._check_read(src, clock, what)
        self._check_write(dst, clock, what)
        lane = "h2d" if kind in (DEMAND, SPECULATIVE) else "d2d" if kind == MOVE else "d2h"
        free, holder = self._engine_free[lane]
        start = max(ready, self._free_at[s], free)
        if kind == DEMAND and holder == SPECULATIVE and free > max(ready, self._free_at[s]):
            waited = free - max(ready, self._free_at[s])
            self.stats.demand_wait_behind_speculative_s += waited
            st = self.stats
            st.longest_demand_wait_behind_speculative_s = max(st.longest_demand_wait_behind_speculative_s, waited)
        nbytes = dst.numel() * dst.element_size()
        duration = nbytes / self._lane_rate[lane]
        end = start + duration
        self._free_at[s] = end
        self._engine_free[lane] = (end, kind)
        self.stats.busy_s[kind] += duration
        self.stats.copies += 1
        access = _Access(s, self._steps[s], what)
        self._readers.setdefault(_key(src), []).append(access)
        payload = self._read_value(src)
        d = _key(dst)
        for table in (self._writer, self._readers, self._value):
            for r in [r for r in table if _inside(r, d)]:
                del table[r]
        self._writer[d] = access
        self._readers[d] = []
        self._value[d] = payload
        dst.view(torch.uint8).fill_(POISON)
        self._pending.append(_Copy(dst, payload, s, self._steps[s], what))
        self._tail[s] = clock
        return SimEvent(clock, end)

    def compute_waits(self, event: object) -> None:
        if event is None:
            return
        c = STREAMS.index(COMPUTE)
        self._tail[c] = tuple(max(a, b) for a, b in zip(self._tail[c], event.clock, strict=True))
        self._free_at[c] = max(self._free_at[c], event.end)
        self._land(self._tail[c])

    def mark_compute(self, reads: torch.Tensor | None = None) -> SimEvent:
        c = STREAMS.index(COMPUTE)
        self._steps[c] += 1
        clock = list(self._tail[c])
        clock[c] = self._steps[c]
        self._tail[c] = clock = tuple(clock)
        self._free_at[c] += self.compute_s
        if reads is not None:
            what = f"compute #{self._steps[c]}"
            self._check_read(reads, clock, what)
            self._readers.setdefault(_key(reads), []).append(_Access(c, self._steps[c], what))
        return SimEvent(clock, self._free_at[c])

    def synchronize(self) -> None:
        self._land(tuple(self._steps))

    # ---- internals ---------------------------------------------------------------------------------

    def _read_value(self, src: torch.Tensor) -> torch.Tensor:
        """The bytes a copy from ``src`` will carry: its current bytes with every range copied into so far
        (landed or not, in issue order) laid over them."""
        k = _key(src)
        out = src.clone()
        flat = out.view(-1).view(torch.uint8)
        for r, v in self._value.items():  # in issue order: a range rewritten is re-inserted, so it comes last
            if _overlaps(r, k):
                a, b = max(r[0], k[0]), min(r[1], k[1])
                flat[a - k[0] : b - k[0]] = v.reshape(-1).view(torch.uint8)[a - r[0] : b - r[0]]
        return out

    def _check_read(self, buf: torch.Tensor, clock: tuple[int, ...], what: str) -> None:
        if not self.strict:
            return
        k = _key(buf)
        for r, w in self._writer.items():
            if _overlaps(r, k) and not _covers(clock, w):
                raise CopyHazard(f"{what} reads a buffer that {w.what} may still be writing (no wait on its event)")

    def _check_write(self, buf: torch.Tensor, clock: tuple[int, ...], what: str) -> None:
        if not self.strict:
            return
        k = _key(buf)
        for r, w in self._writer.items():
            if _overlaps(r, k) and not _covers(clock, w):
                raise CopyHazard(f"{what} overwrites a buffer that {w.what} may still be writing")
        for r in (r for key, rs in self._readers.items() if _overlaps(key, k) for r in rs):
            if not _covers(clock, r):
                raise CopyHazard(
                    f"{what} overwrites a buffer that {r.what} may still be reading "
                    "(a slot reused before its write-back drained or its compute finished?)"
                )

    def _land(self, clock: tuple[int, ...]) -> None:
        """Perform, in issue order, every pending copy ``clock`` is ordered after."""
        keep = []
        for cp in self._pending:
            if clock[cp.stream] >= cp.step:
                cp.dst.copy_(cp.payload)
                cp.landed = True
                self.stats.landed += 1
            else:
                keep.append(cp)
        self._pending = keep


def simulate_copies(target, **options) -> SimCopyEngine:
    """Swap a loaded model's (or an ``ExpertCache``'s) copy engine for a ``SimCopyEngine``; returns it.

    Only between steps (no copy in flight), and only on a CPU cache.
    """
    cache = getattr(target, "expert_cache", target)
    if cache.device.type != "cpu":
        raise ValueError("the copy simulator runs on CPU caches only")
    cache.engine.synchronize()
    engine = SimCopyEngine(**options)
    engine.observers = cache.engine.observers
    cache.engine = engine
    return engine
