"""Emulating a free Colab T4 on a bigger GPU (``scripts/gpu_check.sh``, ``benchmarks/gpu_offload.py``).

A T4's 15.0 GB is what ``mem_get_info`` reports free once the CUDA context exists; everything the
runtime loads afterwards (cuBLAS workspaces and handles, Triton modules) comes out of those 15.0 GB too,
outside torch's caching allocator. Capping only the allocator at 15.0 GB would leave that memory free
on a bigger GPU, so an out-of-memory a T4 would hit could not happen. ``cap_like_t4`` loads the runtime
pieces first (a cuBLAS matmul, a Triton launch), measures what the runtime holds outside the allocator
beyond the bare context, and caps the allocator at 15.0 GB minus that. It also forces the T4's
attention: no flash (cc 7.5 has none), so SDPA runs the memory-efficient kernel, and the T4 path object
(chunked prefill) for models built afterwards (``t4_attention``).
"""

from __future__ import annotations

import torch

from ..runtime.attention import T4_CAPABILITY, AttentionPath, choose_attention

T4_FREE_BYTES = int(15.0e9)  # mem_get_info free on a fresh Colab T4, the context already made


def outside_allocator(device: torch.device | str | int = 0) -> int:
    """Device bytes in use that torch's caching allocator does not hold (context, cuBLAS, modules)."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def _load_runtime_pieces(device: torch.device) -> None:
    """What a first decode step loads: cuBLAS (fp16 matmul) and a Triton module."""
    a = torch.randn(64, 64, device=device, dtype=torch.float16)
    (a @ a).sum()
    from ..runtime import kernels

    if kernels.HAS_TRITON:
        from ..weights.quant import DEMO_EXPERT_SPEC, quantize

        w = quantize(torch.randn(64, 256) * 0.02, DEMO_EXPERT_SPEC, optimize=False)
        w = type(w).from_tensors(w.spec, w.shape, {k: v.to(device) for k, v in w.tensors().items()})
        try:
            kernels.triton_gemv(torch.zeros(1, 256, device=device, dtype=torch.float16), w)
        except Exception:  # no Triton here: nothing of it to count
            pass
    torch.cuda.synchronize(device)


def cap_like_t4(device: torch.device | str = "cuda", free_bytes: int = T4_FREE_BYTES) -> dict:
    """Cap the caching allocator to what a T4 would leave it; returns the measurements (bytes)."""
    device = torch.device(device)
    torch.zeros(1, device=device)  # the context
    torch.cuda.synchronize(device)
    context = outside_allocator(device)
    _load_runtime_pieces(device)
    runtime = max(0, outside_allocator(device) - context)
    cap = free_bytes - runtime
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    torch.backends.cuda.enable_flash_sdp(False)  # a T4 has no flash attention: memory-efficient SDPA
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    return {"context_bytes": context, "runtime_outside_bytes": runtime, "cap_bytes": cap, "total_bytes": total}


def t4_attention() -> AttentionPath:
    """The attention path a T4 gets (``OffloadConfig(attention=...)``): chunked prefill, no flash."""
    return choose_attention("cuda", capability=T4_CAPABILITY)


__all__ = ["T4_FREE_BYTES", "cap_like_t4", "outside_allocator", "t4_attention"]
