"""The preallocated KV cache: bytes written per decoded token flat in the context, same logits as transformers'
``DynamicCache``, chunked prefill and multi-turn reuse through it."""

from __future__ import annotations

import inspect
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, MixtralForCausalLM
from transformers.cache_utils import Cache

from colab_helpers.conversation.generation import SamplingConfig, generate_stream, planned_context
from colab_helpers.conversation.session import ChatSession
from colab_helpers.model import load_model
from colab_helpers.runtime.kv_cache import PreallocatedCache, PreallocatedLayer, new_kv_cache
from colab_helpers.weights.tiny import tiny_model_path

KV = "cache" if "cache" in inspect.signature(MixtralForCausalLM.forward).parameters else "past_key_values"


class _BytesWritten(TorchDispatchMode):
    """Bytes every non-view op writes (its outputs; for ``copy_`` the destination, a slice here)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not getattr(func, "is_view", False):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


def _kv_bytes_per_decode_token(model, cache, context: int) -> int:
    """Prefill ``context`` tokens into ``cache``, then the bytes the cache's updates write for one decoded token."""
    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
    with torch.no_grad():
        model(ids, use_cache=True, **{KV: cache})
    counter = _BytesWritten()
    original = Cache.update

    def counted(self, *args, **kwargs):
        with counter:
            return original(self, *args, **kwargs)

    Cache.update = counted
    try:
        with torch.no_grad():
            model(ids[:, -1:], use_cache=True, **{KV: cache})
    finally:
        Cache.update = original
    return counter.bytes


def test_bytes_written_per_decode_token_do_not_grow_with_the_context() -> None:
    model = load_model(tiny_model_path(), experts_on_device=2, progress=False)
    ours = {n: _kv_bytes_per_decode_token(model, new_kv_cache(model, planned_context(model)), n) for n in (64, 512)}
    stock = {n: _kv_bytes_per_decode_token(model, DynamicCache(config=model.config), n) for n in (64, 512)}
    cfg = model.config
    one_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert ours[64] == ours[512] == one_token  # K and V of one token per layer, fp32 on the CPU
    assert stock[512] > 7 * stock[64]  # DynamicLayer's torch.cat rewrites the whole cache every token


def test_same_logits_as_transformers_dynamic_cache() -> None:
    model = load_model(tiny_model_path(), experts_on_device=2, progress=False)
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    logits = {}
    for name, cache in (("ours", new_kv_cache(model, 48)), ("stock", DynamicCache(config=model.config))):
        steps = []
        with torch.no_grad():
            out = model(ids[:, :32], use_cache=True, **{KV: cache})
            steps.append(out.logits)
            for t in range(32, 40):  # then one token at a time
                steps.append(model(ids[:, t : t + 1], use_cache=True, **{KV: cache}).logits)
        logits[name] = torch.cat(steps, dim=1)
    assert torch.equal(logits["ours"], logits["stock"])


def test_grows_past_its_capacity_and_crops() -> None:
    layer = PreallocatedLayer(capacity=4)
    k = torch.arange(2 * 1 * 6 * 3, dtype=torch.float32).view(2, 1, 6, 3)
    keys, values = layer.update(k[:, :, :3], -k[:, :, :3])
    assert keys.shape[-2] == 3 and layer.get_seq_length() == 3
    keys, values = layer.update(k[:, :, 3:], -k[:, :, 3:])  # 6 > 4: grows once, keeps what it held
    assert torch.equal(keys, k) and torch.equal(values, -k) and layer.capacity >= 6
    layer.crop(-2)
    assert layer.get_seq_length() == 4 and torch.equal(layer.keys, k[:, :, :4])
    assert layer.get_max_length() == -1  # no hard maximum (generate must not treat it as a static cache)


def test_generate_stream_chunked_prefill_and_chat_reuse_use_the_preallocated_cache() -> None:
    model = load_model(tiny_model_path(), experts_on_device=2, progress=False)
    from colab_helpers.weights.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_model_path())
    ids = torch.randint(3, model.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(2))
    sampling = SamplingConfig(max_new_tokens=6)
    whole = generate_stream(model, tok, ids, sampling)
    assert isinstance(whole.cache, PreallocatedCache) and whole.cache.get_seq_length() == 70 + 6 - 1
    path = model.attention_path
    model.attention_path = replace(path, prefill_chunk=16)  # a T4-style chunked prefill, on the CPU
    try:
        chunked = generate_stream(model, tok, ids, sampling)
    finally:
        model.attention_path = path
    assert chunked.token_ids == whole.token_ids
    session = ChatSession(model, tok, SamplingConfig(max_new_tokens=4))
    session.send("What is the capital of France?")
    cache = session._cache
    session.send("And of Italy?")
    assert session._cache is cache and isinstance(cache, PreallocatedCache)  # one buffer, reused turn after turn
    assert session.last_result.stats.prompt_tokens > session.cached_tokens - 4 > 0
