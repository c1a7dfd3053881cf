"""Page-locked host memory of exactly the planned size, registered in chunks, with CUDA's error cleared.

torch's ``pin_memory=True`` rounds every allocation up to a power of two (a 5.4 GB host store would
take 8.6 GB), so the host store is ordinary memory registered with ``cudaHostRegister``: the plan's
bytes are the bytes pinned. A failed call leaves its error as CUDA's "last error", which the next
kernel launch check (``cudaGetLastError`` after every torch kernel) would report as *its* failure, so
every failure is cleared at once. A store the driver will not register in one piece is registered in
``PIN_CHUNK``-sized pieces (same bytes, so the plan holds); if that fails too, loading stops with
``PinnedMemoryError`` saying what to do, after unregistering what was registered.
The CUDA runtime is reached through one seam (``cudart``), so all of this is tested on CPU with a fake.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch

PIN_CHUNK = 1 << 30  # bytes per cudaHostRegister call when the whole store is refused (whole rows)
_UNPIN: dict[int, weakref.finalize] = {}  # data pointer -> the finalizer that unregisters it


class PinnedMemoryError(MemoryError):
    """The host store could not be page-locked; the message says how much and what to try."""


def pinned_host_buffer(
    rows: int, nbytes: int, cudart=None, device: torch.device | str | int | None = None
) -> torch.Tensor:
    """A ``[rows, nbytes]`` uint8 host tensor registered with CUDA (unregistered when it is freed).

    ``device`` is the GPU whose copies read and write it (the expert cache's): unpinning first waits
    for that device's copies (None: the current device). ``cudart`` is ``torch.cuda.cudart()`` unless a
    test passes a fake with ``cudaHostRegister``, ``cudaHostUnregister`` and optionally ``cudaGetLastError``.
    """
    buf = torch.empty(rows, nbytes, dtype=torch.uint8)
    if buf.numel() == 0:
        return buf
    cudart = cudart if cudart is not None else torch.cuda.cudart()
    base, total = buf.data_ptr(), buf.numel()
    code = _register(cudart, base, total)
    if code == 0:
        regions = [base]
    else:
        per = max(1, PIN_CHUNK // nbytes) * nbytes
        regions = []
        for start in range(0, total, per):
            size = min(per, total - start)
            chunk_code = _register(cudart, base + start, size)
            if chunk_code != 0:
                _unregister_all(cudart, regions, synchronize=False)
                raise PinnedMemoryError(
                    f"could not page-lock {total / 1e9:.2f} GB of host memory for {rows} host experts: "
                    f"cudaHostRegister failed ({_name(cudart, code)}; in {per / 1e9:.2f} GB pieces: "
                    f"{_name(cudart, chunk_code)} at {start / 1e9:.2f} GB). Free host RAM (restart the "
                    "runtime), or keep more experts on the GPU (fewer in host RAM)"
                )
            regions.append(base + start)
    _UNPIN[base] = weakref.finalize(buf, _unpin, base, cudart, regions, device)
    return buf


def release(buf: torch.Tensor) -> None:
    """Unregister ``buf`` now (after waiting for copies in flight) instead of when it is garbage collected."""
    fin = _UNPIN.get(buf.data_ptr()) if buf.numel() else None
    if fin is not None:
        fin()


def _unpin(base: int, cudart, regions: Sequence[int], device=None) -> None:
    _UNPIN.pop(base, None)
    _unregister_all(cudart, regions, device=device)


def _register(cudart, ptr: int, size: int) -> int:
    code = int(cudart.cudaHostRegister(ptr, size, 0))
    if code != 0:
        clear_last_error(cudart)
    return code


def _unregister_all(cudart, regions: Sequence[int], synchronize: bool = True, device=None) -> None:
    """Unregister every region; first wait for copies still reading or writing them on ``device`` (the
    cache's GPU, not whichever is current when the finalizer runs)."""
    try:
        if synchronize:
            _wait_for_copies(device)
        for ptr in regions:
            cudart.cudaHostUnregister(ptr)
    except Exception:  # interpreter shutdown: CUDA may already be gone
        pass


def _wait_for_copies(device) -> None:
    """``torch.cuda.synchronize(device)`` if CUDA is up (a test seam: no GPU here)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize(device)


def _name(cudart, code: int) -> str:
    try:
        return f"{cudart.cudaGetErrorString(code)} (error {code})"
    except Exception:
        return f"CUDA error {code}"


def clear_last_error(cudart=None) -> int | None:
    """Reset CUDA's last error (``cudaGetLastError``); returns the error cleared, None if unreachable.

    torch's ``cudart()`` module has no ``cudaGetLastError``, so the runtime library torch already
    loaded is called through ctypes (same library instance, so the same per-thread error state).
    """
    if cudart is not None and hasattr(cudart, "cudaGetLastError"):
        return int(cudart.cudaGetLastError())
    lib = _loaded_cudart()
    return None if lib is None else int(lib.cudaGetLastError())


def _loaded_cudart() -> ctypes.CDLL | None:
    """The ``libcudart`` this process has mapped (Linux), or None."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in maps:
        path = line.split()[-1] if line.split() else ""
        if "libcudart.so" in Path(path).name:
            try:
                return ctypes.CDLL(path)
            except OSError:
                return None
    return None


__all__ = ["PIN_CHUNK", "PinnedMemoryError", "clear_last_error", "pinned_host_buffer", "release"]
