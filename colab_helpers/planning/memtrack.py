"""Peak bytes of tensors a block of code allocates, on any device (CPU included).

The planner's transient rows (dequantization scratch, attention scratch) must be what the code
really peaks at, and most of this project is tested on CPUs, where ``torch.cuda.max_memory_allocated``
does not exist. ``TensorMemoryTracker`` watches every torch op inside the block, counts each new
storage once (views and in-place results are not new memory), and forgets it when the last tensor
seen on it is garbage collected; ``peak`` is the largest live total. It counts tensor storages only
(no allocator rounding or slack: that is a margin of its own).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemoryTracker(TorchDispatchMode):
    """``with TensorMemoryTracker() as t: ...`` then ``t.peak`` (bytes) and ``t.current`` (still alive)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors seen on it still alive]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            ptr = _ptr(t)
            entry = self._live.get(ptr)
            if entry is not None:
                entry[1] += 1
            elif ptr in inputs or ptr == 0:
                continue  # a view of (or in place on) memory allocated before the block
            else:
                nbytes = t.untyped_storage().nbytes()
                self._live[ptr] = [nbytes, 1]
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, ptr)
        return out

    def _release(self, ptr: int) -> None:
        entry = self._live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._live[ptr]
            self.current -= entry[0]


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def peak_bytes(fn, *args, **kwargs) -> int:
    """Peak bytes of tensors ``fn(*args, **kwargs)`` allocates, its result included."""
    with TensorMemoryTracker() as tracker:
        result = fn(*args, **kwargs)
    del result
    return tracker.peak


__all__ = ["TensorMemoryTracker", "peak_bytes"]
