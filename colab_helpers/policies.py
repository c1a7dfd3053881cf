"""Eviction policies for the per-layer expert cache: which resident expert gives up its GPU slot.

A policy sees every demand access (``on_access``) and is asked for a victim among the experts the
cache may evict (``victim``). It keeps its own per-layer state, so the cache stays policy-agnostic
and the same objects drive both the live cache and trace replay.
"""

from __future__ import annotations

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


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy}


def make_policy(name: str, num_layers: int, num_experts: int) -> EvictionPolicy:
    """A fresh policy by name (see ``POLICIES``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose from {sorted(POLICIES)}")
    return POLICIES[name](num_layers, num_experts)
