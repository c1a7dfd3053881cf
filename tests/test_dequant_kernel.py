"""``kernels.triton_dequantize`` (a whole matrix in one launch, prefill's dequantize on CUDA) equals the torch path
bit for bit. Like ``test_kernels``: without CUDA under Triton's interpreter in one child process, with CUDA
in-process (there also against the CPU's result for the same bytes)."""

from __future__ import annotations

import sys
import traceback

import pytest
import torch

from colab_helpers.runtime import kernels
from colab_helpers.weights.quant import DEMO_ATTENTION_SPEC, DEMO_EXPERT_SPEC
from tests.test_kernels import DEVICE, SPECS, TINY_SHAPES, interpreter_results, on_device, random_weight

pytestmark = pytest.mark.gpu_kernels  # gpu_check runs these on CUDA too
pytest.importorskip("triton")

CASES = [(spec, shape, dtype) for spec in SPECS for shape in TINY_SHAPES for dtype in (torch.float16, torch.float32)]


def _id(spec, shape, dtype) -> str:
    dt = str(dtype).removeprefix("torch.")
    return f"b{spec.nbits}g{spec.group_size}s{spec.scale_group_size}-{shape[0]}x{shape[1]}-{dt}"


def run_cases(jobs: dict) -> dict:
    out: dict = {}
    for key, (weight, dtype) in jobs.items():
        try:
            out[key] = kernels.triton_dequantize(weight, dtype).cpu()
        except Exception:
            out[key] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    jobs = {_id(*c): (on_device(random_weight(c[0], c[1], seed=i), DEVICE), c[2]) for i, c in enumerate(CASES)}
    if DEVICE.type == "cuda":
        return run_cases(jobs)
    return interpreter_results(jobs, tmp_path_factory.mktemp("dequant"), __file__)


@pytest.mark.parametrize("case", CASES, ids=[_id(*c) for c in CASES])
def test_one_launch_dequantize_is_bit_identical_to_the_torch_path(results, case) -> None:
    spec, shape, dtype = case
    got = results[_id(*case)]
    assert not isinstance(got, str), got
    weight = random_weight(spec, shape, seed=CASES.index(case), device=torch.device("cpu"))
    want = weight.dequantize_blocks(dtype)  # the CPU path (bit-exact with hqq's fp16 ops)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"b{s.nbits}g{s.group_size}")
def test_dequantize_kernel_compiles_for_a_t4(spec) -> None:
    """Lower it to a cubin for sm_75 (Colab's T4) with triton's bundled ptxas; no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = triton.JITFunction(kernels._dequant_kernel)
    geo = kernels.Geometry.of(spec, (4096, 4096))
    p_pad, k_pad = kernels._pow2(geo.packed_rows), kernels._pow2(geo.codes_per_word)
    consts = dict(
        NBITS=geo.nbits, GROUP=geo.group_size, PACKED_ROWS=geo.packed_rows, P_PAD=p_pad, PER_WORD=geo.codes_per_word,
        PER_WORD_PAD=k_pad, TOP_SHIFT=geo.top_shift, BLOCK_J=max(16, kernels._DEQUANT_SLOTS // (p_pad * k_pad)),
    )  # fmt: skip
    words = "*i32" if spec.nbits == 3 else "*u8"
    pointers = [words, "*u8", "*fp16", "*fp16", "*u8", "*fp16", "*fp16", "*fp16", "i32", "i32"]
    names = fn.arg_names
    signature = dict(zip(names, pointers, strict=False)) | dict.fromkeys(consts, "constexpr")
    constexprs = {(names.index(k),): v for k, v in consts.items()}
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 75, 32))
    assert compiled.asm["cubin"]


@pytest.mark.requires_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec, shape", [(DEMO_EXPERT_SPEC, (14336, 4096)), (DEMO_ATTENTION_SPEC, (1024, 4096))])
def test_full_mixtral_shapes_dequantize_in_one_launch_on_cuda(spec, shape) -> None:
    weight = random_weight(spec, shape, seed=5, device=torch.device("cuda"))
    assert kernels.use_fused_dequantize(weight, torch.float16)
    assert torch.equal(weight.dequantize(torch.float16), weight.dequantize_blocks(torch.float16))
    cpu = random_weight(spec, shape, seed=5, device=torch.device("cpu"))
    assert torch.equal(weight.dequantize(torch.float16).cpu(), cpu.dequantize_blocks(torch.float16))


if __name__ == "__main__":  # the interpreter child: python test_dequant_kernel.py JOBS OUT
    torch.save(run_cases(torch.load(sys.argv[1], weights_only=False)), sys.argv[2])
