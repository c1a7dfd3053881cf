"""Walkthrough ``hqq_quantization``: error against bits, strided groups, packed bytes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class QuantResult:
    bits: int
    group_size: int
    optimized: bool
    weight_error: float  # ||W - Wq|| / ||W||
    output_error: float  # ||X W^T - X Wq^T|| / ||X W^T|| on random inputs
    bits_per_weight: float  # stored bytes * 8 / weights, scales and zeros included
    seconds: float


def quantization_errors(weight: torch.Tensor, specs: dict, optimize: Sequence[bool] = (False, True), inputs: int = 64):
    """Quantize ``weight`` with each spec (min-max and/or HQQ-optimized); relative errors and true bit cost."""
    import time

    from ..weights.quant import quantize

    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(inputs, weight.shape[1], generator=gen).to(weight.device, weight.dtype)
    ref = x @ weight.T
    out = []
    for bits, spec in sorted(specs.items()):
        for opt in optimize:
            start = time.perf_counter()
            q = quantize(weight, spec, optimize=opt)
            w = q.dequantize(weight.dtype)
            seconds = time.perf_counter() - start
            out.append(
                QuantResult(
                    bits,
                    spec.group_size,
                    opt,
                    float((weight - w).norm() / weight.norm()),
                    float((ref - x @ w.T).norm() / ref.norm()),
                    8 * q.nbytes() / weight.numel(),
                    seconds,
                )
            )
    return out


def quant_table(results: Sequence[QuantResult]) -> str:
    lines = [
        f"{'bits':>4} {'group':>6} {'method':>8} {'weight err':>11} {'output err':>11} {'bits/weight':>12} {'time':>7}"
    ]
    for r in results:
        lines.append(
            f"{r.bits:>4} {r.group_size:>6} {'hqq' if r.optimized else 'min-max':>8} {r.weight_error:>11.4f} "
            f"{r.output_error:>11.4f} {r.bits_per_weight:>12.3f} {r.seconds:>6.1f}s"
        )
    return "\n".join(lines)


def plot_quant_errors(
    results: Sequence[QuantResult], ax=None, title: str = "quantization error against bits per weight"
):
    """Relative output error against stored bits per weight, one line per method."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    for opt, marker in ((False, "s--"), (True, "o-")):
        rs = [r for r in results if r.optimized == opt]
        if rs:
            label = "HQQ" if opt else "min-max"
            ax.plot([r.bits_per_weight for r in rs], [r.output_error for r in rs], marker, label=label)
    for r in results:
        if r.optimized == results[0].optimized:  # one label per bit width
            text = f"{r.bits}-bit, g={r.group_size}"
            ax.annotate(
                text, (r.bits_per_weight, r.output_error), fontsize=8, textcoords="offset points", xytext=(4, 4)
            )
    ax.set_xlabel("stored bits per weight (codes + 8-bit scales and zeros)")
    ax.set_ylabel("relative output error ||XW - XWq|| / ||XW||")
    ax.set_title(title)
    ax.set_yscale("log")
    ax.legend()
    return ax


def group_ids(shape: tuple[int, int], group_size: int) -> np.ndarray:
    """Which quantization group each weight of ``W[out, in]`` belongs to in this layout.

    The weight is read row-major as ``[g, M]`` and each column of that view is a group, so group ``j``
    holds flat positions ``j, j+M, j+2M, ...``: one input column, every ``out/g``-th row (strided).
    """
    out_f, in_f = shape
    m = out_f * in_f // group_size
    return (np.arange(out_f * in_f) % m).reshape(out_f, in_f)


def plot_groups(shape: tuple[int, int] = (12, 4), group_size: int = 4, ax=None):
    """A small weight coloured by group id, with the id written in each cell."""
    import matplotlib.pyplot as plt

    ids = group_ids(shape, group_size)
    if ax is None:
        _, ax = plt.subplots(figsize=(3.5, 5))
    ax.imshow(ids % 20, cmap="tab20", aspect="auto", vmin=0, vmax=19)
    for (r, c), g in np.ndenumerate(ids):
        ax.text(c, r, str(g), ha="center", va="center", fontsize=7)
    ax.set_xlabel("input column")
    ax.set_ylabel("output row")
    ax.set_title(f"W{list(shape)}, g={group_size}: group id of each weight")
    return ax


def bits_breakdown(specs: dict, shape: tuple[int, int] = (14336, 4096)) -> str:
    """Where each spec's bits per weight go, from the exact stored tensors of a weight of ``shape``.

    codes: the nominal bits; packing: what the packed ``W_q`` stores beyond them (3-bit puts 10 codes in an
    int32, 2 bits unused, and a group of 64 codes needs 7 words); step + zero: the 8-bit ``scale_q`` and
    ``zero_q`` per group; meta: their fp16 scales and zeros.
    """
    weights = shape[0] * shape[1]

    def bits(nbytes: int) -> float:
        return 8 * nbytes / weights

    lines = [f"{'bits':>4} {'group':>6} {'codes':>7} {'packing':>8} {'step+zero':>10} {'meta':>7} {'total':>7}"]
    for nbits, spec in sorted(specs.items()):
        sizes = {
            name: math.prod(shape_) * torch.empty((), dtype=dt).element_size()
            for name, (dt, shape_) in spec.tensor_specs(shape).items()
        }
        packed = bits(sizes.pop("W_q"))
        step_zero = bits(sizes.pop("meta.scale_q") + sizes.pop("meta.zero_q"))
        meta = bits(sum(sizes.values()))
        lines.append(
            f"{nbits:>4} {spec.group_size:>6} {nbits:>7.3f} {packed - nbits:>8.3f} {step_zero:>10.3f} "
            f"{meta:>7.3f} {packed + step_zero + meta:>7.3f}"
        )
    return "\n".join(lines)
