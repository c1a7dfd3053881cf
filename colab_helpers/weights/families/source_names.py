"""Tensor names of a family's published checkpoints, mapped onto transformers 5's module tree.

transformers 5 holds each MoE block's routed experts fused (``mlp.experts.gate_up_proj`` [E, 2I, H], gate rows
first, and ``mlp.experts.down_proj`` [E, H, I]), but the checkpoints on the hub, and what ``save_pretrained``
writes back, keep one matrix per expert: Mixtral and Phi-3.5-MoE as ``block_sparse_moe.experts.N.w1/w2/w3``
with the router at ``block_sparse_moe.gate``; OLMoE, Qwen2-MoE and Qwen3-MoE as
``mlp.experts.N.gate_proj/down_proj/up_proj`` with the router at ``mlp.gate``. transformers renames them while
loading (``conversion_mapping.py``: ``block_sparse_moe`` -> ``mlp``, Phi's ``gate`` -> ``router``). Each family
adapter's ``SOURCE_NAMES`` says the same for the converter, which reads shards without building the model;
fused transformers 5 names are accepted for every family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .base import MoEArchitecture

EXPERT_MATS = ("w1", "w2", "w3")  # the layout's names: gate, down, up


@dataclass(frozen=True)
class SourceNaming:
    """One way checkpoints of a family spell an MoE block: ``model.layers.L.<block>.experts.E.<mat>.weight``."""

    block: str  # the MoE block's name: "block_sparse_moe" or "mlp"
    experts: tuple[str, str, str]  # one expert's gate, down and up matrices (the layout's w1, w2, w3)
    router: str = "gate"  # the router inside the block


CLASSIC = SourceNaming("block_sparse_moe", ("w1", "w2", "w3"))  # Mixtral, Phi-3.5-MoE on the hub
PER_EXPERT_MLP = SourceNaming("mlp", ("gate_proj", "down_proj", "up_proj"))  # OLMoE, Qwen2-MoE, Qwen3-MoE


@dataclass(frozen=True)
class SourceKey:
    """What one source tensor is: a trunk tensor (under its transformers 5 name), one matrix of one expert,
    or one fused matrix holding every expert of a layer."""

    kind: str  # "trunk", "expert", "fused", or (gpt-oss) "mxfp4_blocks" / "mxfp4_scales"
    name: str  # trunk: transformers 5 name; expert: w1/w2/w3; fused: "gate_up" or "w2"
    layer: int = -1
    expert: int = -1


class UnexpectedTensorError(ValueError):
    """A source tensor that a plain model of the family, with its config.json, does not have."""


_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
# gpt-oss as openai publishes it: each fused expert matrix as MXFP4 blocks and scales (``mxfp4.py``)
_MXFP4 = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)_(blocks|scales)$")


class SourceNames:
    """Classifies a family's source tensor names (published, other known spellings, transformers 5 fused)."""

    def __init__(self, arch: MoEArchitecture, namings: tuple[SourceNaming, ...]) -> None:
        self.arch = arch
        self.trunk = arch.trunk_shapes
        self._experts = []
        self._blocks = []  # (block pattern, router name) -> renamed to "mlp" and arch.router_param
        for n in namings:
            mats = "|".join(map(re.escape, n.experts))
            pat = re.compile(rf"^model\.layers\.(\d+)\.{re.escape(n.block)}\.experts\.(\d+)\.({mats})\.weight$")
            self._experts.append((pat, dict(zip(n.experts, EXPERT_MATS, strict=True))))
            self._blocks.append((f".{n.block}.", n.router))

    def model_name(self, key: str) -> str:
        """A published trunk name under transformers 5's (``block_sparse_moe.gate`` -> ``mlp.gate``/``mlp.router``)."""
        if key in self.trunk:
            return key
        for block, router in self._blocks:
            if block in key:
                name = key.replace(block, ".mlp.", 1)
                return re.sub(rf"\.mlp\.{re.escape(router)}\.weight$", f".mlp.{self.arch.router_param}.weight", name)
        return key

    def classify(self, key: str) -> SourceKey | None:
        """``None`` for what no model keeps (rotary ``inv_freq``); ``UnexpectedTensorError`` for what this
        family's model with this config has no place for (quantized sources, adapters, other layer counts)."""
        if key.endswith("rotary_emb.inv_freq"):
            return None
        for pat, mats in self._experts:
            if m := pat.match(key):
                return SourceKey("expert", mats[m[3]], int(m[1]), int(m[2]))
        if m := _FUSED.match(key):
            return SourceKey("fused", "gate_up" if m[2] == "gate_up_proj" else "w2", int(m[1]))
        if self.arch.expert_layout == "interleaved" and (m := _MXFP4.match(key)):
            return SourceKey(f"mxfp4_{m[3]}", "gate_up" if m[2] == "gate_up_proj" else "w2", int(m[1]))
        name = self.model_name(key)
        if name in self.trunk:
            return SourceKey("trunk", name)
        raise UnexpectedTensorError(f"unexpected tensor {key!r}: not part of a plain {self.arch.model_class}")


def source_names(arch: MoEArchitecture) -> SourceNames:
    """The classifier for ``arch``'s family (its adapter's ``SOURCE_NAMES``)."""
    from . import adapters

    return SourceNames(arch, adapters()[arch.family].SOURCE_NAMES)
