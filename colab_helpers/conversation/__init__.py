"""Conversation: generating text with a loaded model.

Owns the decode loop with sampling and chunked prefill (``generation``), the multi-turn session with
its chat template and KV cache (``session``) and the ipywidgets chat (``chat``).

May import: ``weights``, ``runtime``, ``planning``, ``colab_helpers.model`` and ``usage``. Never ``sim``.
"""
