"""Warm-up compiles every Triton variant that decode and a short prefill launch, listed on the CPU.

Triton compiles one variant per specialization key (dtypes, constexprs, ints equal to 1 or divisible by
16, 16-byte aligned pointers). Here the fused entry points build their launches exactly as on CUDA but
the launch only records its key (``kernels.specialization_key``, Triton's own binder) and the torch
reference computes the result, so the embedded model decodes on the CPU through the CUDA path.
"""

from __future__ import annotations

import pytest
import torch

from colab_helpers.model import load_model
from colab_helpers.runtime import kernels
from colab_helpers.runtime.linear import QuantLinear
from colab_helpers.runtime.moe import OffloadedMoE
from colab_helpers.weights.tiny import tiny_model_path

pytestmark = pytest.mark.gpu_kernels  # gpu_check runs these on CUDA too
pytest.importorskip("triton")

FUSED = ("triton_gemv", "triton_expert_gate_up", "triton_expert_down", "triton_dequantize")


@pytest.fixture
def keys(monkeypatch) -> set:
    """Every specialization key launched while the fixture is active (the fused path taken on CPU)."""
    seen: set = set()
    real = {name: getattr(kernels, name) for name in FUSED}

    def record(kernel, grid, args, kwargs) -> None:
        seen.add(kernels.specialization_key(kernel, args, kwargs))

    def stand_in(name: str):
        def run(*args, **kwargs):
            built = real[name](*args, **kwargs)  # the real launch arguments, recorded, nothing launched
            ref = kernels.REFERENCES[name](*args, **kwargs)
            if name == "triton_expert_gate_up":  # keep the real input split: the down kernel's H_SPLIT
                padded = torch.zeros_like(built)
                padded[0] = ref[0]
                return padded
            return ref

        return run

    monkeypatch.setattr(kernels, "_launch", record)
    for name in FUSED:
        monkeypatch.setattr(kernels, name, stand_in(name))
    monkeypatch.setattr(kernels, "use_fused_kernel", kernels.would_use_fused_kernel)
    monkeypatch.setattr(kernels, "use_fused_dequantize", kernels.would_use_fused_dequantize)
    monkeypatch.setattr(kernels, "_fused_enabled", True)
    return seen


def test_warm_up_covers_every_variant_decode_and_prefills_launch(keys) -> None:
    """Decode, a 3-token prefill (at most 3 rows per matrix: the GEMV at rows 1..3) and a 40-token one
    (dequantize in one launch, then matmul)."""
    model = load_model(tiny_model_path(), device="cpu", dtype=torch.float16, experts_on_device=2, progress=False)
    cache = model.expert_cache
    for m in model.modules():  # on CUDA each trunk tensor is its own (aligned) allocation; here a shard view
        if isinstance(m, QuantLinear):
            m._buffers.update({k: v.clone() for k, v in m._buffers.items()})
    linears = [m.weight_q for m in model.modules() if isinstance(m, QuantLinear)]
    n = kernels.warm_up(
        linears, [cache.layout.weights(cache.device_buf[0])], torch.float16, "cpu", False,
        kernels.triton_gemv, kernels.fused_expert, kernels.triton_dequantize,
    )  # fmt: skip
    assert n > 0
    warmed = set(keys)
    keys.clear()
    prefill = torch.tensor([[1, 330, 1200]])  # 3 tokens: at most 3 per expert, attention at 3 rows
    routed = []
    for block in model.modules():
        if isinstance(block, OffloadedMoE):
            block.observers.append(lambda layer, choice, guesses: routed.append(choice))
    longer = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(prefill, max_new_tokens=4, do_sample=False)
        model(longer)  # > 4 rows per matrix: dequantize + matmul
    hit = set(keys)
    names = {k[0] for k in hit}
    assert names == {"_gemv_kernel", "_gate_up_kernel", "_down_kernel", "_dequant_kernel"}, names
    assert any(len(c) == 3 for c in routed) and any(len(c) == 1 for c in routed)
    missing = hit - warmed
    assert not missing, f"{len(missing)} of {len(hit)} variants would compile during the first tokens: {missing}"


def test_the_coefficient_view_decode_passes_is_not_its_own_variant(monkeypatch) -> None:
    """``coefs[1]`` is a 0-d view 2 bytes into an fp16 vector (not 16-byte aligned): the same variant as
    ``coefs[0]``. Rows are part of the key: 1 is a constant, 2..4 are not (warm-up launches each)."""
    launched = []
    monkeypatch.setattr(
        kernels, "_launch", lambda k, grid, args, kw: launched.append(kernels.specialization_key(k, args, kw))
    )
    model = load_model(tiny_model_path(), device="cpu", experts_on_device=2, progress=False)
    w = model.expert_cache.layout.weights(model.expert_cache.device_buf[0])
    coefs = torch.zeros(2, dtype=torch.float16)
    assert coefs[1].data_ptr() % 16 == 2
    h = torch.zeros(1, 2, 1, 512)
    for c in (coefs[0], coefs[1]):
        kernels.triton_expert_down(h, w["w2"], c, torch.zeros(1, 256, dtype=torch.float16))
    assert launched[0] == launched[1]
    launched.clear()
    for rows in (1, 2, 3, 4):
        kernels.triton_gemv(torch.zeros(rows, 256, dtype=torch.float16), w["w1"])
    assert launched[0] != launched[1] == launched[2] == launched[3]
