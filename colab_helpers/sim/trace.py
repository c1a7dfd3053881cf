"""Routing traces: record them from a running model, replay them through eviction policies.

Replay answers "what hit rate would policy P get with K experts per layer on the GPU" without a GPU or
the model: it drives the *same* policy objects as the live ``ExpertCache`` through the same calls
(``on_access``, ``victim``, ``on_step``), so a recorded run replays to the live cache's exact counters.
``python -m colab_helpers replay TRACE.npz`` is the command-line face; see ``docs/cache_policies.md``.

Trace files use the naming of ``shared/traces/``: ``<name>_decode_experts`` int8 ``[T, L, k]`` with -1
padding, one row per decode step. Recordings add ``<name>_decode_guesses`` ``[T, L, lookahead, n]``
(the prefetch guesses a layer made for the layers after it), ``<name>_prefill_experts`` ``[P, L, k]``
and ``<name>_forward_tokens`` ``[F]`` (tokens per forward call, to put prefill and decode back in order).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from ..runtime.experts import RoutingCounters
from ..runtime.policies import POLICIES, EvictionPolicy, LFUDecayPolicy, make_policy
from .timing import Projection, TimingModel  # noqa: F401 - re-exported for older callers

DECODE_SUFFIX = "_decode_experts"
PolicyFactory = Callable[[int, int], EvictionPolicy]  # (num_layers, num_experts) -> a fresh policy


# --------------------------------------------------------------------------------------------------
# recording
# --------------------------------------------------------------------------------------------------


@dataclass
class _Recorded:
    """One recorded forward call: ``experts[layer]`` is ``[tokens][k]``, ``guesses[layer]`` ``[d][n]`` or None."""

    experts: dict[int, list[list[int]]] = field(default_factory=dict)
    guesses: dict[int, list[list[int]] | None] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return len(next(iter(self.experts.values())))


def _padded(rows: Sequence[Sequence[int]], shape: tuple[int, ...], dtype) -> np.ndarray:
    """Ragged int lists into a -1-padded array."""
    out = np.full(shape, -1, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


class RoutingRecorder:
    """Records, per forward call, the experts every ``OffloadedMoE`` layer chose and its prefetch guesses.

    Attach with ``with RoutingRecorder(model) as rec: model.generate(...)`` (or ``attach``/``detach``).
    Forward calls with one token are decode steps (what the trace files hold); longer ones are prefill.
    Batch size 1 is assumed, as everywhere in this package.
    """

    def __init__(self, model, name: str = "recorded") -> None:
        mlps = [layer.mlp for layer in model.model.layers]
        self.blocks = [b for b in mlps if hasattr(b, "observers") and hasattr(b, "layer")]  # MoE layers only
        if not self.blocks or any(type(b).__name__.endswith("SparseMoeBlock") for b in mlps):
            raise TypeError("RoutingRecorder needs a model loaded with colab_helpers.load_model (OffloadedMoE layers)")
        self.layers = [b.layer for b in self.blocks]
        self.top_k = model.config.num_experts_per_tok
        cache = getattr(self.blocks[0], "cache", None)
        self.num_experts = cache.num_experts if cache is not None else None
        self.sequences: dict[str, list[_Recorded]] = {name: []}
        self._current = name
        self._attached = False

    # ---- hooking ---------------------------------------------------------------------------------

    def attach(self) -> RoutingRecorder:
        if not self._attached:
            for b in self.blocks:
                b.observers.append(self._observe)
            self._attached = True
        return self

    def detach(self) -> None:
        if self._attached:
            for b in self.blocks:
                b.observers.remove(self._observe)
            self._attached = False

    def __enter__(self) -> RoutingRecorder:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def new_sequence(self, name: str) -> None:
        """Start a new named sequence (replay gives each sequence a cold cache)."""
        if name in self.sequences:
            raise ValueError(f"sequence {name!r} already recorded")
        self.sequences[name] = []
        self._current = name

    def _observe(self, layer: int, experts: list[list[int]], guesses: list[list[int]] | None) -> None:
        forwards = self.sequences[self._current]
        if not forwards or layer in forwards[-1].experts:  # a layer seen again: the next forward began
            forwards.append(_Recorded())
        forwards[-1].experts[layer] = [list(row) for row in experts]
        forwards[-1].guesses[layer] = [list(g) for g in guesses] if guesses is not None else None

    # ---- output ----------------------------------------------------------------------------------

    def arrays(self) -> dict[str, np.ndarray]:
        """Every recorded sequence as trace arrays (see the module docstring for names and shapes)."""
        out: dict[str, np.ndarray] = {"top_k": np.array(self.top_k)}
        if self.num_experts is not None:
            out["num_experts"] = np.array(self.num_experts)
        dtype = np.int8 if (self.num_experts or 0) <= 127 else np.int16
        n_layers, k = len(self.layers), self.top_k
        for name, forwards in self.sequences.items():
            if not forwards:
                continue
            decode = [f for f in forwards if f.tokens == 1]
            prefill = [f for f in forwards if f.tokens != 1]
            out[f"{name}_forward_tokens"] = np.array([f.tokens for f in forwards], dtype=np.int32)
            out[f"{name}{DECODE_SUFFIX}"] = self._stack(decode, n_layers, k, dtype)
            out[f"{name}_prefill_experts"] = self._stack(prefill, n_layers, k, dtype)
            guessed = [g for f in decode for g in f.guesses.values() if g]
            if guessed:
                d, n = max(len(g) for g in guessed), max(len(row) for g in guessed for row in g)
                arr = np.full((len(decode), n_layers, d, n), -1, dtype=dtype)
                for t, f in enumerate(decode):
                    for i, layer in enumerate(self.layers):
                        if f.guesses.get(layer):
                            arr[t, i] = _padded(f.guesses[layer], (d, n), dtype)
                out[f"{name}_decode_guesses"] = arr
        return out

    def _stack(self, forwards: list[_Recorded], n_layers: int, k: int, dtype) -> np.ndarray:
        rows = []
        for f in forwards:
            block = np.full((f.tokens, n_layers, k), -1, dtype=dtype)
            for i, layer in enumerate(self.layers):
                if layer in f.experts:
                    block[:, i] = _padded(f.experts[layer], (f.tokens, k), dtype)
            rows.append(block)
        return np.concatenate(rows) if rows else np.zeros((0, n_layers, k), dtype=dtype)

    def save(self, path: str | Path) -> Path:
        """Write ``arrays()`` to a compressed ``.npz``."""
        path = Path(path)
        np.savez_compressed(path, **self.arrays())
        return path


# --------------------------------------------------------------------------------------------------
# replay
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayOptions:
    """How a trace is pushed through a cache.

    Defaults follow ``shared/traces/README.md`` (the reference numbers): a cold cache per sequence and
    layer, experts accessed in rank order (top-1 first), decode steps only, no prefetch. ``live()``
    mirrors ``load_model``'s cache instead: experts 0..K-1 resident at start, resident experts fetched
    first, prefill replayed (not counted), recorded prefetch guesses applied. The replay keeps K fixed: it
    reproduces a cache loaded with ``kv_lending=False`` exactly (the KV cache's lent slots raise K for a while).
    """

    initial: Literal["cold", "warm"] | Sequence[int] | Sequence[Sequence[int]] = "cold"
    order: Literal["rank", "live"] = "rank"
    prefetch: bool = False  # apply recorded guesses (``*_decode_guesses``) like OffloadedMoE does
    with_prefill: bool = False  # replay prefill forwards too (needs ``*_forward_tokens``)
    count_prefill: bool = False  # count prefill hits/misses (the live counters do)
    num_experts: int | None = None  # default: the file's ``num_experts``, else the largest id + 1

    @classmethod
    def live(cls, **overrides) -> ReplayOptions:
        return cls(**{"initial": "warm", "order": "live", "prefetch": True, "with_prefill": True, **overrides})


@dataclass
class ReplayStats(RoutingCounters):
    """Counters shaped like the live ``CacheStats`` (per layer), plus the number of counted steps."""

    tokens: int = 0
    wasted_loads: list[int] = field(default_factory=list)

    COUNTERS: ClassVar[tuple[str, ...]] = (*RoutingCounters.COUNTERS, "wasted_loads")

    def __add__(self, other: ReplayStats) -> ReplayStats:
        if other.num_layers != self.num_layers:
            raise ValueError("cannot add replay stats of different layer counts")
        out = ReplayStats(self.num_layers, tokens=self.tokens + other.tokens)
        for name in self.COUNTERS:
            setattr(out, name, [a + b for a, b in zip(getattr(self, name), getattr(other, name), strict=True)])
        return out

    def per_token(self) -> tuple[float, float]:
        """(demand misses, prefetch loads) per counted step: the inputs of ``TimingModel.project``."""
        t = max(self.tokens, 1)
        return sum(self.misses) / t, sum(self.prefetch_loads) / t


@dataclass
class _LayerStep:
    used: list[int]  # distinct experts, in rank order (token-major for prefill)
    counted: bool
    incoming: list[list[int]]  # prefetch guesses aimed at this layer during this step, in issue order
    pending: list[int] | None  # the previous layer's next-layer guess, scored against ``used``


class BeladyPolicy(EvictionPolicy):
    """Belady's offline optimum: evict the expert whose next use is farthest away (needs the future).

    The current step's experts are never evicted while another candidate exists, the convention of
    the reference numbers (a step's experts share the GPU). Built by ``replay``; not in ``POLICIES``.
    """

    name = "belady"

    def __init__(self, num_layers: int, num_experts: int, future: Sequence[Sequence[Sequence[int]]]) -> None:
        super().__init__(num_layers, num_experts)
        self._steps = [[set(s) for s in steps] for steps in future]
        self._cursor = [0] * num_layers
        self._next_use: list[list[list[float]]] = []  # [layer][t][e]: first step after t using e
        for steps in future:
            nxt, table = [math.inf] * num_experts, [[]] * len(steps)
            for t in range(len(steps) - 1, -1, -1):
                table[t] = list(nxt)
                for e in steps[t]:
                    nxt[e] = t
            self._next_use.append(table)

    def on_access(self, layer: int, expert: int) -> None:
        pass

    def on_step(self, layer: int) -> None:
        self._cursor[layer] += 1

    def victim(self, layer: int, candidates: Sequence[int]) -> int:
        t = self._cursor[layer]
        if t >= len(self._steps[layer]):
            return min(candidates)
        now, nxt = self._steps[layer][t], self._next_use[layer][t]
        pool = [e for e in candidates if e not in now] or candidates
        return max(pool, key=lambda e: (nxt[e], -e))


class _LayerCache:
    """One layer of ``ExpertCache`` without bytes: the same fetch/prefetch/victim logic and call order."""

    def __init__(self, policy: EvictionPolicy, layer: int, capacity: int, resident: Sequence[int]) -> None:
        self.policy, self.layer, self.capacity = policy, layer, capacity
        self.resident = set(resident)
        self.prefetched: set[int] = set()

    def _evict_for(self, expert: int, keep: Sequence[int]) -> bool:
        if len(self.resident) < self.capacity:  # a cold cache fills free slots first
            return True
        keep = set(keep) | {expert}
        candidates = sorted(e for e in self.resident if e not in keep)
        if not candidates:
            return False
        victim = self.policy.victim(self.layer, candidates)
        if victim not in candidates:
            raise RuntimeError(f"{type(self.policy).__name__} chose {victim}, not one of {candidates}")
        self.resident.remove(victim)
        return True

    def fetch(self, expert: int, keep: Sequence[int]) -> bool:
        self.policy.on_access(self.layer, expert)
        if expert in self.resident:
            return True
        if not self._evict_for(expert, keep):
            raise RuntimeError(f"layer {self.layer}: no evictable expert to make room for {expert}")
        self.resident.add(expert)
        return False

    def prefetch(self, expert: int, keep: Sequence[int]) -> bool:
        if expert in self.resident or not self._evict_for(expert, keep):
            return False
        self.resident.add(expert)
        self.prefetched.add(expert)
        return True


def _valid(row) -> list[int]:
    """Distinct non-negative ids in order."""
    out: list[int] = []
    for e in row:
        e = int(e)
        if e >= 0 and e not in out:
            out.append(e)
    return out


@dataclass(frozen=True)
class ForwardCall:
    """One step of a replay: a forward call's routing, its prefetch guesses, and whether it counts."""

    experts: np.ndarray  # [tokens, L, k], -1 = nothing recorded
    guesses: np.ndarray | None = None  # [L, d, n]: guesses layer l made for layers l+1..l+d
    counted: bool = True


def _layer_steps(forwards: Sequence[ForwardCall], layer: int, use_guesses: bool) -> list[_LayerStep]:
    steps = []
    for f in forwards:
        used = _valid(f.experts[:, layer].reshape(-1))
        if not used:  # nothing recorded for this layer at this step (the real trace's dropped tokens)
            continue
        incoming, pending = [], None
        if use_guesses and f.guesses is not None:
            for src in range(max(0, layer - f.guesses.shape[1]), layer):
                g = _valid(f.guesses[src, layer - src - 1])
                if g:
                    incoming.append(g)
                    if src == layer - 1:
                        pending = g
        steps.append(_LayerStep(used, f.counted, incoming, pending))
    return steps


def _initial(initial, layer: int, capacity: int) -> list[int]:
    if isinstance(initial, str):
        if initial not in ("cold", "warm"):
            raise ValueError(f"initial must be 'cold', 'warm' or expert ids, got {initial!r}")
        return [] if initial == "cold" else list(range(capacity))
    items = list(initial)
    per_layer = items[layer] if items and not isinstance(items[0], (int, np.integer)) else items
    if len(per_layer) > capacity:
        raise ValueError(f"layer {layer}: {len(per_layer)} initial experts exceed capacity {capacity}")
    return [int(e) for e in per_layer]


def _resolve_policy(policy: str | PolicyFactory) -> PolicyFactory | None:
    """A factory for named or callable policies; None for "belady" (built from the future)."""
    if callable(policy):
        return policy
    if policy == "belady":
        return None
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {sorted(POLICIES) + ['belady']}")
    return functools.partial(make_policy, policy)


def replay_forwards(
    forwards: Sequence[ForwardCall],
    policy: str | PolicyFactory,
    experts_on_device: int | Sequence[int],
    num_experts: int,
    options: ReplayOptions | None = None,
) -> ReplayStats:
    """Replay one sequence of forward calls through a fresh per-layer cache; see ``replay``."""
    options = options or ReplayOptions()
    if not forwards:
        raise ValueError("nothing to replay")
    n_layers = forwards[0].experts.shape[1]
    caps = [experts_on_device] * n_layers if isinstance(experts_on_device, int) else list(experts_on_device)
    if len(caps) != n_layers or any(c < 1 for c in caps):
        raise ValueError(f"experts_on_device must be >= 1 for each of {n_layers} layers, got {experts_on_device}")
    per_layer = [_layer_steps(forwards, layer, options.prefetch) for layer in range(n_layers)]
    factory = _resolve_policy(policy)
    pol = (
        BeladyPolicy(n_layers, num_experts, [[s.used for s in steps] for steps in per_layer])
        if factory is None
        else factory(n_layers, num_experts)
    )
    stats = ReplayStats(n_layers, tokens=sum(f.counted for f in forwards))
    for layer, steps in enumerate(per_layer):
        cache = _LayerCache(pol, layer, caps[layer], _initial(options.initial, layer, caps[layer]))
        for st in steps:
            count = st.counted
            for guess in st.incoming:
                for e in guess:
                    if cache.prefetch(e, keep=guess) and count:
                        stats.prefetch_loads[layer] += 1
            if st.pending is not None:
                if count:
                    stats.predicted[layer] += len(st.pending)
                    stats.needed[layer] += len(st.used)
                    stats.correct[layer] += len(set(st.pending) & set(st.used))
                    stats.wasted_loads[layer] += len(cache.prefetched - set(st.used))
                cache.prefetched.clear()
            if options.order == "live":
                used = sorted(st.used)
                order = [e for e in used if e in cache.resident] + [e for e in used if e not in cache.resident]
            else:
                order = st.used
            for i, e in enumerate(order):
                hit = cache.fetch(e, keep=order[i + 1 :])
                if count:
                    (stats.hits if hit else stats.misses)[layer] += 1
            pol.on_step(layer)
    return stats


def replay(
    experts,
    policy: str | PolicyFactory = "lru",
    experts_on_device: int | Sequence[int] = 4,
    guesses=None,
    options: ReplayOptions | None = None,
) -> ReplayStats:
    """Hit statistics of ``policy`` on one sequence of decode steps ``experts [T, L, k]`` (-1 = skip).

    ``policy`` is a name in ``POLICIES``, "belady", or a factory ``(num_layers, num_experts) -> policy``.
    Every top-k selection counts as one access; each replay starts from ``options.initial``.
    ``guesses [T, L, d, n]`` are applied as prefetches when ``options.prefetch``.
    """
    options = options or ReplayOptions()
    experts = np.asarray(experts)
    if experts.ndim != 3:
        raise ValueError(f"experts must be [T, L, k], got shape {experts.shape}")
    g = None if guesses is None else np.asarray(guesses)
    forwards = [ForwardCall(experts[t : t + 1], None if g is None else g[t], True) for t in range(len(experts))]
    return replay_forwards(forwards, policy, experts_on_device, _num_experts(options, experts, {}), options)


def _num_experts(options: ReplayOptions, experts: np.ndarray, arrays: Mapping) -> int:
    if options.num_experts is not None:
        return options.num_experts
    if "num_experts" in arrays:
        return int(arrays["num_experts"])
    return int(max(experts.max(initial=-1) + 1, 1))


def sequence_names(arrays: Mapping) -> list[str]:
    """Names of the sequences in a trace (keys ``<name>_decode_experts``), sorted."""
    return sorted(k[: -len(DECODE_SUFFIX)] for k in arrays if k.endswith(DECODE_SUFFIX))


def _sequence_forwards(arrays: Mapping, name: str, options: ReplayOptions) -> list[ForwardCall]:
    decode = np.asarray(arrays[f"{name}{DECODE_SUFFIX}"])
    guesses = arrays.get(f"{name}_decode_guesses") if options.prefetch else None
    dec = [ForwardCall(decode[t : t + 1], None if guesses is None else guesses[t], True) for t in range(len(decode))]
    if not options.with_prefill or f"{name}_forward_tokens" not in arrays:
        return dec
    prefill = np.asarray(arrays[f"{name}_prefill_experts"])
    out, d, p = [], 0, 0
    for n in np.asarray(arrays[f"{name}_forward_tokens"]).tolist():
        if n == 1:
            out.append(dec[d])
            d += 1
        else:
            out.append(ForwardCall(prefill[p : p + n], None, options.count_prefill))
            p += n
    return out


def replay_file(
    source: str | Path | Mapping,
    policy: str | PolicyFactory = "lru",
    experts_on_device: int | Sequence[int] = 4,
    options: ReplayOptions | None = None,
) -> ReplayStats:
    """``replay`` summed over every sequence of a trace (a path to an ``.npz`` or its loaded mapping)."""
    options = options or ReplayOptions()
    arrays = np.load(source) if isinstance(source, (str, Path)) else source
    names = sequence_names(arrays)
    if not names:
        raise ValueError(f"no '*{DECODE_SUFFIX}' arrays in the trace")
    total = None
    for name in names:
        forwards = _sequence_forwards(arrays, name, options)
        ne = _num_experts(options, np.asarray(arrays[f"{name}{DECODE_SUFFIX}"]), arrays)
        s = replay_forwards(forwards, policy, experts_on_device, ne, options)
        total = s if total is None else total + s
    return total


# --------------------------------------------------------------------------------------------------
# command line: python -m colab_helpers replay TRACE.npz
# --------------------------------------------------------------------------------------------------


def parse_ks(text: str) -> list[int]:
    """Parse K lists: 4 -> [4], 2-6 -> [2, 3, 4, 5, 6], 3,5 -> [3, 5]."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give experts per layer (at least 1) as 4, 2-6 or 3,5")
    return out


def policy_table(half_lives: Sequence[float] = (), belady: bool = True) -> dict[str, str | PolicyFactory]:
    """Display name -> policy for the CLI: every registered policy, optional half-life variants, Belady."""
    table: dict[str, str | PolicyFactory] = {name: name for name in POLICIES}
    for h in half_lives:
        table[f"lfu_decay[h={h:g}]"] = functools.partial(LFUDecayPolicy, half_life_tokens=h)
    if belady:
        table["belady"] = "belady"
    return table


def _parser() -> argparse.ArgumentParser:
    from ..usage import ArgumentParser

    p = ArgumentParser(
        prog="python -m colab_helpers replay",
        description="Replay a routing trace through the expert-cache eviction policies.",
    )
    p.add_argument("trace", type=Path, help=".npz with <name>_decode_experts arrays [T, L, k]")
    p.add_argument(
        "--experts-on-device",
        type=parse_ks,
        default=[2, 3, 4, 5, 6],
        metavar="K",
        help="experts per layer on the device: 4, 2-6 or 3,5 (default 2-6)",
    )
    p.add_argument(
        "--sequences",
        default=None,
        help="comma-separated sequence names of the trace to replay (default: all)",
    )
    p.add_argument(
        "--policies",
        default=None,
        help="comma-separated subset (default: all registered + belady); --half-lives rows stay",
    )
    p.add_argument(
        "--half-lives",
        type=_half_lives,
        default=[],
        help="extra lfu_decay rows with these half-lives in tokens, e.g. 2,8,32,128,inf "
        "(sensitivity sweep; default none)",
    )
    p.add_argument(
        "--initial",
        choices=("cold", "warm"),
        default="cold",
        help="cold: empty cache per sequence (reference); warm: experts 0..K-1 resident (load_model); default cold",
    )
    p.add_argument(
        "--order",
        choices=("rank", "live"),
        default="rank",
        help="access order within a step: rank (top-1 first, reference) or live (resident first); default rank",
    )
    p.add_argument("--prefetch", action="store_true", help="apply recorded prefetch guesses (*_decode_guesses)")
    p.add_argument(
        "--model",
        default=None,
        help="the traced model's folder, config.json or repo id (as for plan --model): its expert count and "
        "top-k (checked against the trace) and its 2-bit sizes for the T4 projection (default: Mixtral-8x7B)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object {policy: hit_rate} ({K: {policy: hit_rate}} for several K)",
    )
    return p


def _half_lives(text: str) -> list[float]:
    try:
        values = [float(h) for h in text.split(",") if h.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers of tokens, e.g. 2,8,32,inf") from None
    if any(not h > 0 for h in values):
        raise argparse.ArgumentTypeError(f"{text!r}: half-lives must be above 0")
    return values


def load_trace_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a routing-trace ``.npz``; ``UsageError`` naming the problem when it is not one."""
    import zipfile

    from ..usage import UsageError

    if not path.is_file():
        raise UsageError(f"{path}: no such file (give a routing trace .npz, e.g. one saved by RoutingRecorder)")
    try:
        loaded = np.load(path, allow_pickle=False)
        arrays = None
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                arrays = dict(loaded)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UsageError(f"{path}: not a .npz routing trace ({type(err).__name__}: numpy could not read it)") from None
    if arrays is None:
        raise UsageError(f"{path}: a single .npy array, not a .npz routing trace with '<name>{DECODE_SUFFIX}' arrays")
    if not sequence_names(arrays):
        raise UsageError(f"{path}: no '<name>{DECODE_SUFFIX}' arrays in it, so it is not a routing trace")
    return arrays


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``python -m colab_helpers replay``; bad arguments raise ``usage.UsageError`` (one line via ``cli.main``)."""
    from ..usage import UsageError, check_experts_on_device

    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    table = policy_table(args.half_lives)
    if args.policies:
        wanted = [p.strip() for p in args.policies.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in table]
        if unknown:
            raise UsageError(f"--policies: unknown {', '.join(unknown)}; choose from {', '.join(sorted(table))}")
        table = {k: v for k, v in table.items() if k in wanted or k.startswith("lfu_decay[")}
    arrays = load_trace_arrays(args.trace)
    if args.sequences:
        wanted, known = [n.strip() for n in args.sequences.split(",") if n.strip()], sequence_names(arrays)
        unknown = [n for n in wanted if n not in known]
        if unknown or not wanted:
            raise UsageError(f"--sequences: no {', '.join(unknown) or 'name'} in the trace; it has {', '.join(known)}")
        arrays = {
            k: v for k, v in arrays.items() if not k.endswith(DECODE_SUFFIX) or k[: -len(DECODE_SUFFIX)] in wanted
        }
    options = ReplayOptions(initial=args.initial, order=args.order, prefetch=args.prefetch)
    first = np.asarray(arrays[f"{sequence_names(arrays)[0]}{DECODE_SUFFIX}"])
    timing, args.timing_label = TimingModel(), None
    if args.model:
        options, timing, args.timing_label = _model_options(args.model, options, first, args.trace.name)
    check_experts_on_device(max(args.experts_on_device), _num_experts(options, first, arrays), f"{args.trace.name}")
    results = {
        k: {name: replay_file(arrays, pol, k, options) for name, pol in table.items()} for k in args.experts_on_device
    }
    if args.json:
        rates = {str(k): {name: s.hit_rate for name, s in r.items()} for k, r in results.items()}
        print(json.dumps(rates[str(args.experts_on_device[0])] if len(rates) == 1 else rates))
        return 0
    print(_report(args, arrays, results, timing))
    return 0


def _model_options(
    model: str, options: ReplayOptions, first: np.ndarray, trace_name: str
) -> tuple[ReplayOptions, TimingModel, str]:
    """Expert count from the model's config, its shape checked against the trace, a timing model of its sizes."""
    from ..planning.planner import model_for_cli
    from ..usage import UsageError
    from ..weights.model_spec import ModelSpec

    config, quant, _ = model_for_cli(model, 2)
    s = ModelSpec.of(config, quant)  # the settings model_for_cli gives are fitted to the shapes already
    family, moe_layers = s.arch.name, len(s.moe_layers)
    layers, top_k = first.shape[1], first.shape[2]
    if (layers, top_k) != (moe_layers, s.top_k):
        raise UsageError(
            f"--model {model}: {family} routes top-{s.top_k} in {moe_layers} MoE layers, but {trace_name} "
            f"holds top-{top_k} in {layers} layers: a trace of another model"
        )
    if int(first.max(initial=0)) >= s.num_experts:
        most = int(first.max())
        raise UsageError(f"--model {model}: {trace_name} names expert {most}; {family} has {s.num_experts}")
    timing = TimingModel(
        expert_bytes=s.expert_bytes, trunk_bytes=s.trunk_bytes, num_layers=moe_layers, experts_per_token=s.top_k
    )
    return replace(options, num_experts=s.num_experts), timing, f"{family} {s.quant.experts.nbits}-bit"


def _model_label(args: argparse.Namespace) -> str:
    """ " of Qwen3-MoE 2-bit" when ``--model`` set the timing model's sizes (empty: Mixtral-8x7B's defaults)."""
    label = getattr(args, "timing_label", None)
    return f" of {label}" if label else ""


def _report(
    args: argparse.Namespace,
    arrays: Mapping,
    results: dict[int, dict[str, ReplayStats]],
    timing: TimingModel | None = None,
) -> str:
    names = sequence_names(arrays)
    shape = np.asarray(arrays[f"{names[0]}{DECODE_SUFFIX}"]).shape
    first = next(iter(results.values()))
    tokens = next(iter(first.values())).tokens
    ks = list(results)
    timing = timing or TimingModel()
    width = max(len(n) for n in first) + 2
    lines = [
        f"{args.trace.name}: {len(names)} sequences, {tokens} decode steps, {shape[1]} layers, top-{shape[2]}; "
        f"{args.initial} cache per sequence and layer, {args.order} order{', prefetch' if args.prefetch else ''}",
        "",
        "hit rate".ljust(width) + "".join(f"K={k:<7d}" for k in ks),
    ]
    for name in first:
        lines.append(name.ljust(width) + "".join(f"{results[k][name].hit_rate:<9.3f}" for k in ks))
    lines += [
        "",
        f"idealized T4 bound, tok/s, overlapped / {'pipelined' if args.prefetch else 'serialized'} "
        f"(timing.TimingModel{_model_label(args)}: no host cost; `python -m colab_helpers twin` gives the calibrated "
        "projection)",
        "".ljust(width) + "".join(f"K={k:<11d}" for k in ks),
    ]
    for name in first:
        cells = []
        for k in ks:
            s = results[k][name]
            proj = timing.project_hit_rate(s.hit_rate, sum(s.prefetch_loads) / max(s.accesses, 1))
            low = proj.pipelined if args.prefetch else proj.serialized
            cells.append(f"{proj.overlapped:5.2f} /{low:5.2f} ")
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)
