"""CUDA-only checks of issue 8's attention path and fault handling (run on the device machine)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from colab_helpers.conversation.generation import SamplingConfig, generate_stream
from colab_helpers.model import close_model, load_model, load_tokenizer
from colab_helpers.runtime import kernels, pinning
from colab_helpers.runtime.attention import T4_CAPABILITY, choose_attention, install_attention
from colab_helpers.weights.tiny import tiny_model_path

pytestmark = pytest.mark.requires_cuda
PROMPT = torch.tensor([[1, 17, 45, 99, 3, 64, 12, 7, 88, 23, 5, 41]])


def test_t4_path_runs_with_only_the_memory_efficient_kernel() -> None:
    """Flash and math switched off: the cc 7.5 path (chunked prefill, masked chunks, folded decode) still
    runs on this GPU, and gives the math kernel's tokens (fp32, so no rounding differences). Through
    ``generate_stream``, where the prompt is prefilled in the path's chunks (``model.generate`` never chunks)."""
    model = load_model(tiny_model_path(), device="cuda", dtype=torch.float32, experts_on_device=3, progress=False)
    tokenizer = load_tokenizer(tiny_model_path())
    t4 = replace(choose_attention("cuda", capability=T4_CAPABILITY), prefill_chunk=5)
    install_attention(model, t4)
    lengths = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: lengths.append(kw["input_ids"].shape[-1]), with_kwargs=True
    )
    sampling = SamplingConfig(max_new_tokens=6)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        chunked = generate_stream(model, tokenizer, PROMPT, sampling)
    hook.remove()
    assert lengths[:2] == [5, 5]  # 11 prompt tokens before the last: chunks of 5, 5, 1, then generate
    install_attention(model, choose_attention("cpu"))  # stock sdpa, whole prompt
    with sdpa_kernel([SDPBackend.MATH]):
        ref = generate_stream(model, tokenizer, PROMPT, sampling)
    assert chunked.token_ids == ref.token_ids and len(ref.token_ids) == 6


def test_a_failed_registration_leaves_no_stale_error() -> None:
    buf = pinning.pinned_host_buffer(4, 1 << 20)
    assert buf.is_pinned()
    cudart = torch.cuda.cudart()
    assert int(cudart.cudaHostRegister(buf.data_ptr(), buf.numel(), 0)) != 0  # already registered
    assert pinning.clear_last_error(cudart) not in (None, 0)  # the error was there, and is gone now
    x = torch.ones(1024, device="cuda") * 2  # the next kernel's launch check sees nothing stale
    torch.cuda.synchronize()
    assert x.sum().item() == 2048
    pinning.release(buf)
    assert not buf.is_pinned()


def test_kernels_compile_at_load_and_close_frees_the_gpu(capsys) -> None:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = load_model(tiny_model_path(), device="cuda", experts_on_device=2, progress=True)
    assert "compiling fused low-bit kernels" in capsys.readouterr().err
    assert kernels._fused_enabled
    close_model(model)
    assert torch.cuda.memory_allocated() - before < 2**20
