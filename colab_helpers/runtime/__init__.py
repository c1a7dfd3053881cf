"""Runtime: the engine that runs a loaded model on one or more devices.

Owns the dequantize/matmul kernels (``kernels``), the quantized linear layer (``linear``), the
attention path (``attention``), the expert cache with its eviction policies and pinned host memory
(``experts``, ``policies``, ``pinning``), the offloaded MoE layer with speculative prefetch (``moe``,
``sparsemixer``), the KV cache and the arena that lends its unreached tail to the expert cache
(``kv_cache``, ``kv_arena``), the host-RAM embedding table (``host_embedding``) and the multi-device layer
placement (``placement``).

May import: ``weights`` (and ``usage``). Never ``planning``, ``conversation`` or ``sim``:
``colab_helpers.model.load_model`` is where the plan meets the engine.
"""
