"""Low-bit format: packing round trips, bit-exact dequantization against hqq, byte sizes of the real model."""

from __future__ import annotations

import pytest
import torch

from colab_helpers.runtime.linear import QuantLinear
from colab_helpers.weights.checkpoint import QuantConfig
from colab_helpers.weights.model_spec import ModelSpec
from colab_helpers.weights.quant import (
    DEFAULT_EXPERT_SPECS,
    DEMO_ATTENTION_SPEC,
    DEMO_EXPERT_SPEC,
    PACK,
    UNPACK,
    QuantizedWeight,
    QuantSpec,
    dequantize_peak_bytes,
    quantize,
)

SPECS = [DEMO_EXPERT_SPEC, DEMO_ATTENTION_SPEC, DEFAULT_EXPERT_SPECS[3], DEFAULT_EXPERT_SPECS[4]]


@pytest.mark.parametrize("nbits", [2, 3, 4])
def test_pack_unpack_round_trip(nbits: int) -> None:
    g = 16 if nbits != 3 else 64
    codes = torch.randint(0, 2**nbits, (g, 40), dtype=torch.uint8)
    packed = PACK[nbits](codes)
    assert packed.dtype == (torch.int32 if nbits == 3 else torch.uint8)
    assert torch.equal(UNPACK[nbits](packed)[:g], codes)


def test_2bit_packing_matches_the_documented_bit_order() -> None:
    codes = torch.tensor([[1], [2], [3], [0], [3], [3], [3], [3]], dtype=torch.uint8)  # g=8, h=2
    packed = PACK[2](codes)
    assert packed[:, 0].tolist() == [1 << 6 | 3 << 4 | 3 << 2 | 3, 2 << 6 | 0 << 4 | 3 << 2 | 3]


def _hqq_dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """hqq 0.2.8's backward-compatible ``meta`` path, built by hand (see CHECKPOINT_FORMAT.md)."""
    from hqq.core.quantize import HQQLinear

    spec, m = qw.spec, qw.num_groups
    f16 = torch.float16
    meta = {
        "nbits": spec.nbits,
        "group_size": spec.group_size,
        "shape": qw.shape,
        "axis": 0,
        "packing": {2: "2bit_u8", 3: "3bit_32", 4: "4bit_u8"}[spec.nbits],
        "quant_scale": True,
        "quant_zero": True,
        "compute_dtype": f16,
        "view_as_float": False,
        "scale_q": qw.scale_q,
        "zero_q": qw.zero_q,
        "meta_scale": {
            "nbits": 8,
            "group_size": spec.scale_group_size,
            "shape": (1, m),
            "axis": 0,
            "packing": None,
            "scale": qw.scale_scale,
            "zero": qw.scale_zero,
            "compute_dtype": f16,
        },
        "meta_zero": {
            "nbits": 8,
            "group_size": None,
            "shape": (1, m),
            "axis": 0,
            "packing": None,
            "scale": qw.zero_scale,
            "zero": qw.zero_zero,
            "compute_dtype": f16,
        },
    }
    layer = HQQLinear(None, None, compute_dtype=f16, device="cpu", initialize=False)
    layer.load_state_dict({"W_q": qw.W_q, "meta": meta})
    return layer.dequantize().reshape(qw.shape)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.nbits}b_g{s.group_size}")
@pytest.mark.parametrize("optimize", [False, True])
def test_dequantize_is_bit_exact_with_hqq(spec: QuantSpec, optimize: bool) -> None:
    torch.manual_seed(spec.nbits)
    w = torch.randn(512, 256) * 0.02
    qw = quantize(w, spec, optimize=optimize)
    assert torch.equal(qw.dequantize(), _hqq_dequantize(qw))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.nbits}b_g{s.group_size}")
def test_blockwise_dequantize_is_bit_exact_with_hqq(spec: QuantSpec, monkeypatch) -> None:
    """Many blocks and a partial last one: still hqq's bytes, in every output dtype."""
    from colab_helpers.weights import quant

    torch.manual_seed(10 + spec.nbits)
    qw = quantize(torch.randn(512, 256) * 0.02, spec, optimize=False)
    monkeypatch.setattr(quant, "DEQUANT_BLOCK", 3 * spec.group_size * 97)  # 97 columns: does not divide M
    ref = _hqq_dequantize(qw)
    assert torch.equal(qw.dequantize(), ref)
    assert torch.equal(qw.dequantize(torch.float32), ref.float())


def _random_weight(spec: QuantSpec, shape: tuple[int, int]) -> QuantizedWeight:
    gen, t = torch.Generator().manual_seed(0), {}
    for key, (dtype, s) in spec.tensor_specs(shape).items():
        t[key] = (
            torch.randint(0, 256, s, dtype=torch.uint8, generator=gen)
            if dtype == torch.uint8
            else torch.randint(0, 2**31 - 1, s, dtype=torch.int32, generator=gen)
            if dtype == torch.int32
            else torch.rand(s, generator=gen).to(dtype)
        )
    return QuantizedWeight.from_tensors(spec, shape, t)


@pytest.mark.parametrize(
    "spec, shape",
    [(DEMO_EXPERT_SPEC, (14336, 4096)), (DEMO_ATTENTION_SPEC, (4096, 4096)), (DEFAULT_EXPERT_SPECS[3], (4096, 14336))],
    ids=["w1_2bit", "q_proj_4bit", "w2_3bit"],
)
def test_dequantize_peak_memory_is_what_the_planner_counts(spec: QuantSpec, shape: tuple[int, int]) -> None:
    """Tracked peak of real Mixtral shapes (result included) vs ``dequantize_peak_bytes``.

    Before the blockwise rewrite one 14336 x 4096 matrix peaked at 499 MB (fp32 temporaries of the
    whole grid); now it is the 117 MB result plus a bounded block.
    """
    from colab_helpers.planning.memtrack import peak_bytes

    qw = _random_weight(spec, shape)
    for dtype in (torch.float16, torch.float32):
        measured = peak_bytes(qw.dequantize, dtype)
        counted = dequantize_peak_bytes(spec, shape, torch.empty((), dtype=dtype).element_size())
        assert measured <= counted <= 1.25 * measured, (dtype, measured, counted)
    if shape == (14336, 4096):
        assert peak_bytes(qw.dequantize, torch.float16) < 200e6


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.nbits}b_g{s.group_size}")
def test_stored_tensors_have_the_documented_shapes(spec: QuantSpec) -> None:
    qw = quantize(torch.randn(512, 256), spec, optimize=False)
    for suffix, (dtype, shape) in spec.tensor_specs((512, 256)).items():
        t = qw.tensors()[suffix]
        assert t.dtype == dtype and tuple(t.shape) == shape, suffix


def test_error_shrinks_with_bits_and_hqq_optimizer_helps() -> None:
    torch.manual_seed(0)
    w = torch.randn(512, 256) * 0.02
    err = {}
    for bits, spec in DEFAULT_EXPERT_SPECS.items():
        err[bits] = ((quantize(w, spec).dequantize().float() - w).norm() / w.norm()).item()
    assert err[2] > err[3] > err[4]
    plain = ((quantize(w, DEMO_EXPERT_SPEC, optimize=False).dequantize().float() - w).norm() / w.norm()).item()
    assert err[2] < plain


def test_real_mixtral_byte_sizes_match_the_format_doc() -> None:
    from transformers import MixtralConfig

    cfg = MixtralConfig()  # stock Mixtral-8x7B shapes
    quant = QuantConfig()
    expert = sum(DEMO_EXPERT_SPEC.nbytes(s) for s in ModelSpec.of(cfg).expert_shapes.values())
    attention = sum(DEMO_ATTENTION_SPEC.nbytes(s) for s in ModelSpec.of(cfg).arch.attention_shapes.values())
    trunk = 0
    for dtype, shape in dict(ModelSpec.of(cfg, quant).trunk_tensors).values():
        n = 1
        for s in shape:
            n *= s
        trunk += n * torch.empty((), dtype=dtype).element_size()
    assert expert == 66_404_364
    assert attention == 22_292_496
    assert trunk == 1_240_277_504
    assert trunk + 256 * expert == 18_239_794_688


def test_quant_linear_matches_dequantized_matmul() -> None:
    torch.manual_seed(2)
    qw = quantize(torch.randn(128, 256) * 0.05, DEMO_ATTENTION_SPEC, optimize=False)
    x = torch.randn(3, 256)
    layer = QuantLinear(qw)
    torch.testing.assert_close(layer(x), x @ qw.dequantize(torch.float32).T)


def test_shapes_that_do_not_fit_the_grouping_are_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        DEMO_ATTENTION_SPEC.num_groups((64, 64))
