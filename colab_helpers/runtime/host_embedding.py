"""An embedding table kept in host RAM: only the looked-up rows travel to the GPU.

Mixtral's table is 32000 x 4096 fp16 = 262 MB of VRAM (about four 2-bit expert slots), yet a decode step
reads one row of it (8 KB). ``HostEmbedding`` replaces the model's ``embed_tokens``: the table stays on the
host (page-locked on CUDA, so the row copy is asynchronous), the rows for the input ids are gathered there
into a fresh pinned buffer, and that buffer is copied to the device ``non_blocking`` on the current stream.
torch's caching host allocator records the copy on the buffer, so it is not reused before the copy ran.

The host must know the ids. Our decode loop (``conversation.generation.generate_stream``) already has them
there: it streams text, so every sampled token reaches the host anyway. It lends the module a ``HostIds``
(``feeding_host_ids``): the prompt and each streamed token, looked up by the KV cache's length (the first
position the forward embeds), so the gather reads host memory and nothing is read back. Stock
``model.generate`` (no feed) keeps the ids on the device, so ``forward`` reads them back: one host sync per
forward (per decode token, not per layer), cheap where it sits (``generate`` has just synced in its stopping
check). On a CPU run the same code runs (the table is simply host memory).

A tied ``lm_head`` reads the whole table every token (the logits are ``hidden @ table.T``): that table must stay
on the device, so ``host_embedding_refusal`` says why such a family keeps it there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def host_embedding_refusal(arch) -> str | None:
    """Why a model (its ``families.MoEArchitecture``) must keep its embeddings on the device, or None.

    Mixtral's layout stores ``lm_head`` even when the config says tied, so Mixtral never shares the table.
    """
    if arch.tie_embeddings and arch.family != "mixtral":
        return (
            f"{arch.name} ties lm_head to the embedding table: the logits read the whole table every token, "
            "so it stays on the device"
        )
    return None


class HostEmbedding(nn.Module):
    """``nn.Embedding`` whose table lives in host RAM; its output is on ``device``."""

    def __init__(self, weight: torch.Tensor, device: torch.device | str, pin: bool | None = None) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.num_embeddings, self.embedding_dim = weight.shape
        pin = self.device.type == "cuda" if pin is None else pin
        # a plain tensor, not a Parameter: ``model.device`` (its first parameter's) must stay the GPU
        self.weight = _host_table(weight.detach(), pin)
        self.pinned = pin
        self.feed: HostIds | None = None  # set by ``feeding_host_ids`` while a decode loop streams

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = self.feed.lookup(input_ids.shape) if self.feed is not None else None
        if ids is None:
            ids = input_ids.cpu()  # free when the ids are already on the host; else the one read-back per forward
        rows = torch.empty(
            (ids.numel(), self.embedding_dim), dtype=self.weight.dtype, pin_memory=self.pinned and ids.numel() > 0
        )
        torch.index_select(self.weight, 0, ids.reshape(-1), out=rows)
        out = rows.to(self.device, non_blocking=self.pinned)
        return out.view(*ids.shape, self.embedding_dim)

    def release(self) -> None:
        """Drop the table now (``model.close_model``): its pages are unpinned when the last reference goes."""
        self.weight = self.weight.new_empty((0, self.embedding_dim))

    def _apply(self, fn, recurse: bool = True):
        """``model.to(...)`` moves every other module; the table stays in host RAM (built in the compute dtype)."""
        return self

    def extra_repr(self) -> str:
        where = "pinned host" if self.pinned else "host"
        return f"{self.num_embeddings}, {self.embedding_dim}, table in {where} RAM, rows to {self.device}"


class HostIds:
    """The host copy of the sequence a decode loop feeds one model: the prompt, then each streamed token.

    ``lookup`` finds a forward's ids by position: a forward embeds the tokens that follow what ``kv_cache``
    holds (its ``get_seq_length()``, a host int), which is how transformers derives ``cache_position`` too.
    """

    def __init__(self, prompt: torch.Tensor, kv_cache) -> None:
        self.prompt = prompt.reshape(-1)  # on the host, slices of it are views, not copies
        self.generated: list[int] = []
        self.kv_cache = kv_cache

    def append(self, ids: list[int]) -> None:
        self.generated.extend(ids)

    def __len__(self) -> int:
        return self.prompt.numel() + len(self.generated)

    def lookup(self, shape: torch.Size) -> torch.Tensor | None:
        """The host ids of a forward of ``shape`` ([1, n]), or None where they are not known here (a batch,
        a token not streamed yet): the caller then reads the device ids back."""
        if len(shape) != 2 or shape[0] != 1:
            return None
        start = int(self.kv_cache.get_seq_length())
        end, held = start + shape[1], self.prompt.numel()
        if end > len(self):
            return None
        if self.prompt.device.type != "cpu":  # a prompt given on the device: read once, by the first lookup
            self.prompt = self.prompt.cpu()
        if end <= held:
            return self.prompt[start:end].view(1, -1)
        tail = torch.tensor(self.generated[max(start - held, 0) : end - held], dtype=self.prompt.dtype)
        return (tail if start >= held else torch.cat([self.prompt[start:], tail])).view(1, -1)


@contextlib.contextmanager
def feeding_host_ids(model, ids: HostIds) -> Iterator[bool]:
    """Lend ``ids`` to ``model``'s ``HostEmbedding`` for the block; yields whether the model has one."""
    emb = model.get_input_embeddings()
    if not isinstance(emb, HostEmbedding):
        yield False
        return
    emb.feed = ids
    try:
        yield True
    finally:
        emb.feed = None


def _host_table(weight: torch.Tensor, pin: bool) -> torch.Tensor:
    """The table on the host; page-locked with ``cudaHostRegister`` (no power-of-two rounding) on CUDA."""
    weight = weight.to("cpu")
    if not pin:
        return weight.contiguous()
    from .pinning import pinned_host_buffer

    rows, cols = weight.shape
    buf = pinned_host_buffer(rows, cols * weight.element_size())
    table = buf.view(weight.dtype)
    table.copy_(weight)
    return table


__all__ = ["HostEmbedding", "HostIds", "feeding_host_ids", "host_embedding_refusal"]
