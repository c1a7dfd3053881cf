"""The attention path, chosen once per device by its compute capability, and what it costs in memory.

transformers 5 calls SDPA with ``enable_gqa=True`` whenever the attention mask is None (the first
prefill and every decode step). torch's flash kernel takes that flag but needs compute capability 8
or newer; the memory-efficient kernel rejects K/V with fewer heads than Q (``sdp_utils.cpp``:
``check_batch_size_and_num_heads_dense<false>``). On a T4 (7.5) every such call therefore lands on
the math kernel: fp32 ``[heads, T, T]`` scores (4.3 GB at 4096 tokens) and, per decode step, K/V
expanded to 32 heads. Below capability 8 this module registers ``colab_sdpa``: decode folds the
query heads that share a KV head into the query length (no K/V copy), prefill expands K/V to every
head (what the memory-efficient kernel takes), and no call carries the GQA flag. On every GPU the
prompt is prefilled in chunks (``generation.prefill``), so activation memory is bounded by the chunk
whatever kernel runs.
``sdpa_backend`` models torch's kernel choice so a CPU test can check the path a T4 would take.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FLASH_MIN_CAPABILITY = (8, 0)  # torch's flash SDPA kernel: sm80 and newer
MEM_EFFICIENT_MIN_CAPABILITY = (5, 0)
PREFILL_CHUNK = 1024  # prompt tokens per forward on a GPU: bounds activations, costs one expert sweep per chunk
NO_GQA = "colab_sdpa"  # the registered implementation name (transformers' AttentionInterface)
T4_CAPABILITY = (7, 5)


@dataclass(frozen=True)
class AttentionPath:
    """How attention runs on one device: the transformers implementation, the kernel SDPA is expected
    to pick at prefill, whether the GQA flag reaches SDPA, and the prefill chunk (None: whole prompt)."""

    implementation: str  # config._attn_implementation: "sdpa" (stock) or NO_GQA
    kernel: str  # "flash" | "memory_efficient" | "math" | "cpu"
    capability: tuple[int, int] | None  # None: a CPU run
    prefill_chunk: int | None
    reason: str

    @property
    def gqa_flag(self) -> bool:
        """Whether SDPA may receive ``enable_gqa=True`` (stock transformers, mask-free calls)."""
        return self.implementation == "sdpa"

    def describe(self) -> str:
        chunk = f"prefill in chunks of {self.prefill_chunk} tokens" if self.prefill_chunk else "whole-prompt prefill"
        cc = "CPU" if self.capability is None else f"compute capability {self.capability[0]}.{self.capability[1]}"
        return f"attention: {self.implementation} -> {self.kernel} kernel on {cc}, {chunk} ({self.reason})"

    def scratch_bytes(self, context: int, heads: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
        """Attention memory of one layer at the largest prefill step, beyond q/k/v/output.

        ``context`` tokens of keys; queries are one chunk (or the whole prompt). The math kernel holds
        fp32 scores and their softmax; the others hold K/V expanded to every head (repeat_kv) when the
        GQA flag is not used, plus the boolean mask of a chunk after the first and torch's additive
        copy of it (padded to 16 columns).
        """
        q = min(context, self.prefill_chunk or context)
        if self.kernel == "math":
            return 2 * heads * q * context * 4 + 2 * context * heads * head_dim * itemsize
        expanded = 0 if heads == kv_heads else 2 * context * heads * head_dim * itemsize
        mask = q * context * (1 + 2 * itemsize) if q < context else q * context
        return expanded + mask


def device_capability(device: str | torch.device) -> tuple[int, int] | None:
    """The GPU's compute capability, or None for a CPU."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(dev)
    return int(major), int(minor)


def choose_attention(
    device: str | torch.device = "cpu",
    capability: tuple[int, int] | None = None,
    prefill_chunk: int | None = PREFILL_CHUNK,
) -> AttentionPath:
    """The attention path for ``device``; pass ``capability`` to plan for (or simulate) another GPU.

    A CPU without a given capability keeps stock SDPA and whole-prompt prefill (its parity reference).
    """
    cap = capability if capability is not None else device_capability(device)
    if cap is None:
        return AttentionPath("sdpa", "cpu", None, None, "CPU: stock transformers SDPA")
    if tuple(cap) >= FLASH_MIN_CAPABILITY:
        return AttentionPath("sdpa", "flash", tuple(cap), prefill_chunk, "flash takes the GQA flag")
    if tuple(cap) < MEM_EFFICIENT_MIN_CAPABILITY:
        return AttentionPath(NO_GQA, "math", tuple(cap), prefill_chunk, "too old for fused SDPA kernels")
    return AttentionPath(
        NO_GQA, "memory_efficient", tuple(cap), prefill_chunk, "no flash below 8.0; no GQA flag so mem-efficient runs"
    )


def install_attention(model, path: AttentionPath) -> None:
    """Make ``model`` (a transformers causal LM) use ``path``; ``generation.generate_stream`` reads
    ``model.attention_path.prefill_chunk`` and prefills in chunks itself (transformers'
    ``prefill_chunk_size`` continues a non-empty KV cache wrongly in 5.15, the version Colab ships)."""
    if path.implementation == NO_GQA:
        register()
    model.config._attn_implementation = path.implementation
    model.attention_path = path


# --------------------------------------------------------------------------------------------------
# the registered attention function
# --------------------------------------------------------------------------------------------------


def sdpa_without_gqa_flag(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, heads, q, d]
    key: torch.Tensor,  # [B, kv_heads, kv, d]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention without ``enable_gqa``: every call has equal Q and K/V heads.

    One query token: the ``n_rep`` query heads of each KV head become ``n_rep`` query rows over that
    head's keys (no causal mask is needed for a single token, so this is exact). Longer queries: K/V
    are repeated to every head, the layout the memory-efficient kernel accepts.
    """
    n_rep = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, _ = query.shape
    if n_rep > 1:
        if q_len == 1:
            query = query.reshape(batch, heads // n_rep, n_rep, query.shape[-1])
            if attention_mask is not None and attention_mask.shape[1] != 1:
                attention_mask = attention_mask.reshape(batch, heads // n_rep, n_rep, attention_mask.shape[-1])
        else:
            key = _repeat_kv(key, n_rep)
            value = _repeat_kv(value, n_rep)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = q_len > 1 and attention_mask is None and causal
    if causal and key.shape[2] > q_len:  # an empty static cache's padding: causal SDPA is top-left aligned
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal
    )
    out = out.reshape(out.shape[0], heads, q_len, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, kv_heads, T, d] -> [B, kv_heads * n_rep, T, d], head h reading KV head h // n_rep."""
    b, kvh, t, d = x.shape
    return x[:, :, None].expand(b, kvh, n_rep, t, d).reshape(b, kvh * n_rep, t, d)


_registered = False


def register() -> None:
    """Register ``NO_GQA`` with transformers (attention function and its mask, the stock SDPA mask)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NO_GQA, sdpa_without_gqa_flag)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NO_GQA, sdpa_mask)
    _registered = True


# --------------------------------------------------------------------------------------------------
# torch's kernel choice, modelled (CPU tests; a CUDA test checks it against torch itself)
# --------------------------------------------------------------------------------------------------


def sdpa_backend(
    capability: tuple[int, int],
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    enable_gqa: bool = False,
) -> str:
    """The kernel torch's CUDA SDPA picks for these arguments on a GPU of ``capability``.

    The rules of ``select_sdp_backend`` in ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``
    (torch 2.4-2.13) that matter here: flash needs sm80+, fp16/bf16, no mask, head dim <= 256, and
    takes fewer K/V heads; memory-efficient needs sm50+, fp16/fp32 below sm80, a head dim that is a
    multiple of 8 (fp16) or 4 (fp32), and as many K/V heads as query heads; otherwise math.
    """
    d = query.shape[-1]
    gqa = key.shape[-3] != query.shape[-3]
    if gqa and not enable_gqa:
        return "error"  # SDPA itself raises: head counts differ without the flag
    low = query.dtype in (torch.float16, torch.bfloat16)
    if tuple(capability) >= FLASH_MIN_CAPABILITY and low and attn_mask is None and d <= 256 and d % 8 == 0:
        return "flash"
    dtypes = (torch.float16, torch.float32) + ((torch.bfloat16,) if tuple(capability) >= (8, 0) else ())
    align = 8 if query.dtype != torch.float32 else 4
    if tuple(capability) >= MEM_EFFICIENT_MIN_CAPABILITY and query.dtype in dtypes and d % align == 0 and not gqa:
        return "memory_efficient"
    return "math"


__all__ = [
    "NO_GQA",
    "PREFILL_CHUNK",
    "T4_CAPABILITY",
    "AttentionPath",
    "choose_attention",
    "device_capability",
    "install_attention",
    "register",
    "sdpa_backend",
    "sdpa_without_gqa_flag",
]
