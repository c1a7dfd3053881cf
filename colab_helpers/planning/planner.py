"""Memory plan: free VRAM and host RAM → experts per layer on the GPU, KV budget, or a refusal with reasons.

Every byte the loader allocates for weights is computed exactly from the model config and the
quantization settings (the same tables the checkpoint reader checks files against). Every cost the
weights do not determine — Python/torch, the CUDA runtime, activations, allocator slack — is a named
margin that says where its number comes from (``docs/memory_plan.md``). The plan is made before
anything is allocated, so an impossible load is refused with numbers instead of Colab killing the
kernel half-way through 18.24 GB of shards. GB here means 10^9 bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import MixtralConfig

from ..runtime.attention import T4_CAPABILITY, AttentionPath, choose_attention
from ..runtime.host_embedding import host_embedding_refusal
from ..runtime.kv_arena import lent_slot_starts
from ..runtime.oss_experts import sink_attention
from ..weights.checkpoint import QUANT_CONFIG_KEY, QuantConfig, config_from_dict
from ..weights.families import MoEArchitecture
from ..weights.model_spec import ModelSpec
from ..weights.quant import DEFAULT_EXPERT_SPECS, dequantize_peak_bytes

GB = 10**9
MB = 10**6
DEFAULT_CONTEXT = 4096
STOCK_CONFIG_FILE = Path(__file__).parents[1] / "data" / "mixtral-8x7b-instruct-config.json"

# Where each margin comes from; repeated in the report and in docs/memory_plan.md.
SOURCES = {
    "exact": "exact: QuantSpec.nbytes / fp16 shapes",
    "python_rss": "measured: RSS after imports + skeleton (CPU build 0.53, CUDA build 0.79 GB)",
    "rss_now": "measured now: this process's RSS (psutil)",
    "cuda_host_rss": "assumed 1.0 GB; published 0.1-1.7 GB (pytorch#113326)",
    "cuda_host_later": "assumed: cuBLAS, lazily loaded kernels, Triton after mem_get_info",
    "cuda_growth": "published: CUDA context 0.3-0.43 GB (pytorch#107667, #109888)",
    "slack": "assumed: 20% of transient tensors (caching allocator)",
    "hidden": "counted: Mixtral decoder layer at prefill",
    "dequant": "measured: memtrack peak of QuantizedWeight.dequantize",
    "attention": "counted: attention.AttentionPath.scratch_bytes",
    "reserve": "policy: VRAM never planned (>= 0.5 GB; docs/memory_plan.md)",
    "pow2": "torch CachingHostAllocator: PowerOf2Ceil",
    "embedding": "exact: vocab x hidden fp16, page-locked (cudaHostRegister, no rounding)",
}


class MemoryPlanError(MemoryError):
    """The model does not fit this machine; the message holds the plan table and what would fit."""


@dataclass(frozen=True)
class Margins:
    """Costs the weights do not determine. Each default is measured or published; see ``SOURCES``."""

    python_rss: int = 850 * MB  # what-if plans: measured 0.53 GB (CPU torch), 0.79 GB (CUDA torch), rounded up
    cuda_host_rss: int = 1000 * MB  # what-if plans: host memory of the CUDA context, cuBLAS and loaded kernels
    cuda_host_later: int = 500 * MB  # measured plans: CUDA host memory that arrives after mem_get_info
    cuda_growth: int = 300 * MB  # device memory the runtime takes after mem_get_info (lazy kernel loading)
    vram_reserve: int = 500 * MB  # VRAM the plan leaves unused on purpose: what the estimates may have missed
    allocator_slack: float = 0.20  # share of transient tensors lost to fragmentation
    hidden_copies: int = 8  # live [T, H] tensors in one decoder layer at prefill (RMSNorm upcasts to fp32)
    pinned_pow2: bool = False  # True if pinning fell back to pin_memory=True (rounds up to a power of two)


@dataclass(frozen=True)
class ModelSizes:
    """Exact byte counts of one model under one quantization."""

    num_layers: int
    num_experts: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    attention_bits: int
    expert_bits: int
    expert_bytes: int  # one expert's tensors as stored (66,404,364 B for the real 2-bit model)
    slot_bytes: int  # one expert's flat buffer in the cache (tensors 64-byte aligned)
    attention_layer_bytes: int
    trunk_bytes: int
    largest_matrix: int  # elements of the biggest quantized matrix (dequantization scratch)
    attention_params: int  # weights of one layer's q/k/v/o projections
    expert_params: int  # weights of one expert's w1/w2/w3
    dequant_peak_fp16: int  # QuantizedWeight.dequantize of the largest matrix at its peak, result included
    dequant_peak_fp32: int
    family: str = "Mixtral"
    moe_layers: int = 0  # layers with routed experts (0: all); the rest have a dense MLP in the trunk
    top_k: int = 2
    resident_mlp_bytes: int = 0  # quantized shared experts and dense-layer MLPs, all layers (in the trunk)
    resident_mlp_params: int = 0  # their weights' elements: what a CPU run's dense_on_cpu copies dequantize
    embed_bytes: int = 0  # fp16 embeddings (the first device's share of the trunk when layers are split)
    head_bytes: int = 0  # fp16 lm_head (unless tied and not stored), its bias and the final norm (the last device's)
    embedding_refusal: str | None = None  # why the table must stay on the GPU (a tied lm_head), None if it may move
    kv_lending_refusal: str | None = None  # why the KV cache cannot lend expert slots (MLA, sliding windows)

    @classmethod
    def of(cls, config: MixtralConfig | MoEArchitecture | ModelSpec, quant: QuantConfig | None = None) -> ModelSizes:
        """Sizes of any supported family: a ``ModelSpec``, or a transformers config or ``MoEArchitecture``
        with ``quant``.

        The stored bytes (an expert, its cache slot, the trunk, attention, shared experts and dense
        layers' MLPs) are the model description's (``model_spec.ModelSpec``); the experts' scale group is
        the one the writer would use (64 for gpt-oss-20b at 3/4 bits).
        """
        if isinstance(config, ModelSpec):
            config, quant = config.arch, config.quant
        a = ModelSpec.of(config).arch
        spec = ModelSpec.of(a, quant.fitted(a))
        quant = spec.quant
        attn_shapes = a.attention_shapes.values()
        mlp_shapes = [*a.shared_expert_shapes.values()] + ([*a.dense_mlp_shapes.values()] if a.dense_layers else [])
        stored_lm_head = not a.tie_embeddings or a.family == "mixtral"  # Mixtral's trunk stores it even when tied
        head = a.vocab * a.hidden * stored_lm_head + a.vocab * a.lm_head_bias + a.hidden * (1 + a.norm_bias)
        mats = [a.expert_intermediate * a.hidden, *(o * i for o, i in (*attn_shapes, *mlp_shapes))]
        weights = [(quant.experts, shape) for shape in a.expert_shapes.values()]
        weights += [(quant.attention, shape) for shape in (*attn_shapes, *mlp_shapes)]
        return cls(
            num_layers=a.num_layers,
            num_experts=a.num_experts,
            hidden=a.hidden,
            intermediate=max(a.expert_intermediate, a.shared_intermediate, a.dense_intermediate),
            vocab=a.vocab,
            heads=a.heads,
            # MLA (DeepSeek-V2): transformers caches one latent of kv_lora + rope per token and layer, as 1 x half
            kv_heads=1 if a.mla else a.kv_heads,
            head_dim=(a.mla[1] + a.mla[2] + 1) // 2 if a.mla else a.head_dim,
            attention_bits=quant.attention.nbits,
            expert_bits=quant.experts.nbits,
            expert_bytes=spec.expert_bytes,
            slot_bytes=spec.expert_slot_bytes,  # ExpertLayout's flat buffer
            attention_layer_bytes=spec.attention_layer_bytes,
            trunk_bytes=spec.trunk_bytes,
            largest_matrix=max(mats),
            attention_params=a.attention_params,
            expert_params=a.expert_params,
            dequant_peak_fp16=max(dequantize_peak_bytes(q, shape, 2) for q, shape in weights),
            dequant_peak_fp32=max(dequantize_peak_bytes(q, shape, 4) for q, shape in weights),
            family=a.name,
            moe_layers=len(a.moe_layers),
            top_k=a.top_k,
            resident_mlp_bytes=spec.resident_mlp_bytes,
            resident_mlp_params=len(a.moe_layers) * a.shared_params + len(a.dense_layers) * a.dense_mlp_params,
            embed_bytes=2 * a.vocab * a.hidden,
            head_bytes=2 * head,
            embedding_refusal=host_embedding_refusal(a),
            kv_lending_refusal=a.kv_lending_refusal,
        )

    @property
    def expert_layers(self) -> int:
        """Layers whose experts the cache holds (``moe_layers``; every layer when 0)."""
        return self.moe_layers or self.num_layers

    @property
    def total_experts(self) -> int:
        return self.expert_layers * self.num_experts

    @property
    def dense_trunk_bytes(self) -> int:
        """fp16 embeddings, lm_head, norms and routers: the part of the trunk a CPU run upcasts."""
        return self.trunk_bytes - self.num_layers * self.attention_layer_bytes - self.resident_mlp_bytes

    def dequant_peak(self, itemsize: int) -> int:
        return self.dequant_peak_fp16 if itemsize <= 2 else self.dequant_peak_fp32

    def kv_bytes_per_token(self, itemsize: int = 2) -> int:
        """K and V of every layer for one token: 2 * layers * kv_heads * head_dim * itemsize."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * itemsize


def _tensor_bytes(specs: dict[str, tuple[torch.dtype, tuple]]) -> int:
    total = 0
    for dtype, shape in specs.values():
        n = 1
        for s in shape:
            n *= s
        total += n * torch.empty((), dtype=dtype).element_size()
    return total


@dataclass(frozen=True)
class Budget:
    """What this process may use: free VRAM as ``mem_get_info`` reports it, and host RAM."""

    vram: int | None  # bytes; None when planning for a CPU run
    ram: int  # bytes available to this process (measured: available + our own RSS)
    rss_now: int = 0  # this process's RSS when measured (already inside ``ram``)
    measured: bool = False

    @classmethod
    def given(cls, vram_gb: float | None, ram_gb: float) -> Budget:
        return cls(None if vram_gb is None else int(vram_gb * GB), int(ram_gb * GB))

    def describe(self) -> str:
        how = "measured now" if self.measured else "given"
        vram = "no GPU" if self.vram is None else f"VRAM {self.vram / GB:.2f} GB free"
        return f"{vram}, host RAM {self.ram / GB:.2f} GB available ({how})"


def measure_budget(device: str | torch.device = "auto") -> Budget:
    """Free VRAM (creates the CUDA context first, so it is already excluded) and available host RAM."""
    import psutil

    dev = _device(device)
    vram = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None
    rss = psutil.Process().memory_info().rss
    return Budget(vram, _available_ram() + rss, rss_now=rss, measured=True)


def _available_ram() -> int:
    """psutil's available memory, capped by a cgroup (container) limit when one is set."""
    import psutil

    avail = psutil.virtual_memory().available
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            return min(avail, max(0, limit - usage))
    return avail


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def _device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the table: what takes memory, how much on each side, and where the number comes from."""

    item: str
    vram: int
    ram: int
    source: str
    load_only: bool = False  # host memory held only while loading


@dataclass(frozen=True)
class MemoryPlan:
    """Experts per layer on the device, what every byte is for, and whether it all fits."""

    device: str
    context: int
    sizes: ModelSizes
    budget: Budget
    per_layer: tuple[int, ...]
    spare_slots: int
    rows: tuple[Row, ...]
    margins: Margins = field(default_factory=Margins)
    reasons: tuple[str, ...] = ()
    suggestions: tuple[str, ...] = ()
    chosen: bool = True  # False when the caller fixed experts_on_device and the plan only checks it
    dense_on_cpu: bool = True  # a CPU run keeps fp32 copies of resident weights (OffloadConfig.dense_on_cpu)
    attention: AttentionPath = field(default_factory=choose_attention)  # whose prefill scratch is counted
    embedding_on_host: bool = False  # the fp16 embedding table in host RAM, rows sent per token (host_embedding.py)
    embedding_note: str = ""  # why the table stays on the GPU when it could not move

    @property
    def fits(self) -> bool:
        return not self.reasons

    @property
    def experts_on_device(self) -> int | tuple[int, ...]:
        """What ``load_model(experts_on_device=...)`` takes: one int when every layer gets the same."""
        return self.per_layer[0] if len(set(self.per_layer)) == 1 else self.per_layer

    @property
    def device_experts(self) -> int:
        return sum(self.per_layer)

    @property
    def host_experts(self) -> int:
        return self.sizes.total_experts - self.device_experts

    @property
    def slots(self) -> int:
        return self.device_experts + self.spare_slots

    @property
    def pinned_host_bytes(self) -> int:
        return self.host_experts * self.sizes.slot_bytes if self.device == "cuda" else 0

    @property
    def pinned_alloc_bytes(self) -> int:
        return _pinned_alloc(self.pinned_host_bytes, self.margins.pinned_pow2)

    @property
    def kv_budget_bytes(self) -> int:
        return self.sizes.kv_bytes_per_token(2 if self.device == "cuda" else 4) * self.context

    @property
    def kv_lent_slot_starts(self) -> list[int]:
        """Where the KV cache's lendable expert slots are needed back (``kv_arena.lent_slot_starts``): while the
        conversation is at most ``starts[j]`` tokens, slot ``j`` holds one more expert. Counted in the KV row,
        so no byte is planned twice (on a CPU their fp32 dense copies are a row); empty where nothing is lent
        (nothing in host RAM, MLA, sliding windows)."""
        return _lent_starts(self.sizes, self.context, 2 if self.device == "cuda" else 4, self.host_experts)

    @property
    def vram_peak(self) -> int:
        """Everything planned on the GPU, the reserve included."""
        return sum(r.vram for r in self.rows)

    @property
    def vram_reserve(self) -> int:
        return self.margins.vram_reserve if self.device == "cuda" else 0

    @property
    def vram_unplanned(self) -> int:
        """Free VRAM minus every planned use: the reserve plus what whole slots leave over."""
        return (self.budget.vram or 0) - self.vram_peak + self.vram_reserve if self.device == "cuda" else 0

    @property
    def prefill_tokens(self) -> int:
        """Tokens in the largest prefill forward (a chunk on a GPU)."""
        return min(self.context, self.attention.prefill_chunk or self.context)

    @property
    def process_rss(self) -> int:
        """The process's own RAM the plan counts: measured now, or the what-if margin."""
        return sum(r.ram for r in self.rows if r.item.startswith("Python"))

    @property
    def ram_peak(self) -> int:
        return sum(r.ram for r in self.rows)

    @property
    def ram_steady(self) -> int:
        return sum(r.ram for r in self.rows if not r.load_only)

    def report(self) -> str:
        return "\n".join(_report_lines(self))

    def to_dict(self) -> dict:
        """The JSON the CLI prints (numbers in GB = 10^9 B)."""
        k = self.experts_on_device
        return {
            "fits": self.fits,
            "device": self.device,
            "experts_on_device": k if isinstance(k, int) else list(k),
            "spare_slots": self.spare_slots,
            "host_experts": self.host_experts,
            "pinned_host_gb": round(self.pinned_host_bytes / GB, 3),
            "pinned_alloc_gb": round(self.pinned_alloc_bytes / GB, 3),
            "context": self.context,
            "kv_budget_gb": round(self.kv_budget_bytes / GB, 3),
            "kv_lent_slot_starts": self.kv_lent_slot_starts,
            "expert_bits": self.sizes.expert_bits,
            "vram_peak_gb": round(self.vram_peak / GB, 3),
            "ram_peak_gb": round(self.ram_peak / GB, 3),
            "ram_steady_gb": round(self.ram_steady / GB, 3),
            "vram_budget_gb": None if self.budget.vram is None else round(self.budget.vram / GB, 3),
            "ram_budget_gb": round(self.budget.ram / GB, 3),
            "vram_reserve_gb": round(self.vram_reserve / GB, 3),
            "vram_unplanned_gb": round(self.vram_unplanned / GB, 3),
            "process_rss_gb": round(self.process_rss / GB, 3),
            "attention": {
                "implementation": self.attention.implementation,
                "kernel": self.attention.kernel,
                "capability": None if self.attention.capability is None else list(self.attention.capability),
                "prefill_chunk": self.attention.prefill_chunk,
            },
            "prefill_tokens": self.prefill_tokens,
            "embedding_on_host": self.embedding_on_host,
            "embedding_note": self.embedding_note,
            "rows": [
                {"item": r.item, "vram_gb": round(r.vram / GB, 4), "ram_gb": round(r.ram / GB, 4), "source": r.source}
                for r in self.rows
            ],
            "reasons": list(self.reasons),
            "suggestions": list(self.suggestions),
        }


def _pinned_alloc(nbytes: int, pow2: bool) -> int:
    """Bytes torch's pinned-host allocator really takes for one ``pin_memory=True`` tensor."""
    if nbytes <= 0 or not pow2:
        return max(nbytes, 0)
    return 1 << (nbytes - 1).bit_length()


# ---- rows ----------------------------------------------------------------------------------------


def _transient_rows(
    s: ModelSizes, context: int, itemsize: int, m: Margins, attention: AttentionPath
) -> list[tuple[str, int, str]]:
    """Activations of the largest prefill forward (one chunk of ``attention.prefill_chunk`` tokens, or
    the whole ``context``) against a ``context``-token KV cache, in the compute dtype, plus allocator slack."""
    t, dt = min(context, attention.prefill_chunk or context), f"fp{8 * itemsize}"
    scratch = attention.scratch_bytes(context, s.heads, s.kv_heads, s.head_dim, itemsize)
    items = [
        (
            f"hidden states: {m.hidden_copies} x [{t}, {s.hidden}] {dt}",
            m.hidden_copies * t * s.hidden * itemsize,
            SOURCES["hidden"] if s.family == "Mixtral" else "assumed: as counted on Mixtral's decoder layer",
        ),
        (
            f"expert intermediates: 3 x [{t}, {s.intermediate}] {dt}",
            3 * t * s.intermediate * itemsize,
            "counted: w2(silu(w1 x) * w3 x)",
        ),
        (f"logits [{t}, {s.vocab}] {dt}", t * s.vocab * itemsize, "counted: full-chunk logits"),
        (f"attention scratch ({attention.kernel}) [{t} x {context}]", scratch, SOURCES["attention"]),
        (f"dequantized weight + scratch (largest matrix) {dt}", s.dequant_peak(itemsize), SOURCES["dequant"]),
    ]
    slack = int(m.allocator_slack * sum(b for _, b, _ in items))
    return [*items, (f"allocator slack {m.allocator_slack:.0%} of the above", slack, SOURCES["slack"])]


def _kv_row(s: ModelSizes, context: int, itemsize: int) -> tuple[str, int, str]:
    per_token = s.kv_bytes_per_token(itemsize)
    grow = per_token * context // s.num_layers  # one layer's K/V copied while DynamicCache grows
    return (
        f"KV cache fp{8 * itemsize}: {context} tokens x {per_token:,} B (+1 layer copy)",
        per_token * context + grow,
        "exact: 2*layers*kv_heads*head_dim*bytes",
    )


def _trunk_label(s: ModelSizes) -> str:
    mlps = " and shared/dense MLPs" if s.resident_mlp_bytes else ""  # Mixtral's label unchanged
    return f"trunk: {s.attention_bits}-bit attention{mlps} + fp16 embed/lm_head/norms/router"


def _cuda_fixed_rows(
    s: ModelSizes, context: int, m: Margins, attention: AttentionPath, embedding_on_host: bool = False
) -> list[Row]:
    """Everything on the GPU except the expert slots (whose number the plan chooses)."""
    if embedding_on_host:  # the table's bytes move to a RAM row (_cuda_rows)
        label = _trunk_label(s).replace("fp16 embed/lm_head", "fp16 lm_head")
        rows = [Row(label, s.trunk_bytes - s.embed_bytes, 0, SOURCES["exact"])]
    else:
        rows = [Row(_trunk_label(s), s.trunk_bytes, 0, SOURCES["exact"])]
    name, kv, src = _kv_row(s, context, 2)
    rows.append(Row(name, kv, 0, src))
    rows += [Row(f"prefill {name}", b, 0, src) for name, b, src in _transient_rows(s, context, 2, m, attention)]
    rows.append(Row("CUDA runtime growth after planning", m.cuda_growth, 0, SOURCES["cuda_growth"]))
    rows.append(Row("reserve: VRAM left unplanned on purpose", m.vram_reserve, 0, SOURCES["reserve"]))
    return rows


def _process_rows(device: str, budget: Budget, m: Margins) -> list[Row]:
    """The process's own RAM: its RSS measured now when the budget was measured, else the what-if margins."""
    if budget.rss_now > 0:
        rows = [Row("Python process now (imports, CUDA context, all alive)", 0, budget.rss_now, SOURCES["rss_now"])]
        if device == "cuda":
            rows.append(Row("CUDA host memory loaded after planning", 0, m.cuda_host_later, SOURCES["cuda_host_later"]))
        return rows
    rows = [Row("Python + torch + transformers + colab_helpers", 0, m.python_rss, SOURCES["python_rss"])]
    if device == "cuda":
        rows.append(Row("CUDA runtime host memory", 0, m.cuda_host_rss, SOURCES["cuda_host_rss"]))
    return rows


def _cuda_rows(
    s: ModelSizes,
    context: int,
    slots: int,
    host: int,
    budget: Budget,
    m: Margins,
    attention: AttentionPath,
    embedding_on_host: bool = False,
) -> list[Row]:
    pinned = host * s.slot_bytes
    alloc = _pinned_alloc(pinned, m.pinned_pow2)
    rows = _cuda_fixed_rows(s, context, m, attention, embedding_on_host)
    rows.insert(
        1, Row(f"expert slots: {slots} x {s.slot_bytes / MB:.2f} MB", slots * s.slot_bytes, 0, SOURCES["exact"])
    )
    rows += _process_rows("cuda", budget, m)
    rows.append(Row(f"pinned host experts: {host} x {s.slot_bytes / MB:.2f} MB", 0, pinned, SOURCES["exact"]))
    if alloc > pinned:
        rows.append(Row("pinned rounding up to a power of two", 0, alloc - pinned, SOURCES["pow2"]))
    if embedding_on_host:
        shape = f"{s.vocab} x {s.hidden}"
        rows.append(Row(f"embedding table in pinned host RAM: {shape} fp16", 0, s.embed_bytes, SOURCES["embedding"]))
    rows += _load_rows(s)
    return rows


def _load_rows(s: ModelSizes) -> list[Row]:
    """Shard pages held while loading, next to the already pinned host store.

    ``assemble_model`` copies the trunk to the GPU first (its mapped pages become resident as they are
    read) and drops it before the expert store is allocated and the experts stream in, one file plus one
    staging copy at a time: the larger of the two phases counts (docs/memory_plan.md has the order).
    """
    trunk, expert = s.trunk_bytes, 2 * s.expert_bytes
    item = "trunk shard pages" if trunk >= expert else "expert shard + staging copy"
    return [Row(item, 0, max(trunk, expert), "loader: larger of trunk / expert+staging phase", True)]


def _cpu_rows(
    s: ModelSizes,
    context: int,
    slots: int,
    host: int,
    budget: Budget,
    m: Margins,
    attention: AttentionPath,
    dense: bool = True,
) -> list[Row]:
    """A CPU run keeps device slots and host experts in RAM and computes in float32.

    With ``dense`` (``OffloadConfig.dense_on_cpu``) it also keeps an fp32 copy of every ``QuantLinear``
    weight (attention; shared experts and dense-layer MLPs where a family has them) and of every expert in
    a slot, made on first use: far more than the packed bytes (``tests/test_planner_families.py`` compares
    these rows with what a loaded tiny model of each family holds).
    """
    rows = _process_rows("cpu", budget, m)
    rows.append(
        Row(
            f"expert buffers in RAM: ({slots} slots + {host} host) x {s.slot_bytes / MB:.2f} MB",
            0,
            (slots + host) * s.slot_bytes,
            SOURCES["exact"],
        )
    )
    rows.append(Row("trunk shard mapped (attention read in place)", 0, s.trunk_bytes, "loader: safetensors mmap"))
    rows.append(Row("fp32 copies of embed/lm_head/norms/router", 0, 2 * s.dense_trunk_bytes, SOURCES["exact"]))
    name, kv, src = _kv_row(s, context, 4)
    rows.append(Row(name, 0, kv, src))
    rows += [Row(f"prefill {n}", 0, b, src) for n, b, src in _transient_rows(s, context, 4, m, attention)]
    rows.append(Row("expert shard during load", 0, s.expert_bytes, "loader: one file at a time", True))
    if dense:
        src = "exact: OffloadConfig.dense_on_cpu copies"
        rows.append(Row("fp32 attention weights (dense_on_cpu)", 0, 4 * s.num_layers * s.attention_params, src))
        if s.resident_mlp_params:  # Qwen-MoE style shared experts and dense layers (none in Mixtral)
            rows.append(Row("fp32 shared-expert/dense-layer MLPs (dense_on_cpu)", 0, 4 * s.resident_mlp_params, src))
        lent = len(_lent_starts(s, context, 4, host))  # the KV cache lends slots on a CPU too (same code path)
        what = f"{slots} slots" + (f" + {lent} lent by the KV cache" if lent else "")
        rows.append(Row(f"fp32 experts in {what} (dense_on_cpu)", 0, 4 * (slots + lent) * s.expert_params, src))
    return rows


def _lent_starts(s: ModelSizes, context: int, itemsize: int, host_experts: int) -> list[int]:
    """``kv_arena.lent_slot_starts`` for this model's KV budget ([] when nothing is lent: no host expert, or
    MLA / sliding windows)."""
    if not host_experts or s.kv_lending_refusal:
        return []
    return lent_slot_starts(context, s.kv_bytes_per_token(itemsize), s.slot_bytes)


# ---- choosing experts per layer ------------------------------------------------------------------


def _spread(placed: int, num_layers: int, num_experts: int) -> tuple[int, ...]:
    """``placed`` experts over the layers: the same k everywhere, one more in the first layers.

    Layer 0 goes first because no earlier router guesses its experts, so prefetch never helps it.
    """
    k, extra = divmod(placed, num_layers)
    return tuple(min(num_experts, max(1, k + (i < extra))) for i in range(num_layers))


def _choose_cuda(
    s: ModelSizes,
    context: int,
    budget: Budget,
    spare: int,
    m: Margins,
    attention: AttentionPath,
    embedding_on_host: bool = False,
) -> tuple[tuple[int, ...], int]:
    """As many experts on the GPU as the free VRAM holds after everything else, the margins and the reserve."""
    fixed = sum(r.vram for r in _cuda_fixed_rows(s, context, m, attention, embedding_on_host))
    n_slots = max(0, (budget.vram or 0) - fixed) // s.slot_bytes
    if n_slots >= s.total_experts:
        return (s.num_experts,) * s.expert_layers, 0
    return _spread(max(0, n_slots - spare), s.expert_layers, s.num_experts), spare


def _normalize(k: int | Sequence[int], s: ModelSizes) -> tuple[int, ...]:
    ks = (k,) * s.expert_layers if isinstance(k, int) else tuple(int(x) for x in k)
    if len(ks) != s.expert_layers or any(not 1 <= x <= s.num_experts for x in ks):
        raise ValueError(
            f"experts_on_device must be 1..{s.num_experts} per layer ({s.expert_layers} MoE layers), got {ks}"
        )
    return ks


def plan_memory(
    config: MixtralConfig,
    quant: QuantConfig,
    budget: Budget,
    device: str | torch.device = "cuda",
    context: int = DEFAULT_CONTEXT,
    experts_on_device: int | Sequence[int] | None = None,
    spare_slots: int = 2,
    margins: Margins | None = None,
    suggest: bool = True,
    dense_on_cpu: bool = True,
    attention: AttentionPath | None = None,
    embedding_on_host: bool | None = None,
) -> MemoryPlan:
    """Choose (or, when ``experts_on_device`` is given, check) where experts live; pure arithmetic.

    ``attention`` is the path whose prefill scratch is counted; default for a GPU: this GPU's when the
    budget was measured here, else a T4's (compute capability 7.5). ``embedding_on_host``: keep the fp16
    embedding table in pinned host RAM and give its VRAM to expert slots (``host_embedding.py``); None (default)
    decides: on a GPU, in host RAM when the plan then fits (RAM counts the table instead of VRAM), else on the GPU
    with ``embedding_note`` saying why; a tied ``lm_head`` keeps it on the GPU. A CPU run has no choice to make.
    """
    args = (config, quant, budget, device, context, experts_on_device, spare_slots, margins, suggest, dense_on_cpu)
    dev = _device(device).type
    refusal = ModelSizes.of(config, quant).embedding_refusal
    if embedding_on_host and dev == "cuda" and refusal:
        raise ValueError(f"embedding_on_host=True: {refusal}")
    if embedding_on_host is not None or dev != "cuda":
        return _plan(*args, attention, bool(embedding_on_host) and dev == "cuda")
    if refusal:
        return replace(_plan(*args, attention, False), embedding_note=refusal)
    on_host = _plan(*args[:8], False, *args[9:], attention, True)
    if on_host.fits:
        return on_host
    on_gpu = _plan(*args, attention, False)
    if on_gpu.fits:  # less VRAM is planned on host, so only RAM can have refused the table
        table = on_gpu.sizes.embed_bytes / GB
        why = f"host RAM cannot also hold the {table:.3f} GB embedding table: it stays on the GPU"
        return replace(on_gpu, embedding_note=why)
    return on_gpu


def _plan(
    config: MixtralConfig,
    quant: QuantConfig,
    budget: Budget,
    device: str | torch.device,
    context: int,
    experts_on_device: int | Sequence[int] | None,
    spare_slots: int,
    margins: Margins | None,
    suggest: bool,
    dense_on_cpu: bool,
    attention: AttentionPath | None,
    embedding_on_host: bool,
) -> MemoryPlan:
    """``plan_memory`` with the embedding table's place decided."""
    m = margins or Margins()
    s = ModelSizes.of(config, quant)
    dev = _device(device).type
    attention = attention or _default_attention(dev, budget)
    if ModelSpec.of(config).arch.attn_sinks:
        attention = sink_attention(attention)  # gpt-oss runs eager attention: its scores counted like math's
    if context < 1:
        raise ValueError(f"context must be at least 1 token, got {context}")
    if dev == "cuda" and budget.vram is None:
        raise ValueError("planning for a GPU needs its free VRAM (give vram_gb, or measure on the GPU machine)")
    if experts_on_device is not None:
        ks = _normalize(experts_on_device, s)
    elif dev == "cuda":
        ks, spare_slots = _choose_cuda(s, context, budget, spare_slots, m, attention, embedding_on_host)
    else:
        ks = _normalize(2, s)  # a CPU run: a small cache so offloading is exercised (memory is the same)
    host = s.total_experts - sum(ks)
    spare = spare_slots if host else 0
    slots = sum(ks) + spare
    if dev == "cuda":
        rows = tuple(_cuda_rows(s, context, slots, host, budget, m, attention, embedding_on_host))
    else:
        rows = tuple(_cpu_rows(s, context, slots, host, budget, m, attention, dense_on_cpu))
    plan = MemoryPlan(
        dev,
        context,
        s,
        budget,
        ks,
        spare,
        rows,
        m,
        chosen=experts_on_device is None,
        dense_on_cpu=dense_on_cpu,
        attention=attention,
        embedding_on_host=embedding_on_host,
    )
    reasons = _reasons(plan)
    if not reasons:
        return plan
    plan = replace(plan, reasons=reasons)
    if suggest:
        plan = replace(plan, suggestions=_suggestions(plan, config, quant, spare_slots))
    return plan


def _default_attention(device: str, budget: Budget) -> AttentionPath:
    if device != "cuda":
        return choose_attention("cpu")
    if budget.measured and torch.cuda.is_available():
        return choose_attention("cuda")
    return choose_attention("cuda", capability=T4_CAPABILITY)


def _reasons(plan: MemoryPlan) -> tuple[str, ...]:
    b, out = plan.budget, []
    if plan.device == "cuda" and plan.vram_peak > (b.vram or 0):
        what = "even 1 expert per layer" if max(plan.per_layer) == 1 else f"{plan.device_experts} experts on the GPU"
        out.append(
            f"VRAM: {what} + {plan.spare_slots} spare slots needs {plan.vram_peak / GB:.2f} GB, "
            f"only {(b.vram or 0) / GB:.2f} GB free (short by {(plan.vram_peak - (b.vram or 0)) / GB:.2f} GB)"
        )
    if plan.ram_peak > b.ram:
        why = (
            f"; {plan.host_experts} experts must live in host RAM"
            if plan.device == "cuda"
            else "; a CPU run keeps every expert in RAM"
        )
        out.append(
            f"host RAM: the plan peaks at {plan.ram_peak / GB:.2f} GB, only {b.ram / GB:.2f} GB available "
            f"(short by {(plan.ram_peak - b.ram) / GB:.2f} GB){why}"
        )
    return tuple(out)


# ---- what would fit ------------------------------------------------------------------------------


def _suggestions(plan: MemoryPlan, config: MixtralConfig, quant: QuantConfig, spare: int) -> tuple[str, ...]:
    def again(
        cfg_quant: QuantConfig = quant,
        budget: Budget = plan.budget,
        context: int = plan.context,
        margins: Margins = plan.margins,
        dense: bool = plan.dense_on_cpu,
    ) -> MemoryPlan:
        return plan_memory(
            config, cfg_quant, budget, plan.device, context, None, spare, margins, False, dense, plan.attention
        )

    if not plan.chosen and (auto := again()).fits:
        k = auto.experts_on_device
        return (
            f"let the planner choose: experts_on_device={list(k) if isinstance(k, tuple) else k} fits "
            f"({_k_text(auto)})",
        )
    out = []
    if plan.device == "cpu" and plan.dense_on_cpu and again(dense=False).fits:
        out.append("OffloadConfig(dense_on_cpu=False) fits: no fp32 weight copies (slower, dequantizes every call)")
    out.append(_shorter_context(plan, again))
    out += _other_bits(plan, quant, again)
    if plan.device == "cuda":
        vram = _smallest(lambda v: again(budget=replace(plan.budget, vram=v)).fits, plan.budget.vram or 0)
        out.append(
            f"a bigger GPU: {vram / GB:.1f} GB free VRAM with this RAM"
            if vram
            else "no GPU size helps: this RAM cannot hold even the load of the trunk shard"
        )
    ram = _smallest(lambda r: again(budget=replace(plan.budget, ram=r)).fits, plan.budget.ram)
    if ram:
        where = "with this GPU" if plan.device == "cuda" else "for a CPU run"
        out.append(f"more host RAM: {ram / GB:.1f} GB available {where}")
    if (
        plan.device == "cuda"
        and plan.margins.pinned_pow2
        and again(margins=replace(plan.margins, pinned_pow2=False)).fits
    ):
        out.append("pinning host experts without torch's power-of-two rounding (cudaHostRegister or pow2 chunks) fits")
    return tuple(x for x in out if x)


def _shorter_context(plan: MemoryPlan, again: Callable[..., MemoryPlan]) -> str:
    c = plan.context // 2
    while c >= 256:
        p = again(context=c)
        if p.fits:
            return f"a shorter context: --context {c} fits ({_k_text(p)})"
        c //= 2
    return "a shorter context alone does not help (256 tokens do not fit either)"


def _other_bits(plan: MemoryPlan, quant: QuantConfig, again: Callable[..., MemoryPlan]) -> list[str]:
    out = []
    for bits, spec in sorted(DEFAULT_EXPERT_SPECS.items()):
        if bits == plan.sizes.expert_bits:
            continue
        p = again(cfg_quant=replace(quant, experts=spec))
        if p.fits:
            out.append(f"{bits}-bit experts ({p.sizes.expert_bytes / MB:.1f} MB each) fit ({_k_text(p)})")
        elif bits > plan.sizes.expert_bits:
            out.append(
                f"{bits}-bit experts are larger ({p.sizes.expert_bytes / MB:.1f} MB vs "
                f"{plan.sizes.expert_bytes / MB:.1f} MB each): they fit even less"
            )
    return out


def _smallest(fits: Callable[[int], bool], start: int, cap: int = 2000 * GB) -> int | None:
    """The smallest byte count (to 10 MB) at which ``fits`` holds, searching above ``start``; None if none."""
    if not fits(cap):
        return None
    lo, hi = start, cap
    while hi - lo > 10 * MB:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _k_text(plan: MemoryPlan) -> str:
    ks = plan.per_layer
    lo, hi = min(ks), max(ks)
    if lo == hi:
        return f"{lo} experts per layer on the {plan.device}"
    return f"{lo}-{hi} experts per layer on the {plan.device}"


# ---- report --------------------------------------------------------------------------------------


def _gb(n: int, show: bool = True) -> str:
    return f"{n / GB:8.3f}" if show and n else f"{'-':>8}"


def _report_lines(plan: MemoryPlan) -> list[str]:
    s, b = plan.sizes, plan.budget
    lines = [
        f"memory plan: {s.family} {s.num_layers} layers{_moe_text(s)} x {s.num_experts} experts on {plan.device}, "
        f"context {plan.context} tokens (GB = 10^9 B)",
        f"  {plan.attention.describe()}",
        f"  one {s.expert_bits}-bit expert {s.expert_bytes:,} B (cache slot {s.slot_bytes:,} B); "
        f"{s.attention_bits}-bit attention {s.attention_layer_bytes:,} B/layer; trunk {s.trunk_bytes:,} B",
        f"  budget: {b.describe()}",
        "",
        f"  {'component':<62}{'VRAM GB':>8} {'RAM GB':>8}  source",
    ]
    for r in plan.rows:
        item = r.item + (" (load only)" if r.load_only else "")
        lines.append(f"  {item:<62}{_gb(r.vram)} {_gb(r.ram)}  {r.source}")
    cuda = plan.device == "cuda"
    lines.append(f"  {'peak':<62}{_gb(plan.vram_peak, cuda)} {_gb(plan.ram_peak)}")
    lines.append(f"  {'available':<62}{_gb(b.vram or 0, cuda)} {_gb(b.ram)}")
    lines.append(
        f"  {'headroom beyond the reserve':<62}{((b.vram or 0) - plan.vram_peak) / GB:8.3f} "
        f"{(b.ram - plan.ram_peak) / GB:8.3f}"
        if cuda
        else f"  {'headroom':<62}{'-':>8} {(b.ram - plan.ram_peak) / GB:8.3f}"
    )
    if cuda:
        lines.append(f"  {'VRAM unplanned (reserve + headroom)':<62}{plan.vram_unplanned / GB:8.3f}")
    lines += ["", *_arithmetic(plan), ""]
    if plan.fits:
        lines.append(f"FITS: {_placement(plan)}")
        if cuda:
            lines.append(f"  {_embedding_text(plan)}")
        lines += [f"  better: {x}" for x in plan.suggestions]  # a wider bit width that also fits
    else:
        lines.append("DOES NOT FIT:")
        lines += [f"  - {r}" for r in plan.reasons]
        lines.append("what would fit:")
        lines += [f"  - {x}" for x in plan.suggestions]
    return lines


def _moe_text(s: ModelSizes) -> str:
    """Empty when every layer is MoE (Mixtral's report unchanged), else how many are."""
    return f" ({s.expert_layers} MoE)" if s.expert_layers != s.num_layers else ""


def _arithmetic(plan: MemoryPlan) -> list[str]:
    s, b = plan.sizes, plan.budget
    if plan.device != "cuda":
        return [
            f"arithmetic: all {s.total_experts} experts and the trunk live in RAM on a CPU run; "
            f"{plan.device_experts} of them are 'device' slots"
        ]
    fixed = sum(r.vram for r in _cuda_fixed_rows(s, plan.context, plan.margins, plan.attention, plan.embedding_on_host))
    room = (b.vram or 0) - fixed
    k, extra = divmod(plan.device_experts, s.expert_layers)
    split = f"{k} x {s.expert_layers}" + (f" + {extra} (one more in layers 0-{extra - 1})" if extra else "")
    return [
        f"arithmetic: {(b.vram or 0) / GB:.3f} GB free - {fixed / GB:.3f} GB (trunk, KV, activations, margins, "
        f"reserve) "
        f"= {room / GB:.3f} GB for expert slots",
        f"            -> {max(0, room) // s.slot_bytes} slots of {s.slot_bytes / MB:.2f} MB; "
        f"{plan.spare_slots} spare + {plan.device_experts} experts = {split}",
        f"            host: {plan.host_experts} experts x {s.slot_bytes / MB:.2f} MB = "
        f"{plan.pinned_host_bytes / GB:.3f} GB pinned (allocated {plan.pinned_alloc_bytes / GB:.3f} GB)",
    ]


def _embedding_text(plan: MemoryPlan) -> str:
    table = f"{plan.sizes.embed_bytes / GB:.3f} GB"
    if plan.embedding_on_host:
        return f"embedding table in pinned host RAM ({table}; only each token's row is copied to the GPU)"
    return f"embedding table on the GPU ({table})" + (f": {plan.embedding_note}" if plan.embedding_note else "")


def _placement(plan: MemoryPlan) -> str:
    counts = {k: plan.per_layer.count(k) for k in sorted(set(plan.per_layer), reverse=True)}
    per = ", ".join(f"{k} in {n} layers" for k, n in counts.items())
    text = (
        f"experts on the {plan.device} per layer: {per} ({plan.device_experts} of {plan.sizes.total_experts}) "
        f"+ {plan.spare_slots} spare slots; {plan.host_experts} in host RAM; KV budget {plan.context} tokens "
        f"({plan.kv_budget_bytes / GB:.3f} GB)"
    )
    starts = plan.kv_lent_slot_starts
    if starts:
        text += (
            f"\n  the KV budget's unreached tail holds {len(starts)} more experts while the conversation is short: "
            f"{len(starts)} up to {starts[-1]} tokens, then one fewer at each of {', '.join(map(str, starts[-2::-1]))}"
        )
    return text


# ---- entry points --------------------------------------------------------------------------------


def check_fits(plan: MemoryPlan) -> MemoryPlan:
    """Raise ``MemoryPlanError`` with the numbers when the plan does not fit; a loader calls this first."""
    if not plan.fits:
        err = MemoryPlanError("the model does not fit this machine:\n" + plan.report())
        err.plan = plan  # the CLI prints plan.reasons as one line
        raise err
    return plan


def stock_config() -> MixtralConfig:
    """The Mixtral-8x7B-Instruct architecture, shipped so planning works offline."""
    return config_from_dict(json.loads(STOCK_CONFIG_FILE.read_text()), STOCK_CONFIG_FILE)


def plan_for_checkpoint(
    path: str | Path,
    device: str | torch.device | None = None,
    context: int = DEFAULT_CONTEXT,
    experts_on_device: int | Sequence[int] | None = None,
    budget: Budget | None = None,
    dense_on_cpu: bool = True,
    attention: AttentionPath | None = None,
) -> MemoryPlan:
    """Plan for a checkpoint folder (config and quantization read from it) on this machine."""
    from ..weights.checkpoint import Checkpoint

    ckpt = Checkpoint.open(Path(path), verify=False)
    dev = _device(device)
    budget = budget or measure_budget(dev)
    return plan_memory(
        ckpt.config, ckpt.quant, budget, dev, context, experts_on_device, dense_on_cpu=dense_on_cpu, attention=attention
    )


def model_for_cli(model: str, expert_bits: int) -> tuple[MixtralConfig | MoEArchitecture, QuantConfig, str]:
    """``--model``: a converted checkpoint (its config and bit widths), else any family's config.json
    (``expert_bits``, 4-bit attention), and a line saying what was read; ``UsageError`` for a missing config
    or an unsupported family."""
    from ..usage import UsageError
    from ..weights.checkpoint import INDEX_FILE, Checkpoint
    from ..weights.families import UnsupportedFamilyError, architecture
    from ..weights.families.configs import ConfigNotFoundError, load_config

    if (Path(model) / INDEX_FILE).is_file():
        ckpt = Checkpoint.open(Path(model), verify=False)
        return ckpt.config, ckpt.quant, ""
    try:
        cfg, source = load_config(model)
        arch = architecture(cfg)
    except (ConfigNotFoundError, UnsupportedFamilyError) as err:
        raise UsageError(f"--model {model}: {err}") from err
    except Exception as err:  # transformers (strict dataclass validation) rejected the config's fields
        raise UsageError(f"--model {model}: config.json is not a valid {cfg.get('model_type')} config ({err})") from err
    quant = (
        QuantConfig.from_config_dict(cfg)
        if QUANT_CONFIG_KEY in cfg
        else QuantConfig.for_bits(4, expert_bits).fitted(arch)
    )
    try:
        ModelSizes.of(arch, quant)
    except ValueError as err:  # a shape the bit width's group sizes do not divide
        raise UsageError(f"--model {model}: {err}") from err
    return arch, quant, f"{model}: {arch.describe()} (config: {source})"


__all__ = [
    "Budget",
    "MemoryPlan",
    "MemoryPlanError",
    "Margins",
    "ModelSizes",
    "check_fits",
    "measure_budget",
    "model_for_cli",
    "plan_for_checkpoint",
    "plan_memory",
    "stock_config",
]
