"""Random models in the real quantized layout, made in memory (on the GPU when there is one).

A full-size Mixtral-8x7B-shaped model for benchmarks needs no 17 GB download: its trunk and experts
are random tensors of exactly the checkpoint's dtypes and shapes, with scale/zero codes chosen so
activations stay in range. ``ScriptedRouter`` replays a recorded routing trace instead of routing.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn as nn
from transformers import MixtralConfig

from ..weights.model_spec import ModelSpec, QuantConfig, to_transformers_name
from .random_mixtral import small_config


def mixtral_8x7b_config() -> MixtralConfig:
    """The stock Mixtral-8x7B architecture (what the pre-quantized demo checkpoint holds)."""
    return MixtralConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=32000,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )


def smoke_config() -> MixtralConfig:
    """A Mixtral small enough for a CPU smoke run of the GPU benchmarks (same code paths, tiny widths)."""
    config = small_config(layers=4, vocab=512)
    config.max_position_embeddings = 512
    return config


def _random_quantized(
    specs: dict[str, tuple[torch.dtype, tuple]], nbits: int, gen: torch.Generator, device: torch.device
) -> dict[str, torch.Tensor]:
    """The 7 tensors of one or more quantized linears, keyed by suffix-bearing names.

    Codes are uniform; the step is ~0.07/2^b and the zero point mid-range, so weights have std ≈ 0.02.
    """
    out = {}
    step = 0.07 / 2**nbits
    for key, (dtype, shape) in specs.items():
        if key.endswith("W_q"):
            hi = 2**31 - 1 if dtype == torch.int32 else 256
            t = torch.randint(0, hi, shape, generator=gen, device=device, dtype=torch.int64).to(dtype)
            if dtype == torch.int32:
                t &= 0x3FFFFFFF  # 10 three-bit codes per word, bits 0..29
        elif key.endswith("meta.scale_q"):
            t = torch.randint(100, 156, shape, generator=gen, device=device, dtype=torch.int64).to(dtype)
        elif key.endswith("meta.meta_scale.scale"):
            t = torch.full(shape, step / 128, dtype=dtype, device=device)
        elif key.endswith("meta.zero_q"):
            t = torch.randint(0, 256, shape, generator=gen, device=device, dtype=torch.int64).to(dtype)
        elif key.endswith("meta.meta_zero.scale"):
            t = torch.full(shape, (2**nbits - 1) / 255, dtype=dtype, device=device)
        elif key.endswith(("meta.meta_scale.zero", "meta.meta_zero.zero")):
            t = torch.zeros(shape, dtype=dtype, device=device)
        else:
            raise KeyError(key)
        out[key] = t
    return out


def random_trunk(
    config: MixtralConfig, quant: QuantConfig, device: torch.device | str = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Every non-expert tensor under transformers 5 names, random but well-scaled (any supported family:
    quantized matrices are the trunk's quantized entries, biases are zero, norms one)."""
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)
    model = ModelSpec.of(config, quant)
    bases = {e.name.removesuffix(".weight") for e in model.trunk if e.quantized}
    quantized, dense = {}, {}
    for key, spec in model.trunk_tensors.items():
        (quantized if key.removesuffix(".W_q").split(".meta.")[0] in bases else dense)[key] = spec
    out = _random_quantized(quantized, quant.attention.nbits, gen, device)
    for key, (dtype, shape) in dense.items():
        if key.endswith("norm.weight"):
            out[key] = torch.ones(shape, dtype=dtype, device=device)
        elif key.endswith(".bias"):
            out[key] = torch.zeros(shape, dtype=dtype, device=device)
        else:
            std = 1.0 if "gate" in key else 0.02  # router: spread logits so routing varies
            out[key] = (torch.randn(shape, generator=gen, device=device) * std).to(dtype)
    return {to_transformers_name(k): v for k, v in out.items()}


def random_experts(
    config: MixtralConfig, quant: QuantConfig, device: torch.device | str = "cpu", seed: int = 0, distinct: int = 4
) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """``(layer, expert, tensors)`` for every expert; ``distinct`` random payloads are reused round-robin.

    Made on ``device`` and handed over on the CPU (what a loader reading shards would do); reusing a
    few payloads keeps a full-size build fast and changes no timing.
    """
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed + 1)
    model = ModelSpec.of(config, quant)
    specs = model.expert_tensors
    pool = [
        {k: v.cpu() for k, v in _random_quantized(specs, quant.experts.nbits, gen, device).items()}
        for _ in range(distinct)
    ]
    for layer in model.moe_layers:
        for e in range(model.num_experts):
            yield layer, e, pool[(layer * model.num_experts + e) % distinct]


class ScriptedRouter(nn.Module):
    """A router that replays recorded choices ([T, k] for its layer), cycling; equal weights.

    ``predict`` gives the choices of its *next* call, so a previous layer's prefetch guess made with it
    is an oracle: an upper bound on what speculative prefetch can gain with this trace.
    """

    def __init__(self, choices: np.ndarray, num_experts: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        rows = np.asarray(choices)
        rows = rows[(rows >= 0).all(axis=1)]
        if len(rows) == 0:
            raise ValueError("no routing rows to replay")
        self.choices = torch.as_tensor(rows % num_experts, dtype=torch.long, device=device)  # [T, k]
        self.num_experts = num_experts
        self.step = 0

    def _rows(self, n: int) -> torch.Tensor:
        idx = torch.arange(self.step, self.step + n, device=self.choices.device) % len(self.choices)
        return self.choices[idx]  # [n, k]

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
        index = self._rows(n)
        self.step += n
        weights = torch.full(index.shape, 1.0 / index.shape[1], device=index.device)
        logits = torch.zeros(n, self.num_experts, device=index.device).scatter_(1, index, 1.0)
        return logits, weights, index

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        n = x.reshape(-1, x.shape[-1]).shape[0]
        index = self._rows(n)
        return torch.zeros(n, self.num_experts, device=x.device).scatter_(1, index, 1.0)
