"""Whole layers split across several devices (Kaggle's two T4s): which layer lives where, the per-device
expert caches seen as one, and the hooks that move hidden states at a device boundary.

Each device holds a contiguous range of decoder layers with their attention, routers and expert cache;
the embeddings sit on the first device, the final norm and ``lm_head`` on the last. At the first layer
of each range a pre-hook moves the hidden states, rotary tables and mask to that device; the logits are
moved back to the first device so ``generate`` concatenates tokens on one device. The same code runs
with a device list of identical CPU devices, which is how it is tested here (no machine with two GPUs).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .experts import CacheStats, ExpertCache


def split_refusal(arch) -> str | None:
    """Why a model (its ``families.MoEArchitecture``) cannot be split across devices, or None when it can.

    One sentence, said alike by ``plan --gpus`` and ``load_model``: dense (non-MoE) layers would leave the
    expert caches' layer numbering and the plan's per-GPU shares out of step; a tied ``lm_head`` is the
    embeddings' own tensor, so it cannot sit on the last device while the embeddings sit on the first
    (Mixtral's layout stores ``lm_head`` even when tied, so Mixtral is never tied at load).
    """
    if arch.dense_layers:
        return f"{arch.name} with dense layers cannot be split across devices yet (one device only)"
    if arch.tie_embeddings and arch.family != "mixtral":
        return f"{arch.name} with tied embeddings cannot be split across devices yet (one device only)"
    return None


@dataclass(frozen=True)
class LayerPlacement:
    """``devices[i]`` holds layers ``starts[i] .. starts[i] + counts[i] - 1``."""

    devices: tuple[str, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.devices or len(self.devices) != len(self.counts) or any(c < 1 for c in self.counts):
            raise ValueError(f"one positive layer count per device, got {self.counts} for {self.devices}")

    @classmethod
    def even(cls, devices: Sequence[str | torch.device], num_layers: int) -> LayerPlacement:
        """Layers split as evenly as possible, earlier devices taking the remainder."""
        n = len(devices)
        k, extra = divmod(num_layers, n)
        return cls(tuple(str(d) for d in devices), tuple(k + (i < extra) for i in range(n)))

    @property
    def num_layers(self) -> int:
        return sum(self.counts)

    @property
    def starts(self) -> tuple[int, ...]:
        out, s = [], 0
        for c in self.counts:
            out.append(s)
            s += c
        return tuple(out)

    def device_index(self, layer: int) -> int:
        for i, (s, c) in enumerate(zip(self.starts, self.counts, strict=True)):
            if s <= layer < s + c:
                return i
        raise IndexError(f"layer {layer} is not placed (placement covers {self.num_layers} layers)")

    def same_device(self, a: int, b: int) -> bool:
        """Whether two layers share a device slot of the placement (not just an equal device name)."""
        return self.device_index(a) == self.device_index(b)

    def device(self, layer: int) -> torch.device:
        return torch.device(self.devices[self.device_index(layer)])

    def layer_map(self) -> list[str]:
        """Device name per layer (what the plan prints and the tests check)."""
        return [self.devices[self.device_index(i)] for i in range(self.num_layers)]


class GroupStats:
    """The per-device caches' counters concatenated in layer order; ``reset`` resets every part."""

    def __init__(self, parts: Sequence[CacheStats]) -> None:
        self.parts = list(parts)

    def reset(self) -> None:
        for p in self.parts:
            p.reset()

    def merged(self) -> CacheStats:
        merged = CacheStats(sum(p.num_layers for p in self.parts))
        for name in CacheStats.COUNTERS:
            setattr(merged, name, [x for p in self.parts for x in getattr(p, name)])
        return merged

    def __getattr__(self, name: str):
        return getattr(self.merged(), name)


class _GroupEngine:
    """The copy engines of every device: ``synchronize`` waits for all of them."""

    def __init__(self, engines: Sequence) -> None:
        self.engines = list(engines)
        self.cuda = any(e.cuda for e in self.engines)

    def synchronize(self) -> None:
        for e in self.engines:
            e.synchronize()


class ExpertCacheGroup:
    """One ``ExpertCache`` per device, addressed with global layer numbers (what ``OffloadedMoE`` uses)."""

    def __init__(self, caches: Sequence[ExpertCache], placement: LayerPlacement) -> None:
        self.caches = list(caches)
        self.placement = placement
        self.stats = GroupStats([c.stats for c in self.caches])
        self.engine = _GroupEngine([c.engine for c in self.caches])
        self.num_layers = placement.num_layers
        self.num_experts = self.caches[0].num_experts
        self.device = self.caches[0].device
        self.layout = self.caches[0].layout
        self.lock = threading.RLock()  # one layer step at a time across every device (as ExpertCache.lock)
        self.speculative_bytes_left: float = float("inf")  # one per-token prefetch budget for all devices
        self.slot_of = _PerLayer(self, "slot_of")
        self.host_of = _PerLayer(self, "host_of")

    def begin_token(self, speculative_bytes: float | None = None) -> None:
        self.speculative_bytes_left = float("inf") if speculative_bytes is None else speculative_bytes
        for c in self.caches:
            c.begin_token(speculative_bytes)

    def pump(self, chunks: int) -> int:
        """``ExpertCache.pump`` on every device (each has its own bus); returns the chunks issued."""
        return sum(c.pump(chunks) for c in self.caches)

    def locate(self, layer: int) -> tuple[ExpertCache, int]:
        i = self.placement.device_index(layer)
        return self.caches[i], layer - self.placement.starts[i]

    @property
    def device_buf(self):
        """The first device's slots (what a kernel warm-up reads)."""
        return self.caches[0].device_buf

    @property
    def closed(self) -> bool:
        return all(c.closed for c in self.caches)

    def close(self) -> None:
        """``ExpertCache.close`` on every device (waits for its copies, frees slots and pinned store)."""
        for c in self.caches:
            c.close()

    def check_complete(self) -> None:
        for c in self.caches:
            c.check_complete()

    def check_invariants(self) -> None:
        for c in self.caches:
            c.check_invariants()

    def device_bytes(self) -> int:
        return sum(c.device_bytes() for c in self.caches)

    def host_bytes(self) -> int:
        return sum(c.host_bytes() for c in self.caches)


class _PerLayer:
    """``group.slot_of[layer]``: the owning device cache's per-layer table, by global layer number."""

    def __init__(self, group: ExpertCacheGroup, name: str) -> None:
        self.group, self.name = group, name

    def __getitem__(self, layer: int):
        cache, local = self.group.locate(layer)
        return getattr(cache, self.name)[local]

    def __len__(self) -> int:
        return self.group.num_layers


def _per_layer(name: str):
    def call(self: ExpertCacheGroup, layer: int, *args, **kwargs):
        cache, local = self.locate(layer)
        return getattr(cache, name)(local, *args, **kwargs)

    call.__name__ = name
    call.__doc__ = f"``ExpertCache.{name}`` on the device that holds ``layer``."
    return call


for _name in (
    "place",
    "resident",
    "order",
    "fetch",
    "demand",
    "weights",
    "release",
    "prefetch",
    "stage",
    "score_prediction",
    "end_step",
    "expert_bytes",
):
    setattr(ExpertCacheGroup, _name, _per_layer(_name))


# ---- the boundary ----------------------------------------------------------------------------------


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True) if value.device != device else value
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class BoundaryHooks:
    """Forward hooks that move a layer's inputs to its device at each boundary; counts the crossings."""

    def __init__(self) -> None:
        self.crossings = 0
        self.handles: list = []

    def move_inputs(self, module: torch.nn.Module, device: torch.device) -> None:
        def hook(mod, args, kwargs):
            self.crossings += 1
            return _to(args, device), _to(kwargs, device)

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def move_logits(self, model: torch.nn.Module, device: torch.device) -> None:
        def hook(mod, args, kwargs, output):
            if getattr(output, "logits", None) is not None:
                output.logits = output.logits.to(device)
            return output

        self.handles.append(model.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def place_layers(model, placement: LayerPlacement) -> BoundaryHooks:
    """Move a built ``MixtralForCausalLM``'s modules to their devices and install the boundary hooks."""
    first, last = torch.device(placement.devices[0]), torch.device(placement.devices[-1])
    inner = model.model
    inner.embed_tokens.to(first)
    inner.rotary_emb.to(first)
    for i, layer in enumerate(inner.layers):
        layer.to(placement.device(i))
    inner.norm.to(last)
    model.lm_head.to(last)
    hooks = BoundaryHooks()
    for start in placement.starts[1:]:
        hooks.move_inputs(inner.layers[start], placement.device(start))
    if len(placement.devices) > 1:
        hooks.move_logits(model, first)
    return hooks
