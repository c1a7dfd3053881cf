"""The attention path by compute capability: a simulated T4 (cc 7.5) never takes the GQA math path,
and its logits and tokens equal stock transformers SDPA (whole prompt or chunked prefill)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from colab_helpers.conversation.generation import SamplingConfig, generate_stream
from colab_helpers.model import load_model
from colab_helpers.runtime.attention import (
    NO_GQA,
    PREFILL_CHUNK,
    T4_CAPABILITY,
    choose_attention,
    install_attention,
    sdpa_backend,
)

PROMPT = torch.tensor([[1, 17, 45, 99, 3, 64, 12, 7, 88, 23, 5, 41]])
STOCK = choose_attention("cpu")


def test_choice_by_capability() -> None:
    assert (STOCK.implementation, STOCK.kernel, STOCK.prefill_chunk) == ("sdpa", "cpu", None)
    t4 = choose_attention("cpu", capability=T4_CAPABILITY)
    assert (t4.implementation, t4.kernel, t4.gqa_flag) == (NO_GQA, "memory_efficient", False)
    assert t4.prefill_chunk == PREFILL_CHUNK
    a100 = choose_attention("cpu", capability=(8, 0))
    assert (a100.implementation, a100.kernel, a100.gqa_flag) == ("sdpa", "flash", True)
    assert "7.5" in t4.describe() and "chunks of 1024" in t4.describe()


def test_backend_model_reproduces_the_t4_problem() -> None:
    """torch's rules as modelled: with the GQA flag a T4 runs math; flash takes it from sm80 on."""
    q = torch.empty(1, 32, 4096, 128, dtype=torch.float16, device="meta")
    k = torch.empty(1, 8, 4096, 128, dtype=torch.float16, device="meta")
    k32 = torch.empty(1, 32, 4096, 128, dtype=torch.float16, device="meta")
    assert sdpa_backend(T4_CAPABILITY, q, k, None, enable_gqa=True) == "math"
    assert sdpa_backend((8, 0), q, k, None, enable_gqa=True) == "flash"
    assert sdpa_backend(T4_CAPABILITY, q, k32) == "memory_efficient"
    mask = torch.empty(1, 1, 4096, 4096, dtype=torch.bool, device="meta")
    assert sdpa_backend((8, 6), q, k32, mask) == "memory_efficient"


def test_math_path_scratch_is_what_the_issue_measured() -> None:
    """The stock path on a T4: fp32 [32, T, T] scores, 4.3 GB at 4096 tokens (one copy of two)."""
    math = replace(choose_attention("cpu", capability=(4, 0)), prefill_chunk=None)
    assert math.kernel == "math"
    scores = 32 * 4096 * 4096 * 4
    assert scores == pytest.approx(2.147e9, rel=1e-3)  # one fp32 copy; softmax keeps a second
    assert math.scratch_bytes(4096, 32, 8, 128, 2) > 2 * scores
    t4 = choose_attention("cpu", capability=T4_CAPABILITY)
    assert t4.scratch_bytes(4096, 32, 8, 128, 2) < 0.1e9  # expanded K/V + one chunk's mask


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return load_model(make_checkpoint(2), experts_on_device=3, progress=False)


def _calls(monkeypatch) -> list[tuple]:
    """Record every SDPA call as (query, key, mask, enable_gqa) meta tensors in fp16 (the T4's dtype)."""
    seen: list[tuple] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, *args, enable_gqa=False, **kw):
        meta = [None if t is None else torch.empty(t.shape, dtype=torch.float16, device="meta") for t in (q, k)]
        mask = None if attn_mask is None else torch.empty(attn_mask.shape, dtype=attn_mask.dtype, device="meta")
        seen.append((*meta, mask, enable_gqa))
        return real(q, k, v, attn_mask, *args, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


TOKENIZER = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: " ".join(map(str, ids)))


def _generate(model, ids, new_tokens: int, cache=None) -> list[int]:
    """The package's generation path (it prefills in the path's chunks): greedy token ids."""
    result = generate_stream(model, TOKENIZER, ids, SamplingConfig(new_tokens), past_key_values=cache)
    assert result.error is None
    return result.token_ids


def _run(model, path, monkeypatch, new_tokens: int = 6):
    install_attention(model, path)
    calls = _calls(monkeypatch)
    with torch.no_grad():
        logits = model(PROMPT).logits
    tokens = _generate(model, PROMPT, new_tokens)
    monkeypatch.undo()
    return logits, tokens, calls


def test_simulated_t4_path_is_not_gqa_math_and_matches_stock(model, monkeypatch) -> None:
    try:
        ref_logits, ref_tokens, stock_calls = _run(model, STOCK, monkeypatch)
        t4 = replace(choose_attention("cpu", capability=T4_CAPABILITY), prefill_chunk=5)  # chunks 5 + 5 + 2
        logits, tokens, calls = _run(model, t4, monkeypatch)
    finally:
        install_attention(model, STOCK)
    # stock transformers on a T4: the GQA-flagged calls (prefill and decode) would run the math kernel
    assert "math" in {sdpa_backend(T4_CAPABILITY, *c) for c in stock_calls}
    # the chosen path: no GQA flag, and every call (whole prefill, chunks with a mask, decode) is fused
    assert calls and not any(c[3] for c in calls)
    assert {sdpa_backend(T4_CAPABILITY, *c) for c in calls} == {"memory_efficient"}
    assert {c[0].shape[2] for c in calls if c[0].shape[1] == 8} >= {12, 5}  # whole forward, then 5-token chunks
    assert any(c[2] is not None for c in calls)  # chunks after the first carry a mask
    assert any(c[0].shape[2] == 4 and c[0].shape[1] == 2 for c in calls)  # decode: 4 query heads folded per KV head
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert tokens == ref_tokens and len(tokens) == 6


def test_chat_continuation_with_a_cache_matches_stock(model) -> None:
    """A second turn prefills on top of a KV cache (a [q, kv] mask): same tokens on both paths."""
    from transformers import DynamicCache

    def two_turns(path):
        install_attention(model, path)
        cache = DynamicCache(config=model.config)
        first = _generate(model, PROMPT, 4, cache)
        follow = torch.cat([PROMPT, torch.tensor([first]), PROMPT[:, :7]], dim=1)
        return _generate(model, follow, 5, cache)

    try:
        ref = two_turns(STOCK)
        got = two_turns(replace(choose_attention("cpu", capability=T4_CAPABILITY), prefill_chunk=3))
    finally:
        install_attention(model, STOCK)
    assert got == ref and len(got) == 5


def test_load_model_installs_the_requested_path(make_checkpoint) -> None:
    t4 = choose_attention("cpu", capability=T4_CAPABILITY)
    m = load_model(make_checkpoint(2), experts_on_device=2, progress=False, attention=t4)
    assert m.config._attn_implementation == NO_GQA and m.attention_path == t4
    assert m.attention_path.prefill_chunk == PREFILL_CHUNK
    assert load_model(make_checkpoint(2), experts_on_device=2, progress=False).attention_path == STOCK
