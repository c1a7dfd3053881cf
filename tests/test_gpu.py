"""CUDA-only checks (run on the device machine): async copies, pinned store, parity on the GPU, prefetch overlap."""

from __future__ import annotations

import pytest
import torch

from colab_helpers.model import dequantized_reference, load_model
from colab_helpers.runtime.moe import PrefetchConfig
from colab_helpers.weights.tiny import tiny_model_path

pytestmark = pytest.mark.requires_cuda
PROMPT = torch.tensor([[1, 17, 45, 99, 3, 64, 12, 7, 88, 23, 5, 41]])


@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("prefetch", [True, False])
def test_cuda_offloaded_model_matches_the_reference(make_checkpoint, k: int, prefetch: bool) -> None:
    """fp32 on CUDA: same logits as the CPU reference, same greedy tokens, with async streams and events."""
    path = make_checkpoint(2)
    ref = dequantized_reference(path)
    with torch.no_grad():
        ref_logits = ref(PROMPT).logits
    ref_greedy = ref.generate(PROMPT, max_new_tokens=16, do_sample=False)
    model = load_model(
        path,
        device="cuda",
        dtype=torch.float32,
        experts_on_device=k,
        prefetch=PrefetchConfig(enabled=prefetch),
        progress=False,
    )
    with torch.no_grad():
        logits = model(PROMPT.cuda()).logits.cpu()
    assert ((logits - ref_logits).norm() / ref_logits.norm()).item() < 1e-3
    assert torch.equal(model.generate(PROMPT.cuda(), max_new_tokens=16, do_sample=False).cpu(), ref_greedy)
    model.expert_cache.check_invariants()


def test_host_store_is_page_locked_without_power_of_two_rounding(make_checkpoint) -> None:
    model = load_model(make_checkpoint(2), device="cuda", experts_on_device=2, progress=False)
    cache = model.expert_cache
    assert cache.host_buf.is_pinned()
    assert cache.device_buf.is_cuda


def test_embedded_model_fp16_greedy_text_is_sane() -> None:
    from colab_helpers.conversation.session import ChatSession
    from colab_helpers.model import load_tokenizer

    path = tiny_model_path()
    tok = load_tokenizer(path)
    gpu = load_model(path, device="cuda", experts_on_device=2, progress=False)
    cpu = load_model(path, device="cpu", experts_on_device=2, progress=False)
    q = "Recite the Zen of Python."
    a, b = ChatSession(gpu, tok).send(q).text, ChatSession(cpu, tok).send(q).text
    assert a[:40] == b[:40] and "Beautiful is better than ugly" in a
