"""Count host syncs and kernel launches of the decode path, on a CPU, as they would happen on CUDA.

A decode step on a GPU is slow for two host-side reasons a CPU run hides: every *host sync* (the CPU
waits for the GPU to drain its queue: ``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)``, ``nonzero``,
boolean-mask indexing, one-argument ``torch.where``) stalls the pipeline, and every *kernel launch*
costs the host ~5–10 µs whatever the kernel does. Both are visible on a CPU: ATen ops reach a
``TorchDispatchMode`` (launches = dispatched non-view ops that run a kernel; syncs = the ops that read
device data on the host), and what dispatch cannot see (``.tolist()``, ``.cpu()``, ``.numpy()`` on a
CPU tensor are plain memory reads there) is caught by patching those methods while counting.

``cuda_like=True`` counts what the CUDA path would issue rather than what the CPU path runs: a
low-bit matmul of a few rows is the fused Triton kernel on CUDA, so it counts as its launches (its
CPU stand-in runs muted); the CPU-only dequantized copy a cache slot keeps is muted; copies issued
through ``CopyEngine.copy`` are counted as copies, not launches, on either setting.

    with count_ops() as c:            # any code
        ...
    c.total.syncs, c.total.launches, c.total.ops

    d = count_decode(model, ids, tokens=8)   # per MoE layer per decode token, and per token
    d.syncs_per_layer_token, d.launches_per_layer_token, d.syncs_per_token, d.launches_per_token

Counting is for one thread at a time: the method patches are process-wide while a block runs.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ops that read device memory on the host (the host waits for the device queue to drain)
_SYNC_OPS = {
    "_local_scalar_dense",  # .item(), bool(t), int(t), float(t)
    "nonzero",  # one-argument torch.where, argwhere
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "equal",
    "bincount",
    "histc",
}
# ops that allocate or change metadata without running a kernel
_NO_KERNEL = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "resize_",
    "set_",
    "lift_fresh",
    "detach",
    "alias",
    "_local_scalar_dense",  # a sync (a small D2H copy), counted as such, not as a launch
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "is_same_size",
}
# methods whose CPU implementation never reaches dispatch but which read device data on CUDA
_PATCHED_METHODS = ("tolist", "cpu", "numpy")
# ``torch.tensor(data, device=...)``: host data uploaded from pageable memory, a stream sync on CUDA
# (counted, with ``uploads=True``, as a sync named ``sync:tensor_upload``)


@dataclass
class Tally:
    """What one region issued: syncs, launches, copies, and the ops behind them (``"sync:…"``/``"launch:…"``)."""

    syncs: int = 0
    launches: int = 0
    copies: int = 0
    copy_bytes: int = 0
    ops: Counter = field(default_factory=Counter)

    def __iadd__(self, other: Tally) -> Tally:
        self.syncs += other.syncs
        self.launches += other.launches
        self.copies += other.copies
        self.copy_bytes += other.copy_bytes
        self.ops.update(other.ops)
        return self


def _is_sync(func, args: tuple, kwargs: dict) -> bool:
    name = func._schema.name.split("::")[-1]
    if name in _SYNC_OPS:
        return True
    if name == "repeat_interleave" and kwargs.get("output_size") is None and func._overloadname == "Tensor":
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):  # boolean-mask indexing
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)
    return False


def _is_launch(func) -> bool:
    if getattr(func, "is_view", False):
        return False
    return func._schema.name.split("::")[-1] not in _NO_KERNEL


class _Mode(TorchDispatchMode):
    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counter
        if not c._muted:
            name = str(func.overloadpacket.__name__)
            if _is_sync(func, args, kwargs):
                c.sync(name)
            if _is_launch(func):
                c.launch(name)
        return func(*args, **kwargs)


class OpCounter:
    """Tallies per named scope (``"other"`` unless inside ``scope(...)``); ``total`` sums them."""

    def __init__(self, cuda_like: bool = False, uploads: bool = False) -> None:
        self.cuda_like = cuda_like
        self.uploads = uploads
        self.scopes: dict[str, Tally] = {}
        self._stack: list[str] = ["other"]
        self._muted = 0

    # ---- recording ----------------------------------------------------------------------------------

    def _here(self) -> Tally:
        return self.scopes.setdefault(self._stack[-1], Tally())

    def sync(self, what: str) -> None:
        if not self._muted:
            t = self._here()
            t.syncs += 1
            t.ops[f"sync:{what}"] += 1

    def launch(self, what: str, n: int = 1) -> None:
        if not self._muted:
            t = self._here()
            t.launches += n
            t.ops[f"launch:{what}"] += n

    def copy(self, nbytes: int, what: str = "copy") -> None:
        if not self._muted:
            t = self._here()
            t.copies += 1
            t.copy_bytes += nbytes
            t.ops[f"copy:{what}"] += 1

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        self._muted += 1
        try:
            yield
        finally:
            self._muted -= 1

    @contextlib.contextmanager
    def recording(self) -> Iterator[OpCounter]:
        """Count everything the block dispatches (may be entered many times; tallies accumulate)."""
        with contextlib.ExitStack() as stack:
            for method in _PATCHED_METHODS:
                stack.enter_context(_patched(torch.Tensor, method, self._host_read(method)))
            if self.uploads:
                stack.enter_context(_module_patched(torch, "tensor", self._upload(torch.tensor)))
            for patch in _engine_patches(self):
                stack.enter_context(patch)
            stack.enter_context(_Mode(self))
            yield self

    def _host_read(self, method: str) -> Callable:
        original = getattr(torch.Tensor, method)
        counter = self

        def wrapper(t, *args, **kwargs):
            counter.sync(method)
            with counter.muted():
                return original(t, *args, **kwargs)

        return wrapper

    def _upload(self, original: Callable) -> Callable:
        counter = self

        def tensor(data, *args, **kwargs):
            if kwargs.get("device") is not None:
                counter.sync("tensor_upload")
            with counter.muted():
                return original(data, *args, **kwargs)

        return tensor

    @property
    def total(self) -> Tally:
        out = Tally()
        for t in self.scopes.values():
            out += t
        return out


@contextlib.contextmanager
def _patched(owner, name: str, value) -> Iterator[None]:
    had = name in vars(owner)
    old = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, old)
        else:
            delattr(owner, name)


def _engine_patches(counter: OpCounter) -> list:
    """Copies count as copies (with bytes); with ``cuda_like``, the fused kernels count as their launches."""
    from ..runtime import experts, kernels

    patches = []
    copy = experts.CopyEngine.copy

    def counted_copy(engine, dst, src, kind, *args, **kwargs):
        counter.copy(dst.numel() * dst.element_size(), kind)
        with counter.muted():
            return copy(engine, dst, src, kind, *args, **kwargs)

    patches.append(_patched(experts.CopyEngine, "copy", counted_copy))
    sync = experts.CopyEngine.synchronize

    def counted_sync(engine):
        counter.sync("CopyEngine.synchronize")
        return sync(engine)

    patches.append(_patched(experts.CopyEngine, "synchronize", counted_sync))
    if counter.cuda_like:
        for name, launches in kernels.FUSED_LAUNCHES.items():
            patches.append(_module_patched(kernels, name, _stand_in(counter, name, launches)))
        patches.append(_module_patched(kernels, "use_fused_kernel", kernels.would_use_fused_kernel))
        patches.append(_module_patched(kernels, "use_fused_dequantize", kernels.would_use_fused_dequantize))
        patches.append(_patched(experts.ExpertCache, "_make_dense", lambda cache, slot: None))
    return patches


def _stand_in(counter: OpCounter, name: str, launches: int) -> Callable:
    """The fused kernel's torch reference, muted, counted as the launches the Triton path issues."""
    from ..runtime import kernels

    reference = kernels.REFERENCES[name]

    def run(*args, **kwargs):
        counter.launch(f"triton.{name}", launches)
        with counter.muted():
            return reference(*args, **kwargs)

    return run


@contextlib.contextmanager
def _module_patched(module, name: str, value) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


@contextlib.contextmanager
def count_ops(cuda_like: bool = False, uploads: bool = False) -> Iterator[OpCounter]:
    """Count syncs, launches and copies of the block: ``with count_ops() as c: ...; c.total``; with
    ``uploads`` also ``torch.tensor(data, device=...)`` as a sync."""
    counter = OpCounter(cuda_like, uploads)
    with counter.recording():
        yield counter


# --------------------------------------------------------------------------------------------------
# per decode token, per MoE layer
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeCounts:
    """Counts over ``tokens`` decode steps of a model with ``moe_layers`` offloaded MoE blocks."""

    tokens: int
    moe_layers: int
    moe: Tally  # inside the MoE blocks (router, experts, cache, prefetch)
    total: Tally  # the whole forward (attention, norms, lm_head too)

    @property
    def syncs_per_layer_token(self) -> float:
        return self.moe.syncs / (self.tokens * self.moe_layers)

    @property
    def launches_per_layer_token(self) -> float:
        return self.moe.launches / (self.tokens * self.moe_layers)

    @property
    def syncs_per_token(self) -> float:
        return self.total.syncs / self.tokens

    @property
    def launches_per_token(self) -> float:
        return self.total.launches / self.tokens

    @property
    def copies_per_token(self) -> float:
        return self.total.copies / self.tokens

    def summary(self) -> dict[str, float]:
        return {
            "syncs_per_layer_token": self.syncs_per_layer_token,
            "launches_per_layer_token": self.launches_per_layer_token,
            "syncs_per_token": self.syncs_per_token,
            "launches_per_token": self.launches_per_token,
            "copies_per_token": self.copies_per_token,
        }


def count_decode(model, input_ids: torch.Tensor, tokens: int = 8, cuda_like: bool = True) -> DecodeCounts:
    """Prefill ``input_ids`` (not counted), then count ``tokens`` greedy decode steps, one forward each.

    Ops inside each ``OffloadedMoE`` forward are attributed to the MoE scope; picking the next token
    (argmax) is outside the count (``generate`` adds its own syncs, which are not the engine's).
    """
    from ..conversation.generation import _kv_cache_kwarg, _output_cache
    from ..runtime.moe import OffloadedMoE

    kv = _kv_cache_kwarg(model)
    counter = OpCounter(cuda_like)
    blocks = [m for m in model.modules() if isinstance(m, OffloadedMoE)]
    hooks = _moe_scope_hooks(blocks, counter)
    try:
        with torch.no_grad():
            out = model(input_ids, use_cache=True)
            past = _output_cache(out, None)
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(tokens):
                with counter.recording():
                    out = model(nxt, use_cache=True, **{kv: past})
                past = _output_cache(out, past)
                nxt = out.logits[:, -1:].argmax(-1)
    finally:
        for h in hooks:
            h.remove()
    return DecodeCounts(tokens, len(blocks), counter.scopes.get("moe", Tally()), counter.total)


def _moe_scope_hooks(blocks: list, counter: OpCounter) -> list:
    """Forward hooks attributing what each MoE block issues to the counter's ``"moe"`` scope."""
    scopes: list = []

    def enter(module, args):
        cm = counter.scope("moe")
        cm.__enter__()
        scopes.append(cm)

    def leave(module, args, output):
        scopes.pop().__exit__(None, None, None)

    return [h for b in blocks for h in (b.register_forward_pre_hook(enter), b.register_forward_hook(leave))]


@dataclass(frozen=True)
class PrefillCounts:
    """Counts of one prefill forward of ``tokens`` tokens through ``moe_layers`` MoE blocks."""

    tokens: int
    moe_layers: int
    moe: Tally
    total: Tally

    @property
    def syncs_per_layer(self) -> float:
        """Host syncs per MoE layer, list uploads (``torch.tensor(list, device=...)``) included."""
        return self.moe.syncs / self.moe_layers

    @property
    def launches_per_layer(self) -> float:
        return self.moe.launches / self.moe_layers


def count_prefill(model, input_ids: torch.Tensor, cuda_like: bool = True) -> PrefillCounts:
    """Count one forward of the whole prompt ``input_ids`` (a prefill chunk), MoE blocks in their own scope;
    list uploads (``torch.tensor(data, device=...)``) count as syncs."""
    from ..runtime.moe import OffloadedMoE

    counter = OpCounter(cuda_like, uploads=True)
    blocks = [m for m in model.modules() if isinstance(m, OffloadedMoE)]
    hooks = _moe_scope_hooks(blocks, counter)
    try:
        with torch.no_grad(), counter.recording():
            model(input_ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return PrefillCounts(int(input_ids.shape[-1]), len(blocks), counter.scopes.get("moe", Tally()), counter.total)
