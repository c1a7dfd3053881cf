"""An embedding table kept in host RAM: only the looked-up rows travel to the GPU.

Mixtral's table is 32000 x 4096 fp16 = 262 MB of VRAM (about four 2-bit expert slots), yet a decode step
reads one row of it (8 KB). ``HostEmbedding`` replaces the model's ``embed_tokens``: the table stays on the
host (page-locked on CUDA, so the row copy is asynchronous), the rows for the input ids are gathered there
into a fresh pinned buffer, and that buffer is copied to the device ``non_blocking`` on the current stream.
torch's caching host allocator records the copy on the buffer, so it is not reused before the copy ran.

The host must know the ids. ``generate`` keeps them on the device, so ``forward`` reads them back: one host
sync per forward (per decode token, not per layer). It is cheap where it sits: ``generate`` has already
synced after sampling (its stopping check), so the stream holds only the few ops that build the next input.
Ids given on the CPU are used as they are. On a CPU run the same code runs (the table is simply host memory).

A tied ``lm_head`` reads the whole table every token (the logits are ``hidden @ table.T``): that table must stay
on the device, so ``host_embedding_refusal`` says why such a family keeps it there.
"""

from __future__ import annotations

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

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
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


__all__ = ["HostEmbedding", "host_embedding_refusal"]
