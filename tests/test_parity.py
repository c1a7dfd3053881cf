"""The offloaded model computes exactly what a plain transformers Mixtral with the same weights computes."""

from __future__ import annotations

import pytest
import torch

from colab_helpers.model import dequantized_reference, load_model
from colab_helpers.moe import PrefetchConfig
from colab_helpers.policies import POLICIES

PROMPT = torch.tensor([[1, 17, 45, 99, 3, 64, 12, 7, 88, 23, 5, 41]])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=[2, 4], ids=["2bit", "4bit"])
def pair(request, make_checkpoint):
    path = make_checkpoint(request.param)
    ref = dequantized_reference(path)
    with torch.no_grad():
        logits = ref(PROMPT).logits
    greedy = ref.generate(PROMPT, max_new_tokens=12, do_sample=False)
    return path, logits, greedy


@pytest.mark.parametrize("k", range(1, 9))
def test_logits_and_greedy_tokens_match_for_every_cache_size(pair, k: int) -> None:
    path, ref_logits, ref_greedy = pair
    model = load_model(path, experts_on_device=k, progress=False)
    with torch.no_grad():
        assert rel_err(model(PROMPT).logits, ref_logits) < 1e-3
    assert torch.equal(model.generate(PROMPT, max_new_tokens=12, do_sample=False), ref_greedy)
    stats = model.expert_cache.stats
    if k < 8:
        assert sum(stats.misses) > 0  # offloading really happened
    else:
        assert sum(stats.misses) == 0 and sum(stats.h2d_bytes) == 0
    model.expert_cache.check_invariants()


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no_prefetch"])
def test_parity_with_every_policy_and_prefetch_setting(pair, policy: str, prefetch: bool) -> None:
    path, ref_logits, ref_greedy = pair
    model = load_model(
        path,
        experts_on_device=2,
        policy=policy,
        prefetch=PrefetchConfig(enabled=prefetch, lookahead=2),
        progress=False,
    )
    assert torch.equal(model.generate(PROMPT, max_new_tokens=12, do_sample=False), ref_greedy)
    assert (sum(model.expert_cache.stats.prefetch_loads) > 0) == prefetch
    model.expert_cache.check_invariants()


def test_per_layer_cache_sizes(pair) -> None:
    path, ref_logits, ref_greedy = pair
    model = load_model(path, experts_on_device=[1, 8], progress=False)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=8, do_sample=False), ref_greedy[:, : PROMPT.shape[1] + 8])
    assert model.expert_cache.stats.misses[1] == 0


def test_sampling_is_reproducible_and_matches_the_reference(pair) -> None:
    path, _, _ = pair
    ref = dequantized_reference(path)
    model = load_model(path, experts_on_device=3, progress=False)
    kw = {"do_sample": True, "temperature": 0.9, "top_p": 0.95, "max_new_tokens": 10}
    torch.manual_seed(5)
    a = ref.generate(PROMPT, **kw)
    torch.manual_seed(5)
    b = model.generate(PROMPT, **kw)
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def embedded_reference():
    from colab_helpers.tiny import tiny_model_path

    path = tiny_model_path()
    ref = dequantized_reference(path)
    with torch.no_grad():
        logits = ref(PROMPT).logits
    return path, logits, ref.generate(PROMPT, max_new_tokens=16, do_sample=False)


@pytest.mark.parametrize("k", range(1, 9))
def test_embedded_model_parity_for_every_cache_size(embedded_reference, k: int) -> None:
    path, ref_logits, ref_greedy = embedded_reference
    model = load_model(path, experts_on_device=k, progress=False)
    with torch.no_grad():
        assert rel_err(model(PROMPT).logits, ref_logits) < 1e-3
    assert torch.equal(model.generate(PROMPT, max_new_tokens=16, do_sample=False), ref_greedy)
