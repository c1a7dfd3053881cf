"""Fused low-bit GEMV vs dequantize + matmul at Mixtral shapes: time, achieved GB/s, fraction of peak.

    python benchmarks/kernel_bench.py [--rows 1] [--sweep] [--peak-gbps 320] [--json out.json] [--cpu-smoke]

Decode is memory-bandwidth bound, so the figure of merit is bytes of packed weights + meta read per
second against the GPU's peak (T4: 320 GB/s, ~240 achievable). Each shape is timed on enough copies of
the weight to overflow L2, replayed from a CUDA graph so launch overhead is not counted ("kernel");
"eager" is the same calls launched one by one from Python, what a decode step actually pays.
``--sweep`` also times a few tilings per shape and prints the best, to tune ``default_config``.
``--cpu-smoke`` times the torch path (dequantize + matmul) at small shapes on the CPU with a wall
clock: it checks the script and its JSON, not any GPU number.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from colab_helpers.runtime import kernels
from colab_helpers.runtime.kernels import GemvConfig, default_config, triton_gemv
from colab_helpers.weights.quant import (
    DEFAULT_EXPERT_SPECS,
    DEMO_ATTENTION_SPEC,
    DEMO_EXPERT_SPEC,
    PACK,
    QuantizedWeight,
    QuantSpec,
    dequantized_linear,
)

SHAPES: list[tuple[str, QuantSpec, tuple[int, int]]] = [
    ("expert w1/w3", DEMO_EXPERT_SPEC, (14336, 4096)),
    ("expert w2", DEMO_EXPERT_SPEC, (4096, 14336)),
    ("attn q/o", DEMO_ATTENTION_SPEC, (4096, 4096)),
    ("attn k/v", DEMO_ATTENTION_SPEC, (1024, 4096)),
    ("expert w1 3-bit", DEFAULT_EXPERT_SPECS[3], (14336, 4096)),
    ("expert w1 4-bit", DEFAULT_EXPERT_SPECS[4], (14336, 4096)),
]


def random_weight(spec: QuantSpec, shape: tuple[int, int], device: torch.device) -> QuantizedWeight:
    """Random codes and plausible meta, made on the GPU (nothing to download)."""
    m = spec.num_groups(shape)
    cols = m // spec.scale_group_size
    codes = torch.randint(0, 2**spec.nbits, (spec.group_size, m), device=device, dtype=torch.uint8)
    return QuantizedWeight(
        spec,
        shape,
        W_q=PACK[spec.nbits](codes).contiguous(),
        scale_q=torch.randint(0, 256, (spec.scale_group_size, cols), device=device, dtype=torch.uint8),
        scale_scale=torch.full((1, cols), 1e-4, device=device, dtype=torch.float16),
        scale_zero=torch.full((1, cols), -8.0, device=device, dtype=torch.float16),
        zero_q=torch.randint(0, 256, (1, m), device=device, dtype=torch.uint8),
        zero_scale=torch.tensor((2**spec.nbits - 1) / 255, device=device, dtype=torch.float16),
        zero_zero=torch.tensor(0.0, device=device, dtype=torch.float16),
    )


def peak_gbps(device: torch.device, override: float | None) -> float | None:
    """DRAM peak from the device's memory clock (kHz, double data rate) and bus width (bits)."""
    if override:
        return override
    props = torch.cuda.get_device_properties(device)
    clock, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock * 1e3 * bus / 8 / 1e9 if clock and bus else None


def time_per_call(fns: list[Callable[[], object]], graph: bool, reps: int = 20) -> float:
    """Seconds per call over ``fns`` (distinct weights, so L2 holds none of them), from a CUDA graph
    replay or from eager launches."""
    for fn in fns:  # compile, allocate
        fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for fn in fns:
                fn()
        run = g.replay
    else:

        def run() -> None:
            for fn in fns:
                fn()

    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (reps * len(fns))


def sweep_configs(spec: QuantSpec, shape: tuple[int, int], rows: int, device: torch.device) -> list[GemvConfig]:
    """The default plus tilings around it, skipping those over ~128 fp32 accumulators per thread."""
    base = default_config(spec, shape, rows, device)
    geo = kernels.Geometry.of(spec, shape)
    per_word = 1 << (geo.codes_per_word - 1).bit_length()  # padded to a power of two, as in the kernel
    rows_pow2 = 1 << (geo.packed_rows - 1).bit_length()
    configs = {base}
    for block_c in (128, 256, 512):
        for p_block in {max(1, base.p_block // 2), base.p_block, min(rows_pow2, 2 * base.p_block)}:
            for warps in (2, 4, 8):
                if per_word * p_block * block_c <= 128 * 32 * warps:
                    configs.add(GemvConfig(block_c=block_c, p_block=p_block, split=base.split, num_warps=warps))
    return sorted(configs, key=lambda c: (c.block_c, c.p_block, c.num_warps))


def bench_shape(name: str, spec: QuantSpec, shape: tuple[int, int], args: argparse.Namespace, peak: float | None):
    """Time one shape (fused kernel from a graph and eager, dequantize + matmul from a graph); returns a row."""
    device = torch.device("cuda")
    one = random_weight(spec, shape, device)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    copies = [one] + [random_weight(spec, shape, device) for _ in range(min(32, math.ceil(3 * l2 / one.nbytes())))]
    x = torch.randn(args.rows, shape[1], device=device, dtype=torch.float16)
    ref = dequantized_linear(x.float(), one)
    err = ((triton_gemv(x.float(), one) - ref).abs().max() / ref.abs().max()).item()

    nbytes = one.nbytes() + x.numel() * x.element_size() + args.rows * shape[0] * 2
    fused = time_per_call([lambda w=w: triton_gemv(x, w) for w in copies], graph=True)
    eager = time_per_call([lambda w=w: triton_gemv(x, w) for w in copies], graph=False)
    dequant = time_per_call([lambda w=w: dequantized_linear(x, w) for w in copies], graph=True)
    gbps = nbytes / fused / 1e9
    of_peak = f"{gbps / peak:6.1%}" if peak else "   n/a"
    print(
        f"{name:16s} {spec.nbits}-bit g{spec.group_size:<3d} {nbytes / 1e6:8.2f} MB  kernel {fused * 1e6:8.1f} us "
        f"{gbps:7.1f} GB/s {of_peak}  eager {eager * 1e6:8.1f} us  dequant+matmul {dequant * 1e6:8.1f} us "
        f"({dequant / fused:4.1f}x)" + ("" if err < 1e-4 else f"  WRONG: rel err {err:.2e} vs the reference")
    )
    row = {
        "shape": name,
        "bits": spec.nbits,
        "mb": nbytes / 1e6,
        "kernel_us": fused * 1e6,
        "kernel_gbps": gbps,
        "fraction_of_peak": gbps / peak if peak else None,
        "eager_us": eager * 1e6,
        "dequant_matmul_us": dequant * 1e6,
        "rel_err": err,
        "correct": err < 1e-4,
    }
    if args.sweep:
        timed = []
        for cfg in sweep_configs(spec, shape, args.rows, device):
            timed.append((time_per_call([lambda w=w, c=cfg: triton_gemv(x, w, c) for w in copies], graph=True), cfg))
        best_t, best = min(timed, key=lambda t: t[0])
        print(f"{'':16s} best tiling {best}: {best_t * 1e6:.1f} us, {nbytes / best_t / 1e9:.1f} GB/s")
        row["best_tiling"], row["best_tiling_us"] = str(best), best_t * 1e6
    return row


def smoke_shape(name: str, spec: QuantSpec, shape: tuple[int, int], rows: int, reps: int = 5) -> dict:
    """The CPU stand-in for ``bench_shape``: the torch path at a small shape, timed with a wall clock."""
    small = (shape[0] // 32, shape[1] // 16)
    w = random_weight(spec, small, torch.device("cpu"))
    x = torch.randn(rows, small[1])
    dequantized_linear(x, w)
    start = time.perf_counter()
    for _ in range(reps):
        dequantized_linear(x, w)
    seconds = (time.perf_counter() - start) / reps
    print(f"{name:16s} {spec.nbits}-bit at {small}: dequant+matmul {seconds * 1e6:8.1f} us (CPU wall clock)")
    row = {"shape": f"{name} at {small}", "bits": spec.nbits, "mb": w.nbytes() / 1e6}
    return {**row, "dequant_matmul_us": seconds * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1, help="rows of x (1 = batch-1 decode)")
    parser.add_argument("--sweep", action="store_true", help="also try other tilings per shape")
    parser.add_argument("--peak-gbps", type=float, default=None, help="override the DRAM peak used for %% of peak")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (after every shape)")
    parser.add_argument("--cpu-smoke", action="store_true", help="small shapes, torch path, on the CPU (CI)")
    args = parser.parse_args(argv)
    out: dict = {"rows": [], "torch": torch.__version__}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))

    if args.cpu_smoke:
        out.update(device="cpu", peak_gbps=None, timing="wall clock, eager (CPU smoke)")
        for name, spec, shape in SHAPES[:2]:
            out["rows"].append(smoke_shape(name, spec, shape, args.rows))
            save()
        return 0
    if not (torch.cuda.is_available() and kernels.HAS_TRITON):
        print("kernel_bench needs a CUDA GPU and triton; nothing to measure on this machine (try --cpu-smoke).")
        return 2
    device = torch.device("cuda")
    peak = peak_gbps(device, args.peak_gbps)
    peak_text = f"{peak:.0f} GB/s" if peak else "unknown (pass --peak-gbps)"
    print(f"{torch.cuda.get_device_name(device)}: DRAM peak {peak_text}; x fp16, {args.rows} row(s)")
    out.update(
        device=torch.cuda.get_device_name(device),
        peak_gbps=peak,
        timing="CUDA events over CUDA graph replay (eager_us: launched one by one)",
    )
    for name, spec, shape in SHAPES:
        out["rows"].append(bench_shape(name, spec, shape, args, peak))
        save()
    return 0 if all(r["correct"] for r in out["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
