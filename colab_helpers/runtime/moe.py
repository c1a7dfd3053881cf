"""``OffloadedMoE``: a drop-in for a transformers sparse MoE block (any supported family), experts from the cache.

Routing is the family's own router module (``MixtralTopKRouter``, ``OlmoeTopKRouter``, ``Qwen2MoeTopKRouter``,
``Qwen3MoeTopKRouter``: softmax top-k, renormalized or not by ``norm_topk_prob``; ``PhimoeTopKRouter``:
sparsemixer, at decode by ``sparsemixer.sparsemixer_eval``, equal to its own forward bit for bit), fused below
into one matmul with the next layers' routers. Qwen2-MoE's shared
expert (its projections low-bit) is added, scaled by ``sigmoid(shared_expert_gate(x))``, as transformers does.

One decode step of a layer, in the order the GPU should see it:

1. the router, together with the next layers' routers on the same hidden state (one matmul), and
   *one* host sync reading both this layer's choice and the guesses for the next layers;
2. every demand copy this layer needs (``ExpertCache.demand``), before any expert is computed;
3. the next layers' guesses (speculative prefetch, arXiv 2312.17238 §3.2), gated on the next router's
   probability and capped in bytes per token, issued after this layer's demand copies on their own
   lower-priority stream, so they overlap this layer's compute and never get ahead of a demand load.
   ``mode="auto"`` (the default) loads a guess only into a free slot (nothing resident is evicted for
   it) and in chunks, ``chunks_per_step`` issued per layer step: a demand copy queues behind at most
   those, and guesses not started yet are dropped when a demand load comes (``ExpertCache.stage``);
4. the experts, resident ones first, each a fused low-bit MLP that adds its weighted output in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..weights.quant import QuantizedWeight
from . import kernels
from .experts import ExpertCache
from .sparsemixer import sparsemixer_eval


@dataclass(frozen=True)
class PrefetchConfig:
    """Speculative prefetch: how many guesses per layer, how many layers ahead, and how much to spend."""

    enabled: bool = True
    mode: str = "auto"  # "auto": free slots only, chunked, paced; "evict": a guess may evict (the paper's way)
    experts: int = 2  # guesses per layer (top-n of the next router); Mixtral uses top-2
    lookahead: int = 1  # layers ahead to guess (1 = the paper's next-layer guess)
    min_confidence: float = 0.0  # a guess needs at least this next-router probability (0: every top-n guess)
    max_bytes_per_token: int | None = None  # speculative bytes per decode token over all layers (None: no cap)
    chunks: int = 8  # "auto": a guess's copy in this many chunks (a demand waits for at most one in flight)
    chunks_per_step: int = 1  # "auto": speculative chunks issued per layer step (paces the bus, see docs)

    def __post_init__(self) -> None:
        if self.mode not in PREFETCH_MODES:
            raise ValueError(f"prefetch mode must be one of {PREFETCH_MODES}, got {self.mode!r}")
        if self.chunks < 1 or self.chunks_per_step < 0:
            raise ValueError(f"prefetch chunks must be >= 1 and chunks_per_step >= 0, got {self.chunks}, "
                             f"{self.chunks_per_step}")  # fmt: skip


PREFETCH_MODES = ("auto", "evict")


def expert_forward(x: torch.Tensor, w: dict[str, QuantizedWeight]) -> torch.Tensor:
    """Mixtral's expert: ``w2(silu(w1 x) * w3 x)``."""
    return kernels.quant_linear(F.silu(kernels.quant_linear(x, w["w1"])) * kernels.quant_linear(x, w["w3"]), w["w2"])


def _router_logits(gate: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A router's logits for ``x``; routers that script their choices (benchmarks) expose ``predict``."""
    predict = getattr(gate, "predict", None)
    return predict(x) if predict is not None else F.linear(x, gate.weight, getattr(gate, "bias", None))


# transformers' softmax top-k routers (a weight, softmax in fp32, top-k, renormalized when ``norm_topk_prob``;
# Mixtral's always): ``_route_one`` fuses them with the next layers' routers into one matmul
SOFTMAX_TOPK_ROUTERS = ("MixtralTopKRouter", "OlmoeTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter")


def _plain_router(gate: nn.Module) -> bool:
    """A softmax top-k router of ``SOFTMAX_TOPK_ROUTERS``, which ``_route_one`` can fuse."""
    return type(gate).__name__ in SOFTMAX_TOPK_ROUTERS and not hasattr(gate, "predict")


def _sparsemixer_router(gate: nn.Module) -> bool:
    """Phi-3.5-MoE's top-2 sparsemixer router at inference, which ``sparsemixer_eval`` computes exactly."""
    return (
        type(gate).__name__ == "PhimoeTopKRouter"
        and not hasattr(gate, "predict")
        and not gate.training
        and gate.top_k == 2
        and _stackable(gate)
    )


def _pad_to(index: torch.Tensor, width: int) -> torch.Tensor:
    """``index`` [r, w] padded with -1 (no expert) to ``width`` columns; itself when already that wide."""
    return index if index.shape[-1] == width else F.pad(index, (0, width - index.shape[-1]), value=-1)


def _stackable(gate: nn.Module) -> bool:
    """A router whose logits are ``x @ weight.T`` (any family's, Phi-3.5-MoE's too): its guesses can be fused."""
    return isinstance(getattr(gate, "weight", None), torch.Tensor) and getattr(gate, "bias", None) is None


def _read_back(index: torch.Tensor, k: int, n: int, guessing: bool) -> tuple[list[list[int]], list[list[int]] | None]:
    """The one host sync of a decode layer: row 0 of ``index`` is this layer's choice ([[k]]), the other rows
    the guesses per following layer ([d][<=n], -1 = gated out or padding, dropped; None without prefetch)."""
    rows = index.tolist()
    return [rows[0][:k]], ([[e for e in row[:n] if e >= 0] for row in rows[1:]] if guessing else None)


class OffloadedMoE(nn.Module):
    """Routing plus offloaded experts for one MoE layer; ``gate`` is transformers' own router module.

    ``layer`` is the cache's layer (the rank among MoE layers; ``decoder_layer`` is the model's layer).
    ``shared_expert`` (a module of the family, e.g. ``Qwen2MoeMLP``) runs on every token and is added,
    scaled by ``sigmoid(shared_expert_gate(x))`` when a gate is given.
    """

    def __init__(
        self,
        gate: nn.Module,
        layer: int,
        cache: ExpertCache | None,
        prefetch: PrefetchConfig,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.gate = gate
        self.layer = layer
        self.decoder_layer = layer
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.cache = cache
        self.prefetch = prefetch
        self.next_gates: list[nn.Module] = []  # routers of the following layers (set by ``link``)
        self._following: list[OffloadedMoE] = []
        self._pending_guess: set[int] | None = None
        self._routers: tuple[tuple[int, ...], torch.Tensor] | None = None  # (source pointers, stacked weights)
        self._bars: torch.Tensor | None = None  # per-row confidence bars for the routing readback
        self._prefill_index: torch.Tensor | None = None  # a prefill's [T, k] routing on the device
        # observers(layer, experts [T][k], guesses [lookahead][<=n] as issued, or None): recorders, notebooks
        self.observers: list = []

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        with self.cache.lock:  # one layer's cache step is atomic, whatever thread calls (see ExpertCache.lock)
            return self._step(hidden_states)

    def _step(self, hidden_states: torch.Tensor) -> torch.Tensor:
        bsz, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)  # [T, H]
        if x.shape[0] == 1:
            weights, choice, guesses = self._route_one(x)
        else:  # prefill: no guesses (the next layer's own routing comes at once)
            _, weights, index = self.gate(x)
            choice, guesses = index.tolist(), None  # the one host sync
            self._prefill_index = index  # grouped on the device by ``_run_prefill``
        return self._cache_step(x, weights, choice, guesses).reshape(bsz, seq, hidden)

    def _route_one(self, x: torch.Tensor) -> tuple[torch.Tensor, list[list[int]], list[list[int]] | None]:
        """Decode routing: this layer's weights [1, k] and choice [[k]], plus the next layers' guesses
        [d][<=n] (None without prefetch), read from the device in one host sync."""
        guessing = self.prefetch.enabled and bool(self.next_gates)
        n = self.prefetch.experts if guessing else 0
        fusable = all(_stackable(g) and not hasattr(g, "predict") for g in self.next_gates)
        if _sparsemixer_router(self.gate) and fusable:
            return self._route_sparsemixer(x, guessing, n)
        if _plain_router(self.gate) and fusable:
            k = self.gate.top_k
            rows = 1 + (len(self.next_gates) if guessing else 0)
            logits = F.linear(x, self._router_weight(rows)).view(rows, -1)  # this router and the next d
            probs = F.softmax(logits.float(), dim=-1)
            values, index = probs.topk(max(k, n), dim=-1)
            top = values[:1, :k]
            # transformers' top-k weights: renormalized (Mixtral always; others with ``norm_topk_prob``)
            weights = top / top.sum(dim=-1, keepdim=True) if getattr(self.gate, "norm_topk_prob", True) else top
        else:  # scripted or custom routers (a training-mode sparsemixer too): their own forward, guesses beside it
            _, weights, index = self.gate(x)
            k = index.shape[-1]
            values = torch.ones(index.shape, device=index.device)  # this layer's choice passes any bar
            if guessing:
                logits = torch.cat([_router_logits(g, x) for g in self.next_gates], dim=0)
                g_values, g_index = F.softmax(logits.float(), dim=-1).topk(n, dim=-1)
                width = max(k, n)
                values = torch.cat([F.pad(values, (0, width - k), value=1.0), F.pad(g_values, (0, width - n))])
                index = torch.cat([F.pad(index, (0, width - k), value=-1), F.pad(g_index, (0, width - n), value=-1)])
        if guessing and self.prefetch.min_confidence > 0:
            index = torch.where(values >= self._thresholds(index), index, -1)
        return (weights, *_read_back(index, k, n, guessing))

    def _route_sparsemixer(
        self, x: torch.Tensor, guessing: bool, n: int
    ) -> tuple[torch.Tensor, list[list[int]], list[list[int]] | None]:
        """``_route_one`` for Phi-3.5-MoE: this router's and the next ones' logits in one matmul, sparsemixer on
        the first row (``sparsemixer_eval``: transformers' result in 12 launches, not 21), the guesses the next
        routers' top-n (their softmax only when a confidence bar needs the probabilities)."""
        rows = 1 + (len(self.next_gates) if guessing else 0)
        logits = F.linear(x, self._router_weight(rows)).view(rows, -1)
        weights, index = sparsemixer_eval(logits[:1], self.gate.router_jitter_noise)
        if guessing:
            if self.prefetch.min_confidence > 0:
                g_values, g_index = F.softmax(logits[1:].float(), dim=-1).topk(n, dim=-1)
                g_index = torch.where(g_values >= self.prefetch.min_confidence, g_index, -1)
            else:  # softmax is monotonic: the top-n logits are the top-n probabilities
                g_index = logits[1:].topk(n, dim=-1).indices
            width = max(2, n)
            index = torch.cat([_pad_to(index, width), _pad_to(g_index, width)])
        return (weights, *_read_back(index, 2, n, guessing))

    def _router_weight(self, rows: int) -> torch.Tensor:
        """This router's weight stacked over the next ``rows - 1`` routers' (rebuilt if any was replaced)."""
        sources = [self.gate.weight] + [g.weight for g in self.next_gates[: rows - 1]]
        key = tuple(w.data_ptr() for w in sources)
        if self._routers is None or self._routers[0] != key:
            self._routers = (key, torch.cat(sources, dim=0) if rows > 1 else self.gate.weight)
        return self._routers[1]

    def _thresholds(self, index: torch.Tensor) -> torch.Tensor:
        """Per row of the routing readback: no bar for this layer's choice, ``min_confidence`` for guesses."""
        rows = index.shape[0]
        if self._bars is None or self._bars.shape[0] != rows or self._bars.device != index.device:
            bars = [[-1.0]] + [[self.prefetch.min_confidence]] * (rows - 1)
            self._bars = torch.tensor(bars, device=index.device)
        return self._bars

    # ---- the cache step --------------------------------------------------------------------------

    def _cache_step(
        self, x: torch.Tensor, weights: torch.Tensor, choice: list[list[int]], guesses: list[list[int]] | None
    ) -> torch.Tensor:
        """Everything this layer does with the cache, in one call path (one lock can make it atomic)."""
        cache, layer = self.cache, self.layer
        if guesses is not None and layer == 0:
            cache.begin_token(self.prefetch.max_bytes_per_token)
        used = sorted({e for row in choice for e in row})
        tried = self._plan_guesses(guesses) if guesses is not None else None
        for observe in self.observers:
            observe(layer, choice, tried)
        if self._pending_guess is not None:
            cache.score_prediction(layer, self._pending_guess, set(used))
            self._pending_guess = None
        order = cache.demand(layer, used)  # every demand copy it can issue, before any compute
        if tried is not None:
            self._issue_guesses(tried)  # after the demand copies, overlapping this layer's compute
        if self.prefetch.enabled and self.prefetch.mode == "auto":
            cache.pump(self.prefetch.chunks_per_step)
        shared = self._shared(x)  # queued before the routed experts: it computes while their copies land
        out = self._run_experts(x, weights, choice, order)
        cache.end_step(layer)
        return out if shared is None else out + shared

    def _shared(self, x: torch.Tensor) -> torch.Tensor | None:
        """The shared expert's contribution (Qwen2-MoE), as transformers computes it; None without one."""
        if self.shared_expert is None:
            return None
        y = self.shared_expert(x)
        return y if self.shared_expert_gate is None else F.sigmoid(self.shared_expert_gate(x)) * y

    def _run_experts(
        self, x: torch.Tensor, weights: torch.Tensor, choice: list[list[int]], order: list[int]
    ) -> torch.Tensor:
        cache, layer = self.cache, self.layer
        if x.shape[0] == 1:  # decode: each expert adds its weighted output into ``out`` in place
            coefs = weights[0].to(x.dtype)
            out = None
            for e in order:
                out = kernels.expert_mlp(x, cache.weights(layer, e), coefs[choice[0].index(e)], out)
                cache.release(layer, e)
            return out
        return self._run_prefill(x, weights, choice, order)

    def _run_prefill(
        self, x: torch.Tensor, weights: torch.Tensor, choice: list[list[int]], order: list[int]
    ) -> torch.Tensor:
        """Prefill: tokens grouped by expert on the device (one stable sort of the routing, no index
        upload; the group sizes come from the host copy of the choice the layer already read), each
        expert computing its contiguous slice, one weighted ``index_add_`` back into token order."""
        cache, layer = self.cache, self.layer
        k = len(choice[0])
        index = self._prefill_index  # the router's [T, k] choice, still on the device
        self._prefill_index = None
        counts = [0] * (max(order, default=-1) + 1)
        for row in choice:
            for e in row:
                counts[e] += 1
        starts = [0] * len(counts)
        for e in range(1, len(counts)):
            starts[e] = starts[e - 1] + counts[e - 1]
        position = index.reshape(-1).argsort(stable=True)  # (token, rank) positions, grouped by expert
        tokens = position // k
        xs = x.index_select(0, tokens)
        ys: list[torch.Tensor | None] = [None] * len(counts)
        for e in order:
            ys[e] = expert_forward(xs[starts[e] : starts[e] + counts[e]], cache.weights(layer, e))
            cache.release(layer, e)
        coef = weights.reshape(-1).index_select(0, position).to(x.dtype)
        y = torch.cat([t for t in ys if t is not None]) * coef[:, None]
        return torch.zeros_like(x).index_add_(0, tokens, y)

    def _plan_guesses(self, guesses: list[list[int]]) -> list[list[int]]:
        """The guesses to try per following layer: in order, while the token's byte budget covers the ones
        not resident. Decided before any copy, so a trace of them replays exactly."""
        cache, nbytes = self.cache, self.cache.layout.nbytes
        budget = cache.speculative_bytes_left
        tried: list[list[int]] = []
        for block, guess in zip(self._following, guesses, strict=False):
            row: list[int] = []
            for e in guess:
                if e not in cache.slot_of[block.layer]:
                    if budget < nbytes:
                        break
                    budget -= nbytes
                row.append(e)
            tried.append(row)
        return tried

    def _issue_guesses(self, tried: list[list[int]]) -> None:
        cache, nbytes = self.cache, self.cache.layout.nbytes
        staging, chunks = self.prefetch.mode == "auto", self.prefetch.chunks
        for step, (block, guess) in enumerate(zip(self._following, tried, strict=False)):
            for e in guess:
                started = cache.stage(block.layer, e, chunks) if staging else cache.prefetch(block.layer, e, keep=guess)
                if started:
                    cache.speculative_bytes_left -= nbytes
            if step == 0 and guess:  # an all-gated-out step scores nothing (a trace cannot tell it from none)
                block._pending_guess = set(guess)

    def link(self, following: list[OffloadedMoE]) -> None:
        """Tell this block which blocks come next, for prefetch (their routers and layer ids)."""
        self._following = following
        self.next_gates = [b.gate for b in following]
