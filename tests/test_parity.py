"""The offloaded model computes exactly what a plain transformers Mixtral with the same weights computes.

Copies run through ``SimCopyEngine`` (asynchronous copies simulated on the CPU: a buffer in flight is
poison until waited on, unordered accesses raise ``CopyHazard``), so these tests also check the stream
ordering of every schedule; the last tests remove one wait each and must be caught.
"""

from __future__ import annotations

import pytest
import torch

from colab_helpers.model import dequantized_reference, load_model
from colab_helpers.runtime import experts
from colab_helpers.runtime.moe import PrefetchConfig
from colab_helpers.runtime.policies import POLICIES
from colab_helpers.sim.copysim import CopyHazard, simulate_copies

PROMPT = torch.tensor([[1, 17, 45, 99, 3, 64, 12, 7, 88, 23, 5, 41]])


def simulated(path, **kw):
    """``load_model`` with its copies run through the asynchronous-copy simulator."""
    model = load_model(path, progress=False, **kw)
    simulate_copies(model, compute_s=1e-4)
    return model


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
    model = simulated(path, experts_on_device=k)
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
    model = simulated(path, experts_on_device=2, policy=policy, prefetch=PrefetchConfig(enabled=prefetch, lookahead=2))
    assert torch.equal(model.generate(PROMPT, max_new_tokens=12, do_sample=False), ref_greedy)
    assert (sum(model.expert_cache.stats.prefetch_loads) > 0) == prefetch
    model.expert_cache.check_invariants()


def test_per_layer_cache_sizes(pair) -> None:
    path, ref_logits, ref_greedy = pair
    model = simulated(path, experts_on_device=[1, 8])
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
    from colab_helpers.weights.tiny import tiny_model_path

    path = tiny_model_path()
    ref = dequantized_reference(path)
    with torch.no_grad():
        logits = ref(PROMPT).logits
    return path, logits, ref.generate(PROMPT, max_new_tokens=16, do_sample=False)


@pytest.mark.parametrize("k", range(1, 9))
def test_embedded_model_parity_for_every_cache_size(embedded_reference, k: int) -> None:
    path, ref_logits, ref_greedy = embedded_reference
    model = simulated(path, experts_on_device=k)
    with torch.no_grad():
        assert rel_err(model(PROMPT).logits, ref_logits) < 1e-3
    assert torch.equal(model.generate(PROMPT, max_new_tokens=16, do_sample=False), ref_greedy)


@pytest.mark.parametrize(
    "prefetch",
    [
        PrefetchConfig(min_confidence=0.3),
        PrefetchConfig(max_bytes_per_token=0),
        PrefetchConfig(experts=3, lookahead=3, max_bytes_per_token=400_000),
    ],
    ids=["confident_guesses", "no_speculative_bytes", "capped_bytes"],
)
@pytest.mark.parametrize("k", [1, 3])
def test_embedded_model_parity_with_gated_and_capped_prefetch(embedded_reference, k: int, prefetch) -> None:
    path, _, ref_greedy = embedded_reference
    model = simulated(path, experts_on_device=k, prefetch=prefetch)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=16, do_sample=False), ref_greedy)
    stats = model.expert_cache.stats
    if prefetch.max_bytes_per_token == 0:
        assert sum(stats.prefetch_loads) == 0
    model.expert_cache.check_invariants()


# --------------------------------------------------------------------------------------------------
# the simulator catches a schedule with one wait removed
# --------------------------------------------------------------------------------------------------


def test_a_compute_that_skips_its_wait_is_caught(embedded_reference) -> None:
    path, _, _ = embedded_reference
    model = simulated(path, experts_on_device=2)
    model.expert_cache.engine.compute_waits = lambda event: None  # compute no longer waits for its copies
    with pytest.raises(CopyHazard, match="may still be writing"):
        model.generate(PROMPT, max_new_tokens=4, do_sample=False)


def test_without_hazard_checks_a_skipped_wait_computes_with_poison(embedded_reference) -> None:
    path, _, _ = embedded_reference
    model = load_model(path, experts_on_device=2, progress=False)
    simulate_copies(model, strict=False).compute_waits = lambda event: None
    with torch.no_grad():
        assert model(PROMPT).logits.isnan().any()  # the in-flight expert read as NaN


@pytest.mark.parametrize("kind", [experts.DEMAND, experts.WRITE_BACK])
def test_a_copy_that_skips_its_waits_is_caught(embedded_reference, kind: str) -> None:
    """Demand loads that ignore ``after`` reuse a slot before its write-back drained (or compute finished);
    write-backs that ignore it overwrite a host buffer a load is still reading."""
    path, _, _ = embedded_reference
    model = simulated(path, experts_on_device=1, spare_slots=1)
    engine = model.expert_cache.engine
    issue = engine._issue
    engine._issue = lambda dst, src, k, after: issue(dst, src, k, [] if k == kind else after)
    with pytest.raises(CopyHazard, match="overwrites"):
        model.generate(PROMPT, max_new_tokens=8, do_sample=False)


def test_a_slot_reloaded_before_its_write_back_drained_is_caught(embedded_reference) -> None:
    class Forgetful(list):  # the cache never remembers a slot's write-back event
        def __setitem__(self, i, value) -> None:
            super().__setitem__(i, None)

    path, _, _ = embedded_reference
    model = simulated(path, experts_on_device=2)
    cache = model.expert_cache
    cache._slot_drained = Forgetful(cache._slot_drained)
    with pytest.raises(CopyHazard, match="write_back copy .* may still be reading"):
        model.generate(PROMPT, max_new_tokens=8, do_sample=False)
