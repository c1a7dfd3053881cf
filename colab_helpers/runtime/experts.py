"""Where experts live: one flat byte buffer per expert, per-layer device slots, host store, copies.

Placement is *exclusive*: every expert is in exactly one place, a device slot or a host buffer,
because all 256 Mixtral experts (15.8 GiB) do not fit in a free Colab VM's ~12.7 GB of RAM. A miss
therefore *swaps*: the wanted expert X is copied host→device into a spare device slot, and the
evicted expert Y is copied device→host into the host buffer X just left. A small pool of spare
slots shared by all layers lets loads run ahead of write-backs. On CUDA the two directions run on
their own streams, ordered by events; on CPU the same code copies synchronously.

A speculative guess (prefetch "auto", ``ExpertCache.stage``) takes only a free spare slot, as a ghost:
nothing resident is evicted for it; it is copied in chunks that ``pump`` issues a few per layer step, so a
demand load queues behind at most those.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..weights.model_spec import SLOT_ALIGN, ModelSpec, QuantConfig
from ..weights.quant import SUFFIXES, QuantizedWeight
from .policies import EvictionPolicy, make_policy


@dataclass(frozen=True)
class _Entry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ExpertLayout:
    """How one expert's 21 tensors sit inside its flat ``uint8`` buffer."""

    entries: tuple[_Entry, ...]
    nbytes: int
    quant: QuantConfig
    shapes: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, spec: ModelSpec) -> ExpertLayout:
        """The flat buffer of ``spec``'s expert: its stored tensors in order, each ``SLOT_ALIGN``-aligned
        (``spec.expert_slot_bytes`` in all)."""
        entries, offset = [], 0
        for key, (dtype, shape) in spec.expert_tensors.items():
            n = max(1, _numel(shape)) * torch.empty((), dtype=dtype).element_size()
            entries.append(_Entry(key, dtype, tuple(shape), offset, n))
            offset += -(-n // SLOT_ALIGN) * SLOT_ALIGN
        return cls(tuple(entries), offset, spec.quant, spec.expert_shapes)

    def pack(self, tensors: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        """Copy an expert's tensors (``{rel_key: tensor}``) into its flat buffer ``out`` (padding zeroed)."""
        out.zero_()
        for e in self.entries:
            out[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape).copy_(tensors[e.key])

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero-copy tensors over a flat buffer."""
        return {e.key: buf[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries}

    def weights(self, buf: torch.Tensor) -> dict[str, QuantizedWeight]:
        """``{"w1"|"w2"|"w3": QuantizedWeight}`` viewing ``buf``."""
        v = self.views(buf)
        return {
            mat: QuantizedWeight.from_tensors(self.quant.experts, shape, {s: v[f"{mat}.{s}"] for s in SUFFIXES})
            for mat, shape in self.shapes.items()
        }


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --------------------------------------------------------------------------------------------------
# copies
# --------------------------------------------------------------------------------------------------


def host_buffer(rows: int, nbytes: int, pin: bool, device: torch.device | None = None) -> torch.Tensor:
    """A ``[rows, nbytes]`` host store, page-locked when ``pin`` so copies to the GPU are async DMA.

    Pinned with ``cudaHostRegister`` at exactly its size (``pinning.py``: chunks if the driver refuses
    one piece, CUDA's error cleared, ``PinnedMemoryError`` when it cannot be done); torch's
    ``pin_memory=True`` would round 5.4 GB up to 8.6 GB.
    """
    if not pin:
        return torch.empty(rows, nbytes, dtype=torch.uint8)
    from .pinning import pinned_host_buffer

    return pinned_host_buffer(rows, nbytes, device=device)  # unpinning waits for this device's copies


DEMAND, SPECULATIVE, WRITE_BACK, MOVE = "demand", "speculative", "write_back", "move"
# the first two copy host→device, write-backs device→host, a move device→device (out of a slot the KV cache takes back)
COPY_KINDS = (DEMAND, SPECULATIVE, WRITE_BACK, MOVE)


@dataclass(frozen=True)
class CopyRecord:
    """One copy as issued through ``CopyEngine.copy``: what the T4 twin and the op counters record."""

    kind: str  # DEMAND | SPECULATIVE (host→device) | WRITE_BACK (device→host) | MOVE (device→device)
    nbytes: int
    layer: int = -1
    expert: int = -1

    @property
    def to_device(self) -> bool:
        return self.kind in (DEMAND, SPECULATIVE)


@dataclass
class _Staged:
    """A speculative load into a free slot (the slot becomes the guess's ghost): no resident expert is evicted.

    Its bytes go in ``chunks`` issued a few at a time (``ExpertCache.pump``), so a demand copy queues behind at
    most the chunks already issued; ``issued`` counts them, ``event`` is the last one's completion."""

    layer: int
    expert: int
    slot: int  # -1 until its first chunk is issued
    host: int
    chunks: list[tuple[int, int]]  # byte ranges of the flat expert buffer, in issue order
    issued: int = 0
    event: object = None
    used: bool = False  # the guessed layer used it (re-mapped)
    live: bool = True  # its layer's step has not ended yet

    @property
    def started(self) -> bool:
        return self.issued > 0

    @property
    def complete(self) -> bool:
        return self.issued == len(self.chunks)


def chunk_ranges(nbytes: int, chunks: int) -> list[tuple[int, int]]:
    """``nbytes`` cut into ``chunks`` byte ranges of near-equal size, each boundary 64-byte aligned."""
    step = -(-nbytes // max(1, chunks))
    step = -(-step // SLOT_ALIGN) * SLOT_ALIGN
    return [(a, min(a + step, nbytes)) for a in range(0, nbytes, step)]


class CopyEngine:
    """The one place every expert copy is issued (``copy``: kind, bytes, ordering), and the events that
    order compute after copies.

    CUDA: one stream per kind — demand loads on a high-priority stream, speculative loads on a
    low-priority one, write-backs on their own — ordered only by the events passed as ``after`` (and
    by issue order within a stream). Stream priority lets the GPU pick demand work first; it does not
    preempt a DMA already running, so the cache also bounds speculative bytes (``PrefetchConfig``).
    CPU: plain synchronous copies. ``observers`` see every ``CopyRecord`` as it is issued.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.observers: list[Callable[[CopyRecord], None]] = []
        if self.cuda:
            self.streams = {
                DEMAND: torch.cuda.Stream(self.device, priority=-1),  # lower number = higher priority
                SPECULATIVE: torch.cuda.Stream(self.device, priority=0),
                WRITE_BACK: torch.cuda.Stream(self.device, priority=0),
                MOVE: torch.cuda.Stream(self.device, priority=-1),
            }

    def copy(
        self, dst: torch.Tensor, src: torch.Tensor, kind: str, after: Iterable = (), layer: int = -1, expert: int = -1
    ) -> object:
        """Copy ``src`` into ``dst`` on ``kind``'s stream once every event in ``after`` fired; returns the
        completion event (``None`` when the copy is already complete, as on a CPU)."""
        if kind not in COPY_KINDS:
            raise ValueError(f"copy kind must be one of {COPY_KINDS}, got {kind!r}")
        record = CopyRecord(kind, dst.numel() * dst.element_size(), layer, expert)
        for observe in self.observers:
            observe(record)
        return self._issue(dst, src, kind, [ev for ev in after if ev is not None])

    def _issue(self, dst: torch.Tensor, src: torch.Tensor, kind: str, after: list) -> object:
        if not self.cuda:
            dst.copy_(src)
            return None
        stream = self.streams[kind]
        for ev in after:
            stream.wait_event(ev)
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def compute_waits(self, event: object) -> None:
        """Later compute waits for ``event`` (a copy's or ``mark_compute``'s)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def mark_compute(self, reads: torch.Tensor | None = None) -> object:
        """An event on the compute stream: everything queued so far (including reads of ``reads``) has
        run when it fires."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C / Colab's stop until the block ends, so bookkeeping and copies stay in step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: caught.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


# --------------------------------------------------------------------------------------------------
# counters
# --------------------------------------------------------------------------------------------------


@dataclass
class RoutingCounters:
    """Per-layer hit and prefetch counters, shared by the live cache and trace replay.

    Hits/misses count demand fetches; ``predicted``/``correct``/``needed`` score prefetch guesses.
    """

    num_layers: int
    hits: list[int] = field(default_factory=list)
    misses: list[int] = field(default_factory=list)
    prefetch_loads: list[int] = field(default_factory=list)
    predicted: list[int] = field(default_factory=list)  # experts guessed for a layer
    correct: list[int] = field(default_factory=list)  # guesses the layer then used
    needed: list[int] = field(default_factory=list)  # experts the layer used while a guess existed

    COUNTERS: ClassVar[tuple[str, ...]] = ("hits", "misses", "prefetch_loads", "predicted", "correct", "needed")

    def __post_init__(self) -> None:
        for name in self.COUNTERS:
            if not getattr(self, name):
                setattr(self, name, [0] * self.num_layers)

    def reset(self) -> None:
        for name in self.COUNTERS:
            setattr(self, name, [0] * self.num_layers)

    @property
    def accesses(self) -> int:
        return sum(self.hits) + sum(self.misses)

    @property
    def hit_rate(self) -> float:
        return sum(self.hits) / self.accesses if self.accesses else 0.0

    @property
    def precision(self) -> float:
        return sum(self.correct) / sum(self.predicted) if sum(self.predicted) else 0.0

    @property
    def recall(self) -> float:
        return sum(self.correct) / sum(self.needed) if sum(self.needed) else 0.0


@dataclass
class CacheStats(RoutingCounters):
    """The live cache's counters: routing counters plus bytes moved each way."""

    h2d_bytes: list[int] = field(default_factory=list)
    d2h_bytes: list[int] = field(default_factory=list)
    wasted_bytes: list[int] = field(default_factory=list)  # prefetched bytes the layer did not use
    speculative_bytes: list[int] = field(default_factory=list)  # host->device bytes copied for guesses (any mode)
    remaps: list[int] = field(default_factory=list)  # loads served by a freed slot still holding the expert
    staged: list[int] = field(default_factory=list)  # speculative loads into a free slot that started copying
    staged_used: list[int] = field(default_factory=list)  # ... that their layer then used
    staged_dropped: list[int] = field(default_factory=list)  # guesses dropped before any byte moved
    given_back: list[int] = field(default_factory=list)  # KV-lent slots returned to the KV cache (kv_cache.py)
    moved_bytes: list[int] = field(default_factory=list)  # device->device: a resident moved out of a returned slot

    COUNTERS: ClassVar[tuple[str, ...]] = (
        *RoutingCounters.COUNTERS,
        "h2d_bytes",
        "d2h_bytes",
        "wasted_bytes",
        "speculative_bytes",
        "remaps",
        "staged",
        "staged_used",
        "staged_dropped",
        "given_back",
        "moved_bytes",
    )

    def summary(self) -> dict[str, float]:
        return {
            "hits": sum(self.hits),
            "misses": sum(self.misses),
            "hit_rate": self.hit_rate,
            "h2d_bytes": sum(self.h2d_bytes),
            "d2h_bytes": sum(self.d2h_bytes),
            "prefetch_loads": sum(self.prefetch_loads),
            "prefetch_precision": self.precision,
            "prefetch_recall": self.recall,
            "prefetch_wasted_bytes": sum(self.wasted_bytes),
            "speculative_bytes": sum(self.speculative_bytes),
            "remaps": sum(self.remaps),
            "staged": sum(self.staged),
            "staged_used": sum(self.staged_used),
            "staged_dropped": sum(self.staged_dropped),
            "given_back": sum(self.given_back),
            "moved_bytes": sum(self.moved_bytes),
        }


# --------------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------------


def experts_per_layer(experts_on_device: int | Sequence[int], num_layers: int, num_experts: int) -> list[int]:
    """Normalize ``experts_on_device`` (one int or one per layer) and check its range."""
    ks = [experts_on_device] * num_layers if isinstance(experts_on_device, int) else list(experts_on_device)
    if len(ks) != num_layers or any(not 1 <= k <= num_experts for k in ks):
        raise ValueError(f"experts_on_device must be 1..{num_experts} per layer ({num_layers} layers), got {ks}")
    return ks


class _Closed:
    """Stands in for the placement tables of a closed cache: any lookup says so."""

    def __getitem__(self, layer: int):
        raise RuntimeError("the expert cache was closed (close_model): load the model again to use it")


class ExpertCache:
    """Per-layer device slots over a host store, with a pluggable eviction policy and counters.

    Call ``place`` once per expert at load time (the first ``k`` experts of a layer land on the
    device). Per layer step: ``demand`` (count hits and misses, issue every demand copy it can at
    once), ``prefetch`` for the next layers' guesses, then ``weights``/``release`` per expert in
    ``demand``'s order. ``fetch`` is the one-expert form (``demand`` + ``weights`` for one expert).

    A freed slot keeps its expert's bytes until another load overwrites it: an expert wanted again
    meanwhile (say, evicted by a wrong guess) is *re-mapped* to that slot instead of copied back in.

    ``lend``/``give_back``: the KV cache's unused tail lends whole slots (``kv_arena.KVArena``); each raises one
    layer's capacity until the conversation needs the bytes back (a write-back if the layer is then over).
    """

    def __init__(
        self,
        layout: ExpertLayout,
        num_layers: int,
        num_experts: int,
        experts_on_device: int | Sequence[int],
        device: torch.device | str = "cpu",
        policy: str | EvictionPolicy = "lru",
        spare_slots: int = 2,
        dense_dtype: torch.dtype | None = None,
        engine: CopyEngine | None = None,
    ) -> None:
        self.layout = layout
        self.num_layers, self.num_experts = num_layers, num_experts
        self.device = torch.device(device)
        self.capacity = experts_per_layer(experts_on_device, num_layers, num_experts)
        self.base_capacity = list(self.capacity)  # without lent slots
        n_host = sum(num_experts - k for k in self.capacity)
        self.spare = spare_slots if n_host else 0
        if n_host and self.spare < 1:
            raise ValueError("need at least one spare device slot when some experts live on the host")
        self.policy = make_policy(policy, num_layers, num_experts) if isinstance(policy, str) else policy
        self.engine = engine if engine is not None else CopyEngine(self.device)
        n_slots = sum(self.capacity) + self.spare
        self.device_buf = torch.empty(n_slots, layout.nbytes, dtype=torch.uint8, device=self.device)
        self.host_buf = host_buffer(n_host, layout.nbytes, pin=self.engine.cuda, device=self.device)
        self._slot_bufs = list(self.device_buf)  # one view per slot, made once (no per-token view creation)
        self._slot_weights = [layout.weights(buf) for buf in self._slot_bufs]
        self.slot_of: list[dict[int, int]] = [{} for _ in range(num_layers)]
        self.host_of: list[dict[int, int]] = [{} for _ in range(num_layers)]
        self._free_slots: deque[int] = deque(range(n_slots))
        self._free_hosts: deque[int] = deque(range(n_host))
        self._ghost: dict[tuple[int, int], int] = {}  # (layer, expert) -> free slot still holding its bytes
        self._ghost_of: list[tuple[int, int] | None] = [None] * n_slots
        # events guarding reuse (None on CPU or when nothing is pending)
        self._slot_ready: list = [None] * n_slots  # H2D into slot finished
        self._slot_used: list = [None] * n_slots  # last compute reading slot finished
        self._slot_drained: list = [None] * n_slots  # D2H out of slot finished
        self._host_written: list = [None] * n_host  # D2H into host buffer finished (H2D out of it, before)
        self._prefetched: list[set[int]] = [set() for _ in range(num_layers)]
        # per layer step: misses whose swap waits until their victim (needed this step) has been computed,
        # and experts fetched one by one after such a miss (decided in order, as the policy expects)
        self._deferred: list[dict[int, int]] = [{} for _ in range(num_layers)]
        self._lazy: list[list[int]] = [[] for _ in range(num_layers)]
        self.speculative_bytes_left: float = float("inf")  # per-token cap, reset by ``begin_token``
        # speculative loads into free slots (``stage``): by slot, and the ones with chunks still to issue
        self.spec_chunks = 8  # a staged load is issued in this many chunks (a demand waits for at most one)
        self._staged: dict[int, _Staged] = {}
        self._spec_queue: deque[_Staged] = deque()
        self.stats = CacheStats(num_layers)
        # CPU fast path: a slot's weights are dequantized once per load instead of once per use
        self.dense_dtype = dense_dtype if self.device.type == "cpu" else None
        self._slot_dense = [False] * n_slots
        self._borrower: dict[int, int | None] = {}  # lent slot -> the layer whose capacity it raised
        self._retired: set[int] = set()  # given-back slot ids (reused by the next ``lend``)
        # held by each MoE layer's whole cache step (fetch, compute, prefetch): two generations on two
        # threads (a widget callback on a kernel subshell and a cell) then interleave whole layer steps,
        # never half a swap. Re-entrant so a step may call ``fetch``/``prefetch`` freely.
        self.lock = threading.RLock()
        self.closed = False

    # ---- load time -------------------------------------------------------------------------------

    def place(self, layer: int, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        """Store an expert for the first time: in a device slot while the layer has room, else host."""
        if expert in self.slot_of[layer] or expert in self.host_of[layer]:
            raise ValueError(f"expert {layer}.{expert} placed twice")
        if len(self.slot_of[layer]) < self.capacity[layer]:
            slot = self._free_slots.popleft()
            if self.engine.cuda:
                staging = torch.empty(self.layout.nbytes, dtype=torch.uint8)
                self.layout.pack(tensors, staging)
                self._slot_bufs[slot].copy_(staging)
            else:
                self.layout.pack(tensors, self._slot_bufs[slot])
            self._drop_dense(slot)
            self.slot_of[layer][expert] = slot
        else:
            host = self._free_hosts.popleft()
            self.layout.pack(tensors, self.host_buf[host])
            self.host_of[layer][expert] = host

    def check_complete(self) -> None:
        missing = [
            (layer, e)
            for layer in range(self.num_layers)
            for e in range(self.num_experts)
            if e not in self.slot_of[layer] and e not in self.host_of[layer]
        ]
        if missing:
            raise RuntimeError(f"experts never placed: {missing[:8]}")

    # ---- per token -------------------------------------------------------------------------------

    def resident(self, layer: int) -> set[int]:
        return set(self.slot_of[layer])

    def order(self, layer: int, experts: Iterable[int]) -> list[int]:
        """Resident experts first, then misses: compute starts at once, and each miss can always evict
        an expert this layer has finished with (so one slot per layer is enough for any top-k)."""
        slots = self.slot_of[layer]
        experts = list(experts)
        return [e for e in experts if e in slots] + [e for e in experts if e not in slots]

    def begin_token(self, speculative_bytes: float | None = None) -> None:
        """A decode token starts: reset the speculative byte budget (``None``: no cap)."""
        self.speculative_bytes_left = float("inf") if speculative_bytes is None else speculative_bytes

    def demand(self, layer: int, experts: Iterable[int]) -> list[int]:
        """Start a layer step: order ``experts`` (resident first), count hits and misses, and issue every
        miss's copy now, before any of them is computed. A miss whose victim this step still needs (a
        tight cache) is swapped by ``weights`` once that victim has been computed. The policy sees the
        same accesses in the same order as one ``fetch`` per expert. Then call ``weights``/``release``
        for each expert in the returned order."""
        order = self.order(layer, experts)
        self._retire_guesses(layer, order)  # first: a wrong guess's slot is free for this step's misses
        self._deferred[layer].clear()
        self._lazy[layer] = []
        for i, e in enumerate(order):
            self.policy.on_access(layer, e)
            if e in self.slot_of[layer]:
                self.stats.hits[layer] += 1
                continue
            self.stats.misses[layer] += 1
            victim = self._victim(layer, e, order[i + 1 :])
            # a victim not computed yet: swap once it has been, decide the rest then
            if victim is not None and victim in order[:i]:
                self._deferred[layer][e] = victim
                self._lazy[layer] = order[i + 1 :]
                break
            self._swap_in(layer, e, victim, DEMAND)
        return order

    def weights(self, layer: int, expert: int) -> dict[str, QuantizedWeight]:
        """The expert's weights for the compute stream (which waits for its copy); call in ``demand`` order."""
        lazy = self._lazy[layer]
        if expert in self._deferred[layer]:
            self._swap_in(layer, expert, self._deferred[layer].pop(expert), DEMAND)
        elif expert in lazy:
            return self.fetch(layer, expert, keep=lazy[lazy.index(expert) + 1 :])
        return self._ready_weights(self.slot_of[layer][expert])

    def fetch(self, layer: int, expert: int, keep: Iterable[int] = ()) -> dict[str, QuantizedWeight]:
        """One expert's weights on the device, ready for the compute stream; counts a hit or a miss.

        ``keep`` lists experts of this layer that must not be evicted to make room (still needed);
        fetch a layer's experts in ``order(...)`` and pass the ones still to come as ``keep``.
        """
        self.policy.on_access(layer, expert)
        slot = self.slot_of[layer].get(expert)
        if slot is None:
            self.stats.misses[layer] += 1
            slot = self._swap_in(layer, expert, self._victim(layer, expert, keep), DEMAND)
        else:
            self.stats.hits[layer] += 1
        return self._ready_weights(slot)

    def release(self, layer: int, expert: int) -> None:
        """The compute stream has queued its last read of this expert for now (guards slot reuse)."""
        slot = self.slot_of[layer][expert]
        self._slot_used[slot] = self.engine.mark_compute(reads=self._slot_bufs[slot])

    def prefetch(self, layer: int, expert: int, keep: Iterable[int] = ()) -> bool:
        """Start loading a guessed expert; False when it is resident or no slot may be given up."""
        if expert in self.slot_of[layer]:
            return False
        candidates = self._candidates(layer, expert, keep)
        if not candidates and not self._has_room(layer):
            return False
        victim = None if self._has_room(layer) else self.policy.victim(layer, candidates)
        self._swap_in(layer, expert, victim, SPECULATIVE)
        self.stats.prefetch_loads[layer] += 1
        self._prefetched[layer].add(expert)
        return True

    def stage(self, layer: int, expert: int, chunks: int | None = None) -> bool:
        """Queue a speculative load of a guessed expert into a *free* slot, evicting nothing resident.

        When ``pump`` issues its first chunk it takes a free slot holding nothing, else the longest-freed
        evicted expert (the policy already judged it the least likely to be reused), never one another
        guess is loading; the slot becomes the guess's ghost. A demand for it at its layer is then a
        re-map (no copy in; the victim the policy picks is written back as for any miss); a wrong guess
        costs only the bus time of the chunks issued (``chunks`` of them; default ``spec_chunks``). False
        when resident, held by a free slot, or queued."""
        if expert in self.slot_of[layer] or (layer, expert) in self._ghost:
            return False
        if any(st.layer == layer and st.expert == expert for st in self._spec_queue):
            return False
        chunks = chunk_ranges(self.layout.nbytes, self.spec_chunks if chunks is None else chunks)
        self._spec_queue.append(_Staged(layer, expert, -1, self.host_of[layer][expert], chunks))
        return True

    def pump(self, chunks: int) -> int:
        """Issue up to ``chunks`` queued speculative chunks (oldest guess first); returns how many."""
        n = 0
        while n < chunks and self._spec_queue:
            st = self._spec_queue[0]
            if not st.started and not self._start_stage(st):
                break  # every free slot holds a guess in flight: wait for a step to free one
            self._issue_chunk(st, SPECULATIVE)
            n += 1
            if st.complete:
                self._spec_queue.popleft()
        return n

    def _start_stage(self, st: _Staged) -> bool:
        slot = self._free_slot_for_guess()
        if slot is None:
            return False
        self._free_slots.remove(slot)
        self._forget_ghost(slot)
        self._drop_dense(slot)
        self._free_slots.append(slot)  # still free (it is a ghost now), and the last a demand load takes
        self._ghost[(st.layer, st.expert)] = slot
        self._ghost_of[slot] = (st.layer, st.expert)
        st.slot = slot
        self._staged[slot] = st
        return True

    @property
    def pending_chunks(self) -> int:
        """Speculative chunks queued but not issued yet."""
        return sum(len(st.chunks) - st.issued for st in self._spec_queue)

    def _issue_chunk(self, st: _Staged, kind: str) -> None:
        a, b = st.chunks[st.issued]
        slot, host = st.slot, st.host
        if st.issued == 0:
            self.stats.staged[st.layer] += 1
            after = (self._slot_used[slot], self._slot_drained[slot], self._host_written[host], self._slot_ready[slot])
        else:
            after = (st.event,)  # each chunk after the last: the last chunk's event covers the whole load
        st.event = self.engine.copy(
            self._slot_bufs[slot][a:b], self.host_buf[host][a:b], kind, after=after, layer=st.layer, expert=st.expert
        )
        self._slot_ready[slot] = st.event
        st.issued += 1
        self.stats.h2d_bytes[st.layer] += b - a
        if kind == SPECULATIVE:  # the rest of a used guess goes out as demand
            self.stats.speculative_bytes[st.layer] += b - a
        if st.complete:
            self.stats.prefetch_loads[st.layer] += 1

    def _free_slot_for_guess(self) -> int | None:
        """A free slot a guess may load into: holding nothing, else the longest-freed evicted expert or stale
        guess; None when every free slot holds a live guess."""
        ghosts = []
        for slot in self._free_slots:
            st = self._staged.get(slot)
            if st is not None and st.live:
                continue
            if self._ghost_of[slot] is None:
                return slot
            ghosts.append(slot)
        return ghosts[0] if ghosts else None

    def _unstage(self, slot: int) -> None:
        """Forget the guess a slot is loading (its chunks not issued are dropped); a partial one's ghost goes."""
        st = self._staged.pop(slot, None)
        if st is None:
            return
        if not st.complete:
            with contextlib.suppress(ValueError):
                self._spec_queue.remove(st)
            if self._ghost_of[slot] == (st.layer, st.expert):
                self._forget_ghost(slot)
        if not st.used:
            self.stats.wasted_bytes[st.layer] += sum(b - a for a, b in st.chunks[: st.issued])

    def _drop_unstarted(self, layer: int | None = None) -> None:
        """Guesses that have not moved a byte yet give way (a demand load is coming, or their layer routed)."""
        for st in [st for st in self._spec_queue if not st.started and layer in (None, st.layer)]:
            self._spec_queue.remove(st)
            self.stats.staged_dropped[st.layer] += 1

    def score_prediction(self, layer: int, predicted: set[int], used: set[int]) -> None:
        """Record how a guess for ``layer`` compared with the experts it then used."""
        s = self.stats
        s.predicted[layer] += len(predicted)
        s.needed[layer] += len(used)
        s.correct[layer] += len(predicted & used)
        s.wasted_bytes[layer] += len(self._prefetched[layer] - used) * self.layout.nbytes
        self._prefetched[layer].clear()

    def end_step(self, layer: int) -> None:
        if self._deferred[layer]:
            raise RuntimeError(f"layer {layer}: experts {sorted(self._deferred[layer])} were never computed")
        self._lazy[layer] = []
        self._retire_guesses(layer, ())
        self.policy.on_step(layer)

    def _retire_guesses(self, layer: int, used: Iterable[int]) -> None:
        """The layer has routed: its guesses it does not use are wrong. One whose bytes are all issued stays a
        ghost (re-mappable later); the rest of a partial one would be wasted bus time and is dropped."""
        used = set(used)
        self._drop_unstarted(layer)
        for st in [st for st in self._staged.values() if st.layer == layer and st.expert not in used]:
            if st.complete:
                self.stats.wasted_bytes[layer] += self.layout.nbytes
                st.live = False
                del self._staged[st.slot]
            else:
                self._unstage(st.slot)

    # ---- internals -------------------------------------------------------------------------------

    def _candidates(self, layer: int, expert: int, keep: Iterable[int]) -> list[int]:
        keep = set(keep) | {expert}
        return sorted(e for e in self.slot_of[layer] if e not in keep)

    def _has_room(self, layer: int) -> bool:
        """The layer holds fewer experts than its capacity (a lent slot raised it): a miss evicts nothing."""
        return len(self.slot_of[layer]) < self.capacity[layer]

    def _victim(self, layer: int, expert: int, keep: Iterable[int]) -> int | None:
        """The expert a miss evicts (None while the layer has room)."""
        if self._has_room(layer):
            return None
        candidates = self._candidates(layer, expert, keep)
        if not candidates:
            raise RuntimeError(f"layer {layer}: no evictable expert to make room for {expert} (keep={set(keep)})")
        return self.policy.victim(layer, candidates)

    def _ready_weights(self, slot: int) -> dict[str, QuantizedWeight]:
        self.engine.compute_waits(self._slot_ready[slot])
        self._make_dense(slot)
        return self._slot_weights[slot]

    def _take_free_slot(self) -> int:
        """A free slot to load into: one holding nothing re-mappable if any, else the longest-freed; a slot
        a live guess is loading only when no other is free (that guess is then dropped)."""
        free = [slot for slot in self._free_slots if not (slot in self._staged and self._staged[slot].live)]
        free = free or list(self._free_slots)
        slot = next((slot for slot in free if self._ghost_of[slot] is None), free[0])
        self._unstage(slot)
        self._free_slots.remove(slot)
        self._forget_ghost(slot)
        self._drop_dense(slot)
        return slot

    def _forget_ghost(self, slot: int) -> None:
        if self._ghost_of[slot] is not None:
            del self._ghost[self._ghost_of[slot]]
            self._ghost_of[slot] = None

    def _swap_in(self, layer: int, expert: int, victim: int | None, kind: str) -> int:
        """Bring ``expert`` into a device slot and write ``victim`` back into the host buffer it leaves (no victim:
        the layer has room, and that host buffer becomes free)."""
        eng = self.engine
        with deferred_interrupts():  # copies and bookkeeping change together or not at all
            host = self.host_of[layer][expert]
            slot = self._ghost.get((layer, expert))
            if slot is not None:  # its old slot (or a guess's) holds it: no copy in
                st = self._staged.get(slot)
                if st is not None:  # a guess: issue what is left of its copy now, as demand
                    st.used = True
                    self.stats.staged_used[layer] += 1
                    if not st.complete:
                        with contextlib.suppress(ValueError):
                            self._spec_queue.remove(st)
                        while not st.complete:
                            self._issue_chunk(st, kind)
                    del self._staged[slot]
                self._free_slots.remove(slot)
                self._forget_ghost(slot)
                self.stats.remaps[layer] += 1
                read_host = self._slot_ready[slot]  # the victim's write-back into host waits for that copy
            else:
                if kind == DEMAND:
                    self._drop_unstarted()
                slot = self._take_free_slot()
                ready = eng.copy(
                    self._slot_bufs[slot],
                    self.host_buf[host],
                    kind,
                    after=(
                        self._slot_used[slot],
                        self._slot_drained[slot],
                        self._host_written[host],
                        self._slot_ready[slot],
                    ),
                    layer=layer,
                    expert=expert,
                )
                self._slot_ready[slot] = read_host = ready
                self.stats.h2d_bytes[layer] += self.layout.nbytes
                if kind == SPECULATIVE:
                    self.stats.speculative_bytes[layer] += self.layout.nbytes
            del self.host_of[layer][expert]
            self.slot_of[layer][expert] = slot
            if victim is None:  # a free host buffer now; a write-back into it waits for the copy out of it
                self._host_written[host] = read_host
                self._free_hosts.append(host)
            else:
                self._write_back(layer, victim, host, read_host)
        return slot

    def _write_back(self, layer: int, victim: int, host: int, after: object = None) -> None:
        """Evict resident ``victim`` into host buffer ``host``: its slot is freed, still holding it (a ghost)."""
        old = self.slot_of[layer].pop(victim)
        drained = self.engine.copy(
            self.host_buf[host],
            self._slot_bufs[old],
            WRITE_BACK,
            after=(after, self._host_written[host], self._slot_ready[old]),
            layer=layer,
            expert=victim,
        )
        self._slot_drained[old], self._host_written[host] = drained, drained
        self.host_of[layer][victim] = host
        self._free_slots.append(old)
        self._ghost[(layer, victim)] = old
        self._ghost_of[old] = (layer, victim)
        self.stats.d2h_bytes[layer] += self.layout.nbytes

    # ---- slots lent by the KV cache ----------------------------------------------------------------

    @property
    def lent_slots(self) -> list[int]:
        """Slot ids the KV cache lent and has not taken back."""
        return list(self._borrower)

    def lend(self, buf: torch.Tensor) -> int:
        """Take ``buf`` (``layout.nbytes`` bytes of device memory, e.g. the KV cache's unused tail) as one more slot.

        The layer with the fewest experts on the device (then the lowest index) gets one more: its next miss
        loads without evicting. Until ``give_back`` the cache owns the bytes; the compute stream's writes so far
        come before any copy into them. Returns the slot id ``give_back`` takes."""
        if buf.device != self.device or buf.dtype != torch.uint8 or buf.numel() != self.layout.nbytes:
            raise ValueError(f"a lent slot must be {self.layout.nbytes} uint8 bytes on {self.device}, got {buf}")
        with self.lock, deferred_interrupts():
            slot = min(self._retired) if self._retired else len(self._slot_bufs)
            entry = (buf, self.layout.weights(buf), self.engine.mark_compute(), None, None, None, False)
            if slot == len(self._slot_bufs):
                for table in self._slot_tables():
                    table.append(None)
            self._retired.discard(slot)
            for table, value in zip(self._slot_tables(), entry, strict=True):
                table[slot] = value
            open_layers = [layer for layer in range(self.num_layers) if self.capacity[layer] < self.num_experts]
            borrower = min(open_layers, key=lambda layer: (self.capacity[layer], layer)) if open_layers else None
            if borrower is not None:
                self.capacity[borrower] += 1
            self._borrower[slot] = borrower
            self._free_slots.appendleft(slot)  # holds nothing: the next load takes it first
        return slot

    def give_back(self, slot: int) -> None:
        """Return lent ``slot``: its borrower layer's capacity drops (the policy's victim is written back if the
        layer is over); an expert the slot holds moves to a free slot (a device-to-device copy). Later compute
        (the KV cache's writes) runs after every copy into or out of the slot."""
        with self.lock, deferred_interrupts():
            layer = self._borrower.pop(slot)
            if layer is not None:
                self.capacity[layer] -= 1
                if len(self.slot_of[layer]) > self.capacity[layer]:
                    victim = self.policy.victim(layer, sorted(self.slot_of[layer]))
                    self._write_back(layer, victim, self._free_hosts.popleft())
            owner = next(
                ((lay, e) for lay in range(self.num_layers) for e, s in self.slot_of[lay].items() if s == slot), None
            )
            if owner is not None:
                self._move(owner, slot)
            else:
                self._unstage(slot)
                self._forget_ghost(slot)
                self._free_slots.remove(slot)
            self.engine.compute_waits(self._slot_ready[slot])
            self.engine.compute_waits(self._slot_drained[slot])
            self._drop_dense(slot)
            for table in self._slot_tables():
                table[slot] = None
            self._slot_dense[slot] = False
            self._retired.add(slot)
            self.stats.given_back[layer if layer is not None else 0] += 1

    def _move(self, owner: tuple[int, int], slot: int) -> None:
        """Move a resident expert out of ``slot`` into a free one (device to device, on its own stream)."""
        layer, expert = owner
        free = [s for s in self._free_slots if s != slot]  # never empty: at least spare + 1 slots are free here
        dst = next((s for s in free if not (s in self._staged and self._staged[s].live)), free[0])
        self._unstage(dst)  # a live guess loading there (only when every free slot holds one) is dropped
        self._free_slots.remove(dst)
        self._forget_ghost(dst)
        self._drop_dense(dst)
        moved = self.engine.copy(
            self._slot_bufs[dst],
            self._slot_bufs[slot],
            MOVE,
            after=(self._slot_ready[slot], self._slot_ready[dst], self._slot_drained[dst], self._slot_used[dst]),
            layer=layer,
            expert=expert,
        )
        self._slot_ready[dst] = moved
        self._slot_drained[slot] = moved  # a read out of ``slot``: the K/V writes wait for it like for a write-back
        self.slot_of[layer][expert] = dst
        self.stats.moved_bytes[layer] += self.layout.nbytes

    def _slot_tables(self) -> tuple[list, ...]:
        """Every per-slot list, in ``lend``'s entry order."""
        return (
            self._slot_bufs,
            self._slot_weights,
            self._slot_used,
            self._slot_ready,
            self._slot_drained,
            self._ghost_of,
            self._slot_dense,
        )

    def _make_dense(self, slot: int) -> None:
        """CPU fast path: dequantize a slot's weights once per load (no fused low-bit kernel on a CPU)."""
        if self.dense_dtype is not None and not self._slot_dense[slot]:
            for w in self._slot_weights[slot].values():
                w.dense = w.dequantize(self.dense_dtype)
            self._slot_dense[slot] = True

    def _drop_dense(self, slot: int) -> None:
        if self._slot_dense[slot]:
            for w in self._slot_weights[slot].values():
                w.dense = None
            self._slot_dense[slot] = False

    # ---- teardown --------------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for every copy in flight, then free the device slots and unpin and free the host store.

        Unpinning or freeing a buffer a copy stream still reads or writes is undefined, so this
        synchronizes first. The cache cannot be used afterwards (a fetch raises); closing twice is fine.
        """
        from .pinning import release

        with self.lock:  # not in the middle of another thread's layer step
            if self.closed:
                return
            self.engine.synchronize()
            release(self.host_buf)
            self._slot_weights = []  # views of the device buffer
            self.device_buf = torch.empty(0, self.layout.nbytes, dtype=torch.uint8, device=self.device)
            self.host_buf = torch.empty(0, self.layout.nbytes, dtype=torch.uint8)
            self.slot_of = self.host_of = _Closed()
            self._spec_queue.clear()
            self.closed = True

    # ---- inspection (tests, notebooks) -----------------------------------------------------------

    def expert_bytes(self, layer: int, expert: int) -> torch.Tensor:
        """A host copy of the expert's flat buffer, wherever it lives now."""
        self.engine.synchronize()
        slot = self.slot_of[layer].get(expert)
        if slot is not None:
            return self._slot_bufs[slot].cpu().clone()
        return self.host_buf[self.host_of[layer][expert]].clone()

    def check_invariants(self) -> None:
        """Each expert in exactly one place, no buffer shared, no layer over capacity.

        Holds the cache lock, so another thread's swap is never seen half done."""
        with self.lock:
            self._check_invariants()

    def _check_invariants(self) -> None:
        slots, hosts = [], []
        for layer in range(self.num_layers):
            on_dev, on_host = set(self.slot_of[layer]), set(self.host_of[layer])
            assert not on_dev & on_host, f"layer {layer}: experts in two places {on_dev & on_host}"
            assert on_dev | on_host == set(range(self.num_experts)), f"layer {layer}: experts lost"
            assert len(on_dev) <= self.capacity[layer], f"layer {layer}: {len(on_dev)} > {self.capacity[layer]}"
            slots += self.slot_of[layer].values()
            hosts += self.host_of[layer].values()
        live = len(self._slot_bufs) - len(self._retired)
        assert len(set(slots) | set(self._free_slots)) == len(slots) + len(self._free_slots) == live
        assert not (set(slots) | set(self._free_slots)) & self._retired, "a given-back slot is still in use"
        assert set(self._free_hosts).isdisjoint(hosts) and len(hosts) + len(self._free_hosts) == len(self.host_buf)
        assert len(set(hosts)) == len(hosts)
        for (layer, e), slot in self._ghost.items():
            assert slot in self._free_slots and self._ghost_of[slot] == (layer, e), f"stale ghost {layer}.{e}"
            assert e in self.host_of[layer], f"ghost {layer}.{e} is resident"
        for slot, st in self._staged.items():
            assert st.slot == slot and self._ghost.get((st.layer, st.expert)) == slot, f"staged {st} lost its ghost"
        for st in self._spec_queue:
            assert not st.complete and (not st.started or self._staged.get(st.slot) is st), f"stale queued guess {st}"

    @property
    def device_bytes(self) -> int:
        return self.device_buf.numel()

    @property
    def host_bytes(self) -> int:
        return self.host_buf.numel()
