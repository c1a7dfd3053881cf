"""``OffloadedMoE``: a drop-in for transformers' ``MixtralSparseMoeBlock`` that reads experts from the cache.

Per call: the router picks top-k experts per token (the one host sync: reading that choice), the
layer runs resident experts first and misses after (so compute starts while copies land), then it
applies the *next* layer's router to the same hidden state and starts copying the experts it
predicts (speculative prefetch, arXiv 2312.17238 §3.2), never evicting one this layer still needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .experts import ExpertCache
from .kernels import quant_linear
from .quant import QuantizedWeight


@dataclass(frozen=True)
class PrefetchConfig:
    """Speculative prefetch: how many guessed experts per layer, and how many layers ahead."""

    enabled: bool = True
    experts: int = 2  # guesses per layer (top-n of the next router); Mixtral uses top-2
    lookahead: int = 1  # layers ahead to guess (1 = the paper's next-layer guess)


def expert_forward(x: torch.Tensor, w: dict[str, QuantizedWeight]) -> torch.Tensor:
    """Mixtral's expert: ``w2(silu(w1 x) * w3 x)``."""
    return quant_linear(F.silu(quant_linear(x, w["w1"])) * quant_linear(x, w["w3"]), w["w2"])


def _router_logits(gate: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A router's logits for ``x``; routers that script their choices (benchmarks) expose ``predict``."""
    predict = getattr(gate, "predict", None)
    return predict(x) if predict is not None else F.linear(x, gate.weight)


class OffloadedMoE(nn.Module):
    """Routing plus offloaded experts for one layer; ``gate`` is transformers' own router module."""

    def __init__(self, gate: nn.Module, layer: int, cache: ExpertCache | None, prefetch: PrefetchConfig) -> None:
        super().__init__()
        self.gate = gate
        self.layer = layer
        self.cache = cache
        self.prefetch = prefetch
        self.next_gates: list[nn.Module] = []  # routers of the following layers (set by ``link``)
        self._following: list[OffloadedMoE] = []
        self._pending_guess: set[int] | None = None
        # observers(layer, experts [T][k], guesses [lookahead][n] or None): routing recorders, notebooks
        self.observers: list = []

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        with self.cache.lock:  # one layer's cache step is atomic, whatever thread calls (see ExpertCache.lock)
            return self._step(hidden_states)

    def _step(self, hidden_states: torch.Tensor) -> torch.Tensor:
        bsz, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)  # [T, H]
        _, weights, index = self.gate(x)  # [T, k], [T, k]
        guess_index = self._guess(x) if seq * bsz == 1 else None  # [d, n] or None
        index_list = index.tolist()  # the one host sync per layer
        guesses = guess_index.tolist() if guess_index is not None else None
        used = sorted({e for row in index_list for e in row})
        for observe in self.observers:
            observe(self.layer, index_list, guesses)
        if self._pending_guess is not None:
            self.cache.score_prediction(self.layer, self._pending_guess, set(used))
            self._pending_guess = None
        out = self._run_experts(x, weights, index, used)
        if guesses is not None:
            self._start_prefetch(guesses)
        self.cache.end_step(self.layer)
        return out.reshape(bsz, seq, hidden)

    def _run_experts(
        self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, used: list[int]
    ) -> torch.Tensor:
        cache, layer = self.cache, self.layer
        order = cache.order(layer, used)
        out = torch.zeros_like(x)
        single = x.shape[0] == 1
        for i, e in enumerate(order):
            w = cache.fetch(layer, e, keep=order[i + 1 :])
            if single:  # decode: one token, no gather/scatter
                coef = weights[0][(index[0] == e)].sum().to(x.dtype)
                out += expert_forward(x, w) * coef
            else:
                tok, rank = torch.where(index == e)
                y = expert_forward(x[tok], w) * weights[tok, rank, None].to(x.dtype)
                out.index_add_(0, tok, y)
            cache.release(layer, e)
        return out

    def _guess(self, x: torch.Tensor) -> torch.Tensor | None:
        """Next layers' routers on this hidden state: top-n expert guesses, [lookahead, n]."""
        if not self.prefetch.enabled or not self.next_gates:
            return None
        n = self.prefetch.experts
        logits = torch.cat([_router_logits(g, x) for g in self.next_gates], dim=0)  # [d, E]
        return logits.topk(n, dim=-1).indices

    def _start_prefetch(self, guesses: list[list[int]]) -> None:
        for step, (block, guess) in enumerate(zip(self._following, guesses, strict=False)):
            if step == 0:
                block._pending_guess = set(guess)
            for e in guess:
                self.cache.prefetch(block.layer, e, keep=guess)

    def link(self, following: list[OffloadedMoE]) -> None:
        """Tell this block which blocks come next, for prefetch (their routers and layer ids)."""
        self._following = following
        self.next_gates = [b.gate for b in following]
