"""The KV cache: transformers' ``DynamicCache`` with each layer's keys and values preallocated.

``DynamicLayer`` appends a token with ``torch.cat``: every decoded token copies the whole cache (at
4096 tokens of Mixtral ~0.5 GB read and written per token, two launches per layer). ``PreallocatedLayer``
allocates ``capacity`` positions at its first update and writes only the new positions into them; what
attention sees is a view of the filled prefix (attention reads what it needs, never a padded
maximum, unlike ``StaticCache``), so the bytes written per decoded token do not grow with the context.
The capacity is the context the model was planned for (``generation.planned_context``: the memory
plan reserved exactly these bytes); past it a layer grows once (a copy), it never fails.

Bound to the model's ``KVArena`` (``kv_arena.py``), a cache writes into the arena's buffer instead, whose
unreached tail the expert cache borrows.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .kv_arena import KVArena

GROW_STEP = 256  # positions added at a time when a cache must grow past its capacity


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


__all__ = ["PreallocatedCache", "PreallocatedLayer", "new_kv_cache", "use_arena_in_generate"]
