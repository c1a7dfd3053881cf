"""One model description: a checkpoint's config resolved once into everything the loader, the cache, the
planner, the converter and the twin need to know about its tensors.

``ModelSpec.of(config, quant)`` takes a config.json dict, a transformers config or a family's
``MoEArchitecture`` and returns a frozen ``ModelSpec``: the family's architecture (layers, MoE layers,
experts, top-k, shapes), every trunk tensor with its layout name, shape and quantization, one expert's
stored tensors, and the byte sizes that follow (an expert as stored, an expert's aligned cache slot, the
trunk, the whole checkpoint). It is computed once per (architecture, settings) and shared.
``tests/test_model_spec.py`` checks it against every other place that derives these numbers.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from .families import MoEArchitecture, detect_family, from_transformers, transformers_config
from .quant import DEFAULT_ATTENTION_SPECS, DEFAULT_EXPERT_SPECS, DEMO_ATTENTION_SPEC, DEMO_EXPERT_SPEC, QuantSpec

QUANT_CONFIG_KEY = "offloading_quantization"  # our addition to config.json; absent in the public demo repo
SLOT_ALIGN = 64  # bytes; each tensor of an expert's cache slot starts aligned for fp16/int32 loads and kernels

TensorShape = tuple[torch.dtype, tuple[int, ...]]


@dataclass(frozen=True)
class QuantConfig:
    """Which low-bit settings attention and experts use in one checkpoint."""

    attention: QuantSpec = DEMO_ATTENTION_SPEC
    experts: QuantSpec = DEMO_EXPERT_SPEC

    @classmethod
    def for_bits(cls, attn_bits: int, expert_bits: int) -> QuantConfig:
        if attn_bits not in DEFAULT_ATTENTION_SPECS or expert_bits not in DEFAULT_EXPERT_SPECS:
            raise ValueError(f"bit widths must be 2, 3 or 4 (got attention {attn_bits}, experts {expert_bits})")
        return cls(DEFAULT_ATTENTION_SPECS[attn_bits], DEFAULT_EXPERT_SPECS[expert_bits])

    def fitted(self, arch: MoEArchitecture) -> QuantConfig:
        """These settings with the experts' scale group halved until ``arch``'s expert shapes fit (gpt-oss's
        2880 x 2880 experts make 129600 groups of 64: not a multiple of 128, a multiple of 64); unchanged
        when they fit already, and when halving cannot help (``num_groups`` then names the misfit)."""
        from dataclasses import replace

        spec = self.experts
        while spec.scale_group_size > 8:
            try:
                for shape in arch.expert_shapes.values():
                    spec.num_groups(shape)
                return replace(self, experts=spec)
            except ValueError:
                spec = replace(spec, scale_group_size=spec.scale_group_size // 2)
        return self

    @classmethod
    def from_config_dict(cls, cfg: dict) -> QuantConfig:
        """Settings stored by our writer, or the public demo's settings when there are none."""
        q = cfg.get(QUANT_CONFIG_KEY)
        if q is None:
            return cls()
        return cls(QuantSpec(**q["attention"]), QuantSpec(**q["experts"]))

    def to_dict(self) -> dict:
        return {"attention": self.attention.to_dict(), "experts": self.experts.to_dict()}


def to_transformers_name(name: str) -> str:
    """Layout names to transformers 5 names: Mixtral's old ``block_sparse_moe`` becomes ``mlp``."""
    return name.replace(".block_sparse_moe.", ".mlp.")


@dataclass(frozen=True)
class TrunkEntry:
    """One tensor of the source model that the trunk file stores: its name in the layout, its shape, and
    whether it is quantized (with the attention settings: 7 stored tensors) or kept float16 (one)."""

    name: str  # layout name (transformers 5 names; Mixtral's router under ``block_sparse_moe``)
    shape: tuple[int, ...]
    quantized: bool

    @property
    def model_name(self) -> str:
        """The transformers 5 parameter name this entry is read from and loaded into."""
        return to_transformers_name(self.name)


def arch_of(config) -> MoEArchitecture:
    """The family adapter's ``MoEArchitecture`` of a transformers config (any supported family), or ``config``
    itself when it already is one."""
    return config if isinstance(config, MoEArchitecture) else from_transformers(config)


def _norm(name: str, h: int, bias: bool) -> list[TrunkEntry]:
    return [TrunkEntry(f"{name}.weight", (h,), False)] + ([TrunkEntry(f"{name}.bias", (h,), False)] if bias else [])


@functools.lru_cache(maxsize=64)
def _trunk(a: MoEArchitecture) -> tuple[TrunkEntry, ...]:
    """Every non-expert tensor of a model of any supported family, as the trunk file stores it.

    Quantized with the attention settings: the q/k/v/o projections, and (Qwen2-MoE) the shared expert's
    and (Qwen2/Qwen3-MoE) the dense layers' gate/up/down projections: they are read for every token like
    attention, so they get attention's bits rather than sixteen. Float16: embeddings, ``lm_head`` (not
    stored when tied, except by Mixtral, whose public layout always has it) and its bias, norms and their
    biases, attention biases, q/k norms, routers, the shared expert's gate.
    """
    h, v = a.hidden, a.vocab
    mixtral = a.family == "mixtral"
    out = [TrunkEntry("model.embed_tokens.weight", (v, h), False)]
    if mixtral or not a.tie_embeddings:
        out.append(TrunkEntry("lm_head.weight", (v, h), False))
    if a.lm_head_bias:
        out.append(TrunkEntry("lm_head.bias", (v,), False))
    out += _norm("model.norm", h, a.norm_bias)
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    for layer in range(a.num_layers):
        p = f"model.layers.{layer}."
        out += _norm(p + "input_layernorm", h, a.norm_bias) + _norm(p + "post_attention_layernorm", h, a.norm_bias)
        if mixtral:
            out.append(TrunkEntry(p + "block_sparse_moe.gate.weight", (a.num_experts, h), False))
        out += [TrunkEntry(f"{p}self_attn.{proj}.weight", shape, True) for proj, shape in a.attention_shapes.items()]
        if a.qkv_bias:
            out += [TrunkEntry(f"{p}self_attn.{x}_proj.bias", (n,), False) for x, n in (("q", q), ("k", kv), ("v", kv))]
        if a.o_bias:
            out.append(TrunkEntry(p + "self_attn.o_proj.bias", (h,), False))
        if a.q_norm:
            out.append(TrunkEntry(p + "self_attn.q_norm.weight", (a.q_norm,), False))
        if a.k_norm:
            out.append(TrunkEntry(p + "self_attn.k_norm.weight", (a.k_norm,), False))
        if getattr(a, "attn_sinks", False):  # gpt-oss (issue 23's family; absent from older architectures)
            out.append(TrunkEntry(p + "self_attn.sinks", (a.heads,), False))
        out += [TrunkEntry(f"{p}self_attn.{m}.weight", (n,), False) for m, n in a.attention_norms.items()]  # MLA
        if mixtral:
            continue
        if layer in a.moe_layers:
            out.append(TrunkEntry(f"{p}mlp.{a.router_param}.weight", (a.num_experts, h), False))
            if getattr(a, "router_bias", False):
                out.append(TrunkEntry(f"{p}mlp.{a.router_param}.bias", (a.num_experts,), False))
            biases = getattr(a, "expert_bias_shapes", {}).items()
            out += [TrunkEntry(f"{p}mlp.experts.{m}", shape, False) for m, shape in biases]
            shared = a.shared_expert_shapes.items()
            out += [TrunkEntry(f"{p}mlp.{a.shared_name}.{m}.weight", shape, True) for m, shape in shared]
            if a.shared_expert_gate:
                out.append(TrunkEntry(p + "mlp.shared_expert_gate.weight", (1, h), False))
        else:
            out += [TrunkEntry(f"{p}mlp.{m}.weight", shape, True) for m, shape in a.dense_mlp_shapes.items()]
    return tuple(out)


def _bytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A checkpoint's model, resolved once: architecture, quantization, every stored tensor, byte sizes."""

    arch: MoEArchitecture
    quant: QuantConfig

    # Resolved on first use, then kept (a spec asked only for its architecture never checks that the
    # settings fit its shapes, as ``save_checkpoint`` asks before fitting the settings).

    @functools.cached_property
    def trunk(self) -> tuple[TrunkEntry, ...]:
        """Every trunk tensor of the source model, in layout order."""
        return _trunk(self.arch)

    @functools.cached_property
    def trunk_tensors(self) -> MappingProxyType[str, TensorShape]:
        """The trunk file (read-only): full layout name -> (dtype, shape); a quantized matrix is 7 tensors."""
        out: dict[str, TensorShape] = {}
        for entry in self.trunk:
            if entry.quantized:
                base = entry.name.removesuffix(".weight")
                out.update({f"{base}.{k}": v for k, v in self.quant.attention.tensor_specs(entry.shape).items()})
            else:
                out[entry.name] = (torch.float16, entry.shape)
        return MappingProxyType(out)

    @functools.cached_property
    def expert_tensors(self) -> MappingProxyType[str, TensorShape]:
        """One expert file (read-only), keys relative to the expert (``w1.W_q`` ...)."""
        return MappingProxyType(
            {
                f"{mat}.{suffix}": spec
                for mat, shape in self.arch.expert_shapes.items()
                for suffix, spec in self.quant.experts.tensor_specs(shape).items()
            }
        )

    @functools.cached_property
    def expert_bytes(self) -> int:
        """One expert as stored (the sum of its tensors)."""
        return sum(_bytes(*spec) for spec in self.expert_tensors.values())

    @functools.cached_property
    def expert_slot_bytes(self) -> int:
        """One expert's flat cache buffer: each tensor starts at a ``SLOT_ALIGN`` boundary."""
        return sum(-(-max(_bytes(*spec), 1) // SLOT_ALIGN) * SLOT_ALIGN for spec in self.expert_tensors.values())

    @functools.cached_property
    def trunk_bytes(self) -> int:
        """Every trunk tensor as stored."""
        return sum(_bytes(*spec) for spec in self.trunk_tensors.values())

    @classmethod
    def of(cls, config, quant: QuantConfig | None = None) -> ModelSpec:
        """The spec of a config.json dict, a transformers config or a ``MoEArchitecture``; ``quant``
        defaults to the settings a config.json dict stores (the public demo's when none)."""
        if isinstance(config, dict):
            quant = quant or QuantConfig.from_config_dict(config)
            detect_family(config)  # UnsupportedFamilyError naming the supported families
            config = transformers_config(config)
        return _resolve(arch_of(config), quant or QuantConfig())

    @classmethod
    def read(cls, folder: str | Path, quant: QuantConfig | None = None) -> ModelSpec:
        """The spec of a checkpoint folder's config.json (or of a config.json file)."""
        path = Path(folder)
        path = path / "config.json" if path.is_dir() else path
        return cls.of(json.loads(path.read_text()), quant)

    # ---- what the architecture says --------------------------------------------------------------

    @property
    def family(self) -> str:
        return self.arch.family

    @property
    def num_layers(self) -> int:
        return self.arch.num_layers

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return self.arch.moe_layers

    @property
    def num_experts(self) -> int:
        return self.arch.num_experts

    @property
    def top_k(self) -> int:
        return self.arch.top_k

    @property
    def total_experts(self) -> int:
        return self.arch.total_experts

    @property
    def legacy_names(self) -> bool:
        """Mixtral keeps the public demo's old names (``block_sparse_moe``) in the trunk and the index."""
        return self.arch.family == "mixtral"

    @property
    def expert_shapes(self) -> dict[str, tuple[int, int]]:
        """One routed expert's ``w1`` (gate), ``w2`` (down), ``w3`` (up), ``(out, in)`` each."""
        return self.arch.expert_shapes

    @property
    def quantized_trunk_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{transformers 5 name without .weight: (out, in)}`` of the trunk's quantized matrices."""
        return {e.model_name.removesuffix(".weight"): e.shape for e in self.trunk if e.quantized}

    # ---- bytes -----------------------------------------------------------------------------------

    @property
    def attention_layer_bytes(self) -> int:
        """One layer's quantized q/k/v/o projections as stored."""
        return sum(self.quant.attention.nbytes(s) for s in self.arch.attention_shapes.values())

    @property
    def resident_mlp_bytes(self) -> int:
        """Shared experts and dense layers' MLPs (quantized like attention, always on the device)."""
        a = self.arch
        shared = sum(self.quant.attention.nbytes(s) for s in a.shared_expert_shapes.values())
        dense = sum(self.quant.attention.nbytes(s) for s in a.dense_mlp_shapes.values()) if a.dense_layers else 0
        return len(a.moe_layers) * shared + len(a.dense_layers) * dense

    @property
    def checkpoint_bytes(self) -> int:
        """Every tensor of the checkpoint (trunk and all experts), as stored; safetensors headers not counted."""
        return self.trunk_bytes + self.total_experts * self.expert_bytes


@functools.lru_cache(maxsize=64)
def _resolve(arch: MoEArchitecture, quant: QuantConfig) -> ModelSpec:
    return ModelSpec(arch, quant)
