"""Run Mixtral-8x7B on a free Colab T4: HQQ low-bit weights, a GPU expert cache, speculative prefetch."""
