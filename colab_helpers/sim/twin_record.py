"""Record our engine's decode schedule for the twin, on a CPU, at Mixtral-8x7B's sizes.

The engine runs a *narrow* Mixtral: the real 32 layers x 8 experts, top-2, 32 heads / 8 KV heads, but
every width divided by 16 (hidden 256, FFN 896, head_dim 8, vocab 2000), fp16, random weights in the
real quantized layout, routing scripted from the real trace. While it decodes, the recorder sees:

- every dispatched ATen op that would launch a GPU kernel, with the bytes it reads and writes, and every
  op that makes the host wait for the GPU on CUDA, classified as ``dispatch_count`` does (the same
  harness the sync budget is tested with); a fused entry point (``kernels.FUSED_LAUNCHES``, e.g. the
  Triton GEMV the CUDA path takes for a few rows) is recorded as its launches;
- every copy, at the engine's single copy seam (``CopyEngine.copy``): bytes, direction, stream, and the
  events it waits for; the compute stream's waits (``compute_waits``) and marks (``mark_compute``);
- HF ``generate``'s own per-token ops and syncs, which a real run pays too, decoding as
  ``generate_stream`` does: a streamer takes each token on the host (one read per token, table on the GPU
  or not) and a host-RAM embedding table gathers from those host ids, so it adds no read-back.

Bytes are then scaled to full size: a weight (a model buffer/parameter) reads 256x its narrow bytes
(both matrix dimensions are 16x), an expert buffer reads or moves ``EXPERT_BYTES / narrow expert bytes``,
an activation 16x (one dimension). The embedding lookup reads one row, not the table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import MixtralConfig

from ..runtime import kernels
from ..runtime.experts import DEMAND, MOVE, SPECULATIVE, CopyEngine, ExpertCache
from ..weights.model_spec import ModelSpec
from ..weights.quant import QuantizedWeight
from .dispatch_count import _PATCHED_METHODS, _is_launch, _is_sync
from .synthetic import ScriptedRouter
from .twin import EXPERT_BYTES, Op, Schedule

WIDTH = 16  # full size / narrow size, per dimension

# bool(t) reaches dispatch as is_nonzero (its inner _local_scalar_dense does not): a sync, not a launch
_ALSO_SYNCING = {"is_nonzero"}


def narrow_mixtral_config(num_layers: int = 32) -> MixtralConfig:
    """Mixtral-8x7B with every width divided by ``WIDTH`` (quantization group constraints still hold)."""
    from .synthetic import mixtral_8x7b_config

    full = mixtral_8x7b_config()
    return MixtralConfig(
        hidden_size=full.hidden_size // WIDTH,
        intermediate_size=full.intermediate_size // WIDTH,
        num_hidden_layers=num_layers,
        num_attention_heads=full.num_attention_heads,
        num_key_value_heads=full.num_key_value_heads,
        head_dim=full.hidden_size // full.num_attention_heads // WIDTH,
        num_local_experts=full.num_local_experts,
        num_experts_per_tok=full.num_experts_per_tok,
        vocab_size=full.vocab_size // WIDTH,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )


class NoisyScriptedRouter(ScriptedRouter):
    """Routes like ``ScriptedRouter``; its ``predict`` (the previous layer's guess) is right with prob. ``recall``.

    Each of a row's k experts is kept with probability ``recall``, else replaced by a random expert the
    row does not use, so precision = recall for k guesses. Deterministic for a seed.
    """

    def __init__(self, choices: np.ndarray, num_experts: int, recall: float, seed: int) -> None:
        super().__init__(choices, num_experts)
        rng = np.random.default_rng(seed)
        rows = self.choices.numpy()
        keep = rng.random(rows.shape) < recall
        order = np.argsort(rng.random((len(rows), num_experts)), axis=1)  # a random order of the experts
        unused = ~(order[:, :, None] == rows[:, None, :]).any(axis=2)  # [T, E]: that expert is not in the row
        wrong = np.stack([order[i][unused[i]][: rows.shape[1]] for i in range(len(rows))])  # first k unused
        guesses = np.where(keep, rows, wrong)
        self.guesses = torch.as_tensor(guesses)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        n = x.reshape(-1, x.shape[-1]).shape[0]
        idx = torch.arange(self.step, self.step + n) % len(self.guesses)
        return torch.zeros(n, self.num_experts, dtype=x.dtype).scatter_(1, self.guesses[idx], 1.0)


_MISSING = object()


class _Event:
    """Stands in for a CUDA event: fires when op ``op`` of the schedule is done (None: before recording)."""

    __slots__ = ("op",)

    def __init__(self, op: int | None) -> None:
        self.op = op


@dataclass(frozen=True)
class ByteScale:
    """Full-size bytes per narrow byte. The default is the narrow Mixtral's (every width / ``WIDTH``);
    another family's narrow engine (``twin_family``) gives a ratio per weight storage instead."""

    expert_bytes: float = EXPERT_BYTES  # one full-size expert, as stored
    weights: Mapping[int, float] = field(default_factory=dict)  # untyped storage pointer -> ratio
    weight_default: float = WIDTH * WIDTH  # any other weight: both matrix dimensions scaled
    activations: float = WIDTH  # one dimension (hidden) scaled


class ScheduleRecorder(TorchDispatchMode):
    """Collects a ``Schedule`` while the wrapped engine decodes (see the module docstring)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        cache = model.expert_cache
        self.scale: ByteScale = getattr(model, "twin_scale", None) or ByteScale()
        self.expert_ratio = self.scale.expert_bytes / cache.layout.nbytes
        self.expert_storages = {cache.device_buf.untyped_storage().data_ptr()}
        lent = getattr(model, "twin_lent_slots", None)  # the twin's stand-ins for KV-lent slots (install_kv_lending)
        if lent is not None:
            self.expert_storages.add(lent.untyped_storage().data_ptr())
        self.weight_storages = {
            t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()] if t.numel() > 1
        }
        from ..runtime.host_embedding import HostEmbedding

        # a host-RAM embedding table (host_embedding.py): its gather reads the looked-up rows, on the host
        self.host_tables = {
            m.weight.untyped_storage().data_ptr() for m in model.modules() if isinstance(m, HostEmbedding)
        }
        self.schedule = Schedule()
        self.active = False  # recording (decode tokens only)
        self.paused = 0  # inside a fused call: its CPU fallback ops are not launches
        self.waits: list[int] = []  # events the next compute op waits for
        self.last_compute: int | None = None
        self.window: dict[str, int] = {}  # cache counters over the recorded steps

    # ---- bytes ------------------------------------------------------------------------------------

    def full_bytes(self, t: torch.Tensor) -> float:
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.expert_storages:
            return t.nbytes * self.expert_ratio
        if ptr in self.weight_storages:
            return t.nbytes * self.scale.weights.get(ptr, self.scale.weight_default)
        return t.nbytes * self.scale.activations

    def _tensors_bytes(self, *items) -> float:
        total = 0.0
        for item in items:
            if isinstance(item, torch.Tensor):
                total += self.full_bytes(item)
            elif isinstance(item, (list, tuple)):
                total += self._tensors_bytes(*item)
            elif isinstance(item, dict):
                total += self._tensors_bytes(*item.values())
        return total

    # ---- ops --------------------------------------------------------------------------------------

    def add_compute(self, kind: str, nbytes: float, tag: str) -> None:
        if not self.active:
            return
        op = Op(kind, nbytes=nbytes, after=tuple(self.waits), tag=tag)
        self.waits = []
        self.last_compute = self.schedule.add(op)

    def add_sync(self, tag: str) -> None:
        if self.active:
            self.schedule.add(Op("sync", tag=tag))

    def add_copy(self, nbytes: float, to_device: bool, stream: str, after: Sequence[int]) -> int | None:
        if not self.active:
            return None
        op = Op("copy", stream, nbytes, to_device, tuple(after), tag=stream)
        return self.schedule.add(op)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused or not self.active:
            return out
        name = func._schema.name.split("::")[-1]
        if name in _ALSO_SYNCING or _is_sync(func, args, kwargs):
            self.add_sync(name)
        if name in _ALSO_SYNCING or not _is_launch(func):
            return out
        if name == "embedding":  # reads the looked-up rows only
            nbytes = 2 * self._tensors_bytes(out)
        elif name == "index_select" and args[0].untyped_storage().data_ptr() in self.host_tables:
            # the host table's gather: host work of about one launch's cost, recorded as one small eager op
            nbytes = 2 * self._tensors_bytes(out)
        else:
            nbytes = self._tensors_bytes(args, kwargs, out)
        self.add_compute("eager", nbytes, name)
        return out


class RecordingCopyEngine(CopyEngine):
    """The engine's copy seam, CUDA-shaped: copies happen at once, but return events and feed the recorder.

    ``CopyEngine.copy`` (the one place copies are issued) calls ``_issue`` with the copy's kind, which
    is its stream: demand and speculative loads and write-backs each have their own.
    """

    def __init__(self, device: torch.device, recorder: ScheduleRecorder) -> None:
        super().__init__(torch.device("cpu"))
        self.rec = recorder

    def _issue(self, dst: torch.Tensor, src: torch.Tensor, kind: str, after: list) -> _Event:
        rec = self.rec
        rec.paused += 1
        try:
            dst.copy_(src)
        finally:
            rec.paused -= 1
        deps = [e.op for e in after if isinstance(e, _Event) and e.op is not None]
        if kind == MOVE:  # device to device: no PCIe; an op reading and writing the expert in GPU memory
            rec.waits.extend(deps)
            rec.add_compute("eager", 2 * dst.nbytes * rec.expert_ratio, MOVE)
            return _Event(rec.last_compute if rec.active else None)
        return _Event(rec.add_copy(dst.nbytes * rec.expert_ratio, kind in (DEMAND, SPECULATIVE), kind, deps))

    def compute_waits(self, event: object) -> None:
        if isinstance(event, _Event) and event.op is not None and self.rec.active:
            self.rec.waits.append(event.op)

    def mark_compute(self, reads: torch.Tensor | None = None) -> _Event:
        return _Event(self.rec.last_compute if self.rec.active else None)

    def synchronize(self) -> None:
        pass


def _counters(cache) -> dict[str, int]:
    s = cache.stats
    return {name: sum(getattr(s, name)) for name in s.COUNTERS}


@contextlib.contextmanager
def recording(model, skip_tokens: int = 0) -> Iterator[ScheduleRecorder]:
    """Record ``model``'s decode steps after the first ``skip_tokens``: ``with recording(model) as rec: ...``.

    ``rec.window`` then holds the cache counters of the recorded steps only.
    """
    rec = ScheduleRecorder(model)
    decode_steps = 0
    start: dict[str, int] = {}
    entered: list[ScheduleRecorder] = []
    cache = model.expert_cache
    old_engine = cache.engine
    cache.engine = RecordingCopyEngine(cache.device, rec)

    shapes: dict[tuple, tuple] = {}  # (entry point, argument shapes) -> output shape and dtype

    def fused(name: str, launches: int):
        """A fused entry point, as the CUDA path issues it: ``launches`` launches reading its arguments.

        Routing is scripted, so the values computed here steer nothing: the torch reference runs once per
        shape (muted) to learn the output's shape, later calls return zeros (or ``out`` as it was)."""
        reference = kernels.REFERENCES[name]

        def run(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            weights = [a for a in (*args, *kwargs.values()) if isinstance(a, QuantizedWeight)]
            out_arg = kwargs.get("out", args[3] if name == "triton_expert_down" and len(args) > 3 else None)
            key = (name, *(tuple(t.shape) for t in tensors), *(w.shape for w in weights))
            rec.paused += 1
            try:
                if out_arg is not None and key in shapes:
                    out = out_arg
                elif key in shapes:
                    out = torch.zeros(shapes[key][0], dtype=shapes[key][1])
                else:
                    out = reference(*args, **kwargs)
                    shapes[key] = (tuple(out.shape), out.dtype)
            finally:
                rec.paused -= 1
            read = sum(rec.full_bytes(t) for w in weights for t in w.tensors().values())
            read += sum(rec.full_bytes(t) for t in tensors) + rec.full_bytes(out)
            rec.add_compute("fused", read, name)
            for _ in range(launches - 1):
                rec.add_compute("eager", rec.full_bytes(out), name)
            return out

        return run

    def host_read(method: str):
        original = getattr(torch.Tensor, method)

        def read(t, *args, **kwargs):
            if rec.active and not rec.paused:
                rec.add_sync(method)
            rec.paused += 1
            try:
                return original(t, *args, **kwargs)
            finally:
                rec.paused -= 1

        return read

    def on_forward(module, args, kwargs):
        nonlocal decode_steps
        ids = kwargs.get("input_ids", args[0] if args else None)
        decoding = ids is not None and ids.shape[-1] == 1
        decode_steps += decoding
        rec.active = decoding and decode_steps > skip_tokens
        if rec.active:  # a recorded decode step starts: a new token
            if not start:  # the first one: start intercepting ops (warm-up runs at full speed)
                start.update(_counters(cache))
                rec.__enter__()
                entered.append(rec)
            rec.schedule.start_token()

    patches = [(kernels, name, fused(name, n)) for name, n in kernels.FUSED_LAUNCHES.items()]
    patches += [(kernels, "use_fused_kernel", kernels.would_use_fused_kernel)]
    patches += [(ExpertCache, "_make_dense", lambda cache, slot: None)]
    patches += [(torch.Tensor, m, host_read(m)) for m in _PATCHED_METHODS]
    saved = [(owner, name, owner.__dict__.get(name, _MISSING)) for owner, name, _ in patches]
    handle = model.register_forward_pre_hook(on_forward, with_kwargs=True)
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield rec
        end = _counters(cache)
        rec.window = {k: end[k] - start.get(k, 0) for k in end}
    finally:
        if entered:
            rec.__exit__(None, None, None)
        for name, events in vars(cache).items():  # no stand-in event may outlive the recording engine
            if isinstance(events, list) and any(isinstance(e, _Event) for e in events):
                setattr(cache, name, [None if isinstance(e, _Event) else e for e in events])
        for owner, name, value in reversed(saved):
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        handle.remove()
        cache.engine = old_engine


# --------------------------------------------------------------------------------------------------
# building and running the narrow engine
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineRun:
    """Which engine configuration decodes, on which routing, for how long."""

    experts_on_device: tuple[int, ...]
    policy: str = "lfu_decay"
    prefetch: bool = True
    recall: float = 0.8  # of the next-layer guesses (precision equal: as many guesses as experts used)
    prompt_tokens: int = 16
    decode_tokens: int = 48
    warmup_tokens: int = 0  # decode steps run (not recorded) before the recorded window, to warm the cache
    seed: int = 0
    family: object | None = None  # a ``twin_family.FamilyTwin`` (another model's narrow engine); None: Mixtral-8x7B
    prefetch_config: object | None = None  # a ``moe.PrefetchConfig`` (None: the default, on or off by ``prefetch``)
    embedding_on_host: bool = False  # the embedding table in host RAM (host_embedding.py), as the plan may put it
    kv_lending: bool = True  # the KV cache's unreached tail lends expert slots (kv_arena.KVArena), at full size
    context: int = 4096  # the planned KV budget, tokens (where the lent slots are needed back)

    def prefetch_settings(self, **family_defaults):
        """The ``PrefetchConfig`` the engine runs with."""
        from dataclasses import replace

        from ..runtime.moe import PrefetchConfig

        base = self.prefetch_config if self.prefetch_config is not None else PrefetchConfig(**family_defaults)
        return replace(base, enabled=self.prefetch and base.enabled)


def build_narrow_engine(run: EngineRun, routing: np.ndarray):
    """The narrow Mixtral, offloaded like the real one, its routers replaying ``routing`` [T, L, k]."""
    if run.family is not None:
        return run.family.build(run, routing)
    from ..model import OffloadConfig, assemble_model
    from ..weights.checkpoint import QuantConfig
    from .synthetic import mixtral_8x7b_config, random_experts, random_trunk

    config = narrow_mixtral_config(len(run.experts_on_device))
    quant = QuantConfig()
    cfg = OffloadConfig(
        device="cpu",
        dtype=torch.float16,
        experts_on_device=tuple(run.experts_on_device),
        policy=run.policy,
        prefetch=run.prefetch_settings(),
        dense_on_cpu=False,
        check_memory=False,
        progress=False,
        embedding_on_host=run.embedding_on_host,
        kv_lending=False,  # installed below at Mixtral's full sizes
    )
    torch.manual_seed(run.seed)
    model = assemble_model(config, quant, random_trunk(config, quant), random_experts(config, quant), cfg)
    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate = NoisyScriptedRouter(routing[:, i], config.num_local_experts, run.recall, run.seed + i)
    blocks = [layer.mlp for layer in model.model.layers]
    for i, block in enumerate(blocks):
        block.link(blocks[i + 1 : i + 1 + block.prefetch.lookahead])
    if run.kv_lending:
        from ..planning.planner import ModelSizes
        from ..runtime.kv_arena import lent_slot_starts

        full = ModelSizes.of(mixtral_8x7b_config(), quant)  # fp16 K/V per token and slot bytes, as the plan has them
        install_kv_lending(
            model, run.context, lent_slot_starts(run.context, full.kv_bytes_per_token(2), full.slot_bytes)
        )
    return model


def install_kv_lending(model, context: int, starts: list[int]) -> None:
    """Give the narrow engine a ``KVArena`` lending as the full-size model's would: slots needed back at the
    full-size positions ``starts`` (``lent_slot_starts``), held in narrow stand-in buffers the recorder counts
    as experts."""
    from ..runtime.kv_arena import KVArena

    cache, arch = model.expert_cache, ModelSpec.of(model.config).arch
    model.twin_lent_slots = torch.empty(max(1, len(starts)), cache.layout.nbytes, dtype=torch.uint8)
    model.kv_arena = KVArena(
        arch.num_layers,
        arch.kv_heads,
        arch.head_dim,
        context,
        model.dtype,
        cache.device,
        cache,
        starts,
        list(model.twin_lent_slots[: len(starts)]),
    )


class _HostIdsStreamer:
    """``generate_stream``'s streamer, as far as the engine sees it: each token it gets (``generate`` reads it
    back for the streamer, a sync recorded there) goes to the ``HostIds`` the host embedding reads."""

    def __init__(self, fed, rec: ScheduleRecorder) -> None:
        self.fed, self.rec, self.prompt_seen = fed, rec, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first sends the prompt
            self.prompt_seen = True
            return
        self.rec.paused += 1  # the token is a host tensor here: reading it is free
        try:
            self.fed.append(value.reshape(-1).tolist())
        finally:
            self.rec.paused -= 1

    def end(self) -> None:
        pass


def _decode_as_generate_stream(model, ids: torch.Tensor, n: int, rec: ScheduleRecorder) -> None:
    """``n`` greedy tokens the way ``conversation.generation.generate_stream`` decodes them: a streamer
    receives each token on the host, and a host-RAM embedding table gathers from those host ids (no
    read-back); the KV cache is ``new_kv_cache``'s (the model's arena when it has one)."""
    from ..conversation.generation import _kv_cache_kwarg
    from ..runtime.host_embedding import HostIds, feeding_host_ids
    from ..runtime.kv_cache import new_kv_cache

    kv = new_kv_cache(model, int(ids.shape[-1]) + n)
    fed = HostIds(ids, kv)
    with feeding_host_ids(model, fed):
        model.generate(
            ids,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            streamer=_HostIdsStreamer(fed, rec),
            **{_kv_cache_kwarg(model): kv},
        )


def record_engine(run: EngineRun, routing: np.ndarray) -> Schedule:
    """Decode ``run.decode_tokens`` tokens with the engine and return its recorded schedule."""
    model = build_narrow_engine(run, routing)
    gen = torch.Generator().manual_seed(run.seed)
    ids = torch.randint(3, model.config.vocab_size, (1, run.prompt_tokens), generator=gen)
    from .dispatch_count import count_decode

    counts = count_decode(model, ids[:, :4], tokens=2)  # the harness's own numbers, engine forward only
    n = run.warmup_tokens + run.decode_tokens + 1  # the first new token comes from the prefill forward
    # no_grad, not inference_mode: under inference_mode the mode sees ops before decomposition (to, sdpa)
    with torch.no_grad(), recording(model, skip_tokens=run.warmup_tokens) as rec:
        _decode_as_generate_stream(model, ids, n, rec)
    s, w = rec.schedule, rec.window
    s.hit_rate = w["hits"] / max(w["hits"] + w["misses"], 1)
    per_token = 1 / max(s.tokens, 1)
    h2d = {kind: s.bytes_per_token("copy", kind) / EXPERT_BYTES for kind in (DEMAND, SPECULATIVE)}
    s.notes = {
        "misses_per_token": w["misses"] * per_token,
        "demand_loads_per_token": h2d[DEMAND],  # expert-sized host->device copies a demand issued
        "speculative_loads_per_token": h2d[SPECULATIVE],  # ... a guess issued (chunks summed)
        "wasted_speculative_loads_per_token": w["wasted_bytes"] / model.expert_cache.layout.nbytes * per_token,
        "prefetch_loads_per_token": w["prefetch_loads"] * per_token,
        "prefetch_precision": w["correct"] / max(w["predicted"], 1),
        "prefetch_recall": w["correct"] / max(w["needed"], 1),
        "kv_lent_slots": model.kv_arena.lent if getattr(model, "kv_arena", None) is not None else 0,  # at the end
        "kv_slots_given_back": w["given_back"],  # within the recorded window
        "harness_syncs_per_token": counts.syncs_per_token,
        "harness_launches_per_token": counts.launches_per_token,
        "harness_syncs_per_layer_token": counts.syncs_per_layer_token,
        "harness_launches_per_layer_token": counts.launches_per_layer_token,
    }
    return s
