"""The T4 twin for any supported MoE family (``twin --model``): its sizes, its plan, and whose routing.

The twin records our engine decoding a *narrow* model (``twin_record``) and scales every byte to full
size. For Mixtral-8x7B that model is the narrow Mixtral of ``twin_record`` (unchanged). For another
family, ``FamilyTwin`` builds the family's own transformers class through ``assemble_model``, as
``load_model`` does, with its layer count (dense layers included), expert count, top-k, head counts,
biases, q/k norms, LayerNorm, shared expert and gate at narrow widths (hidden 256, every other width in
proportion, rounded so the quantization groups fit), and a byte ratio per weight so each tensor reads
what its full-size one reads (``MoEArchitecture.trunk_shapes``; one expert the family's 2-bit expert
bytes). Its launches, syncs and copies per token are then the family runtime's.

What it does not model: the routers replay the routing (``NoisyScriptedRouter``, as for Mixtral), so a
router's own few ops (Phi-3.5-MoE's sparsemixer included) are the scripted router's.

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

from ..weights.families import MoEArchitecture
from ..weights.model_spec import ModelSpec

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


def _round_to(x: float, step: int) -> int:
    return max(step, int(round(x / step)) * step)


# family -> (its transformers config class, the field naming the expert count, the one naming the expert FFN)
_CONFIG_FIELDS = {
    "mixtral": ("MixtralConfig", "num_local_experts", "intermediate_size"),
    "olmoe": ("OlmoeConfig", "num_experts", "intermediate_size"),
    "qwen2_moe": ("Qwen2MoeConfig", "num_experts", "moe_intermediate_size"),
    "qwen3_moe": ("Qwen3MoeConfig", "num_experts", "moe_intermediate_size"),
    "phimoe": ("PhimoeConfig", "num_local_experts", "intermediate_size"),
    "gpt_oss": ("GptOssConfig", "num_local_experts", "intermediate_size"),
    "deepseek_v2": ("DeepseekV2Config", "n_routed_experts", "moe_intermediate_size"),
}


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
        """The family's own transformers config at narrow widths (groups fit): its layers (dense ones where
        it has them), experts, top-k, heads, biases, norms and router as at full size."""
        import transformers

        a, w = self.arch, self.width
        if a.family not in _CONFIG_FIELDS:
            raise ValueError(f"the twin has no narrow engine for {a.name}")
        cls, experts, ffn = _CONFIG_FIELDS[a.family]
        resident = self.quant.attention.group_size
        fields = dict(
            hidden_size=NARROW_HIDDEN,
            num_hidden_layers=a.num_layers,
            num_attention_heads=a.heads,
            num_key_value_heads=a.kv_heads,
            head_dim=max(8, 64 // math.gcd(a.kv_heads, 64)),  # k/v rows a multiple of the 4-bit group (64)
            vocab_size=max(64, round(a.vocab / w)),
            max_position_embeddings=4096,
            num_experts_per_tok=a.top_k,
            tie_word_embeddings=a.tie_embeddings,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=None,
            **{experts: a.num_experts, ffn: _round_to(a.expert_intermediate / w, self.quant.experts.group_size)},
        )
        if a.family in ("olmoe", "qwen2_moe", "qwen3_moe"):
            fields["norm_topk_prob"] = a.norm_topk_prob
        if a.family in ("olmoe", "phimoe", "gpt_oss"):
            fields["attention_bias"] = a.qkv_bias
        if a.family == "olmoe":  # its q/k norms are sized by hidden / heads, whatever head_dim says
            fields["head_dim"] = NARROW_HIDDEN // a.heads
        if a.family in ("qwen2_moe", "qwen3_moe"):  # the dense layers by index, whatever rule made them
            fields.update(mlp_only_layers=list(a.dense_layers), decoder_sparse_step=1)
            fields["intermediate_size"] = _round_to(max(a.dense_intermediate, 1) / w, resident)
        if a.family == "qwen2_moe":
            fields["qkv_bias"] = a.qkv_bias
            shared = _round_to(a.shared_intermediate / w, resident) if a.shared_intermediate else 0
            fields["shared_expert_intermediate_size"] = shared
        if a.family == "phimoe":
            fields.update(lm_head_bias=a.lm_head_bias, router_jitter_noise=a.router_jitter)
        if a.family == "deepseek_v2":  # latent attention at narrow widths whose every projection fits 4-bit groups
            del fields["head_dim"]
            fields.update(
                num_key_value_heads=a.heads,
                q_lora_rank=(_round_to(a.mla[0] / w, resident) if a.mla[0] else None),
                kv_lora_rank=112,  # kv_a: 112 + 16 rows; kv_b: heads x 64 rows of 112
                qk_nope_head_dim=32,
                qk_rope_head_dim=16,
                v_head_dim=32,
                n_shared_experts=max(1, round(a.shared_intermediate / a.expert_intermediate)),
                first_k_dense_replace=len(a.dense_layers),
                moe_intermediate_size=_round_to(a.expert_intermediate / w, resident),  # the shared MLP fits too
                intermediate_size=_round_to(max(a.dense_intermediate, 1) / w, resident),
            )
        config = getattr(transformers, cls)(**fields)
        narrow = ModelSpec.of(config).arch
        for key in ("family", "moe_layers", "num_experts", "top_k", "heads", "kv_heads", "router", "norm_bias"):
            if getattr(narrow, key) != getattr(a, key):  # the narrow model must be the same model, only narrower
                raise ValueError(f"the narrow {a.name} differs in {key}: {getattr(narrow, key)} != {getattr(a, key)}")
        return config

    def build(self, run, routing: np.ndarray):
        """The narrow engine (``twin_record.EngineRun`` with ``family=self``), routers replaying ``routing``.

        ``assemble_model`` builds the family's own class, as ``load_model`` does: its attention (biases,
        q/k norms), norms, shared expert and gate, dense layers' MLPs. Only the routers are scripted."""
        from ..model import OffloadConfig, assemble_model
        from .synthetic import random_experts, random_trunk
        from .twin_record import NoisyScriptedRouter

        a = self.arch
        config = self.narrow_config()
        cfg = OffloadConfig(
            device="cpu",
            dtype=torch.float16,
            experts_on_device=tuple(run.experts_on_device),
            policy=run.policy,
            prefetch=run.prefetch_settings(experts=a.top_k),
            dense_on_cpu=False,
            check_memory=False,
            progress=False,
            embedding_on_host=run.embedding_on_host,
            kv_lending=False,  # the narrow KV would lend at narrow sizes; families project without lending
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
        model.twin_scale = self.byte_scale(model)
        return model

    def byte_scale(self, model):
        """Full-size bytes per narrow byte for each weight the engine reads: each trunk tensor reads what its
        full-size tensor (``MoEArchitecture.trunk_shapes``) reads, 4-bit matrices as quantized."""
        from ..runtime.linear import QuantLinear
        from .twin_record import ByteScale

        a, q = self.arch, self.quant
        full_shapes = a.trunk_shapes
        ratios: dict[int, float] = {}

        def put(tensors, full_bytes: float) -> None:
            tensors = list(tensors)
            narrow = sum(t.nbytes for t in tensors)
            for t in tensors:
                ratios[t.untyped_storage().data_ptr()] = full_bytes / narrow

        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):  # OffloadedMoE holds any family's shared MLP as ``shared_expert``
                name = name.replace(".mlp.shared_expert.", f".mlp.{a.shared_name}.")
                put(module.buffers(), q.attention.nbytes(full_shapes[f"{name}.weight"]))
        for name, p in model.named_parameters():
            if name in full_shapes:
                put([p], 2 * math.prod(full_shapes[name]))
        w = self.width
        return ByteScale(ModelSpec.of(a, q.fitted(a)).expert_bytes, ratios, w * w, w)  # as the writer fits q


def is_stock_mixtral(arch: MoEArchitecture, quant) -> bool:
    """Mixtral-8x7B's shapes at the demo's bit widths: the twin's own narrow Mixtral covers it exactly."""
    from ..weights.checkpoint import QuantConfig
    from .synthetic import mixtral_8x7b_config

    stock = ModelSpec.of(mixtral_8x7b_config()).arch
    keys = ("family", "num_layers", "moe_layers", "num_experts", "top_k", "hidden", "expert_intermediate")
    keys += ("heads", "kv_heads", "head_dim", "vocab", "shared_intermediate", "dense_intermediate")
    same = all(getattr(arch, k) == getattr(stock, k) for k in keys)
    return same and quant == QuantConfig.for_bits(4, 2)


def planned_experts(
    arch: MoEArchitecture, quant, vram_gb: float, ram_gb: float, embedding_on_host: bool | None = None
) -> tuple[int, ...]:
    """Experts per MoE layer the planner puts on a GPU with this much free memory; ValueError if none fit.

    ``embedding_on_host``: as ``plan_memory`` takes it (None: the planner decides; False: on the GPU)."""
    return tuple(planned(arch, quant, vram_gb, ram_gb, embedding_on_host).per_layer)


def planned(arch: MoEArchitecture, quant, vram_gb: float, ram_gb: float, embedding_on_host: bool | None = None):
    """The planner's ``MemoryPlan`` for ``arch`` on a GPU with this much free memory; ValueError if none fit."""
    from ..planning.planner import Budget, plan_memory

    plan = plan_memory(arch, quant, Budget.given(vram_gb, ram_gb), "cuda", embedding_on_host=embedding_on_host)
    if not plan.fits:
        why = plan.reasons[0] if plan.reasons else "no fit"
        raise ValueError(f"{arch.name} does not fit {vram_gb:g} GB VRAM / {ram_gb:g} GB RAM ({why}): no projection")
    return plan
