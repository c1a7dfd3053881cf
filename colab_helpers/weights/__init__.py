"""Weights: what a checkpoint is and how it gets onto the disk.

Owns the model description (``model_spec.ModelSpec``: family, shapes, quantization, byte sizes), the
family adapters (``families/``), the HQQ quantized tensor format (``quant``), the shard layout and its
reader/writer (``checkpoint``), the converter from published checkpoints (``convert``), the download
(``hub``, ``hub_layout``, ``transfer``), the tokenizer and the bundled tiny checkpoint (``tiny``).

May import: ``colab_helpers.usage`` only. Nothing here knows about GPUs, caches, plans or chats.
"""
