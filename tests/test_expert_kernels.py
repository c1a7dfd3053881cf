"""The fused expert MLP (w1+w3 in one launch, w2 with SiLU·mul in and the weighted sum out) against float64.

Like ``test_kernels``: without CUDA the kernels run under Triton's interpreter in one child process
(``TRITON_INTERPRET`` must be set before triton is imported), with CUDA in-process.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from colab_helpers.runtime import kernels
from colab_helpers.runtime.kernels import GemvConfig
from colab_helpers.weights.quant import DEFAULT_EXPERT_SPECS, DEMO_EXPERT_SPEC, QuantizedWeight, QuantSpec
from tests.test_kernels import DEVICE, interpreter_results, on_device, random_weight

pytestmark = pytest.mark.gpu_kernels  # gpu_check runs these on CUDA too

HIDDEN, FFN = 256, 512  # the tiny model's expert shapes


@dataclass(frozen=True)
class ExpertCase:
    spec: QuantSpec
    dtype: torch.dtype
    rows: int = 1
    accumulate: bool = True
    split: int | None = None  # gate/up input splits (None: the default plan)

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"b{self.spec.nbits}-{dt}-r{self.rows}-{'acc' if self.accumulate else 'new'}-s{self.split}"

    def make(self):
        gen = torch.Generator().manual_seed(self.spec.nbits * 100 + self.rows)
        w = {
            "w1": random_weight(self.spec, (FFN, HIDDEN), 1),
            "w3": random_weight(self.spec, (FFN, HIDDEN), 2),
            "w2": random_weight(self.spec, (HIDDEN, FFN), 3),
        }
        x = (torch.randn(self.rows, HIDDEN, generator=gen) * 2).to(self.dtype)
        out = torch.randn(self.rows, HIDDEN, generator=gen).to(self.dtype) if self.accumulate else None
        return x, w, torch.tensor(0.375, dtype=self.dtype), out


CASES = [
    ExpertCase(DEMO_EXPERT_SPEC, dtype, rows, True, split)
    for dtype in (torch.float32, torch.float16)
    for rows, split in ((1, None), (2, 2))
] + [
    ExpertCase(DEFAULT_EXPERT_SPECS[3], torch.float16, 1, False),
    ExpertCase(DEFAULT_EXPERT_SPECS[4], torch.float32, 1, False, 3),  # 3 requested: 2 chunks of 128 columns
]


def run_cases(jobs: dict) -> dict:
    out = {}
    for key, (x, w, coef, acc, split) in jobs.items():
        try:
            cfg = None if split is None else GemvConfig(block_c=64, p_block=4, split=split)
            h = kernels.triton_expert_gate_up(x, w["w1"], w["w3"], cfg)
            y = kernels.triton_expert_down(h, w["w2"], coef, None if acc is None else acc.clone(), x.dtype)
            out[key] = (h.cpu(), y.cpu())
        except Exception:
            out[key] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    jobs = {}
    for case in CASES:
        x, w, coef, out = case.make()
        dev = {k: on_device(v, DEVICE) for k, v in w.items()}
        jobs[case.id] = (x.to(DEVICE), dev, coef.to(DEVICE), None if out is None else out.to(DEVICE), case.split)
    if DEVICE.type == "cuda":
        return run_cases(jobs)
    tmp = tmp_path_factory.mktemp("expert")
    return interpreter_results(jobs, tmp, __file__)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fused_expert_matches_float64(results: dict, case: ExpertCase) -> None:
    result = results[case.id]
    if isinstance(result, str):
        pytest.fail(f"fused expert kernels raised:\n{result}")
    h, y = result
    x, w, coef, out = case.make()
    w64 = {k: v.dequantize(torch.float64) for k, v in w.items()}
    x64 = x.double()
    a, b = x64 @ w64["w1"].T, x64 @ w64["w3"].T
    bound_ab = x64.abs() @ w64["w1"].abs().T, x64.abs() @ w64["w3"].abs().T
    assert h.shape[1:] == (2, case.rows, FFN) and h.dtype == torch.float32
    assert h.shape[0] == (1 if case.split is None else 2)
    for got, ref, bound in ((h.sum(0)[0], a, bound_ab[0]), (h.sum(0)[1], b, bound_ab[1])):
        assert ((got.double() - ref).abs() <= 1e-5 * bound + 1e-30).all()
    mid = F.silu(a) * b
    ref = (mid @ w64["w2"].T) * float(coef)
    bound = (mid.abs() @ w64["w2"].abs().T) * float(coef) + 1e-5 * (bound_ab[0] + bound_ab[1]).abs().max()
    if out is not None:
        ref = ref + out.double()
    tol = 1e-4 * bound + 2 * torch.finfo(case.dtype).eps * ref.abs() + 1e-30
    assert y.dtype == case.dtype and y.shape == (case.rows, HIDDEN)
    err = (y.double() - ref).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"


@pytest.mark.parametrize("kernel", ["gate_up", "down"])
@pytest.mark.parametrize("x_type", ["fp16", "fp32"])
def test_expert_kernels_compile_for_a_t4(kernel: str, x_type: str) -> None:
    """Lower both kernels to sm_75 cubins (Colab's T4) with triton's bundled ptxas; no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = DEMO_EXPERT_SPEC
    shape = (14336, 4096) if kernel == "gate_up" else (4096, 14336)
    cfg = kernels.default_config(spec, shape, 1, torch.device("cpu"))
    plan = kernels.make_plan(spec, shape, 1, GemvConfig(cfg.block_c, cfg.p_block, 1))
    consts = dict(plan.constants)
    options = {"num_warps": consts.pop("num_warps"), "enable_fp_fusion": consts.pop("enable_fp_fusion")}
    weight = ["*u8", "*u8", "*fp16", "*fp16", "*u8", "*fp16", "*fp16"]
    if kernel == "gate_up":
        fn = triton.JITFunction(kernels._gate_up_kernel)
        pointers = [f"*{x_type}", *weight, *weight, "*fp32"]
    else:
        fn = triton.JITFunction(kernels._down_kernel)
        pointers = ["*fp32", *weight, f"*{x_type}", f"*{x_type}"]
        consts |= {"H_SPLIT": 1, "ACCUMULATE": True}
    names = fn.arg_names
    signature = dict(zip(names, pointers + ["i32"] * len(plan.ints), strict=False)) | dict.fromkeys(consts, "constexpr")
    constexprs = {(names.index(k),): v for k, v in consts.items()}
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 75, 32), options=options)
    assert compiled.asm["cubin"]


def _weights() -> dict[str, QuantizedWeight]:
    cpu = torch.device("cpu")
    return {
        "w1": random_weight(DEMO_EXPERT_SPEC, (FFN, HIDDEN), 1, cpu),
        "w3": random_weight(DEMO_EXPERT_SPEC, (FFN, HIDDEN), 2, cpu),
        "w2": random_weight(DEMO_EXPERT_SPEC, (HIDDEN, FFN), 3, cpu),
    }


def test_cpu_expert_is_the_composed_reference() -> None:
    w, x = _weights(), torch.randn(1, HIDDEN)
    coef, out = torch.tensor(0.25), torch.randn(1, HIDDEN)
    q = kernels.quant_linear
    y = q(F.silu(q(x, w["w1"])) * q(x, w["w3"]), w["w2"]) * coef
    assert torch.equal(kernels.expert_mlp(x, w, coef, out.clone()), out + y)
    assert torch.equal(kernels.expert_mlp(x, w, coef), y)


def test_expert_failure_falls_back_once_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(kernels, "_fused_enabled", True)
    monkeypatch.setattr(kernels, "use_fused_kernel", lambda x, w: kernels._fused_enabled)  # a GPU machine
    monkeypatch.setattr(kernels, "triton_expert_gate_up", broken)
    w, x, coef = _weights(), torch.randn(1, HIDDEN), torch.tensor(0.5)
    with pytest.warns(UserWarning, match="fused expert kernels failed"):
        y = kernels.expert_mlp(x, w, coef)
    assert not kernels._fused_enabled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(kernels.expert_mlp(x, w, coef), y)


if __name__ == "__main__":  # the interpreter child: python test_expert_kernels.py JOBS OUT
    torch.save(run_cases(torch.load(sys.argv[1], weights_only=False)), sys.argv[2])
