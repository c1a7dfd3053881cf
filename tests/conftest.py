"""Shared fixtures: tiny random Mixtral checkpoints written in the real shard layout."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings
from transformers import MixtralConfig, MixtralForCausalLM

from colab_helpers.sim.random_mixtral import random_mixtral, small_config
from colab_helpers.weights.checkpoint import save_checkpoint

# Hypothesis: in CI (``CI`` set) every run draws the same examples, so a red run reproduces exactly;
# locally examples vary (more bugs found) and a failure prints the blob to replay it with @reproduce_failure.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True)
def _seeded_rngs() -> None:
    """Every test starts from the same RNG state, so unseeded ``torch.randn`` calls are reproducible too."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


def tiny_config(layers: int = 2, vocab: int = 128) -> MixtralConfig:
    """The smallest shapes that satisfy the format's group constraints (see CHECKPOINT_FORMAT.md)."""
    return small_config(layers=layers, vocab=vocab)


def random_model(seed: int = 0, layers: int = 2) -> MixtralForCausalLM:
    """Random weights, routers scaled up for varied routing (``random_mixtral``)."""
    return random_mixtral(small_config(layers=layers), seed)


_CACHE: dict[tuple, Path] = {}


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """``make_checkpoint(expert_bits=2, seed=0, layers=2) -> Path``, each variant written once per session."""

    def make(expert_bits: int = 2, seed: int = 0, layers: int = 2, attn_bits: int = 4) -> Path:
        key = (expert_bits, seed, layers, attn_bits)
        if key not in _CACHE:
            out = tmp_path_factory.mktemp(f"ckpt_e{expert_bits}_s{seed}_l{layers}")
            save_checkpoint(
                random_model(seed, layers),
                out,
                attn_bits=attn_bits,
                expert_bits=expert_bits,
                optimize=False,
                progress=False,
            )
            _CACHE[key] = out
        return _CACHE[key]

    return make


def pytest_collection_modifyitems(config, items) -> None:
    """``requires_cuda`` tests run only where a CUDA GPU is present (the device machine), skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)
