"""The KV cache: transformers' ``DynamicCache`` with each layer's keys and values preallocated.

``DynamicLayer`` appends a token with ``torch.cat``: every decoded token copies the whole cache (at
4096 tokens of Mixtral ~0.5 GB read and written per token, two launches per layer). ``PreallocatedLayer``
allocates ``capacity`` positions at its first update and writes only the new positions into them; what
attention sees is a view of the filled prefix (attention reads what it needs, never a padded
maximum, unlike ``StaticCache``), so the bytes written per decoded token do not grow with the context.
The capacity is the context the model was planned for (``generation.planned_context``: the memory
plan reserved exactly these bytes); past it a layer grows once (a copy), it never fails.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

GROW_STEP = 256  # positions added at a time when a cache must grow past its capacity


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views of buffers of ``capacity`` positions."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = max(1, int(capacity))
        self.length = 0
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._keys = key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.shape[-1])
        self._values = value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.shape[-1])
        self._set_length(0)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            self._grow(end)
        self._keys[:, :, self.length : end].copy_(key_states)
        self._values[:, :, self.length : end].copy_(value_states)
        self._set_length(end)
        return self.keys, self.values

    def _grow(self, needed: int) -> None:
        """Past the planned capacity: reallocate once, rounded up (the plan did not count these bytes)."""
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

    def reset(self) -> None:
        if self.is_initialized:
            self._set_length(0)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the preallocated KV cache holds one sequence (batch 1)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("the preallocated KV cache holds one sequence (batch 1)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("the preallocated KV cache holds one sequence (no beam search)")


class PreallocatedCache(DynamicCache):
    """``DynamicCache(config=...)`` whose full-attention layers are ``PreallocatedLayer``s of ``capacity``."""

    def __init__(self, config, capacity: int) -> None:
        super().__init__(config=config)
        self.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in self.layers]
        self.capacity = capacity


def new_kv_cache(model, tokens: int) -> PreallocatedCache:
    """A KV cache for ``model`` holding ``tokens`` positions (a chat: ``generation.planned_context(model)``)."""
    return PreallocatedCache(model.config, tokens)


__all__ = ["PreallocatedCache", "PreallocatedLayer", "new_kv_cache"]
