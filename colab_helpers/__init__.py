"""Run Mixtral-8x7B on a free Colab T4: HQQ low-bit weights, a GPU expert cache, speculative prefetch.

Public API::

    model = colab_helpers.load_model(path, device="cpu", experts_on_device=k)   # a transformers causal LM
    colab_helpers.save_checkpoint(model, out_dir, attn_bits=4, expert_bits=2)   # write the shard layout

Submodules are imported lazily so ``import colab_helpers`` stays cheap (notebook install cells).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "model",
    "load_tokenizer": "weights.tokenizer",
    "close_model": "model",
    "OffloadConfig": "model",
    "save_checkpoint": "weights.checkpoint",
    "Checkpoint": "weights.checkpoint",
    "CheckpointError": "weights.checkpoint",
    "PrefetchConfig": "runtime.moe",
    "SamplingConfig": "conversation.generation",
    "generate_stream": "conversation.generation",
    "ChatSession": "conversation.session",
    "tiny_model_path": "weights.tiny",
    "download": "weights.hub",
    "ChatUI": "conversation.chat",
    "chat": "conversation.chat",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'colab_helpers' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
