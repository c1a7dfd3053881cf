"""What one mixture-of-experts architecture looks like, in the numbers offloading and planning need.

Every family adapter (``mixtral.py``, ``olmoe.py`` ...) turns its transformers config into one frozen
``MoEArchitecture``: which layers route tokens to experts, how many experts and how many per token,
the matrix shapes of one expert, of the shared expert and of attention, and which small tensors
(biases, q/k norms, LayerNorm biases) the trunk carries. Shapes are ``(out_features, in_features)``,
as ``nn.Linear`` stores them. Parameter counts here are checked against tiny instantiated models of
each class (``tests/test_families.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Shape = tuple[int, int]


@dataclass(frozen=True)
class MoEArchitecture:
    """One model's architecture as offloading sees it; built by a family adapter from a transformers config."""

    family: str  # the config's model_type: "mixtral", "olmoe", ...
    name: str  # for people: "Mixtral", "Qwen3-MoE", ...
    model_class: str  # the transformers class, e.g. "MixtralForCausalLM"
    num_layers: int
    moe_layers: tuple[int, ...]  # decoder layers whose MLP is a sparse MoE block (the rest are dense MLPs)
    num_experts: int
    top_k: int
    norm_topk_prob: bool  # the top-k routing weights are renormalized to sum to 1
    hidden: int
    expert_intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool
    # what only some families have; the defaults are Mixtral's (and most families')
    router: str = "softmax_topk"  # or "sparsemixer" (Phi-3.5-MoE)
    router_jitter: float = 0.0  # multiplicative noise in training only; inference ignores it
    dense_intermediate: int = 0  # intermediate size of the dense MLP in non-MoE layers (0: no such layers)
    shared_intermediate: int = 0  # the always-on shared expert (0: none)
    shared_expert_gate: bool = False  # the shared expert's output is scaled by sigmoid(a [1, hidden] gate)
    qkv_bias: bool = False  # q/k/v projections carry a bias
    o_bias: bool = False
    q_norm: int = 0  # elements of the q-norm weight per layer (0: none); OLMoE norms all of q, Qwen3 per head
    k_norm: int = 0
    norm_bias: bool = False  # LayerNorm with bias (Phi-3.5-MoE) instead of RMSNorm
    lm_head_bias: bool = False
    router_param: str = "gate"  # the router's parameter name inside the MoE block ("gate" or "router")
    router_bias: bool = False  # the router has a bias [E] (gpt-oss)
    expert_bias: bool = False  # experts have biases: ``experts.gate_up_proj_bias`` [E, 2I], ``down_proj_bias`` [E, H]
    expert_layout: str = "gate_rows"  # fused experts: [E, 2I, H] gate rows first; "interleaved": gpt-oss's [E, H, 2I]
    attn_sinks: bool = False  # one learned sink logit per attention head (gpt-oss's ``self_attn.sinks``)
    shared_name: str = "shared_expert"  # the shared expert's module ("shared_experts": DeepSeek-V2)
    # multi-head latent attention (DeepSeek-V2): (q_lora_rank (0: plain q_proj), kv_lora_rank, rope dim, v dim);
    # head_dim is then the q/k head (nope + rope); () for standard attention
    mla: tuple[int, ...] = ()
    sliding_window_layers: bool = False  # some layers keep a rolling window of K/V (gpt-oss's ``layer_types``)

    @property
    def kv_lending_refusal(self) -> str | None:
        """Why the KV cache cannot lend its unreached tail as expert slots (``runtime.kv_arena.KVArena``), or None."""
        if self.mla:
            return "MLA caches K and V of other widths than kv_heads x head_dim"
        if self.sliding_window_layers:
            return "sliding-window layers keep a rolling K/V window"
        return None

    # ---- shapes ----------------------------------------------------------------------------------

    @property
    def expert_shapes(self) -> dict[str, Shape]:
        """One routed expert: w1 = gate, w2 = down, w3 = up (Mixtral's names, the checkpoint's keys)."""
        h, i = self.hidden, self.expert_intermediate
        return {"w1": (i, h), "w2": (h, i), "w3": (i, h)}

    @property
    def fused_expert_shapes(self) -> dict[str, tuple[int, int, int]]:
        """The transformers 5 parameters of one MoE block: ``experts.gate_up_proj`` (gate rows first), ``down_proj``."""
        h, i, e = self.hidden, self.expert_intermediate, self.num_experts
        if self.expert_layout == "interleaved":  # gpt-oss: transposed, gate/up columns alternating
            return {"gate_up_proj": (e, h, 2 * i), "down_proj": (e, i, h)}
        return {"gate_up_proj": (e, 2 * i, h), "down_proj": (e, h, i)}

    @property
    def shared_expert_shapes(self) -> dict[str, Shape]:
        h, i = self.hidden, self.shared_intermediate
        return {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)} if i else {}

    @property
    def expert_bias_shapes(self) -> dict[str, tuple[int, ...]]:
        """One MoE layer's expert biases (gpt-oss; kept in the trunk, transformers' names and shapes)."""
        e, i, h = self.num_experts, self.expert_intermediate, self.hidden
        return {"gate_up_proj_bias": (e, 2 * i), "down_proj_bias": (e, h)} if self.expert_bias else {}

    @property
    def dense_mlp_shapes(self) -> dict[str, Shape]:
        h, i = self.hidden, self.dense_intermediate
        return {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    @property
    def attention_shapes(self) -> dict[str, Shape]:
        q, kv, h = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden
        if self.mla:  # DeepSeek-V2's latent attention
            q_lora, kv_lora, rope, v = self.mla
            out = {"q_a_proj": (q_lora, h), "q_b_proj": (q, q_lora)} if q_lora else {"q_proj": (q, h)}
            nope = self.head_dim - rope
            out["kv_a_proj_with_mqa"] = (kv_lora + rope, h)
            out["kv_b_proj"] = (self.heads * (nope + v), kv_lora)
            out["o_proj"] = (h, self.heads * v)
            return out
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}

    @property
    def attention_norms(self) -> dict[str, int]:
        """MLA's RMSNorms inside attention, by module name: elements of each weight (fp16 in the trunk)."""
        if not self.mla:
            return {}
        q_lora, kv_lora = self.mla[:2]
        return {"q_a_layernorm": q_lora, "kv_a_layernorm": kv_lora} if q_lora else {"kv_a_layernorm": kv_lora}

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.moe_layers)

    @property
    def trunk_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the transformers 5 state dict but the routed experts, by name: what a converter
        must find in a source (``lm_head.weight`` may be absent from one when embeddings are tied)."""
        h, v = self.hidden, self.vocab
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h)}
        if self.lm_head_bias:
            out["lm_head.bias"] = (v,)
        norm = ("weight", "bias") if self.norm_bias else ("weight",)
        out.update({f"model.norm.{p}": (h,) for p in norm})
        for layer in range(self.num_layers):
            p = f"model.layers.{layer}."
            for which in ("input_layernorm", "post_attention_layernorm"):
                out.update({f"{p}{which}.{t}": (h,) for t in norm})
            for proj, shape in self.attention_shapes.items():
                out[f"{p}self_attn.{proj}.weight"] = shape
            if self.qkv_bias:
                out.update({f"{p}self_attn.q_proj.bias": (q,), f"{p}self_attn.k_proj.bias": (kv,)})
                out[f"{p}self_attn.v_proj.bias"] = (kv,)
            if self.o_bias:
                out[f"{p}self_attn.o_proj.bias"] = (h,)
            if self.q_norm:
                out[f"{p}self_attn.q_norm.weight"] = (self.q_norm,)
            if self.k_norm:
                out[f"{p}self_attn.k_norm.weight"] = (self.k_norm,)
            if self.attn_sinks:
                out[f"{p}self_attn.sinks"] = (self.heads,)
            out.update({f"{p}self_attn.{m}.weight": (n,) for m, n in self.attention_norms.items()})
            if layer not in self.moe_layers:
                out.update({f"{p}mlp.{m}.weight": shape for m, shape in self.dense_mlp_shapes.items()})
                continue
            out[f"{p}mlp.{self.router_param}.weight"] = (self.num_experts, h)
            if self.router_bias:
                out[f"{p}mlp.{self.router_param}.bias"] = (self.num_experts,)
            out.update({f"{p}mlp.experts.{m}": s for m, s in self.expert_bias_shapes.items()})
            out.update({f"{p}mlp.{self.shared_name}.{m}.weight": s for m, s in self.shared_expert_shapes.items()})
            if self.shared_expert_gate:
                out[f"{p}mlp.shared_expert_gate.weight"] = (1, h)
        return out

    # ---- parameter counts (elements) -------------------------------------------------------------

    @property
    def expert_params(self) -> int:
        return sum(o * i for o, i in self.expert_shapes.values())

    @property
    def attention_params(self) -> int:
        """q/k/v/o weights of one layer (what gets quantized)."""
        return sum(o * i for o, i in self.attention_shapes.values())

    @property
    def attention_small_params(self) -> int:
        """One layer's attention biases and q/k norms (kept in fp16)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        small = (q + 2 * kv) * self.qkv_bias + self.hidden * self.o_bias + self.q_norm + self.k_norm
        return small + self.heads * self.attn_sinks + sum(self.attention_norms.values())

    @property
    def shared_params(self) -> int:
        """One MoE layer's shared expert weights (its gate not included)."""
        return sum(o * i for o, i in self.shared_expert_shapes.values())

    @property
    def dense_mlp_params(self) -> int:
        return sum(o * i for o, i in self.dense_mlp_shapes.values())

    @property
    def router_params(self) -> int:
        """One MoE layer's router (and its bias) plus the shared-expert gate."""
        return self.num_experts * (self.hidden + self.router_bias) + self.hidden * self.shared_expert_gate

    @property
    def expert_bias_params(self) -> int:
        """One MoE layer's expert biases (gpt-oss), stored in the trunk."""
        return sum(math.prod(s) for s in self.expert_bias_shapes.values())

    @property
    def norm_params(self) -> int:
        """One layer's two norms."""
        return 2 * self.hidden * (1 + self.norm_bias)

    @property
    def embedding_params(self) -> int:
        """Embeddings, lm_head (unless tied) and its bias, final norm."""
        lm_head = 0 if self.tie_embeddings else self.vocab * self.hidden
        return self.vocab * self.hidden + lm_head + self.vocab * self.lm_head_bias + self.hidden * (1 + self.norm_bias)

    @property
    def total_experts(self) -> int:
        return len(self.moe_layers) * self.num_experts

    @property
    def total_params(self) -> int:
        """Every parameter of the transformers model (tied embeddings counted once)."""
        per_layer = self.attention_params + self.attention_small_params + self.norm_params
        moe = self.num_experts * self.expert_params + self.router_params + self.shared_params + self.expert_bias_params
        return (
            self.num_layers * per_layer
            + len(self.moe_layers) * moe
            + len(self.dense_layers) * self.dense_mlp_params
            + self.embedding_params
        )

    @property
    def active_params(self) -> int:
        """Parameters one token touches: everything but the experts it is not routed to."""
        return self.total_params - len(self.moe_layers) * (self.num_experts - self.top_k) * self.expert_params

    def describe(self) -> str:
        shared = f", shared expert {self.shared_intermediate}" if self.shared_intermediate else ""
        dense = f", {len(self.dense_layers)} dense layers" if self.dense_layers else ""
        return (
            f"{self.model_class}: {self.num_layers} layers ({len(self.moe_layers)} MoE{dense}), "
            f"{self.num_experts} experts top-{self.top_k} of [{self.expert_intermediate} x {self.hidden}]{shared}; "
            f"{self.total_params / 1e9:.2f} B params, {self.active_params / 1e9:.2f} B active"
        )


def sparse_layers(config) -> tuple[int, ...]:
    """Qwen2/Qwen3-MoE's rule: layer i is MoE unless in ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step``."""
    dense, step = set(config.mlp_only_layers or ()), config.decoder_sparse_step
    n = config.num_hidden_layers
    return tuple(i for i in range(n) if i not in dense and config.num_experts > 0 and (i + 1) % step == 0)


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def architecture(config, **fields) -> MoEArchitecture:
    """A family's ``MoEArchitecture``: the fields every transformers MoE config spells alike, plus ``fields``
    (the family's own; every layer is MoE unless ``fields`` gives ``moe_layers``)."""
    common = dict(
        num_layers=config.num_hidden_layers,
        moe_layers=tuple(range(config.num_hidden_layers)),
        top_k=config.num_experts_per_tok,
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=head_dim_of(config),
        vocab=config.vocab_size,
        tie_embeddings=bool(config.tie_word_embeddings),
    )
    return MoEArchitecture(**{**common, **fields})
