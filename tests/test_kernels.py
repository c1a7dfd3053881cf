"""Fused low-bit GEMV: the Triton kernel against the torch reference, and the ``quant_linear`` dispatch.

Without CUDA the kernel runs under Triton's interpreter on CPU tensors. ``TRITON_INTERPRET=1`` only
works if it is set before triton is first imported, and ``conftest`` (via transformers) imports
triton before this module loads, so the kernel runs in one child process started with the variable
set: it executes every case below (inputs made here, outputs sent back) and the assertions run here,
one test per case. With CUDA the same cases run in-process on the GPU, and the ``requires_cuda`` test
adds the full Mixtral shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from colab_helpers.runtime import kernels
from colab_helpers.runtime.kernels import GemvConfig, default_config, quant_linear, triton_gemv
from colab_helpers.weights.quant import (
    DEFAULT_ATTENTION_SPECS,
    DEFAULT_EXPERT_SPECS,
    DEMO_ATTENTION_SPEC,
    DEMO_EXPERT_SPEC,
    PACK,
    QuantizedWeight,
    QuantSpec,
    dequantized_linear,
    quantize,
)

pytestmark = pytest.mark.gpu_kernels  # gpu_check runs these on CUDA too

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SPECS = sorted(
    set(DEFAULT_EXPERT_SPECS.values()) | set(DEFAULT_ATTENTION_SPECS.values()),
    key=lambda s: (s.nbits, s.group_size, s.scale_group_size),
)
TINY_SHAPES = [(256, 512), (512, 256), (256, 256), (64, 256)]  # the tiny model's expert and attention linears
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_weight(spec: QuantSpec, shape: tuple[int, int], seed: int, device: torch.device = DEVICE) -> QuantizedWeight:
    """Random codes and meta in the checkpoint layout (faster than quantizing, and hits every code)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    m = spec.num_groups(shape)
    cols = m // spec.scale_group_size

    def u8(*size: int) -> torch.Tensor:
        return torch.randint(0, 256, size, generator=gen, device=device, dtype=torch.uint8)

    def f16(lo: float, hi: float, *size: int) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(size, generator=gen, device=device)).half()

    codes = torch.randint(0, 2**spec.nbits, (spec.group_size, m), generator=gen, device=device, dtype=torch.uint8)
    top = 2**spec.nbits - 1
    return QuantizedWeight(
        spec,
        shape,
        W_q=PACK[spec.nbits](codes).contiguous(),
        scale_q=u8(spec.scale_group_size, cols),
        scale_scale=f16(2e-5, 2e-4, 1, cols),
        scale_zero=f16(-4.0, 40.0, 1, cols),
        zero_q=u8(1, m),
        zero_scale=f16(top / 300, top / 200),
        zero_zero=f16(0.0, 20.0),
    )


def on_device(weight: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    return QuantizedWeight.from_tensors(
        weight.spec, weight.shape, {k: v.to(device) for k, v in weight.tensors().items()}
    )


def assert_matches_reference(y: torch.Tensor, x: torch.Tensor, weight: QuantizedWeight) -> None:
    """``y`` equals ``x @ W.T`` for the fp16-dequantized ``W`` up to fp32 summation order and the
    rounding of ``y`` to its dtype. Tight enough that dequantizing in fp32 instead (skipping hqq's
    fp16 roundings) fails it."""
    w = weight.dequantize(torch.float64).to(y.device)
    x64 = x.double().reshape(-1, w.shape[1]).to(y.device)
    ref = x64 @ w.T
    bound = x64.abs() @ w.abs().T  # sum of |terms|: scales the summation error
    tol = 1e-5 * bound + 2 * torch.finfo(y.dtype).eps * ref.abs() + 1e-30
    err = (y.double().reshape(ref.shape) - ref).abs()
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}, max err {err.max().item():.3g}"


# --------------------------------------------------------------------------------------------------
# the kernel against the reference: cases, run all at once (interpreter in a child process, or CUDA)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One ``triton_gemv(x, weight, config)`` call; ``make`` builds its CPU inputs deterministically."""

    spec: QuantSpec
    shape: tuple[int, int]
    dtype: torch.dtype = torch.float32
    lead: tuple[int, ...] = (1,)  # leading dims of x
    config: GemvConfig | None = None
    source: str = "random"  # random codes and meta | "quantized" real matrix | "onehot" x picks columns

    @property
    def id(self) -> str:
        s, cfg = self.spec, self.config
        tiling = f"-c{cfg.block_c}p{cfg.p_block}s{cfg.split}" if cfg else ""
        lead = "x".join(map(str, self.lead))
        dtype = str(self.dtype).removeprefix("torch.")
        spec = f"b{s.nbits}g{s.group_size}s{s.scale_group_size}"
        return f"{self.source}-{spec}-{self.shape[0]}x{self.shape[1]}-{lead}-{dtype}{tiling}"

    def make(self) -> tuple[torch.Tensor, QuantizedWeight]:
        gen = torch.Generator().manual_seed(sum(self.shape) + 7 * self.spec.group_size + self.spec.nbits)
        in_f = self.shape[1]
        if self.source == "quantized":
            weight = quantize(torch.randn(self.shape, generator=gen) * 0.02, self.spec, optimize=False)
        else:
            weight = random_weight(self.spec, self.shape, seed=int(torch.randint(1 << 30, (), generator=gen)))
        if self.source == "onehot":
            x = torch.zeros(len(ONEHOT_COLUMNS(in_f)), in_f)
            x[torch.arange(x.shape[0]), ONEHOT_COLUMNS(in_f)] = 1.0
        else:
            x = torch.randn(*self.lead, in_f, generator=gen)
        return x.to(self.dtype), weight


def ONEHOT_COLUMNS(in_f: int) -> torch.Tensor:  # noqa: N802  (a constant, per width)
    return torch.tensor([0, 1, in_f // 2, in_f - 1])


REFERENCE_CASES = [
    Case(spec, shape, dtype) for spec in SPECS for shape in TINY_SHAPES for dtype in (torch.float32, torch.float16)
]
TILING_CASES = [
    Case(DEMO_EXPERT_SPEC, (256, 512), dtype, (1,), GemvConfig(block_c=64, p_block=4, split=3))  # uneven split-K
    for dtype in (torch.float32, torch.float16)
] + [
    Case(DEMO_EXPERT_SPEC, (192, 512), torch.float32, (1,), GemvConfig(block_c=32, p_block=4)),  # meta index wraps
    Case(DEMO_EXPERT_SPEC, (64, 256), torch.float16, (2, 2), GemvConfig(block_c=32, p_block=8)),  # p_block > h
    Case(DEFAULT_EXPERT_SPECS[3], (64, 256), torch.float32, (1, 1), GemvConfig(block_c=128, p_block=4, split=2)),
]
QUANTIZED_CASES = [
    Case(spec, (256, 512), lead=(2,), source="quantized") for spec in (DEMO_EXPERT_SPEC, DEMO_ATTENTION_SPEC)
]
ONEHOT_CASES = [Case(DEFAULT_EXPERT_SPECS[b], (64, 512), source="onehot") for b in (2, 3, 4)]
ALL_CASES = REFERENCE_CASES + TILING_CASES + QUANTIZED_CASES + ONEHOT_CASES


def interpreter_results(jobs: dict, tmp: Path, script: str) -> dict:
    """``script``'s ``run_cases(jobs)`` in a child process under ``TRITON_INTERPRET=1`` (it must be set before
    triton is imported, so not in this process): ``python script JOBS OUT``."""
    torch.save(jobs, tmp / "jobs.pt")
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, script, str(tmp / "jobs.pt"), str(tmp / "out.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return torch.load(tmp / "out.pt", weights_only=False)


def run_cases(jobs: dict[str, tuple[torch.Tensor, QuantizedWeight, GemvConfig | None]]) -> dict[str, object]:
    """``{id: y}``, or ``{id: traceback}`` for a case that raised (so one failure doesn't hide the rest)."""
    out: dict[str, object] = {}
    for key, (x, weight, config) in jobs.items():
        try:
            out[key] = triton_gemv(x, weight, config).cpu()
        except Exception:
            out[key] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def gemv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Every case's kernel output: in-process on CUDA, else one interpreter child process."""
    jobs = {}
    for case in ALL_CASES:
        x, weight = case.make()
        jobs[case.id] = (x.to(DEVICE), on_device(weight, DEVICE), case.config)
    if DEVICE.type == "cuda":
        return run_cases(jobs)
    tmp = tmp_path_factory.mktemp("gemv")
    return interpreter_results(jobs, tmp, __file__)


def output(gemv: dict[str, object], case: Case) -> tuple[torch.Tensor, torch.Tensor, QuantizedWeight]:
    result = gemv[case.id]
    if isinstance(result, str):
        pytest.fail(f"triton_gemv raised:\n{result}")
    x, weight = case.make()
    return result, x, weight


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: c.id)
def test_gemv_matches_reference(gemv: dict[str, object], case: Case) -> None:
    assert_matches_reference(*output(gemv, case))


@pytest.mark.parametrize("case", TILING_CASES, ids=lambda c: c.id)
def test_gemv_tilings_and_leading_dims(gemv: dict[str, object], case: Case) -> None:
    assert_matches_reference(*output(gemv, case))


@pytest.mark.parametrize("case", QUANTIZED_CASES, ids=lambda c: c.id)
def test_gemv_on_a_quantized_matrix(gemv: dict[str, object], case: Case) -> None:
    """Meta from the real quantizer (positive steps, rounded 4-bit zeros), not just random bytes."""
    assert_matches_reference(*output(gemv, case))


@pytest.mark.parametrize("case", ONEHOT_CASES, ids=lambda c: c.id)
def test_gemv_multiplies_the_exact_fp16_weights(gemv: dict[str, object], case: Case) -> None:
    """One-hot rows of x pick single columns of W: the kernel must reproduce them bit for bit."""
    y, _, weight = output(gemv, case)
    assert torch.equal(y, weight.dequantize(torch.float32)[:, ONEHOT_COLUMNS(case.shape[1])].T)


@pytest.mark.parametrize(
    ("spec", "shape", "x_type", "split"),
    [
        (DEMO_EXPERT_SPEC, (14336, 4096), "fp16", 1),
        (DEMO_ATTENTION_SPEC, (1024, 4096), "fp16", 3),
        (DEFAULT_EXPERT_SPECS[3], (64, 256), "fp32", 1),  # no wrap-once fast path
    ],
    ids=["b2", "b4-split", "b3-fp32"],
)
def test_kernel_compiles_for_a_t4(spec: QuantSpec, shape: tuple[int, int], x_type: str, split: int) -> None:
    """Lower the kernel to a cubin for sm_75 (Colab's T4: fp16, no bf16) with triton's bundled ptxas, so a
    construct the GPU backend rejects fails here and not first on Colab. No GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = triton.JITFunction(kernels._gemv_kernel)  # compiled even if TRITON_INTERPRET is set
    cfg = default_config(spec, shape, 1, torch.device("cpu"))
    plan = kernels.make_plan(spec, shape, 1, GemvConfig(cfg.block_c, cfg.p_block, split))
    consts = dict(plan.constants)
    options = {"num_warps": consts.pop("num_warps"), "enable_fp_fusion": consts.pop("enable_fp_fusion")}
    words = "*i32" if spec.nbits == 3 else "*u8"
    y_type = x_type if plan.split == 1 else "fp32"
    pointers = [f"*{x_type}", words, "*u8", "*fp16", "*fp16", "*u8", "*fp16", "*fp16", f"*{y_type}"]
    names = fn.arg_names
    signature = dict(zip(names, pointers + ["i32"] * len(plan.ints), strict=False)) | dict.fromkeys(consts, "constexpr")
    constexprs = {(names.index(k),): v for k, v in consts.items()}
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 75, 32), options=options)
    assert compiled.asm["cubin"]


def test_default_config_bounds_accumulators_per_column() -> None:
    cpu = torch.device("cpu")
    assert default_config(DEMO_EXPERT_SPEC, (14336, 4096), 1, cpu) == GemvConfig(block_c=256, p_block=4)
    assert default_config(DEMO_ATTENTION_SPEC, (4096, 4096), 1, cpu) == GemvConfig(block_c=256, p_block=8)
    assert default_config(DEFAULT_EXPERT_SPECS[3], (14336, 4096), 1, cpu) == GemvConfig(block_c=256, p_block=1)


def test_gemv_rejects_mismatched_input() -> None:
    weight = random_weight(DEMO_EXPERT_SPEC, (64, 256), seed=0)
    with pytest.raises(ValueError, match="features"):
        triton_gemv(torch.zeros(1, 128, device=DEVICE), weight)


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------


def _fake(rows: int, dtype: torch.dtype = torch.float16, is_cuda: bool = True, in_f: int = 256) -> SimpleNamespace:
    """Just the attributes ``use_fused_kernel`` reads from x, so its CUDA branch is testable without a GPU."""
    cuda = torch.device("cuda", 0)
    return SimpleNamespace(
        shape=(rows, in_f), numel=lambda: rows * in_f, dtype=dtype, is_cuda=is_cuda, requires_grad=False, device=cuda
    )


def test_dispatch_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    monkeypatch.setattr(kernels, "_fused_enabled", True)
    weight = SimpleNamespace(W_q=SimpleNamespace(device=torch.device("cuda", 0)), shape=(64, 256))
    decide = kernels.use_fused_kernel
    assert decide(_fake(1), weight)
    assert decide(_fake(kernels.MAX_GEMV_ROWS, torch.float32), weight)
    assert not decide(_fake(kernels.MAX_GEMV_ROWS + 1), weight)  # prefill: dequantize + matmul
    assert not decide(_fake(1, torch.bfloat16), weight)
    assert not decide(_fake(1, is_cuda=False), weight)
    assert not decide(SimpleNamespace(**{**vars(_fake(1)), "requires_grad": True}), weight)  # no backward
    assert not decide(_fake(1, in_f=512), weight)  # let torch raise its shape error
    assert not decide(_fake(1), SimpleNamespace(W_q=SimpleNamespace(device=torch.device("cpu")), shape=(64, 256)))
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    assert not decide(_fake(1), weight)


def test_cpu_input_takes_the_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_kernel(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("the fused kernel must not run for CPU tensors")

    monkeypatch.setattr(kernels, "triton_gemv", no_kernel)
    weight = random_weight(DEMO_EXPERT_SPEC, (64, 256), seed=0, device=torch.device("cpu"))
    x = torch.randn(1, 256)
    assert not kernels.use_fused_kernel(x, weight)
    assert torch.equal(quant_linear(x, weight), dequantized_linear(x, weight))


def test_dispatch_routes_decode_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``quant_linear`` returns on a GPU for decode is the kernel's output (the kernel itself is
    checked above)."""
    marker = torch.full((1, 1, 64), 7.0)
    calls = []

    def fake_kernel(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
        calls.append((x, weight))
        return marker

    monkeypatch.setattr(kernels, "use_fused_kernel", lambda x, w: True)
    monkeypatch.setattr(kernels, "triton_gemv", fake_kernel)
    weight = random_weight(DEMO_EXPERT_SPEC, (64, 256), seed=0)
    x = torch.randn(1, 1, 256, device=DEVICE)
    assert quant_linear(x, weight) is marker
    assert calls == [(x, weight)]


def test_kernel_failure_falls_back_once_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(kernels, "_fused_enabled", True)
    monkeypatch.setattr(kernels, "use_fused_kernel", lambda x, w: kernels._fused_enabled)  # a GPU machine
    monkeypatch.setattr(kernels, "triton_gemv", broken)
    weight = random_weight(DEMO_EXPERT_SPEC, (64, 256), seed=0, device=torch.device("cpu"))
    x = torch.randn(1, 256)
    with pytest.warns(UserWarning, match="dequantize \\+ matmul"):
        assert torch.equal(quant_linear(x, weight), dequantized_linear(x, weight))
    assert not kernels._fused_enabled
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # disabled now: no second attempt, no second warning
        assert torch.equal(quant_linear(x, weight), dequantized_linear(x, weight))


def test_triton_gemv_needs_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="triton"):
        triton_gemv(torch.zeros(1, 256), random_weight(DEMO_EXPERT_SPEC, (64, 256), seed=0))


# --------------------------------------------------------------------------------------------------
# full Mixtral shapes on a GPU
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        (DEMO_EXPERT_SPEC, (14336, 4096)),  # w1 / w3
        (DEMO_EXPERT_SPEC, (4096, 14336)),  # w2
        (DEMO_ATTENTION_SPEC, (4096, 4096)),  # q / o
        (DEMO_ATTENTION_SPEC, (1024, 4096)),  # k / v
        (DEFAULT_EXPERT_SPECS[3], (14336, 4096)),
    ],
    ids=["w1", "w2", "q", "k", "w1-3bit"],
)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.requires_cuda
@cuda_only
def test_gemv_full_mixtral_shapes_on_cuda(spec: QuantSpec, shape: tuple[int, int], rows: int) -> None:
    weight = random_weight(spec, shape, seed=11, device=torch.device("cuda"))
    x = torch.randn(rows, shape[1], device="cuda")
    for dtype in (torch.float32, torch.float16):
        assert kernels.use_fused_kernel(x.to(dtype), weight)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "fused low-bit GEMV failed")  # the fallback must not answer
            assert_matches_reference(quant_linear(x.to(dtype), weight), x.to(dtype), weight)
    onehot = torch.zeros(4, shape[1], device="cuda")
    cols = torch.tensor([0, 1, shape[1] // 2, shape[1] - 1], device="cuda")
    onehot[torch.arange(4, device="cuda"), cols] = 1.0
    assert torch.equal(triton_gemv(onehot, weight), weight.dequantize(torch.float32)[:, cols].T)


if __name__ == "__main__":  # the interpreter child: python test_kernels.py JOBS OUT
    torch.save(run_cases(torch.load(sys.argv[1], weights_only=False)), sys.argv[2])
