"""gpt-oss's offloaded MoE layer: ``OffloadedMoE`` with biased experts and the clamped SwiGLU.

Everything about caching, routing and prefetch is ``OffloadedMoE``'s: gpt-oss's router (a linear *with a
bias*, softmax over the top-k logits) runs as its own module, with the next layers' guesses beside it and
the one host sync of a decode step unchanged (``moe._route_one``). What differs is one expert:

    g = min(w1 x + b_gate, l),  u = clamp(w3 x + b_up, -l, l),  y = w2((u + 1) * g * sigmoid(alpha * g)) + b_down

(``GptOssExperts._apply_gate``; the published gate/up columns are interleaved, split at conversion into
w1 = gate and w3 = up). The biases are resident (in the trunk, [E, .] per layer), indexed by a Python int,
so no host sync. The fused Triton expert kernels compute Mixtral's ``silu(g) * u`` without biases, so a
gpt-oss expert runs as three ``quant_linear`` calls (on CUDA each is the fused low-bit GEMV at decode;
elsewhere dequantize + matmul) plus a few elementwise ops: the measured fallback, not a new kernel.
The block returns ``(hidden, None)``, since ``GptOssDecoderLayer`` unpacks ``(hidden, router_scores)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..weights.quant import QuantizedWeight
from . import kernels
from .attention import AttentionPath
from .moe import OffloadedMoE, PrefetchConfig


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's gated activation on de-interleaved gate and up (``GptOssExperts._apply_gate``)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def biased_expert(
    x: torch.Tensor,
    w: dict[str, QuantizedWeight],
    b_gate: torch.Tensor,
    b_up: torch.Tensor,
    b_down: torch.Tensor,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """One gpt-oss expert on rows ``x`` from its low-bit ``w1``/``w2``/``w3`` and its biases."""
    g = kernels.quant_linear(x, w["w1"]) + b_gate
    u = kernels.quant_linear(x, w["w3"]) + b_up
    return kernels.quant_linear(clamped_swiglu(g, u, alpha, limit), w["w2"]) + b_down


class BiasedSwigluMoE(OffloadedMoE):
    """``OffloadedMoE`` for gpt-oss: experts with biases ``gate_up_bias`` [E, 2I] (interleaved, as published)
    and ``down_bias`` [E, H], and the clamped SwiGLU of ``alpha``/``limit``."""

    def __init__(
        self,
        gate: nn.Module,
        layer: int,
        prefetch: PrefetchConfig,
        gate_up_bias: torch.Tensor,
        down_bias: torch.Tensor,
        alpha: float,
        limit: float,
    ) -> None:
        super().__init__(gate, layer, None, prefetch)
        self.register_buffer("gate_bias", gate_up_bias[:, ::2].contiguous())
        self.register_buffer("up_bias", gate_up_bias[:, 1::2].contiguous())
        self.register_buffer("down_bias", down_bias.contiguous())
        self.alpha, self.limit = float(alpha), float(limit)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
        return super().forward(hidden_states), None

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        w = self.cache.weights(self.layer, e)
        b = (self.gate_bias[e].to(x.dtype), self.up_bias[e].to(x.dtype), self.down_bias[e].to(x.dtype))
        return biased_expert(x, w, *b, self.alpha, self.limit)

    def _run_experts(
        self, x: torch.Tensor, weights: torch.Tensor, choice: list[list[int]], order: list[int]
    ) -> torch.Tensor:
        cache, layer = self.cache, self.layer
        if x.shape[0] == 1:  # decode: weighted outputs summed; the coefficients stay on the device
            coefs = weights[0].to(x.dtype)
            out = torch.zeros_like(x)
            for e in order:
                out.add_(self._expert(x, e) * coefs[choice[0].index(e)])
                cache.release(layer, e)
            return out
        routed: dict[int, tuple[list[int], list[int]]] = {}  # expert -> (tokens, ranks) from the host choice
        for t, row in enumerate(choice):
            for r, e in enumerate(row):
                tokens, ranks = routed.setdefault(e, ([], []))
                tokens.append(t)
                ranks.append(r)
        out = torch.zeros_like(x)
        for e in order:
            tok, rank = routed[e]
            tok_i = torch.tensor(tok, device=x.device)
            y = self._expert(x[tok_i], e)
            out.index_add_(0, tok_i, y * weights[tok_i, torch.tensor(rank, device=x.device), None].to(x.dtype))
            cache.release(layer, e)
        return out


def sink_attention(path: AttentionPath) -> AttentionPath:
    """``path`` with transformers' eager attention: the only CPU/T4 implementation that adds gpt-oss's sinks
    (its SDPA path ignores them); prefill stays chunked, so scores are bounded by the chunk."""
    from dataclasses import replace

    kernel = "cpu" if path.capability is None else "math"
    return replace(path, implementation="eager", kernel=kernel, reason="attention sinks need eager attention")
