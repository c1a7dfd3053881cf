"""The KV arena: a loaded model's KV bytes, whose unreached tail the expert cache borrows as slots.

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

import threading
import weakref

import torch

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


__all__ = ["LEND_ALIGN", "KVArena", "lent_slot_offsets", "lent_slot_starts"]
