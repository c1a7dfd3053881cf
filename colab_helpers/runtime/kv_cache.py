"""The KV cache: transformers' ``DynamicCache`` with each layer's keys and values preallocated.

``DynamicLayer`` appends a token with ``torch.cat``: every decoded token copies the whole cache (at
4096 tokens of Mixtral ~0.5 GB read and written per token, two launches per layer). ``PreallocatedLayer``
allocates ``capacity`` positions at its first update and writes only the new positions into them; what
attention sees is a view of the filled prefix (attention reads what it needs, never a padded
maximum, unlike ``StaticCache``), so the bytes written per decoded token do not grow with the context.
The capacity is the context the model was planned for (``generation.planned_context``: the memory
plan reserved exactly these bytes); past it a layer grows once (a copy), it never fails.

``KVArena``: a loaded model's KV bytes as one buffer, position-major (``[capacity, layers, 2, kv_heads,
head_dim]``), so the positions a conversation has not reached are one contiguous tail. Until the conversation
needs them, whole expert slots of that tail are *lent* to the expert cache (``ExpertCache.lend``): on a free T4
the 4096-token KV budget (537 MB) is 8 more experts on the GPU while the conversation is short, 7 up to 549
tokens, one fewer every 507 tokens after. A write that reaches a lent slot's bytes first takes the slot back
(``ExpertCache.give_back``: a write-back if its layer is then over capacity); shortening the conversation (crop,
reset, a new one) lends again. Each layer's keys are a strided view (one position to the next skips the other
layers' rows); attention reads them as it reads any view.
"""

from __future__ import annotations

import inspect
import threading
import weakref

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

GROW_STEP = 256  # positions added at a time when a cache must grow past its capacity


LEND_ALIGN = 512  # a lent slot starts on this many bytes (every view dtype of an expert's tensors stays aligned)


def lent_slot_offsets(total_bytes: int, slot_bytes: int) -> list[int]:
    """Byte offsets of the slots a ``total_bytes`` KV buffer can lend, from its end: each as late as it fits,
    starting on a multiple of ``LEND_ALIGN``."""
    offsets, end = [], total_bytes
    while (offset := (end - slot_bytes) // LEND_ALIGN * LEND_ALIGN) >= 0:
        offsets.append(offset)
        end = offset
    return offsets


def lent_slot_starts(capacity: int, bytes_per_token: int, slot_bytes: int) -> list[int]:
    """Positions at which the KV cache's lendable slots are needed back, the last bytes' slot first.

    Slot ``j`` starts at byte ``lent_slot_offsets(...)[j]`` of a ``capacity``-token cache; it is free while the
    conversation is at most ``starts[j]`` tokens long (its first byte lies in position ``starts[j]``).
    """
    return [offset // bytes_per_token for offset in lent_slot_offsets(capacity * bytes_per_token, slot_bytes)]


class KVArena:
    """One model's KV cache bytes, position-major, whose unreached tail the expert cache borrows (module docstring).

    One conversation's cache holds it at a time (``bind``; a second concurrent one allocates its own buffers,
    as without an arena). ``slot_starts``/``slot_buffers`` default to slots carved from the tail; the T4 twin
    passes full-size positions with small buffers (its narrow model's KV is 16x smaller than Mixtral's).
    """

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
        cache=None,
        slot_starts: list[int] | None = None,
        slot_buffers: list[torch.Tensor] | None = None,
    ) -> None:
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.capacity = int(capacity)
        self.buf = torch.empty(self.capacity, num_layers, 2, kv_heads, head_dim, dtype=dtype, device=device)
        self.cache = cache
        if cache is not None and slot_starts is None:
            nbytes = cache.layout.nbytes
            flat = self.buf.view(-1).view(torch.uint8)
            offsets = lent_slot_offsets(flat.numel(), nbytes)
            slot_starts = [offset // self.bytes_per_token for offset in offsets]
            slot_buffers = [flat[offset : offset + nbytes] for offset in offsets]
        self.slot_starts = list(slot_starts or [])
        self._buffers = list(slot_buffers or [])
        self._lent: list[int | None] = [None] * len(self.slot_starts)  # the cache's slot id while lent
        self._lengths = [0] * num_layers
        self._owner: weakref.ref | None = None
        self._binding = threading.Lock()  # two threads starting conversations at once: one gets the arena
        self._next_start = self.capacity  # the lowest start of a lent slot (fast path of ``ensure``)
        self.release()

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.kv_heads * self.head_dim * self.buf.element_size()

    @property
    def lent(self) -> int:
        """Slots lent to the expert cache now."""
        return sum(slot is not None for slot in self._lent)

    def keys(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s keys for all ``capacity`` positions, ``[1, kv_heads, capacity, head_dim]`` (a view)."""
        return self.buf[:, layer, 0].permute(1, 0, 2).unsqueeze(0)

    def values(self, layer: int) -> torch.Tensor:
        return self.buf[:, layer, 1].permute(1, 0, 2).unsqueeze(0)

    def bind(self, owner: object) -> bool:
        """Let ``owner`` (a KV cache starting empty) write here; False while another live cache holds the arena."""
        with self._binding:
            if self._owner is not None and self._owner() is not None:
                return False
            self._owner = weakref.ref(owner)
            self._lengths = [0] * self.num_layers
            self.release()
            return True

    def unbind(self, owner: object) -> None:
        """``owner`` is done: every lendable slot goes back to the expert cache."""
        with self._binding:
            if self._owner is not None and self._owner() is owner:
                self._owner = None
                self._lengths = [0] * self.num_layers
                self.release()

    def ensure(self, layer: int, end: int) -> None:
        """Layer ``layer`` is about to write positions up to ``end``: take back every lent slot those bytes reach."""
        self._lengths[layer] = max(self._lengths[layer], end)
        if end <= self._next_start:
            return
        for j, slot in enumerate(self._lent):
            if slot is not None and self.slot_starts[j] < end:
                self.cache.give_back(slot)
                self._lent[j] = None
        self._update_next_start()

    def _update_next_start(self) -> None:
        lent = [self.slot_starts[j] for j, slot in enumerate(self._lent) if slot is not None]
        self._next_start = min(lent, default=self.capacity)

    def shrunk(self, layer: int, length: int) -> None:
        """Layer ``layer`` now holds ``length`` positions (crop, reset): lend what no layer reaches any more."""
        self._lengths[layer] = length
        self.release()

    def release(self) -> None:
        """Lend every slot beyond the longest layer (the last bytes' slot first)."""
        if self.cache is None:
            return
        used = max(self._lengths)
        for j, slot in enumerate(self._lent):
            if slot is None and self.slot_starts[j] >= used:
                self._lent[j] = self.cache.lend(self._buffers[j])
        self._update_next_start()


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views of buffers of ``capacity`` positions (an arena's, if given)."""

    def __init__(self, capacity: int, arena: KVArena | None = None, index: int = 0) -> None:
        super().__init__()
        self.capacity = max(1, int(capacity))
        self.length = 0
        self.arena, self.index = arena, index
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        if self.arena is not None and key_states.shape[0] != 1:
            raise RuntimeError(f"the KV arena holds one sequence; got a batch of {key_states.shape[0]}")
        if self.arena is not None:
            keys, values = self.arena.keys(self.index), self.arena.values(self.index)
            for name, got, want in (("keys", key_states, keys), ("values", value_states, values)):
                if (got.shape[1], got.shape[-1], got.dtype, got.device) != (
                    want.shape[1],
                    want.shape[-1],
                    want.dtype,
                    want.device,
                ):
                    raise RuntimeError(
                        f"KV arena layer {self.index}: {name} {tuple(got.shape)} {got.dtype} on {got.device} do not "
                        f"match its [{want.shape[1]}, *, {want.shape[-1]}] {want.dtype} on {want.device}"
                    )
            self._keys, self._values = keys, values
        else:
            self._keys = key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.shape[-1])
            self._values = value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.shape[-1])
        self._set_length(0)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self.arena is not None:
            self.arena.ensure(self.index, end)  # first: a lent slot these positions reach goes back
        if end > self._keys.shape[-2]:
            self._grow(end)
        self._keys[:, :, self.length : end].copy_(key_states)
        self._values[:, :, self.length : end].copy_(value_states)
        self._set_length(end)
        return self.keys, self.values

    def _grow(self, needed: int) -> None:
        """Past the planned capacity: reallocate once, rounded up (the plan did not count these bytes). An arena's
        layer leaves it (every lent slot is back by now; the arena lends again once its cache is released)."""
        self.arena = None
        size = -(-needed // GROW_STEP) * GROW_STEP
        for name in ("_keys", "_values"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], size, old.shape[-1])
            new[:, :, : self.length].copy_(old[:, :, : self.length])
            setattr(self, name, new)
        self.capacity = size

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self._keys[:, :, :length]
        self.values = self._values[:, :, :length]

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` positions (transformers' convention); the buffers stay."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if self.is_initialized and tokens_to_remove:
            self._set_length(max(0, self.length + tokens_to_remove))
            self._shrunk()

    def reset(self) -> None:
        if self.is_initialized:
            self._set_length(0)
            self._shrunk()

    def _shrunk(self) -> None:
        if self.arena is not None:
            self.arena.shrunk(self.index, self.length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the preallocated KV cache holds one sequence (batch 1)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("the preallocated KV cache holds one sequence (batch 1)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("the preallocated KV cache holds one sequence (no beam search)")


class PreallocatedCache(DynamicCache):
    """``DynamicCache(config=...)`` whose full-attention layers are ``PreallocatedLayer``s of ``capacity``.

    With an ``arena`` it can bind (no other live cache holds it), its layers write there; ``release_arena``
    (or this cache being collected) gives the arena's lendable slots back to the expert cache."""

    def __init__(self, config, capacity: int, arena: KVArena | None = None) -> None:
        super().__init__(config=config)
        if arena is not None and (capacity > arena.capacity or not arena.bind(self)):
            arena = None
        self.arena = arena
        self.capacity = arena.capacity if arena is not None else capacity
        self.layers = [
            PreallocatedLayer(self.capacity, arena, i) if type(layer) is DynamicLayer else layer
            for i, layer in enumerate(self.layers)
        ]

    def release_arena(self) -> None:
        """This conversation is over: the arena's tail goes back to the expert cache (the cache is empty after)."""
        if self.arena is not None:
            for layer in self.layers:
                layer.reset()
            self.arena.unbind(self)


def new_kv_cache(model, tokens: int) -> PreallocatedCache:
    """A KV cache for ``model`` holding ``tokens`` positions (a chat: ``generation.planned_context(model)``): the
    model's ``KVArena`` when it has one that is free and large enough, else buffers of its own."""
    return PreallocatedCache(model.config, tokens, getattr(model, "kv_arena", None))


def use_arena_in_generate(model) -> None:
    """``model.generate`` (transformers' own loop) writes its K/V into the model's arena when no cache is passed.

    Without this it would make a ``DynamicCache``: KV bytes the memory plan does not have (the plan counts the
    KV budget once, as the arena, whose tail is lent to expert slots). transformers offers no hook for a custom
    default cache, so the instance's ``_prepare_cache_for_generation`` is wrapped: batch 1, ``use_cache`` on and
    no ``cache_implementation`` get ``new_kv_cache``; anything else goes to transformers unchanged."""
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    default = model._prepare_cache_for_generation

    def prepare(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        if (
            model_kwargs.get(name) is None
            and batch_size == 1
            and generation_config.use_cache is not False
            and generation_config.cache_implementation is None
        ):
            model_kwargs[name] = new_kv_cache(model, max(1, int(max_cache_length)))
        return default(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)

    model._prepare_cache_for_generation = prepare


__all__ = [
    "KVArena",
    "PreallocatedCache",
    "PreallocatedLayer",
    "lent_slot_offsets",
    "lent_slot_starts",
    "new_kv_cache",
    "use_arena_in_generate",
]
