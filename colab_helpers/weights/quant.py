"""Low-bit weights in the offloading-demo layout: pack/unpack 2/3/4-bit codes, quantized scale/zero.

The layout is the one HQQ wrote for the public Mixtral offloading checkpoint (see
``docs/checkpoint_format.md``): a weight ``W[out, in]`` is viewed row-major as ``[g, M]`` and each
*column* of that view is one quantization group. Codes are packed along dim 0; the per-group step and
zero point are themselves 8-bit quantized ("meta" tensors). Dequantization follows the library's
float16 arithmetic op for op, so results are bit-exact with ``hqq``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The seven tensors of one quantized linear, in file order.
SUFFIXES: tuple[str, ...] = (
    "W_q",
    "meta.scale_q",
    "meta.meta_scale.scale",
    "meta.meta_scale.zero",
    "meta.zero_q",
    "meta.meta_zero.scale",
    "meta.meta_zero.zero",
)


# --------------------------------------------------------------------------------------------------
# bit packing (along dim 0, first row in the most significant bits)
# --------------------------------------------------------------------------------------------------


def _pack_4bit(q: torch.Tensor) -> torch.Tensor:  # [g, M] -> [g/2, M] uint8
    q = q.to(torch.uint8)
    h = q.shape[0] // 2
    return (q[:h] << 4) | q[h:]


def _unpack_4bit(p: torch.Tensor) -> torch.Tensor:  # [g/2, M] -> [g, M]
    return torch.cat([(p >> 4) & 0xF, p & 0xF], dim=0)


def _pack_2bit(q: torch.Tensor) -> torch.Tensor:  # [g, M] -> [g/4, M] uint8
    q = q.to(torch.uint8)
    h = q.shape[0] // 4
    return (q[:h] << 6) | (q[h : 2 * h] << 4) | (q[2 * h : 3 * h] << 2) | q[3 * h :]


def _unpack_2bit(p: torch.Tensor) -> torch.Tensor:  # [g/4, M] -> [g, M]
    return torch.cat([(p >> 6) & 3, (p >> 4) & 3, (p >> 2) & 3, p & 3], dim=0)


def _pack_3bit(q: torch.Tensor) -> torch.Tensor:  # [g, M] -> [ceil(g/10), M] int32 ("3bit_32")
    rows = 10 * math.ceil(q.shape[0] / 10)
    padded = torch.zeros(rows, q.shape[1], dtype=torch.int32, device=q.device)
    padded[: q.shape[0]] = q.to(torch.int32)
    h = rows // 10
    out = torch.zeros(h, q.shape[1], dtype=torch.int32, device=q.device)
    for i in range(10):
        out |= padded[i * h : (i + 1) * h] << (27 - 3 * i)
    return out


def _unpack_3bit(p: torch.Tensor) -> torch.Tensor:  # [h, M] int32 -> [10h, M] (caller slices to g)
    return torch.cat([(p >> (27 - 3 * i)) & 7 for i in range(10)], dim=0).to(torch.uint8)


PACK: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {2: _pack_2bit, 3: _pack_3bit, 4: _pack_4bit}
UNPACK: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {2: _unpack_2bit, 3: _unpack_3bit, 4: _unpack_4bit}


# --------------------------------------------------------------------------------------------------
# quantization settings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantSpec:
    """Bit width, group size g and scale-group size gs of one family of linears."""

    nbits: int
    group_size: int
    scale_group_size: int

    def __post_init__(self) -> None:
        if self.nbits not in PACK:
            raise ValueError(f"nbits must be 2, 3 or 4, got {self.nbits}")
        if self.nbits != 3 and self.group_size % (8 // self.nbits):
            raise ValueError(f"group_size {self.group_size} is not a multiple of {8 // self.nbits}")

    @property
    def packed_dtype(self) -> torch.dtype:
        return torch.int32 if self.nbits == 3 else torch.uint8

    @property
    def packed_rows(self) -> int:
        if self.nbits == 3:
            return math.ceil(self.group_size / 10)
        return self.group_size * self.nbits // 8

    def num_groups(self, shape: tuple[int, int]) -> int:
        """M = out*in/g; raises if the shape does not fit this spec's grouping."""
        out_f, in_f = shape
        g, gs = self.group_size, self.scale_group_size
        if (out_f * in_f) % g or out_f % g or ((out_f * in_f) // g) % gs:
            raise ValueError(
                f"shape {list(shape)} does not fit {self.nbits}-bit quantization with group {g} and scale "
                f"group {gs} (need out % g == 0 and (out*in/g) % gs == 0)"
            )
        return out_f * in_f // g

    def tensor_specs(self, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The exact dtype and shape of each of the 7 stored tensors for a weight of ``shape``."""
        m = self.num_groups(shape)
        gs = self.scale_group_size
        return {
            "W_q": (self.packed_dtype, (self.packed_rows, m)),
            "meta.scale_q": (torch.uint8, (gs, m // gs)),
            "meta.meta_scale.scale": (torch.float16, (1, m // gs)),
            "meta.meta_scale.zero": (torch.float16, (1, m // gs)),
            "meta.zero_q": (torch.uint8, (1, m)),
            "meta.meta_zero.scale": (torch.float16, ()),
            "meta.meta_zero.zero": (torch.float16, ()),
        }

    def nbytes(self, shape: tuple[int, int]) -> int:
        return sum(_numel(s) * _itemsize(d) for d, s in self.tensor_specs(shape).values())

    def to_dict(self) -> dict[str, int]:
        return {"nbits": self.nbits, "group_size": self.group_size, "scale_group_size": self.scale_group_size}


# The settings of the public Mixtral offloading-demo checkpoint.
DEMO_ATTENTION_SPEC = QuantSpec(nbits=4, group_size=64, scale_group_size=256)
DEMO_EXPERT_SPEC = QuantSpec(nbits=2, group_size=16, scale_group_size=128)
# Our defaults for writing other bit widths. 3-bit packs 10 codes per int32 word (2 bits of each word unused),
# so a group of 64 codes takes ceil(64/10) = 7 words = 224 bits for 192 bits of codes: 1/7 of W_q is padding,
# 3.5 bits per code. With the 8-bit step and zero per group of 64 (0.25 bit) that is 3.75 bits per weight.
DEFAULT_EXPERT_SPECS = {
    2: DEMO_EXPERT_SPEC,
    3: QuantSpec(nbits=3, group_size=64, scale_group_size=128),
    4: QuantSpec(nbits=4, group_size=64, scale_group_size=128),
}
DEFAULT_ATTENTION_SPECS = {
    2: QuantSpec(nbits=2, group_size=16, scale_group_size=128),
    3: QuantSpec(nbits=3, group_size=64, scale_group_size=256),
    4: DEMO_ATTENTION_SPEC,
}


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------------
# the quantized weight
# --------------------------------------------------------------------------------------------------


@dataclass
class QuantizedWeight:
    """The 7 stored tensors of one linear ``W[out, in]`` plus the settings needed to read them."""

    spec: QuantSpec
    shape: tuple[int, int]
    W_q: torch.Tensor  # [packed_rows, M] uint8 (int32 for 3-bit)
    scale_q: torch.Tensor  # [gs, M/gs] uint8
    scale_scale: torch.Tensor  # [1, M/gs] fp16
    scale_zero: torch.Tensor  # [1, M/gs] fp16
    zero_q: torch.Tensor  # [1, M] uint8
    zero_scale: torch.Tensor  # [] fp16
    zero_zero: torch.Tensor  # [] fp16
    dense: torch.Tensor | None = None  # optional dequantized copy (CPU fast path); never stored on disk

    @classmethod
    def from_tensors(cls, spec: QuantSpec, shape: tuple[int, int], t: dict[str, torch.Tensor]) -> QuantizedWeight:
        """Build from a ``{suffix: tensor}`` dict (see ``SUFFIXES``)."""
        return cls(spec, tuple(shape), *(t[s] for s in SUFFIXES))  # type: ignore[arg-type]

    def tensors(self) -> dict[str, torch.Tensor]:
        values = (
            self.W_q,
            self.scale_q,
            self.scale_scale,
            self.scale_zero,
            self.zero_q,
            self.zero_scale,
            self.zero_zero,
        )
        return dict(zip(SUFFIXES, values, strict=True))

    @property
    def num_groups(self) -> int:
        return self.shape[0] * self.shape[1] // self.spec.group_size

    def step_and_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group multiplicative step and zero point, [1, M] each, in fp16 as hqq computes them."""
        m = self.num_groups
        step = ((self.scale_q.half() - self.scale_zero) * self.scale_scale).reshape(1, m)
        zero = (self.zero_q.half() - self.zero_zero) * self.zero_scale
        return step, zero

    def codes(self) -> torch.Tensor:
        """Unpacked codes, [g, M] uint8."""
        return UNPACK[self.spec.nbits](self.W_q)[: self.spec.group_size]

    def dequantize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """``W[out, in]``; float16 arithmetic (bit-exact with hqq), then cast to ``dtype``.

        On CUDA one Triton launch (``kernels.triton_dequantize``, the same fp16 ops, no scratch beyond
        the result; ``kernels`` registers it in ``DEVICE_DEQUANTIZE``, as it imports this module);
        elsewhere, or without Triton, ``dequantize_blocks``.
        """
        for fused in DEVICE_DEQUANTIZE:
            out = fused(self, dtype)
            if out is not None:
                return out
        return self.dequantize_blocks(dtype)

    def dequantize_blocks(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """``dequantize`` in torch ops: written block by block of ``DEQUANT_BLOCK`` codes into the output, so
        the scratch beyond the result stays ~10 bytes x the block (measured by ``tests/test_quant.py`` with
        ``memtrack.TensorMemoryTracker``) instead of ~8 bytes x the whole matrix: the planner counts it.
        """
        step, zero = self.step_and_zero()
        g, m = self.spec.group_size, self.num_groups
        out = torch.empty(g, m, dtype=dtype, device=self.W_q.device)  # the [g, M] grid of W
        cols = max(1, DEQUANT_BLOCK // g)
        for j0 in range(0, m, cols):
            j1 = min(m, j0 + cols)
            codes = UNPACK[self.spec.nbits](self.W_q[:, j0:j1])[:g]
            out[:, j0:j1] = _dequantize_block(codes, zero[:, j0:j1], step[:, j0:j1])
        return out.view(self.shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


# whole-matrix dequantizers for devices (``weight, dtype -> W or None`` when they do not apply), registered by
# ``kernels`` (which imports this module, so this one cannot import it)
DEVICE_DEQUANTIZE: list[Callable[[QuantizedWeight, torch.dtype], torch.Tensor | None]] = []
DEQUANT_BLOCK = 1 << 22  # codes dequantized at a time (4.2 M): bounds the scratch, few launches per matrix


def dequantize_peak_bytes(spec: QuantSpec, shape: tuple[int, int], itemsize: int = 2) -> int:
    """What ``QuantizedWeight.dequantize`` holds at its peak, its result included (the planner's row).

    The result (``itemsize`` per weight), the fp16 step and zero vectors with their temporaries
    (8 B per group) and one block's unpacked codes and fp32 temporaries (10 B per code, the CPU path;
    the GPU path holds less). ``tests/test_quant.py`` checks it against a tracked run.
    """
    m = spec.num_groups(shape)
    block = min(spec.group_size * m, max(1, DEQUANT_BLOCK // spec.group_size) * spec.group_size)
    return shape[0] * shape[1] * itemsize + 8 * m + 10 * block


def _dequantize_block(codes: torch.Tensor, zero: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) * step`` with hqq's fp16 rounding after each op, as fp16."""
    if codes.is_cuda:  # fp16 ops are exactly rounded on the GPU; in place keeps one fp16 temporary
        return codes.half().sub_(zero).mul_(step)
    # CPUs: each fp16 op computed in fp32 and rounded once; the fp32 results are exact (differences and
    # products of fp16 values fit in 24 bits), so this is bit-exact, and much faster than CPU fp16 ops
    return ((codes.float() - zero.float()).half().float() * step.float()).half()


# --------------------------------------------------------------------------------------------------
# quantization (to write checkpoints in this layout)
# --------------------------------------------------------------------------------------------------


def _minmax_params(x: torch.Tensor, nbits: int, round_zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantizer parameters along dim 0: (scale s, zero z) with q = x*s + z."""
    top = 2**nbits - 1
    lo, hi = x.min(0, keepdim=True)[0], x.max(0, keepdim=True)[0]
    denom = hi - lo
    s = torch.where(denom.abs() <= 1e-4, torch.ones_like(denom), top / denom).clamp(max=2e4)
    z = -lo * s
    return s, (z.round() if round_zero else z)


def _quantize_meta(x: torch.Tensor, group: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit codes for step or zero vectors [1, M]: per group of ``group`` (as [group, M/group]) or global."""
    x = x.float()
    view = x.reshape(group, -1) if group else x.reshape(-1, 1)
    s, z = _minmax_params(view, 8, round_zero=False)
    codes = (view * s + z).round().clamp(0, 255).to(torch.uint8)
    step = (1.0 / s).half()
    if group:
        return codes, step, z.half()  # [gs, M/gs], [1, M/gs], [1, M/gs]
    return codes.reshape(1, -1), step.reshape(()), z.half().reshape(())


def quantize(weight: torch.Tensor, spec: QuantSpec, optimize: bool = True) -> QuantizedWeight:
    """Quantize ``weight[out, in]`` into the offloading-demo layout.

    With ``optimize`` HQQ's half-quadratic proximal solver (``optimize_weights_proximal_legacy``, the
    method the real checkpoint used: an l_p<1 norm of the error, no calibration data) refines each
    group's *zero* only; the step stays min-max's (hqq 0.2.8 returns the scale it was given). Codes are
    then recomputed against the *stored* (8-bit) step/zero, so the bytes we write are the best codes for
    what a reader will actually dequantize. Groups run along axis 0 (``W.reshape(g, -1)``, one group per
    column: hqq's ``axis=0``, the demo's setting; hqq's own default is ``axis=1``, runs of a row).
    """
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    m = spec.num_groups(shape)
    top = 2**spec.nbits - 1
    w = weight.detach().float().reshape(spec.group_size, m)  # [g, M]; column j is group j
    s, z = _minmax_params(w, spec.nbits, round_zero=spec.nbits == 4)
    if optimize:
        from hqq.core.optimize import optimize_weights_proximal_legacy

        _, s, z = optimize_weights_proximal_legacy(w, s, z, [0, top], axis=0, device=w.device)
        s, z = s.float(), z.float()
    scale_q, scale_scale, scale_zero = _quantize_meta(1.0 / s, spec.scale_group_size)
    zero_q, zero_scale, zero_zero = _quantize_meta(z, None)
    qw = QuantizedWeight(spec, shape, torch.empty(0), scale_q, scale_scale, scale_zero, zero_q, zero_scale, zero_zero)
    step, zero = (t.float() for t in qw.step_and_zero())
    codes = (w / step + zero).round().clamp(0, top).to(torch.uint8)  # [g, M]
    qw.W_q = PACK[spec.nbits](codes).contiguous()
    return qw


def dequantized_linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """Reference path: dequantize (or use the kept dense copy), then an ordinary matmul."""
    if weight.dense is not None and weight.dense.dtype == x.dtype:
        return F.linear(x, weight.dense)
    return F.linear(x, weight.dequantize(x.dtype))
