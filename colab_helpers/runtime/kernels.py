"""Low-bit matmul dispatch: fused Triton GEMV on CUDA for decode, dequantize + matmul elsewhere.

Decode (one token, batch 1) is memory-bandwidth bound: every weight byte is read once per token, so a
path that first writes an fp16 copy of ``W`` and then reads it again moves ~10x the bytes of the packed
weight (``docs/benchmarks.md``, reference facts). The fused kernel reads each packed byte once, unpacks its codes
and dequantizes them in registers, and reduces straight into ``y``.

It reads the checkpoint's native layout, no re-packing: ``W[out, in]`` viewed row-major as the
``[g, M]`` code grid has ``M = R * in`` columns with ``R = out / g``, so column ``j = r0 * in + c`` holds
``W[i * R + r0, c]`` for ``i = 0..g-1``. For a fixed ``r0`` the reduction over ``c`` therefore runs
over *contiguous* columns, and one packed byte of that column carries several grid rows ``i`` (packed
row ``p`` holds rows ``p, p + h, p + 2h, ...``), i.e. several outputs that share the column's
step and zero point. A program owns one ``r0``, a block of packed rows and a range of ``c``; it keeps
a ``[codes per word, packed rows, BLOCK_C]`` fp32 accumulator and reduces it once at the end.

Dequantization repeats ``QuantizedWeight.dequantize`` op for op in fp16, so the kernel multiplies
exactly the reference weights; only the fp32 summation order differs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..weights import quant
from ..weights.quant import QuantizedWeight, QuantSpec, dequantized_linear

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    try:
        import triton
        import triton.language as tl
    except Exception:  # a broken install is the same as none: use the torch path
        HAS_TRITON = False

MAX_GEMV_ROWS = 4  # rows of x up to which the fused GEMV beats dequantize + matmul (decode, tiny batches)
FUSED_DTYPES = (torch.float16, torch.float32)  # what the T4 path needs; anything else takes the torch path
_SLOTS = 16  # grid rows (codes per word x packed rows) one program accumulates per column: bounds registers
_fused_enabled = True  # cleared (with a warning) if the fused kernel ever fails on this machine


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------


def quant_linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """``x @ W.T`` for a low-bit ``W``: fused GEMV for decode on CUDA, else dequantize + matmul."""
    if use_fused_kernel(x, weight):
        y = _fused_or_none(triton_gemv, (x, weight))
        if y is not None:
            return y
    return dequantized_linear(x, weight)


def expert_mlp(
    x: torch.Tensor, w: dict[str, QuantizedWeight], coef: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``out + coef * w2(silu(w1 x) * w3 x)`` (just the product when ``out`` is None; ``out`` is updated in
    place) for a few rows of ``x``: Mixtral's expert, weighted by its routing coefficient ``coef`` (a
    0-d device tensor) and summed into the layer output.

    CUDA: two launches, ``w1``/``w3`` together, then ``w2`` with SiLU·mul in its input and the weighted
    sum in its output. Elsewhere: the same arithmetic as separate torch ops.
    """
    if use_fused_kernel(x, w["w1"]):
        y = _fused_or_none(fused_expert, (x, w, coef, out), "fused expert kernels")
        if y is not None:
            return y
    h = F.silu(quant_linear(x, w["w1"])) * quant_linear(x, w["w3"])
    y = quant_linear(h, w["w2"]) * coef
    return y if out is None else out.add_(y)


def fused_expert(
    x: torch.Tensor, w: dict[str, QuantizedWeight], coef: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``expert_mlp``'s CUDA path, unconditionally: the two Triton launches."""
    return triton_expert_down(triton_expert_gate_up(x, w["w1"], w["w3"]), w["w2"], coef, out, x.dtype)


def _fused_or_none(launch, args: tuple, what: str = "fused low-bit GEMV") -> torch.Tensor | None:
    """``launch(*args)``; None (fused kernels off for the session, with a warning) if it cannot compile
    or launch here. Out of memory is re-raised: memory, not the kernel, failed, and the dequantize
    fallback would need more of it (the caller's OOM handling drops the KV cache instead)."""
    global _fused_enabled
    try:
        return launch(*args)
    except Exception as err:
        if is_out_of_memory(err):
            raise
        _fused_enabled = False  # never run on this GPU/driver before: keep the model usable, say so once
        warnings.warn(f"{what} failed ({err!r}); using dequantize + matmul from now on", stacklevel=3)
        return None


def is_out_of_memory(err: BaseException) -> bool:
    """torch's OOM, or a driver/Triton error whose message says out of memory."""
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def warm_up(
    linears: Iterable[QuantizedWeight],
    experts: Iterable[dict[str, QuantizedWeight]],
    dtype: torch.dtype,
    device: str | torch.device,
    progress: bool = True,
    gemv=None,
    expert=None,
    dequant=None,
) -> int:
    """Compile, now (at load), every Triton variant that decode and a prefill launch.

    Triton compiles one variant per *specialization key*: argument dtypes, constexprs, which integer
    arguments equal 1 or are divisible by 16, and which pointers are 16-byte aligned. Decode and a
    prefill of up to ``MAX_GEMV_ROWS`` tokens per expert vary only the row count (1 is its own variant,
    and the rows decide whether a launch splits the input dimension, which makes its output fp32), so
    ``triton_gemv`` is launched at every row count 1..``MAX_GEMV_ROWS`` for each (spec, shape) of
    ``linears`` (attention) and of the expert matrices (a short prompt routes a few tokens per expert
    through it); ``fused_expert`` (first and accumulating call) at one row for each expert geometry;
    ``triton_dequantize`` (longer prefills dequantize, then matmul) once per matrix geometry. The
    routing coefficient decode passes (``coefs[i]``, a 0-d view 2 bytes into its vector) is not
    specialized on its alignment (``_DOWN``). ``tests/test_warm_up_keys.py`` lists the keys a decode, a
    3-token and a 40-token prefill hit and checks this covers them.

    Returns how many geometries were compiled; 0 where the fused path is off (no CUDA, no Triton, or
    disabled). ``gemv``/``expert`` are test seams. A compile or launch failure switches the fused
    kernels off with the same warning as at run time.
    """
    dev = torch.device(device)
    if gemv is None or expert is None:
        if not (HAS_TRITON and _fused_enabled and dev.type == "cuda"):
            return 0
        gemv, expert = gemv or triton_gemv, expert or fused_expert
        dequant = dequant or triton_dequantize
    mlps: dict[tuple, dict[str, QuantizedWeight]] = {}
    for w in experts:
        mlps.setdefault(tuple((k, v.spec, tuple(v.shape)) for k, v in sorted(w.items())), w)
    shapes: dict[tuple, QuantizedWeight] = {}
    for w in [*linears, *(v for mlp in mlps.values() for _, v in sorted(mlp.items()))]:
        shapes.setdefault((w.spec, tuple(w.shape)), w)
    if progress:
        n = len(shapes) + len(mlps)
        print(f"compiling fused low-bit kernels for {n} weight shapes...", file=sys.stderr, flush=True)
    for w in shapes.values():
        for rows in range(1, MAX_GEMV_ROWS + 1):
            if _fused_or_none(gemv, (torch.zeros(rows, w.shape[1], dtype=dtype, device=dev), w)) is None:
                return 0
        if dequant is not None and _fused_or_none(dequant, (w, dtype), "fused dequantize") is None:
            return 0
    for w in mlps.values():
        x = torch.zeros(1, w["w1"].shape[1], dtype=dtype, device=dev)
        coef = torch.zeros((), dtype=dtype, device=dev)
        out = _fused_or_none(expert, (x, w, coef), "fused expert kernels")
        if out is None or _fused_or_none(expert, (x, w, coef, out), "fused expert kernels") is None:
            return 0
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return len(shapes) + len(mlps)


def use_fused_kernel(x: torch.Tensor, weight: QuantizedWeight) -> bool:
    """Whether ``quant_linear`` takes the Triton path: CUDA tensors, Triton importable, few rows."""
    return (
        HAS_TRITON
        and _fused_enabled
        and x.is_cuda
        and weight.W_q.device == x.device
        and would_use_fused_kernel(x, weight)
    )


def would_use_fused_kernel(x: torch.Tensor, weight: QuantizedWeight) -> bool:
    """The device-independent half of ``use_fused_kernel``: what a CUDA run with Triton would take
    (``dispatch_count`` uses it to count a CPU run's launches as the CUDA path issues them)."""
    rows = x.numel() // max(1, x.shape[-1])
    return (
        not x.requires_grad  # the kernel has no backward
        and x.dtype in FUSED_DTYPES
        and x.shape[-1] == weight.shape[1]  # a wrong shape gets torch's own error, not the fallback warning
        and 0 < rows <= MAX_GEMV_ROWS
    )


# --------------------------------------------------------------------------------------------------
# geometry and tiling
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Where grid row ``i`` of column ``j`` lives in ``W_q``: packed row ``i % packed_rows``, bit
    ``top_shift - (i // packed_rows) * nbits``; its output row is ``i * rows_per_group + j // in``."""

    nbits: int
    group_size: int
    rows_per_group: int  # R = out / g
    packed_rows: int  # h: rows of W_q
    codes_per_word: int  # 8 / nbits, or 10 for 3-bit int32 words
    top_shift: int  # bit offset of the first code in a word

    @classmethod
    def of(cls, spec: QuantSpec, shape: tuple[int, int]) -> Geometry:
        per_word = 10 if spec.nbits == 3 else 8 // spec.nbits
        top = 27 if spec.nbits == 3 else 8 - spec.nbits
        return cls(spec.nbits, spec.group_size, shape[0] // spec.group_size, spec.packed_rows, per_word, top)


@dataclass(frozen=True)
class GemvConfig:
    """One launch's tiling: ``p_block`` packed rows (x codes per word grid rows) and ``block_c`` input
    columns per loop step in a program; ``split`` programs share the input dimension (partial sums)."""

    block_c: int
    p_block: int
    split: int = 1
    num_warps: int = 4


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_config(spec: QuantSpec, shape: tuple[int, int], rows: int, device: torch.device) -> GemvConfig:
    """Bound registers to ``_SLOTS`` accumulators per column and, on CUDA, split the input dimension
    until there are ~4 programs per SM (attention k/v have only ``out / g = 16`` row groups)."""
    geo = Geometry.of(spec, shape)
    p_block = max(1, min(_SLOTS // _pow2(geo.codes_per_word), _pow2(geo.packed_rows)))
    block_c = min(256, _pow2(shape[1]))
    split = 1
    if device.type == "cuda":
        programs = rows * geo.rows_per_group * math.ceil(geo.packed_rows / p_block)
        split = max(1, min(math.ceil(4 * _sm_count(device) / programs), shape[1] // (4 * block_c)))
    return GemvConfig(block_c=block_c, p_block=p_block, split=split)


@dataclass(frozen=True)
class _Plan:
    """Everything a launch needs besides the tensors; cached per (spec, shape, rows, device)."""

    grid: tuple[int]
    split: int
    ints: tuple[int, ...]  # the kernel's runtime integer arguments, in order
    constants: dict[str, int | bool]  # constexprs and launch options


def make_plan(spec: QuantSpec, shape: tuple[int, int], rows: int, cfg: GemvConfig) -> _Plan:
    """Grid and arguments for one tiling, computed once per shape so a decode step pays only the launch."""
    out_f, in_f = shape
    geo = Geometry.of(spec, shape)
    m = spec.num_groups(shape)
    if geo.packed_rows * m >= 2**31:
        raise ValueError(f"weight {list(shape)} too large for the kernel's 32-bit offsets")
    chunk = math.ceil(in_f / cfg.split / cfg.block_c) * cfg.block_c
    split = math.ceil(in_f / chunk)
    n_pblocks = math.ceil(geo.packed_rows / cfg.p_block)
    scale_cols = m // spec.scale_group_size
    constants = dict(
        NBITS=geo.nbits,
        GROUP=geo.group_size,
        PACKED_ROWS=geo.packed_rows,
        PER_WORD=geo.codes_per_word,
        PER_WORD_PAD=_pow2(geo.codes_per_word),
        TOP_SHIFT=geo.top_shift,
        P_BLOCK=cfg.p_block,
        N_PBLOCKS=n_pblocks,
        BLOCK_C=cfg.block_c,
        WRAP_ONCE=cfg.block_c <= scale_cols,
        num_warps=cfg.num_warps,
        enable_fp_fusion=True,  # fp32 multiply-adds into the accumulator; no fp16 multiply feeds an add
    )
    grid = (rows * n_pblocks * geo.rows_per_group * split,)
    return _Plan(grid, split, (rows, in_f, out_f, m, scale_cols, geo.rows_per_group, chunk), constants)


@functools.lru_cache(maxsize=512)
def _default_plan(spec: QuantSpec, shape: tuple[int, int], rows: int, device: torch.device) -> _Plan:
    return make_plan(spec, shape, rows, default_config(spec, shape, rows, device))


# --------------------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------------------


def _gemv_kernel(
    x_ptr,  # [N, in] activations
    wq_ptr,  # [h, M] packed codes (uint8, int32 for 3-bit)
    sq_ptr,  # [gs, M/gs] uint8 step codes; flat index j
    ss_ptr,  # [M/gs] fp16 step-code scale; index j % (M/gs)
    sz_ptr,  # [M/gs] fp16 step-code zero
    zq_ptr,  # [M] uint8 zero-point codes
    zs_ptr,  # [] fp16 zero-code scale
    zz_ptr,  # [] fp16 zero-code zero
    y_ptr,  # [split, N, out] partial sums (or [N, out] in x's dtype when split == 1)
    n_rows,
    in_features,
    out_features,
    num_groups,  # M
    scale_cols,  # M / gs
    rows_per_group,  # R
    chunk,  # input columns per split, a multiple of BLOCK_C
    NBITS: tl.constexpr,
    GROUP: tl.constexpr,  # g
    PACKED_ROWS: tl.constexpr,  # h
    PER_WORD: tl.constexpr,  # codes per packed word
    PER_WORD_PAD: tl.constexpr,  # next power of two
    TOP_SHIFT: tl.constexpr,
    P_BLOCK: tl.constexpr,
    N_PBLOCKS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WRAP_ONCE: tl.constexpr,  # BLOCK_C <= M/gs: a step-meta index wraps at most once per block
):
    # program -> (x row n, packed-row block pb, row group r0, input split s); n fastest so programs
    # sharing packed bytes run together and re-reads for n > 0 come from L2
    pid = tl.program_id(0)
    n = pid % n_rows
    t = pid // n_rows
    pb = t % N_PBLOCKS
    t = t // N_PBLOCKS
    r0 = t % rows_per_group
    s = t // rows_per_group

    k = tl.arange(0, PER_WORD_PAD)  # code slot within a word
    p = pb * P_BLOCK + tl.arange(0, P_BLOCK)  # packed row
    shift = tl.maximum(TOP_SHIFT - k * NBITS, 0)[:, None, None]
    p_ok = (p < PACKED_ROWS)[:, None]
    zero_scale = tl.load(zs_ptr)
    zero_zero = tl.load(zz_ptr)

    c_start = s * chunk
    c_stop = tl.minimum(c_start + chunk, in_features)
    col0 = r0 * in_features  # grid column of (r0, c = 0)
    acc = tl.zeros([PER_WORD_PAD, P_BLOCK, BLOCK_C], dtype=tl.float32)
    for c0 in range(c_start, c_stop, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < c_stop
        j = col0 + c
        if WRAP_ONCE:
            sj = (col0 + c0) % scale_cols + tl.arange(0, BLOCK_C)
            sj = tl.where(sj >= scale_cols, sj - scale_cols, sj)
        else:
            sj = j % scale_cols
        # per-column step and zero, fp16 op for op as QuantizedWeight.step_and_zero
        step = (tl.load(sq_ptr + j, mask=c_ok, other=0).to(tl.float16) - tl.load(sz_ptr + sj, mask=c_ok, other=0.0)) * (
            tl.load(ss_ptr + sj, mask=c_ok, other=0.0)
        )
        zero = (tl.load(zq_ptr + j, mask=c_ok, other=0).to(tl.float16) - zero_zero) * zero_scale
        xv = tl.load(x_ptr + n * in_features + c, mask=c_ok, other=0.0).to(tl.float32)
        # each packed word of the block is loaded once and yields PER_WORD grid rows
        words = tl.load(wq_ptr + p[:, None] * num_groups + j[None, :], mask=p_ok & c_ok[None, :], other=0)
        # code -> fp16 without int->float conversion: 0x6400 | q is the fp16 bit pattern of 1024 + q
        codes = ((words.to(tl.int32)[None, :, :] >> shift) & ((1 << NBITS) - 1)) | 0x6400
        q = codes.to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
        w = (q - zero[None, None, :]) * step[None, None, :]
        acc += w.to(tl.float32) * xv[None, None, :]

    out = tl.sum(acc, axis=2)  # [PER_WORD_PAD, P_BLOCK]
    i = k[:, None] * PACKED_ROWS + p[None, :]  # grid row
    ok = (k[:, None] < PER_WORD) & (p < PACKED_ROWS)[None, :] & (i < GROUP)
    dst = y_ptr + (s * n_rows + n) * out_features + i * rows_per_group + r0
    tl.store(dst, out.to(y_ptr.dtype.element_ty), mask=ok)


# pointers whose alignment may vary between launches and must not make a new variant: 0-d scalars read
# once per program (decode's coefficient ``coefs[i]`` sits at any 2-byte offset)
_NO_ALIGNMENT = {
    "_gemv_kernel": ("zs_ptr", "zz_ptr"),
    "_gate_up_kernel": ("a_zs", "a_zz", "b_zs", "b_zz"),
    "_down_kernel": ("zs_ptr", "zz_ptr", "coef_ptr"),
    "_dequant_kernel": ("zs_ptr", "zz_ptr"),
}
# interpreted iff TRITON_INTERPRET was set first
_KERNEL = triton.jit(_gemv_kernel, do_not_specialize_on_alignment=_NO_ALIGNMENT["_gemv_kernel"]) if HAS_TRITON else None


def _launch(kernel, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)``: every Triton launch goes through here (a test seam: the keys)."""
    kernel[grid](*args, **kwargs)


def specialization_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """The key Triton compiles one variant of ``kernel`` per, for these arguments (its own binder on the
    kernel's parameters: dtypes, constexprs, ints equal to 1 or divisible by 16, 16-byte aligned
    pointers, launch options). Needs no GPU; used by tests to check ``warm_up`` covers every launch."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = getattr(kernel, "fn", kernel)
    while hasattr(fn, "fn"):  # an interpreted function wraps the python function
        fn = fn.fn
    jit = _KEY_FUNCTIONS.get(fn)
    if jit is None:
        dns_oa = _NO_ALIGNMENT.get(fn.__name__, ())
        jit = _KEY_FUNCTIONS[fn] = JITFunction(fn, do_not_specialize_on_alignment=dns_oa)
    _, spec, options = create_function_from_signature(jit.signature, jit.params, BaseBackend)(*args, **kwargs)
    return (fn.__name__, tuple(tuple(x) for x in spec), tuple(sorted(options.items())))


_KEY_FUNCTIONS: dict = {}


def triton_gemv(x: torch.Tensor, weight: QuantizedWeight, config: GemvConfig | None = None) -> torch.Tensor:
    """The fused kernel, unconditionally: CUDA tensors, or CPU tensors if ``TRITON_INTERPRET=1`` was set
    before triton was first imported (Triton's interpreter).

    fp32 accumulation, output in ``x.dtype``. Meant for a few rows of ``x``: each row is its own set
    of programs, so ``W`` is read from DRAM once and again from L2 per extra row.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features, weight {list(weight.shape)} expects {in_f}")
    x2 = x.reshape(-1, in_f).contiguous()
    rows = x2.shape[0]
    if rows == 0:
        return x.new_empty(*x.shape[:-1], out_f)
    if config is None:
        plan = _default_plan(weight.spec, tuple(weight.shape), rows, x.device)
    else:
        plan = make_plan(weight.spec, tuple(weight.shape), rows, config)
    y = torch.empty(plan.split, rows, out_f, dtype=x.dtype if plan.split == 1 else torch.float32, device=x.device)
    tensors = (weight.W_q, weight.scale_q, weight.scale_scale, weight.scale_zero, weight.zero_q)
    args = (x2, *(t.contiguous() for t in tensors), weight.zero_scale, weight.zero_zero, y, *plan.ints)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # triton uses the current device
        _launch(_KERNEL, plan.grid, args, plan.constants)
    y = y[0] if plan.split == 1 else y.sum(0).to(x.dtype)
    return y.reshape(*x.shape[:-1], out_f)


# --------------------------------------------------------------------------------------------------
# the expert MLP in two launches: w1 and w3 together, then w2 with SiLU·mul in and the weighted sum out
# --------------------------------------------------------------------------------------------------


def _tile_update(acc, xv, wq_ptr, sq_ptr, ss_ptr, sz_ptr, zq_ptr, zero_scale, zero_zero, p, p_ok, shift, j, sj, c_ok,
                 num_groups, NBITS: tl.constexpr):  # fmt: skip
    """``acc += W_block * x`` for one block of columns: ``_gemv_kernel``'s loop body, op for op."""
    step = (tl.load(sq_ptr + j, mask=c_ok, other=0).to(tl.float16) - tl.load(sz_ptr + sj, mask=c_ok, other=0.0)) * (
        tl.load(ss_ptr + sj, mask=c_ok, other=0.0)
    )
    zero = (tl.load(zq_ptr + j, mask=c_ok, other=0).to(tl.float16) - zero_zero) * zero_scale
    words = tl.load(wq_ptr + p[:, None] * num_groups + j[None, :], mask=p_ok & c_ok[None, :], other=0)
    codes = ((words.to(tl.int32)[None, :, :] >> shift) & ((1 << NBITS) - 1)) | 0x6400
    q = codes.to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    w = (q - zero[None, None, :]) * step[None, None, :]
    return acc + w.to(tl.float32) * xv[None, None, :]


def _gate_up_kernel(
    x_ptr,  # [N, in]
    a_wq, a_sq, a_ss, a_sz, a_zq, a_zs, a_zz,  # w1's seven tensors
    b_wq, b_sq, b_ss, b_sz, b_zq, b_zs, b_zz,  # w3's (same spec and shape)
    h_ptr,  # [split, 2, N, out] fp32 partial sums of w1 x and w3 x
    n_rows, in_features, out_features, num_groups, scale_cols, rows_per_group, chunk,
    NBITS: tl.constexpr, GROUP: tl.constexpr, PACKED_ROWS: tl.constexpr, PER_WORD: tl.constexpr,
    PER_WORD_PAD: tl.constexpr, TOP_SHIFT: tl.constexpr, P_BLOCK: tl.constexpr, N_PBLOCKS: tl.constexpr,
    BLOCK_C: tl.constexpr, WRAP_ONCE: tl.constexpr,
):  # fmt: skip
    """``_gemv_kernel``'s programs, each reducing w1 and w3 over the same x block (x read once)."""
    pid = tl.program_id(0)
    n = pid % n_rows
    t = pid // n_rows
    pb = t % N_PBLOCKS
    t = t // N_PBLOCKS
    r0 = t % rows_per_group
    s = t // rows_per_group
    k = tl.arange(0, PER_WORD_PAD)
    p = pb * P_BLOCK + tl.arange(0, P_BLOCK)
    shift = tl.maximum(TOP_SHIFT - k * NBITS, 0)[:, None, None]
    p_ok = (p < PACKED_ROWS)[:, None]
    a_zscale, a_zzero = tl.load(a_zs), tl.load(a_zz)
    b_zscale, b_zzero = tl.load(b_zs), tl.load(b_zz)
    c_start = s * chunk
    c_stop = tl.minimum(c_start + chunk, in_features)
    col0 = r0 * in_features
    acc_a = tl.zeros([PER_WORD_PAD, P_BLOCK, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([PER_WORD_PAD, P_BLOCK, BLOCK_C], dtype=tl.float32)
    for c0 in range(c_start, c_stop, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < c_stop
        j = col0 + c
        if WRAP_ONCE:
            sj = (col0 + c0) % scale_cols + tl.arange(0, BLOCK_C)
            sj = tl.where(sj >= scale_cols, sj - scale_cols, sj)
        else:
            sj = j % scale_cols
        xv = tl.load(x_ptr + n * in_features + c, mask=c_ok, other=0.0).to(tl.float32)
        acc_a = _tile_update(acc_a, xv, a_wq, a_sq, a_ss, a_sz, a_zq, a_zscale, a_zzero, p, p_ok, shift, j, sj, c_ok,
                             num_groups, NBITS)  # fmt: skip
        acc_b = _tile_update(acc_b, xv, b_wq, b_sq, b_ss, b_sz, b_zq, b_zscale, b_zzero, p, p_ok, shift, j, sj, c_ok,
                             num_groups, NBITS)  # fmt: skip
    i = k[:, None] * PACKED_ROWS + p[None, :]
    ok = (k[:, None] < PER_WORD) & (p < PACKED_ROWS)[None, :] & (i < GROUP)
    dst = h_ptr + (2 * s * n_rows + n) * out_features + i * rows_per_group + r0
    tl.store(dst, tl.sum(acc_a, axis=2), mask=ok)
    tl.store(dst + n_rows * out_features, tl.sum(acc_b, axis=2), mask=ok)


def _down_kernel(
    h_ptr,  # [H_SPLIT, 2, N, in] fp32 from _gate_up_kernel
    wq_ptr, sq_ptr, ss_ptr, sz_ptr, zq_ptr, zs_ptr, zz_ptr,  # w2's seven tensors
    coef_ptr,  # [] routing coefficient
    out_ptr,  # [N, out]: written, or added to when ACCUMULATE
    n_rows, in_features, out_features, num_groups, scale_cols, rows_per_group, chunk,
    H_SPLIT: tl.constexpr, ACCUMULATE: tl.constexpr,
    NBITS: tl.constexpr, GROUP: tl.constexpr, PACKED_ROWS: tl.constexpr, PER_WORD: tl.constexpr,
    PER_WORD_PAD: tl.constexpr, TOP_SHIFT: tl.constexpr, P_BLOCK: tl.constexpr, N_PBLOCKS: tl.constexpr,
    BLOCK_C: tl.constexpr, WRAP_ONCE: tl.constexpr,
):  # fmt: skip
    """``out (+)= coef * W2 (silu(gate) * up)``: one program per (row, packed-row block, row group), no split."""
    pid = tl.program_id(0)
    n = pid % n_rows
    t = pid // n_rows
    pb = t % N_PBLOCKS
    r0 = t // N_PBLOCKS
    k = tl.arange(0, PER_WORD_PAD)
    p = pb * P_BLOCK + tl.arange(0, P_BLOCK)
    shift = tl.maximum(TOP_SHIFT - k * NBITS, 0)[:, None, None]
    p_ok = (p < PACKED_ROWS)[:, None]
    zero_scale, zero_zero = tl.load(zs_ptr), tl.load(zz_ptr)
    col0 = r0 * in_features
    acc = tl.zeros([PER_WORD_PAD, P_BLOCK, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, in_features, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < in_features
        j = col0 + c
        if WRAP_ONCE:
            sj = (col0 + c0) % scale_cols + tl.arange(0, BLOCK_C)
            sj = tl.where(sj >= scale_cols, sj - scale_cols, sj)
        else:
            sj = j % scale_cols
        gate = tl.zeros([BLOCK_C], dtype=tl.float32)
        up = tl.zeros([BLOCK_C], dtype=tl.float32)
        for hs in tl.static_range(H_SPLIT):
            gate += tl.load(h_ptr + (2 * hs * n_rows + n) * in_features + c, mask=c_ok, other=0.0)
            up += tl.load(h_ptr + ((2 * hs + 1) * n_rows + n) * in_features + c, mask=c_ok, other=0.0)
        xv = gate * tl.sigmoid(gate) * up
        acc = _tile_update(acc, xv, wq_ptr, sq_ptr, ss_ptr, sz_ptr, zq_ptr, zero_scale, zero_zero, p, p_ok, shift, j,
                           sj, c_ok, num_groups, NBITS)  # fmt: skip
    y = tl.sum(acc, axis=2) * tl.load(coef_ptr).to(tl.float32)
    i = k[:, None] * PACKED_ROWS + p[None, :]
    ok = (k[:, None] < PER_WORD) & (p < PACKED_ROWS)[None, :] & (i < GROUP)
    dst = out_ptr + n * out_features + i * rows_per_group + r0
    if ACCUMULATE:
        y += tl.load(dst, mask=ok, other=0.0).to(tl.float32)
    tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=ok)


if HAS_TRITON:  # the kernels call it by this global name, so it must be a jit function itself
    _tile_update = triton.jit(_tile_update)
_GATE_UP = (
    triton.jit(_gate_up_kernel, do_not_specialize_on_alignment=_NO_ALIGNMENT["_gate_up_kernel"]) if HAS_TRITON else None
)
_DOWN = triton.jit(_down_kernel, do_not_specialize_on_alignment=_NO_ALIGNMENT["_down_kernel"]) if HAS_TRITON else None


def _weight_args(w: QuantizedWeight) -> tuple[torch.Tensor, ...]:
    return (w.W_q, w.scale_q, w.scale_scale, w.scale_zero, w.zero_q, w.zero_scale, w.zero_zero)


def triton_expert_gate_up(
    x: torch.Tensor, w1: QuantizedWeight, w3: QuantizedWeight, config: GemvConfig | None = None
) -> torch.Tensor:
    """``[split, 2, N, I]`` fp32 partial sums of ``w1 x`` and ``w3 x`` in one launch (``h`` for
    ``triton_expert_down``); same devices and conditions as ``triton_gemv``."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if w1.spec != w3.spec or tuple(w1.shape) != tuple(w3.shape):
        raise ValueError(f"w1 {w1.spec} {list(w1.shape)} and w3 {w3.spec} {list(w3.shape)} differ")
    out_f, in_f = w1.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features, weight {list(w1.shape)} expects {in_f}")
    x2 = x.reshape(-1, in_f).contiguous()
    rows = x2.shape[0]
    if config is None:
        plan = _default_plan(w1.spec, tuple(w1.shape), rows, x.device)
    else:
        plan = make_plan(w1.spec, tuple(w1.shape), rows, config)
    h = torch.empty(plan.split, 2, rows, out_f, dtype=torch.float32, device=x.device)
    if rows == 0:
        return h
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _launch(_GATE_UP, plan.grid, (x2, *_weight_args(w1), *_weight_args(w3), h, *plan.ints), plan.constants)
    return h


@functools.lru_cache(maxsize=512)
def _down_plan(spec: QuantSpec, shape: tuple[int, int], rows: int, device: torch.device) -> _Plan:
    cfg = default_config(spec, shape, rows, device)
    return make_plan(spec, shape, rows, GemvConfig(cfg.block_c, cfg.p_block, 1, cfg.num_warps))


def triton_expert_down(
    h: torch.Tensor,
    w2: QuantizedWeight,
    coef: torch.Tensor,
    out: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """``out + coef * w2(silu(gate) * up)`` from ``h = triton_expert_gate_up(...)`` in one launch; ``out``
    (``[N, out]``) is updated in place, or a new ``[N, out]`` of ``dtype`` is returned when it is None."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    splits, _, rows, in_f = h.shape
    out_f = w2.shape[0]
    if in_f != w2.shape[1]:
        raise ValueError(f"h has {in_f} features, weight {list(w2.shape)} expects {w2.shape[1]}")
    if config is None:
        plan = _down_plan(w2.spec, tuple(w2.shape), rows, h.device)
    else:
        plan = make_plan(w2.spec, tuple(w2.shape), rows, GemvConfig(config.block_c, config.p_block, 1))
    accumulate = out is not None
    if out is None:
        out = torch.empty(rows, out_f, dtype=dtype or coef.dtype, device=h.device)
    if rows == 0:
        return out
    with torch.cuda.device(h.device) if h.is_cuda else contextlib.nullcontext():
        args = (h.contiguous(), *_weight_args(w2), coef, out, *plan.ints)
        _launch(_DOWN, plan.grid, args, dict(H_SPLIT=splits, ACCUMULATE=accumulate, **plan.constants))
    return out


# --------------------------------------------------------------------------------------------------
# dequantize a whole matrix in one launch (prefill: dequantize + matmul)
# --------------------------------------------------------------------------------------------------


def _dequant_kernel(
    wq_ptr, sq_ptr, ss_ptr, sz_ptr, zq_ptr, zs_ptr, zz_ptr,  # the weight's seven tensors
    out_ptr,  # [g, M] the grid of W (row-major W[out, in]), in the output dtype
    num_groups, scale_cols,
    NBITS: tl.constexpr, GROUP: tl.constexpr, PACKED_ROWS: tl.constexpr, P_PAD: tl.constexpr,
    PER_WORD: tl.constexpr, PER_WORD_PAD: tl.constexpr, TOP_SHIFT: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """One program per ``BLOCK_J`` grid columns: every code of them, ``(q - zero) * step`` in fp16 op for op as
    ``QuantizedWeight.dequantize`` (and ``_gemv_kernel``), stored row by row (coalesced along the columns)."""
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < num_groups
    sj = j % scale_cols
    step = (tl.load(sq_ptr + j, mask=j_ok, other=0).to(tl.float16) - tl.load(sz_ptr + sj, mask=j_ok, other=0.0)) * (
        tl.load(ss_ptr + sj, mask=j_ok, other=0.0)
    )
    zero = (tl.load(zq_ptr + j, mask=j_ok, other=0).to(tl.float16) - tl.load(zz_ptr)) * tl.load(zs_ptr)
    k = tl.arange(0, PER_WORD_PAD)
    p = tl.arange(0, P_PAD)
    shift = tl.maximum(TOP_SHIFT - k * NBITS, 0)[:, None, None]
    words = tl.load(
        wq_ptr + p[:, None] * num_groups + j[None, :], mask=(p < PACKED_ROWS)[:, None] & j_ok[None, :], other=0
    )
    codes = ((words.to(tl.int32)[None, :, :] >> shift) & ((1 << NBITS) - 1)) | 0x6400
    q = codes.to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    w = (q - zero[None, None, :]) * step[None, None, :]
    i = k[:, None] * PACKED_ROWS + p[None, :]  # grid row of (code slot, packed row)
    ok = (k[:, None] < PER_WORD) & (p < PACKED_ROWS)[None, :] & (i < GROUP)
    dst = out_ptr + i[:, :, None] * num_groups + j[None, None, :]
    tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=ok[:, :, None] & j_ok[None, None, :])


_DEQUANT = (
    triton.jit(_dequant_kernel, do_not_specialize_on_alignment=_NO_ALIGNMENT["_dequant_kernel"]) if HAS_TRITON else None
)
_DEQUANT_SLOTS = 4096  # grid values one program dequantizes (codes per word x packed rows x columns)


def triton_dequantize(weight: QuantizedWeight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``weight.dequantize(dtype)`` in one launch, bit for bit (fp16 arithmetic, then cast); same devices
    and conditions as ``triton_gemv``."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    spec = weight.spec
    geo = Geometry.of(spec, tuple(weight.shape))
    m = spec.num_groups(tuple(weight.shape))
    if spec.group_size * m >= 2**31:
        raise ValueError(f"weight {list(weight.shape)} too large for the kernel's 32-bit offsets")
    out = torch.empty(spec.group_size, m, dtype=dtype, device=weight.W_q.device)
    p_pad, k_pad = _pow2(geo.packed_rows), _pow2(geo.codes_per_word)
    block_j = max(16, _DEQUANT_SLOTS // (p_pad * k_pad))
    constants = dict(
        NBITS=geo.nbits,
        GROUP=geo.group_size,
        PACKED_ROWS=geo.packed_rows,
        P_PAD=p_pad,
        PER_WORD=geo.codes_per_word,
        PER_WORD_PAD=k_pad,
        TOP_SHIFT=geo.top_shift,
        BLOCK_J=block_j,
    )
    args = (*(t.contiguous() for t in _weight_args(weight)), out, m, m // spec.scale_group_size)
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        _launch(_DEQUANT, (math.ceil(m / block_j),), args, constants)
    return out.view(weight.shape)


def use_fused_dequantize(weight: QuantizedWeight, dtype: torch.dtype) -> bool:
    """Whether ``QuantizedWeight.dequantize`` takes the one-launch Triton path: CUDA, Triton, fp16/fp32."""
    return HAS_TRITON and _fused_enabled and weight.W_q.is_cuda and would_use_fused_dequantize(weight, dtype)


def would_use_fused_dequantize(weight: QuantizedWeight, dtype: torch.dtype) -> bool:
    """The device-independent half of ``use_fused_dequantize`` (``dispatch_count``'s CUDA-like counting)."""
    return dtype in FUSED_DTYPES


def _device_dequantize(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor | None:
    """``QuantizedWeight.dequantize``'s CUDA path (registered in ``quant.DEVICE_DEQUANTIZE``); None elsewhere."""
    if not use_fused_dequantize(weight, dtype):
        return None
    return _fused_or_none(triton_dequantize, (weight, dtype), "fused dequantize")


quant.DEVICE_DEQUANTIZE.append(_device_dequantize)


def reference_dequantize(weight: QuantizedWeight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """What ``triton_dequantize`` computes: the torch path of ``QuantizedWeight.dequantize``."""
    return weight.dequantize_blocks(dtype)


def reference_gemv(x: torch.Tensor, weight: QuantizedWeight, config: GemvConfig | None = None) -> torch.Tensor:
    """What ``triton_gemv`` computes, in torch (the kernel tests' and ``dispatch_count``'s stand-in)."""
    return dequantized_linear(x, weight)


def reference_expert_gate_up(
    x: torch.Tensor, w1: QuantizedWeight, w3: QuantizedWeight, config: GemvConfig | None = None
) -> torch.Tensor:
    """What ``triton_expert_gate_up`` computes: ``[1, 2, N, I]`` fp32 (one input split of w1 x and w3 x)."""
    x2 = x.reshape(-1, w1.shape[1])
    return torch.stack([dequantized_linear(x2, w1).float(), dequantized_linear(x2, w3).float()])[None]


def reference_expert_down(
    h: torch.Tensor,
    w2: QuantizedWeight,
    coef: torch.Tensor,
    out: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """What ``triton_expert_down`` computes from the gate/up partial sums ``h`` ``[S, 2, N, I]``."""
    dtype = out.dtype if out is not None else (dtype or coef.dtype)
    gate, up = h.sum(0)
    y = (dequantized_linear((F.silu(gate) * up).to(dtype), w2).float() * coef.float()).to(dtype)
    return y if out is None else out.add_(y)


# each fused entry point, the launches it issues on CUDA, and its torch reference (for dispatch_count)
FUSED_LAUNCHES: dict[str, int] = {  # triton_gemv: +2 (sum, cast) when a plan splits the input dimension
    "triton_gemv": 1,
    "triton_expert_gate_up": 1,
    "triton_expert_down": 1,
    "triton_dequantize": 1,
}
REFERENCES = {
    "triton_gemv": reference_gemv,
    "triton_expert_gate_up": reference_expert_gate_up,
    "triton_expert_down": reference_expert_down,
    "triton_dequantize": reference_dequantize,
}
