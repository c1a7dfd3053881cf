"""``load_model``: a stock transformers 5 MoE model (any supported family) with low-bit attention and offloaded experts.

The family's own class (``MixtralForCausalLM``, ``OlmoeForCausalLM``, ``Qwen2MoeForCausalLM``,
``Qwen3MoeForCausalLM``, ``PhimoeForCausalLM``) is built on the meta device (no expert weights are ever
materialised), the trunk is loaded from its shard, the quantized trunk matrices (attention; shared-expert
and dense-layer MLPs) become ``QuantLinear``, and each MoE layer's sparse block becomes an ``OffloadedMoE``
reading from one shared ``ExpertCache`` that indexes MoE layers only (dense layers keep their MLP).
Everything else — generation, KV cache, streaming, chat templates — is stock transformers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, MixtralConfig, MixtralForCausalLM
from transformers.cache_utils import DynamicLayer

from .runtime.attention import AttentionPath, choose_attention, install_attention, register
from .runtime.experts import ExpertCache, ExpertLayout, experts_per_layer
from .runtime.host_embedding import HostEmbedding, host_embedding_refusal
from .runtime.kv_arena import KVArena
from .runtime.kv_cache import use_arena_in_generate
from .runtime.linear import QuantLinear
from .runtime.moe import OffloadedMoE, PrefetchConfig
from .runtime.oss_experts import BiasedSwigluMoE, sink_attention
from .runtime.placement import ExpertCacheGroup, LayerPlacement, place_layers, split_refusal
from .weights.checkpoint import SUFFIXES, Checkpoint, QuantConfig
from .weights.model_spec import ModelSpec
from .weights.quant import QuantizedWeight
from .weights.tokenizer import load_tokenizer  # noqa: F401  (re-exported: model.load_tokenizer)


@dataclass(frozen=True)
class OffloadConfig:
    """How a checkpoint is run: device, dtype, experts kept on the device, eviction, prefetch."""

    device: str = "cpu"
    dtype: torch.dtype | None = None  # default: float16 on CUDA, float32 on CPU
    experts_on_device: int | tuple[int, ...] | str = "auto"  # "auto": the planner's choice (load_model)
    policy: str = "lfu_decay"  # beats LRU on the real Mixtral trace (docs/cache_policies.md)
    spare_slots: int = 2
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    dense_on_cpu: bool = True  # CPU only: keep dequantized copies of resident weights (no fused CPU kernel)
    verify: bool = True  # check every shard's header before reading
    context: int = 4096  # tokens of KV cache the memory check reserves
    check_memory: bool = True  # refuse (MemoryPlanError, with the plan) when the model will not fit
    progress: bool = True
    attention: AttentionPath | None = None  # default: chosen by the device's compute capability (attention.py)
    placement: LayerPlacement | None = None  # whole layers split across devices (several GPUs); None: all on device
    embedding_on_host: bool | None = None  # table in host RAM, rows sent (host_embedding.py); None: the plan decides
    kv_lending: bool = True  # the KV cache's unreached tail holds more experts until needed (kv_arena.KVArena)

    def attention_path(self) -> AttentionPath:
        return self.attention or choose_attention(resolve_device(self.device))

    @property
    def compute_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return torch.float16 if torch.device(self.device).type == "cuda" else torch.float32


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" → CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


AUTO = "auto"  # experts_on_device chosen by the planner


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    experts_on_device: int | Sequence[int] | str = AUTO,
    config: OffloadConfig | None = None,
    **overrides,
) -> MixtralForCausalLM:
    """Load a checkpoint in the offloading layout as its family's stock transformers causal LM.

    ``path`` is a local directory (see ``colab_helpers.weights.hub.download`` for the hub). ``experts_on_device``
    is an int, one int per MoE layer, or ``"auto"`` (default): the memory planner's choice — on CUDA as
    many experts as the free VRAM holds after the trunk, KV cache and margins; on CPU 2 per layer (a
    small cache, so a CPU run exercises offloading; the memory is the same host RAM either way).
    Extra keyword arguments override ``OffloadConfig`` fields. The cache is reachable as
    ``model.expert_cache``; nothing half-loaded is returned on error.
    """
    dev = resolve_device(device)
    ks = experts_on_device if isinstance(experts_on_device, (int, str)) else tuple(experts_on_device)
    cfg = config or OffloadConfig(device=str(dev), experts_on_device=ks, **overrides)
    ckpt = Checkpoint.open(Path(path), verify=cfg.verify)
    plan = None
    several_gpus = dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1
    if cfg.placement is None and several_gpus and split_refusal(ckpt.arch) is None:
        plan, cfg = _every_gpu(ckpt, cfg)  # layers split across all visible GPUs, experts per layer planned
    elif (cfg.check_memory or _is_auto(cfg.experts_on_device)) and cfg.placement is None:
        from dataclasses import replace

        from .planning.planner import check_fits, measure_budget, plan_memory

        plan = plan_memory(
            ckpt.config,
            ckpt.quant,
            measure_budget(dev),
            dev,
            context_tokens(cfg, ckpt.config),
            experts_on_device=None if _is_auto(cfg.experts_on_device) else cfg.experts_on_device,
            spare_slots=cfg.spare_slots,
            dense_on_cpu=cfg.dense_on_cpu,
            suggest=False,
            attention=cfg.attention_path(),
            embedding_on_host=cfg.embedding_on_host,
        )
        if cfg.check_memory:
            check_fits(plan)  # refuse before allocating anything, with the numbers
        if _is_auto(cfg.experts_on_device):
            cfg = replace(cfg, experts_on_device=plan.experts_on_device)
        if cfg.embedding_on_host is None:
            cfg = replace(cfg, embedding_on_host=plan.embedding_on_host)
    model = assemble_model(ckpt.config, ckpt.quant, ckpt.load_trunk(), ckpt.iter_experts(), cfg)
    model.checkpoint_path = str(path)
    model.memory_plan = plan
    return model


def _every_gpu(ckpt: Checkpoint, cfg: OffloadConfig):
    """Plan whole layers per visible GPU (``multigpu.plan_gpus``) and the config that loads that plan."""
    from dataclasses import replace

    from .planning.multigpu import plan_gpus
    from .planning.planner import MemoryPlanError, measure_budget

    n = torch.cuda.device_count()
    vram = [torch.cuda.mem_get_info(i)[0] for i in range(n)]
    budget = measure_budget("cpu")
    plan = plan_gpus(ckpt.config, ckpt.quant, vram, budget.ram, context_tokens(cfg, ckpt.config), cfg.spare_slots)
    if cfg.check_memory and not plan.fits:
        err = MemoryPlanError("the model does not fit these GPUs:\n" + plan.report())
        err.plan = plan
        raise err
    placement = plan.placement([f"cuda:{i}" for i in range(n)])
    cfg = replace(cfg, device="cuda:0", placement=placement, experts_on_device=plan.per_layer)
    return plan, cfg


def _is_auto(k) -> bool:
    return isinstance(k, str) and k == AUTO


def resolved_experts(k, device: torch.device):
    """``experts_on_device`` as ``ExpertCache`` takes it. ``"auto"`` reaching here (``assemble_model``
    called directly, or a given placement) has no plan: 2 per layer on CPU, an error on CUDA."""
    if not isinstance(k, str):
        return k
    if k != AUTO:
        raise ValueError(f"experts_on_device must be an int, one int per MoE layer or 'auto', got {k!r}")
    if device.type == "cuda":
        raise ValueError("experts_on_device='auto' needs a memory plan (load_model); give a number here")
    return 2


def context_tokens(cfg: OffloadConfig, mcfg: MixtralConfig) -> int:
    """Tokens of prompt + answer this model is planned for: the KV budget, at most the position table."""
    return min(cfg.context, int(mcfg.max_position_embeddings))


def assemble_model(
    mcfg: MixtralConfig,
    quant: QuantConfig,
    trunk: dict[str, torch.Tensor],
    experts: Iterable[tuple[int, int, dict[str, torch.Tensor]]],
    cfg: OffloadConfig,
) -> MixtralForCausalLM:
    """Build the offloaded model from trunk tensors (transformers names) and ``(decoder layer, expert, tensors)``.

    ``mcfg`` is the family's transformers config. Used by ``load_model`` (tensors streamed from shards)
    and by benchmarks (random tensors made on the GPU, so a full-size model needs no download).
    ``trunk`` is consumed. The cache's layer ``r`` is the ``r``-th MoE layer (``OffloadedMoE.layer``).
    """
    from tqdm.auto import tqdm

    spec = ModelSpec.of(mcfg, quant)  # the one model description: shapes, quantization, expert layout
    arch = spec.arch
    if getattr(mcfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"experts with activation {mcfg.hidden_act!r} are not supported (the kernels are SiLU)")
    dev = resolve_device(cfg.device)
    k = resolved_experts(cfg.experts_on_device, dev)
    dtype = cfg.compute_dtype
    attention = cfg.attention_path()
    if arch.attn_sinks:  # gpt-oss: only transformers' eager attention adds the sinks
        attention = sink_attention(attention)
    placement = cfg.placement
    if placement is not None and placement.num_layers != arch.num_layers:
        raise ValueError(f"placement covers {placement.num_layers} layers, the model has {arch.num_layers}")
    if placement is not None and (why := split_refusal(arch)):
        raise ValueError(why)
    if cfg.embedding_on_host and (why := host_embedding_refusal(arch)):
        raise ValueError(f"embedding_on_host=True: {why}")

    def device_of(layer: int) -> torch.device:
        return dev if placement is None else placement.device(layer)

    register()  # the skeleton may be built with the no-GQA implementation
    mcfg._attn_implementation = attention.implementation
    with torch.device("meta"):
        model = getattr(transformers, arch.model_class)(mcfg)
    model.eval().requires_grad_(False)

    for name, shape in spec.quantized_trunk_shapes.items():  # attention; shared-expert and dense-layer MLPs
        at = device_of(int(name.split(".")[2]))
        tensors = {s: trunk.pop(f"{name}.{s}").to(at) for s in SUFFIXES}
        qw = QuantizedWeight.from_tensors(quant.attention, shape, tensors)
        bias = trunk.pop(name + ".bias").to(at, dtype) if f"{name}.bias" in trunk else None
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, QuantLinear(qw, dense_on_cpu=cfg.dense_on_cpu, bias=bias))
    blocks = []
    for rank, i in enumerate(arch.moe_layers):
        layer = model.model.layers[i]
        sparse = layer.mlp  # the family's own block (on meta): its router and shared expert are kept
        gate = getattr(sparse, arch.router_param)
        weight = trunk.pop(f"model.layers.{i}.mlp.{arch.router_param}.weight").to(device_of(i), dtype)
        gate.weight = torch.nn.Parameter(weight, requires_grad=False)
        if arch.router_bias:
            bias = trunk.pop(f"model.layers.{i}.mlp.{arch.router_param}.bias").to(device_of(i), dtype)
            gate.bias = torch.nn.Parameter(bias, requires_grad=False)
        shared = getattr(sparse, arch.shared_name, None) if arch.shared_intermediate else None
        shared_gate = getattr(sparse, "shared_expert_gate", None) if arch.shared_expert_gate else None
        if arch.expert_bias:  # gpt-oss: biased experts, clamped SwiGLU (oss_experts.py)
            b = {
                m: trunk.pop(f"model.layers.{i}.mlp.experts.{m}").to(device_of(i), dtype)
                for m in arch.expert_bias_shapes
            }
            alpha, limit = sparse.experts.alpha, sparse.experts.limit
            block = BiasedSwigluMoE(gate, rank, cfg.prefetch, b["gate_up_proj_bias"], b["down_proj_bias"], alpha, limit)
        else:
            block = OffloadedMoE(gate, rank, None, cfg.prefetch, shared, shared_gate)  # the cache is attached below
        block.decoder_layer = i
        layer.mlp = block
        blocks.append(block)
    for r, block in enumerate(blocks):
        following = blocks[r + 1 : r + 1 + cfg.prefetch.lookahead]
        # prefetch guesses stay on one device: the next router must see this layer's hidden state
        block.link([b for b in following if placement is None or placement.same_device(b.layer, r)])

    if cfg.embedding_on_host:  # the table never visits the device: only looked-up rows are copied
        table = trunk.pop("model.embed_tokens.weight").to("cpu", dtype)
        model.model.embed_tokens = HostEmbedding(table, device_of(0))
        del table
    # the rest of the trunk: embeddings, norms, biases, lm_head (names match the skeleton's)
    _, unexpected = model.load_state_dict({k: v.to(dev, dtype) for k, v in trunk.items()}, strict=False, assign=True)
    trunk.clear()  # the trunk shard's pages can go before the expert store is allocated
    if model.lm_head.weight.is_meta and arch.tie_embeddings:  # a tied lm_head is not stored
        model.lm_head.weight = model.model.embed_tokens.weight
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if unexpected or [n for n in still_meta if "rotary_emb" not in n]:
        raise RuntimeError(f"trunk mismatch: unexpected {unexpected[:5]}, unset {still_meta[:5]}")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=mcfg)
    moe_layers = len(arch.moe_layers)
    if placement is None:
        model.to(dev)
        cache = _expert_cache(spec, moe_layers, k, dev, cfg)
    else:
        model.boundary_hooks = place_layers(model, placement)
        ks = experts_per_layer(k, moe_layers, arch.num_experts)
        caches = [
            _expert_cache(spec, n, ks[start : start + n], torch.device(d), cfg)
            for d, start, n in zip(placement.devices, placement.starts, placement.counts, strict=True)
        ]
        cache = ExpertCacheGroup(caches, placement)
    for block in blocks:
        block.cache = cache
    rank_of = {layer: r for r, layer in enumerate(arch.moe_layers)}
    bar = tqdm(total=moe_layers * arch.num_experts, desc="loading experts", unit="expert", disable=not cfg.progress)
    for layer_idx, e, tensors in experts:
        cache.place(rank_of[layer_idx], e, tensors)
        bar.update(1)
    bar.close()
    cache.check_complete()
    model.expert_cache = cache
    model.kv_arena = _kv_arena(mcfg, arch, cache, cfg, dev, dtype)
    if model.kv_arena is not None:  # HF's own generate then writes K/V into the arena too (never a second KV)
        use_arena_in_generate(model)
    model.offload_config = cfg
    install_attention(model, attention)
    from .runtime import kernels

    quantized = [m.weight_q for m in model.modules() if isinstance(m, QuantLinear)]
    kernels.warm_up(quantized, [cache.layout.weights(cache.device_buf[0])], dtype, dev, cfg.progress)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = mcfg.eos_token_id
    return model


def close_model(model: MixtralForCausalLM) -> None:
    """Free what a loaded model holds on the device and pinned on the host, safely, now.

    Waits for every copy in flight (``ExpertCache.close``), unpins and frees the expert store and
    slots, drops the KV arena and the trunk's tensors (the model moves to the meta device) and returns cached blocks
    to the GPU. The model cannot be used afterwards; load it again.
    """
    cache = getattr(model, "expert_cache", None)
    device = cache.device if cache is not None else next(model.parameters()).device
    if cache is not None:
        cache.close()
    for m in model.modules():
        if isinstance(m, HostEmbedding):  # model.to leaves its table in host RAM
            m.release()
    model.kv_arena = None  # the KV bytes (and the slots they lent: the cache is closed)
    model.to("meta")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _kv_arena(mcfg, arch, cache, cfg: OffloadConfig, device: torch.device, dtype: torch.dtype) -> KVArena | None:
    """The KV cache's bytes, lending their unreached tail to the expert cache (``kv_arena.KVArena``); None where
    it cannot: lending off, layers split across devices, no expert in host RAM, or layers whose K/V are not
    plain full attention of ``kv_heads x head_dim`` (sliding windows, MLA)."""
    if not cfg.kv_lending or not isinstance(cache, ExpertCache) or not len(cache.host_buf) or arch.kv_lending_refusal:
        return None
    if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=mcfg).layers):
        return None
    return KVArena(arch.num_layers, arch.kv_heads, arch.head_dim, context_tokens(cfg, mcfg), dtype, device, cache)


def _expert_cache(spec: ModelSpec, layers: int, ks, device: torch.device, cfg: OffloadConfig):
    return ExpertCache(
        ExpertLayout.of(spec),
        layers,
        spec.num_experts,
        ks,
        device=device,
        policy=cfg.policy,
        spare_slots=cfg.spare_slots,
        dense_dtype=cfg.compute_dtype if cfg.dense_on_cpu else None,
    )


def dequantized_reference(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> MixtralForCausalLM:
    """A plain transformers model of the checkpoint's family holding its dequantized weights, all resident.

    The ground truth for parity tests and the CPU overhead benchmark; small models only.
    """
    ckpt = Checkpoint.open(Path(path))
    mcfg, spec = ckpt.config, ckpt.spec
    arch = spec.arch
    mcfg._attn_implementation = "eager" if arch.attn_sinks else "sdpa"  # transformers' SDPA drops gpt-oss's sinks
    model = getattr(transformers, arch.model_class)(mcfg).eval().requires_grad_(False)
    sd = ckpt.load_trunk()
    for name, shape in spec.quantized_trunk_shapes.items():
        t = {s: sd.pop(f"{name}.{s}") for s in SUFFIXES}
        sd[f"{name}.weight"] = QuantizedWeight.from_tensors(ckpt.quant.attention, shape, t).dequantize()
    if "lm_head.weight" not in sd:  # tied, not stored
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    layout = ExpertLayout.of(spec)
    inter = arch.expert_intermediate
    gate_up = {i: torch.zeros(arch.fused_expert_shapes["gate_up_proj"]) for i in arch.moe_layers}
    down = {i: torch.zeros(arch.fused_expert_shapes["down_proj"]) for i in arch.moe_layers}
    buf = torch.empty(layout.nbytes, dtype=torch.uint8)
    for layer, e, tensors in ckpt.iter_experts():
        layout.pack(tensors, buf)
        w = {k: v.dequantize().float() for k, v in layout.weights(buf).items()}
        if arch.expert_layout == "interleaved":  # gpt-oss: [H, 2I] gate/up columns alternating, down [I, H]
            gate_up[layer][e, :, ::2], gate_up[layer][e, :, 1::2], down[layer][e] = w["w1"].T, w["w3"].T, w["w2"].T
            continue
        gate_up[layer][e, :inter], gate_up[layer][e, inter:], down[layer][e] = w["w1"], w["w3"], w["w2"]
    for i in arch.moe_layers:
        sd[f"model.layers.{i}.mlp.experts.gate_up_proj"] = gate_up[i]
        sd[f"model.layers.{i}.mlp.experts.down_proj"] = down[i]
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    model.to(dtype)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = mcfg.eos_token_id
    return model
