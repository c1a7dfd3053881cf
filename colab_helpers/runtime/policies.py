"""Eviction policies for the per-layer expert cache: which resident expert gives up its GPU slot.

A policy sees every demand access (``on_access``) and is asked for a victim among the experts the
cache may evict (``victim``). It keeps its own per-layer state, so the cache stays policy-agnostic
and the same objects drive both the live cache and trace replay (``colab_helpers.sim.trace``).

Policies run on the per-token path (32 layers x top-2 per token), so they use plain Python lists.
See ``docs/cache_policies.md`` for measurements and for why the hyper-parameters are what they are.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence


class EvictionPolicy(ABC):
    """Interface every policy implements; one instance serves all layers of one model."""

    name: str = "base"

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts

    @abstractmethod
    def on_access(self, layer: int, expert: int) -> None:
        """The model used ``expert`` at ``layer`` (a hit or a miss)."""

    def on_step(self, layer: int) -> None:  # noqa: B027 - optional hook
        """One routing step (token or batch) at ``layer`` finished; for policies that age with time."""

    @abstractmethod
    def victim(self, layer: int, candidates: Sequence[int]) -> int:
        """Pick one of ``candidates`` (resident, not needed now) to evict."""


class LRUPolicy(EvictionPolicy):
    """Least recently used (the paper's baseline); ties broken by the lower expert index."""

    name = "lru"

    def __init__(self, num_layers: int, num_experts: int) -> None:
        super().__init__(num_layers, num_experts)
        self._clock = 0
        self._last_used = [[-1] * num_experts for _ in range(num_layers)]

    def on_access(self, layer: int, expert: int) -> None:
        self._clock += 1
        self._last_used[layer][expert] = self._clock

    def victim(self, layer: int, candidates: Sequence[int]) -> int:
        last = self._last_used[layer]
        return min(candidates, key=lambda e: (last[e], e))


def decay_for_half_life(half_life_tokens: float) -> float:
    """Per-step multiplier that halves a score after ``half_life_tokens`` steps (``inf`` -> 1, no decay)."""
    if not half_life_tokens > 0:
        raise ValueError(f"half_life_tokens must be positive, got {half_life_tokens}")
    return 1.0 if math.isinf(half_life_tokens) else 0.5 ** (1.0 / half_life_tokens)


# How many uses of an average expert one half-life should span. Two experts' counts n and 2n (one used
# twice as often) differ by z = n / sqrt(3n) = sqrt(n / 3) standard deviations (Poisson), so n = 8 is the
# smallest count at which the busier expert ranks first with ~95% confidence. An average expert is
# used top_k / num_experts of the steps, hence a half-life of 8 * E / k steps: 32 tokens for
# Mixtral-8x7B (E = 8, k = 2). Not fitted to any trace; docs/cache_policies.md shows the sweep.
USES_PER_HALF_LIFE = 8


def principled_half_life(num_experts: int, top_k: int = 2) -> float:
    """Half-life in tokens (steps) over which an average expert is used ``USES_PER_HALF_LIFE`` times."""
    return USES_PER_HALF_LIFE * num_experts / top_k


class LFUDecayPolicy(EvictionPolicy):
    """Frequency with exponential decay (LRFU family): evict the expert used least, recent uses weighing more.

    Each access adds 1 to the expert's score; every step multiplies the layer's scores by
    ``0.5 ** (1 / half_life_tokens)`` (default ``principled_half_life``: 32 tokens for Mixtral). Ties
    go to LRU, then the lower index. Experts used in the current step are evicted only when nothing
    else may go: one just used is the likeliest to be used again, and the live cache (which protects
    only the experts still to be fetched) then makes the choices of the reference replay (which
    protects the whole step).
    """

    name = "lfu_decay"
    default_half_life_tokens: float | None = None  # None: ``principled_half_life(num_experts, top_k)``

    def __init__(
        self, num_layers: int, num_experts: int, half_life_tokens: float | None = None, top_k: int = 2
    ) -> None:
        super().__init__(num_layers, num_experts)
        if half_life_tokens is None:
            half_life_tokens = self.default_half_life_tokens or principled_half_life(num_experts, top_k)
        self.half_life_tokens = half_life_tokens
        self.decay = decay_for_half_life(self.half_life_tokens)
        self._clock = 0
        self._score = [[0.0] * num_experts for _ in range(num_layers)]
        self._last_used = [[-1] * num_experts for _ in range(num_layers)]
        self._this_step: list[set[int]] = [set() for _ in range(num_layers)]

    def on_access(self, layer: int, expert: int) -> None:
        self._clock += 1
        self._last_used[layer][expert] = self._clock
        self._score[layer][expert] += 1.0
        self._this_step[layer].add(expert)

    def on_step(self, layer: int) -> None:
        self._this_step[layer].clear()
        if self.decay != 1.0:
            d, s = self.decay, self._score[layer]
            for e in range(len(s)):
                s[e] *= d

    def victim(self, layer: int, candidates: Sequence[int]) -> int:
        step = self._this_step[layer]
        pool = [e for e in candidates if e not in step] or candidates
        score, last = self._score[layer], self._last_used[layer]
        return min(pool, key=lambda e: (score[e], last[e], e))


class LFUPolicy(LFUDecayPolicy):
    """Plain frequency since the cache started (the no-decay limit of ``lfu_decay``), LRU tie-break."""

    name = "lfu"
    default_half_life_tokens = math.inf


class TransitionPolicy(LFUDecayPolicy):
    """``lfu_decay`` plus what usually follows: evict the expert least likely to be used at the layer's next step.

    Per layer it counts, with decay, which experts were used one step after each expert (a first-order Markov
    table of the layer's own routing). A candidate's score is its ``lfu_decay`` share of the layer's recent
    uses plus ``weight`` times the probability that the experts of the current step (the last one while none
    yet) are followed by it; LRU, then the lower index, break ties. Chosen on the HumanEval sequences of the
    trace only (``weight`` 1, ``transition_half_life_tokens`` 32, swept over 0.5-2 and 32-128 with < 0.002
    hit-rate spread); docs/cache_policies.md reports GSM8K separately.
    """

    name = "transition"

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        half_life_tokens: float | None = None,
        top_k: int = 2,
        weight: float = 1.0,
        transition_half_life_tokens: float = 32.0,
    ) -> None:
        super().__init__(num_layers, num_experts, half_life_tokens, top_k)
        self.weight = weight
        self.transition_decay = decay_for_half_life(transition_half_life_tokens)
        self._follows = [[[0.0] * num_experts for _ in range(num_experts)] for _ in range(num_layers)]
        self._previous: list[set[int]] = [set() for _ in range(num_layers)]
        self._current: list[set[int]] = [set() for _ in range(num_layers)]

    def on_access(self, layer: int, expert: int) -> None:
        super().on_access(layer, expert)
        self._current[layer].add(expert)

    def on_step(self, layer: int) -> None:
        super().on_step(layer)
        d = self.transition_decay
        for a in self._previous[layer]:
            row = self._follows[layer][a]
            for e in range(len(row)):
                row[e] *= d
            for e in self._current[layer]:
                row[e] += 1.0
        self._previous[layer], self._current[layer] = self._current[layer], set()

    def follow_probability(self, layer: int, expert: int) -> float:
        """How likely ``expert`` is used at the layer's next step, given the current (else the last) step."""
        rows = [self._follows[layer][a] for a in (self._current[layer] or self._previous[layer])]
        total = sum(sum(row) for row in rows)
        return sum(row[expert] for row in rows) / total if total else 0.0

    def victim(self, layer: int, candidates: Sequence[int]) -> int:
        step = self._this_step[layer]
        pool = [e for e in candidates if e not in step] or candidates
        score, last = self._score[layer], self._last_used[layer]
        total = sum(score) or 1.0
        return min(pool, key=lambda e: (score[e] / total + self.weight * self.follow_probability(layer, e), last[e], e))


POLICIES: dict[str, type[EvictionPolicy]] = {
    p.name: p for p in (LRUPolicy, LFUDecayPolicy, LFUPolicy, TransitionPolicy)
}


def make_policy(name: str, num_layers: int, num_experts: int, **params: float) -> EvictionPolicy:
    """A fresh policy by name (see ``POLICIES``); ``params`` go to its constructor (e.g. ``half_life_tokens``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose from {sorted(POLICIES)}")
    return POLICIES[name](num_layers, num_experts, **params)
