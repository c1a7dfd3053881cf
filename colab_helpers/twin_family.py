"""The T4 twin for any supported MoE family (``twin --model``): its sizes, its plan, and whose routing.

The twin records our engine decoding a *narrow* model (``twin_record``) and scales every byte to full
size. For Mixtral-8x7B that model is the narrow Mixtral of ``twin_record`` (unchanged). For another
family, ``FamilyTwin`` builds the same engine with that family's layer count, expert count and top-k,
widths chosen so the quantization groups fit (hidden 256, the expert FFN in proportion), and a byte ratio
per weight so each matrix reads what the full-size one reads: one expert the family's 2-bit expert bytes,
attention its 4-bit projections, the lm_head and embeddings its vocabulary. Shared experts (Qwen2-MoE)
and the MLPs of dense (non-MoE) layers are always resident: ``ResidentMLP`` runs them in the layer as
4-bit linears, so their compute and bytes count every token and they never touch the expert cache.

What it does not model: q/k norms, attention and lm_head biases, LayerNorm vs RMSNorm, the sparsemixer
router (a few small eager ops per layer each); the engine's attention is Mixtral's at that family's
head counts.

Routing: a recorded trace is used only when it is a trace of this model (layers, top-k, and expert count
from the file or its highest expert id); Mixtral's trace is never used for another family. Otherwise
routing is *synthetic* (``synthetic_routing``) and every report says so.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .families import MoEArchitecture

TRACE_ENV = "COLAB_HELPERS_TRACE"  # a routing trace .npz used when --trace is not given
NARROW_HIDDEN = 256

# Synthetic routing's one locality parameter. Measured on the real Mixtral-8x7B-Instruct trace (shared
# traces, the four *_decode_experts arrays, consecutive decode steps at the same layer): 37.6% of a token's
# experts were also used by the previous token, against 25% for independent uniform draws (k/E = 2/8).
# STICKINESS is the excess, (0.376 - 0.25) / (1 - 0.25): each of a token's k picks repeats one of the
# previous token's experts at that layer with this probability, else it is uniform over the unused experts.
# tests/test_twin_family.py re-measures it when the trace is present.
STICKINESS = 0.168


def synthetic_routing(layers: int, num_experts: int, top_k: int, tokens: int = 256, seed: int = 0) -> np.ndarray:
    """``[tokens, layers, top_k]`` distinct experts per row, with ``STICKINESS`` temporal locality per layer."""
    rng = np.random.default_rng(seed)
    out = np.empty((tokens, layers, top_k), dtype=np.int16)
    for layer in range(layers):
        prev = list(rng.choice(num_experts, top_k, replace=False))
        for t in range(tokens):
            row: list[int] = []
            for _ in range(top_k):
                repeats = [e for e in prev if e not in row]
                if repeats and rng.random() < STICKINESS:
                    row.append(int(repeats[rng.integers(len(repeats))]))
                    continue
                while (e := int(rng.integers(num_experts))) in row:
                    pass
                row.append(e)
            out[t, layer] = row
            prev = row
    return out


def repeat_fraction(rows: np.ndarray) -> float:
    """Share of a decode step's experts that the previous step used at the same layer (rows ``[T, L, k]``)."""
    rows = np.asarray(rows)
    same = total = 0
    for t in range(1, len(rows)):
        for layer in range(rows.shape[1]):
            cur, prev = rows[t, layer], rows[t - 1, layer]
            if (cur < 0).any() or (prev < 0).any():
                continue
            same += len(set(cur.tolist()) & set(prev.tolist()))
            total += len(cur)
    return same / max(total, 1)


# --------------------------------------------------------------------------------------------------
# routing: a trace of this model, or synthetic
# --------------------------------------------------------------------------------------------------


def trace_path(explicit: Path | None) -> Path | None:
    """``--trace``, else ``$COLAB_HELPERS_TRACE``, else None (no default location)."""
    if explicit is not None:
        return explicit
    env = os.environ.get(TRACE_ENV)
    return Path(env) if env else None


def trace_mismatch(arrays: dict, arch: MoEArchitecture) -> str | None:
    """Why a trace is not one of ``arch``'s model (None when its shape and expert ids fit)."""
    from .trace import DECODE_SUFFIX, sequence_names

    names = sequence_names(arrays)
    if not names:
        return f"no '<name>{DECODE_SUFFIX}' arrays"
    first = np.asarray(arrays[f"{names[0]}{DECODE_SUFFIX}"])
    layers, k = first.shape[1], first.shape[2]
    if (layers, k) != (len(arch.moe_layers), arch.top_k):
        return f"it holds top-{k} in {layers} layers, {arch.name} routes top-{arch.top_k} in {len(arch.moe_layers)}"
    top = max(int(np.asarray(arrays[f"{n}{DECODE_SUFFIX}"]).max(initial=-1)) for n in names)
    experts = int(arrays["num_experts"]) if "num_experts" in arrays else top + 1
    if experts != arch.num_experts:
        return f"it routes over {experts} experts, {arch.name} has {arch.num_experts}"
    return None


# --------------------------------------------------------------------------------------------------
# the narrow engine of another family
# --------------------------------------------------------------------------------------------------


class ResidentMLP(nn.Module):
    """A layer's always-resident MLP: a shared expert next to the routed ones, scaled by ``sigmoid(gate x)``
    (Qwen2-MoE), or a dense layer's MLP in place of them (``moe`` None). Its weights live in the trunk."""

    def __init__(self, moe: nn.Module | None, projs: dict[str, nn.Module], gate: nn.Module | None) -> None:
        super().__init__()
        self.moe = moe
        self.gate_proj, self.up_proj, self.down_proj = projs["gate_proj"], projs["up_proj"], projs["down_proj"]
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x)) * y
        return y if self.moe is None else self.moe(x) + y


def _round_to(x: float, step: int) -> int:
    return max(step, int(round(x / step)) * step)


@dataclass(frozen=True)
class FamilyTwin:
    """One model's narrow engine for the twin: its architecture at full size and the quantization."""

    arch: MoEArchitecture
    quant: object  # checkpoint.QuantConfig

    @property
    def width(self) -> float:
        """Full hidden size over the narrow one."""
        return self.arch.hidden / NARROW_HIDDEN

    def narrow_config(self):
        """A MixtralConfig of this family's layers, experts and top-k at narrow widths (groups fit)."""
        from transformers import MixtralConfig

        a, w = self.arch, self.width
        expert_group = self.quant.experts.group_size
        return MixtralConfig(
            hidden_size=NARROW_HIDDEN,
            intermediate_size=_round_to(a.expert_intermediate / w, expert_group),
            num_hidden_layers=a.num_layers,
            num_attention_heads=a.heads,
            num_key_value_heads=a.kv_heads,
            head_dim=max(8, 64 // math.gcd(a.kv_heads, 64)),  # k/v rows a multiple of the 4-bit group (64)
            num_local_experts=a.num_experts,
            num_experts_per_tok=a.top_k,
            vocab_size=max(64, round(a.vocab / w)),
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
        )

    def resident_intermediate(self, full: int) -> int:
        return _round_to(full / self.width, self.quant.attention.group_size)

    def build(self, run, routing: np.ndarray):
        """The narrow engine (``twin_record.EngineRun`` with ``family=self``), routers replaying ``routing``."""
        from .model import OffloadConfig, assemble_model
        from .moe import PrefetchConfig
        from .synthetic import random_experts, random_trunk
        from .twin_record import NoisyScriptedRouter

        a = self.arch
        config = self.narrow_config()
        moe_ks = dict(zip(a.moe_layers, run.experts_on_device, strict=True))
        ks = tuple(moe_ks.get(i, 1) for i in range(a.num_layers))  # dense layers: one idle slot
        cfg = OffloadConfig(
            device="cpu",
            dtype=torch.float16,
            experts_on_device=ks,
            policy=run.policy,
            prefetch=PrefetchConfig(enabled=run.prefetch, experts=a.top_k),
            dense_on_cpu=False,
            check_memory=False,
            progress=False,
        )
        torch.manual_seed(run.seed)
        model = assemble_model(
            config, self.quant, random_trunk(config, self.quant), random_experts(config, self.quant), cfg
        )
        layers = model.model.layers
        for j, i in enumerate(a.moe_layers):
            layers[i].mlp.gate = NoisyScriptedRouter(routing[:, j], a.num_experts, run.recall, run.seed + i)
        blocks = [layers[i].mlp for i in a.moe_layers]
        for j, block in enumerate(blocks):
            block.link(blocks[j + 1 : j + 1 + block.prefetch.lookahead])
        gen = torch.Generator().manual_seed(run.seed + 7)
        for i, layer in enumerate(layers):
            if i in moe_ks and a.shared_intermediate:
                projs = self._resident_projs(a.shared_intermediate, gen)
                gate = nn.Linear(NARROW_HIDDEN, 1, bias=False, dtype=torch.float16).requires_grad_(False)
                layer.mlp = ResidentMLP(layer.mlp, projs, gate)
            elif i not in moe_ks:
                layer.mlp = ResidentMLP(None, self._resident_projs(a.dense_intermediate, gen), None)
        model.twin_scale = self.byte_scale(model)
        return model

    def _resident_projs(self, full_intermediate: int, gen: torch.Generator) -> dict[str, nn.Module]:
        from .linear import QuantLinear
        from .quant import QuantizedWeight
        from .synthetic import _random_quantized

        i, h, spec = self.resident_intermediate(full_intermediate), NARROW_HIDDEN, self.quant.attention
        out = {}
        for name, shape in {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}.items():
            tensors = _random_quantized(spec.tensor_specs(shape), spec.nbits, gen, torch.device("cpu"))
            out[name] = QuantLinear(QuantizedWeight.from_tensors(spec, shape, tensors), dense_on_cpu=False)
        return out

    def byte_scale(self, model):
        """Full-size bytes per narrow byte for each weight the engine reads (see the module docstring)."""
        from .planner import ModelSizes
        from .twin_record import ByteScale

        a, q = self.arch, self.quant
        ratios: dict[int, float] = {}

        def put(tensors, full_bytes: float) -> None:
            tensors = list(tensors)
            narrow = sum(t.nbytes for t in tensors)
            for t in tensors:
                ratios[t.untyped_storage().data_ptr()] = full_bytes / narrow

        for layer in model.model.layers:
            for proj, shape in a.attention_shapes.items():
                put(getattr(layer.self_attn, proj).buffers(), q.attention.nbytes(shape))
            mlp = layer.mlp
            if isinstance(mlp, ResidentMLP):
                shapes = a.shared_expert_shapes if mlp.moe is not None else a.dense_mlp_shapes
                for proj, shape in shapes.items():
                    put(getattr(mlp, proj).buffers(), q.attention.nbytes(shape))
                if mlp.gate is not None:
                    put([mlp.gate.weight], 2 * a.hidden)
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                put([norm.weight], 2 * a.hidden * (1 + a.norm_bias))
        put([model.model.embed_tokens.weight], 2 * a.vocab * a.hidden)
        put([model.lm_head.weight], 2 * a.vocab * a.hidden)
        put([model.model.norm.weight], 2 * a.hidden)
        w = self.width
        return ByteScale(ModelSizes.of(a, q).expert_bytes, ratios, w * w, w)


def is_stock_mixtral(arch: MoEArchitecture, quant) -> bool:
    """Mixtral-8x7B's shapes at the demo's bit widths: the twin's own narrow Mixtral covers it exactly."""
    from .checkpoint import QuantConfig
    from .families import from_transformers
    from .synthetic import mixtral_8x7b_config

    stock = from_transformers(mixtral_8x7b_config())
    keys = ("family", "num_layers", "moe_layers", "num_experts", "top_k", "hidden", "expert_intermediate")
    keys += ("heads", "kv_heads", "head_dim", "vocab", "shared_intermediate", "dense_intermediate")
    same = all(getattr(arch, k) == getattr(stock, k) for k in keys)
    return same and quant == QuantConfig.for_bits(4, 2)


def planned_experts(arch: MoEArchitecture, quant, vram_gb: float, ram_gb: float) -> tuple[int, ...]:
    """Experts per MoE layer the planner puts on a GPU with this much free memory; ValueError if none fit."""
    from .planner import Budget, plan_memory

    plan = plan_memory(arch, quant, Budget.given(vram_gb, ram_gb), "cuda")
    if not plan.fits:
        why = plan.reasons[0] if plan.reasons else "no fit"
        raise ValueError(f"{arch.name} does not fit {vram_gb:g} GB VRAM / {ram_gb:g} GB RAM ({why}): no projection")
    return tuple(plan.per_layer)
