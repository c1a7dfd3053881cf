"""MXFP4 (the OCP microscaling FP4 format) as the published gpt-oss checkpoints store their experts.

Each row of a matrix is cut into blocks of 32 values: 16 bytes (two E2M1 codes per byte, low nibble
first) and one E8M0 scale byte (a power of two, bias 127). ``dequantize`` decodes exactly as
transformers' ``integrations/mxfp4.py`` (``_convert_moe_packed_tensors``: the same value table, low
nibble to even columns, ``ldexp`` by ``scale - 127``), but keeps the published row-major
``[..., rows, cols]`` orientation instead of transposing to the fused ``[E, cols, rows]`` parameter;
``tests/test_gpt_oss.py`` checks it against transformers' own function on random blocks. A T4 cannot run
MXFP4 natively, so the converter decodes the experts and re-quantizes them with HQQ.
"""

from __future__ import annotations

import torch

# E2M1 codes 0..15: sign bit, two exponent bits, one mantissa bit (transformers' ``FP4_VALUES``)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale
SCALE_BIAS = 127


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``blocks`` [..., rows, cols/32, 16] uint8 and ``scales`` [..., rows, cols/32] uint8 -> [..., rows, cols].

    Every value is exact in float32 (and in bfloat16 while ``scale - 127`` stays in its exponent range).
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    out = torch.empty(*blocks.shape[:-1], BLOCK, dtype=dtype, device=blocks.device)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]
    out[..., 1::2] = lut[(blocks >> 4).long()]
    out = torch.ldexp(out, (scales.to(torch.int32) - SCALE_BIAS).unsqueeze(-1))
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK)


def random_blocks(shape: tuple[int, ...], seed: int = 0, exponent: tuple[int, int] = (-7, -3)) -> tuple:
    """Random ``(blocks, scales)`` of a ``shape`` = (..., rows, cols) matrix: every FP4 code, scales
    ``2**exponent`` (the published weights' order of magnitude); for tests and the converter's fixtures."""
    *lead, rows, cols = shape
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*lead, rows, cols // BLOCK, BLOCK // 2), generator=g, dtype=torch.int32)
    low, high = exponent
    scales = torch.randint(SCALE_BIAS + low, SCALE_BIAS + high + 1, (*lead, rows, cols // BLOCK), generator=g)
    return blocks.to(torch.uint8), scales.to(torch.uint8)
