"""Property tests for the expert cache: capacity, no eviction of needed experts, counters, byte integrity."""

from __future__ import annotations

import signal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from colab_helpers.runtime.experts import ExpertCache, ExpertLayout, deferred_interrupts
from colab_helpers.runtime.policies import POLICIES
from colab_helpers.weights.checkpoint import QuantConfig
from colab_helpers.weights.model_spec import ModelSpec
from tests.conftest import tiny_config

LAYERS, EXPERTS = 3, 8
CONFIG = tiny_config(LAYERS)
QUANT = QuantConfig()
LAYOUT = ExpertLayout.of(ModelSpec.of(CONFIG, QUANT))


def expert_tensors(layer: int, expert: int) -> dict[str, torch.Tensor]:
    """Distinct random contents per expert, so any mix-up shows in the bytes."""
    g = torch.Generator().manual_seed(1000 * layer + expert)
    out = {}
    for key, (dtype, shape) in dict(ModelSpec.of(CONFIG, QUANT).expert_tensors).items():
        if dtype == torch.float16:
            out[key] = torch.randn(shape, generator=g).half()
        else:
            out[key] = torch.randint(0, 255, shape, generator=g, dtype=torch.uint8).to(dtype)
    return out


ORIGINAL = {(lay, e): expert_tensors(lay, e) for lay in range(LAYERS) for e in range(EXPERTS)}
ORIGINAL_BYTES = {}
for _key, _tensors in ORIGINAL.items():
    _buf = torch.zeros(LAYOUT.nbytes, dtype=torch.uint8)
    LAYOUT.pack(_tensors, _buf)
    ORIGINAL_BYTES[_key] = _buf


def build(capacity, policy: str = "lru", spare: int = 1) -> ExpertCache:
    cache = ExpertCache(LAYOUT, LAYERS, EXPERTS, capacity, policy=policy, spare_slots=spare)
    for (lay, e), tensors in ORIGINAL.items():
        cache.place(lay, e, tensors)
    cache.check_complete()
    return cache


requests = st.lists(
    st.tuples(
        st.integers(0, LAYERS - 1),
        st.lists(st.integers(0, EXPERTS - 1), min_size=1, max_size=EXPERTS, unique=True),
        st.lists(st.integers(0, EXPERTS - 1), max_size=3, unique=True),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=50, deadline=None)
@given(
    capacity=st.lists(st.integers(1, EXPERTS), min_size=LAYERS, max_size=LAYERS),
    policy=st.sampled_from(sorted(POLICIES)),
    spare=st.integers(1, 3),
    steps=requests,
)
def test_cache_invariants_under_random_requests(capacity, policy, spare, steps) -> None:
    cache = build(capacity, policy, spare)
    fetches = 0
    for layer, needed, guesses in steps:
        needed = cache.order(layer, needed)
        for i, e in enumerate(needed):
            keep = needed[i + 1 :]
            before = cache.resident(layer)
            weights = cache.fetch(layer, e, keep=keep)
            fetches += 1
            after = cache.resident(layer)
            assert e in after
            assert before & set(keep) <= after, "evicted an expert the layer still needs"
            assert len(after) <= capacity[layer]
            slot = cache.device_buf[cache.slot_of[layer][e]]
            assert weights["w1"].W_q.data_ptr() == slot.data_ptr()  # the served views are this slot
            assert torch.equal(slot, ORIGINAL_BYTES[(layer, e)]), f"expert {layer}.{e} served wrong bytes"
            cache.release(layer, e)
        nxt = (layer + 1) % LAYERS
        protected = cache.resident(nxt) & set(guesses)
        for g in guesses:
            cache.prefetch(nxt, g, keep=guesses)
        assert protected <= cache.resident(nxt)
        cache.check_invariants()
    s = cache.stats
    assert sum(s.hits) + sum(s.misses) == fetches
    loads = sum(s.misses) + sum(s.prefetch_loads)
    assert sum(s.d2h_bytes) == loads * LAYOUT.nbytes  # every load writes its victim back
    assert sum(s.h2d_bytes) == (loads - sum(s.remaps)) * LAYOUT.nbytes  # a re-mapped expert is not copied in
    for (lay, e), expected in ORIGINAL_BYTES.items():
        assert torch.equal(cache.expert_bytes(lay, e), expected)


def test_full_capacity_never_moves_bytes() -> None:
    cache = build(EXPERTS)
    assert cache.host_buf.shape[0] == 0 and cache.spare == 0
    for e in range(EXPERTS):
        cache.fetch(0, e)
    assert cache.stats.hit_rate == 1.0 and sum(cache.stats.h2d_bytes) == 0


def test_exclusive_placement_uses_each_byte_once() -> None:
    cache = build([2, 3, 8], spare=2)
    assert cache.device_buf.shape[0] == 2 + 3 + 8 + 2
    assert cache.host_buf.shape[0] == 6 + 5 + 0
    assert cache.device_bytes + cache.host_bytes == (24 + 2) * LAYOUT.nbytes


def test_lru_evicts_the_least_recently_used() -> None:
    cache = build(2)
    assert cache.resident(0) == {0, 1}
    cache.fetch(0, 0)
    cache.fetch(0, 1)
    cache.fetch(0, 5)  # evicts 0 (older than 1)
    assert cache.resident(0) == {1, 5}
    cache.fetch(0, 1)
    cache.fetch(0, 6)  # evicts 5
    assert cache.resident(0) == {1, 6}


def test_prefetch_counts_and_scores_guesses() -> None:
    cache = build(2)
    assert cache.prefetch(1, 4, keep=[4, 5]) and cache.prefetch(1, 5, keep=[4, 5])
    assert not cache.prefetch(1, 4)  # already resident
    cache.score_prediction(1, {4, 5}, {4, 7})
    s = cache.stats
    assert s.prefetch_loads[1] == 2 and s.predicted[1] == 2 and s.correct[1] == 1 and s.needed[1] == 2
    assert s.wasted_bytes[1] == LAYOUT.nbytes and s.precision == 0.5 and s.recall == 0.5


def test_prefetch_gives_up_rather_than_evict_its_own_guesses() -> None:
    cache = build(1)
    assert cache.prefetch(0, 3, keep=[3, 4])
    assert not cache.prefetch(0, 4, keep=[3, 4])  # the only slot holds guess 3
    assert cache.resident(0) == {3}


def test_no_room_is_an_error_not_a_silent_overflow() -> None:
    cache = build(1)
    with pytest.raises(RuntimeError, match="no evictable expert"):
        cache.fetch(0, 5, keep=[0])


def test_interrupt_during_a_swap_is_deferred_until_bookkeeping_is_done() -> None:
    with pytest.raises(KeyboardInterrupt), deferred_interrupts():
        signal.raise_signal(signal.SIGINT)
        done = True  # still runs: the interrupt waits for the block to end
    assert done


@settings(max_examples=40, deadline=None)
@given(
    capacity=st.lists(st.integers(1, EXPERTS), min_size=LAYERS, max_size=LAYERS),
    spare=st.integers(1, 3),
    chunks=st.integers(1, 5),
    pumped=st.integers(0, 6),
    steps=requests,
)
def test_staged_guesses_never_evict_and_serve_the_right_bytes(capacity, spare, chunks, pumped, steps) -> None:
    """``stage``/``pump`` (prefetch "auto") load guesses into free slots only: the residents of every layer
    are exactly the demand path's, a used guess is re-mapped with its bytes whole, a wrong one costs no eviction."""
    cache, plain = build(capacity, "lru", spare), build(capacity, "lru", spare)
    cache.spec_chunks = chunks
    for layer, needed, guesses in steps:
        for c in (cache, plain):
            order = c.demand(layer, needed)
            for e in order:
                c.weights(layer, e)
                slot = c.device_buf[c.slot_of[layer][e]]
                assert torch.equal(slot, ORIGINAL_BYTES[(layer, e)]), f"expert {layer}.{e} served wrong bytes"
                c.release(layer, e)
            c.end_step(layer)
        assert cache.resident(layer) == plain.resident(layer)  # same demand decisions, guesses or not
        nxt = (layer + 1) % LAYERS
        before = [cache.resident(lay) for lay in range(LAYERS)]
        for g in guesses:
            cache.stage(nxt, g)
        cache.pump(pumped)
        assert [cache.resident(lay) for lay in range(LAYERS)] == before, "a guess evicted a resident expert"
        cache.check_invariants()
    s = cache.stats
    assert sum(s.d2h_bytes) == sum(plain.stats.d2h_bytes)  # write-backs only for demand misses
    assert sum(s.staged_used) <= sum(s.staged)
    for (lay, e), expected in ORIGINAL_BYTES.items():
        assert torch.equal(cache.expert_bytes(lay, e), expected)
