"""The idealized T4 bound: PCIe and HBM at full rate, every copy hidden or fully exposed, no host cost.

It is a ceiling, not a forecast: ``colab_helpers.sim.twin`` simulates the engine's real schedule (host
launches, syncs, stream ordering) and is calibrated on the paper's measurements; quote the twin.
``trace``'s replay report still prints this bound next to hit rates, labelled as such.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Projection:
    """Seconds per token and tokens/s under three assumptions about transfer/compute overlap."""

    compute_s: float
    transfer_s: float  # all loads (demand misses + prefetches) and their write-backs
    demand_s: float  # the part caused by demand misses (a stall unless something hid it)

    @property
    def overlapped(self) -> float:
        """Copies and compute fully overlapped: 1 / max(transfer, compute). When copies dominate (every cache
        size a T4 holds) this is compute hidden behind copies, the PCIe bound: no prefetch beats it, only
        fewer loads do."""
        return 1.0 / max(self.transfer_s, self.compute_s)

    @property
    def serialized(self) -> float:
        """Nothing overlaps: the floor (the paper's public code without pre-loading is close to this)."""
        return 1.0 / (self.transfer_s + self.compute_s)

    @property
    def pipelined(self) -> float:
        """Prefetch loads overlap compute, demand misses stall: the estimate for a run with prefetch."""
        return 1.0 / (max(self.transfer_s - self.demand_s, self.compute_s) + self.demand_s)


@dataclass(frozen=True)
class TimingModel:
    """Decode time per token on a free Colab T4, Mixtral-8x7B, 2-bit experts (docs/benchmarks.md, reference facts).

    Compute reads the trunk and every used expert once from GPU memory; a load copies one expert
    host->device and (exclusive layout) writes the victim back device->host on its own stream.
    """

    h2d_bytes_per_s: float = 12.3e9  # pinned, PCIe 3.0 x16, measured
    d2h_bytes_per_s: float = 13.1e9
    expert_bytes: int = 66_404_364  # one 2-bit HQQ expert (w1, w2, w3 with scales and zeros)
    mem_bytes_per_s: float = 240e9  # T4: 320 GB/s peak, ~240 achievable
    trunk_bytes: int = 1_240_000_000  # 4-bit attention, embeddings, lm_head, norms, routers
    num_layers: int = 32
    experts_per_token: int = 2
    duplex: bool = True  # write-backs overlap loads (separate streams); False: the paper's one stream

    @property
    def compute_s(self) -> float:
        used = self.num_layers * self.experts_per_token * self.expert_bytes
        return (used + self.trunk_bytes) / self.mem_bytes_per_s

    def transfer_s(self, loads: float) -> float:
        """Seconds to load ``loads`` experts and write back as many victims."""
        h2d = loads * self.expert_bytes / self.h2d_bytes_per_s
        d2h = loads * self.expert_bytes / self.d2h_bytes_per_s
        return max(h2d, d2h) if self.duplex else h2d + d2h

    def project(self, demand_loads: float, prefetch_loads: float = 0.0) -> Projection:
        """Per-token demand misses and prefetch loads -> ``Projection``."""
        return Projection(self.compute_s, self.transfer_s(demand_loads + prefetch_loads), self.transfer_s(demand_loads))

    def project_hit_rate(self, hit_rate: float, prefetch_per_selection: float = 0.0) -> Projection:
        """Rates per expert selection (a trace's, whatever its shape) applied to this model's selections per token."""
        selections = self.num_layers * self.experts_per_token
        return self.project((1.0 - hit_rate) * selections, prefetch_per_selection * selections)
