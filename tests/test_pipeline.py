"""The decode pipeline's budgets and schedule: host syncs, launches, copy order, re-mapping, prefetch caps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from colab_helpers.model import load_model
from colab_helpers.runtime.experts import DEMAND, SPECULATIVE, WRITE_BACK
from colab_helpers.runtime.moe import PrefetchConfig
from colab_helpers.sim.copysim import simulate_copies
from colab_helpers.sim.dispatch_count import count_decode
from colab_helpers.sim.trace import ReplayOptions, RoutingRecorder, replay_file
from colab_helpers.weights.tiny import tiny_model_path

PROMPT = torch.tensor([[1, 17, 45, 99, 3, 64, 12, 7]])
LAUNCHES_BEFORE = 31.2  # per MoE layer per decode token before issue 9 (docs/benchmarks.md)


@pytest.mark.parametrize(
    "prefetch",
    [PrefetchConfig(), PrefetchConfig(enabled=False), PrefetchConfig(lookahead=2, min_confidence=0.2)],
    ids=["prefetch", "no_prefetch", "lookahead2_gated"],
)
@pytest.mark.parametrize("k", [1, 4])
def test_at_most_one_host_sync_per_moe_layer_per_decode_token(k: int, prefetch: PrefetchConfig) -> None:
    model = load_model(
        tiny_model_path(),
        dtype=torch.float16,
        experts_on_device=k,
        dense_on_cpu=False,
        prefetch=prefetch,
        progress=False,
    )
    d = count_decode(model, PROMPT, tokens=6)
    assert d.syncs_per_layer_token <= 1, d.moe.ops  # reading the router's choice, nothing per expert
    assert not [op for op in d.moe.ops if op.startswith("sync:") and op != "sync:tolist"], d.moe.ops
    assert d.launches_per_layer_token <= LAUNCHES_BEFORE / 2, d.moe.ops  # at least halved
    assert sum(model.expert_cache.stats.misses) > 0 or k == 8


def test_demand_copies_come_before_compute_and_before_guesses() -> None:
    """Per decode layer step (a cache of 3: no miss has to wait for a victim): every demand copy is issued before
    the first expert is computed and before the first guess for the next layer."""
    model = load_model(tiny_model_path(), experts_on_device=3, progress=False)
    engine = simulate_copies(model)
    log: list[tuple[str, int]] = []
    engine.observers.append(lambda rec: log.append((rec.kind, rec.layer)))
    mark = engine.mark_compute
    engine.mark_compute = lambda reads=None: (log.append(("compute", -1)), mark(reads))[1]
    for block in (layer.mlp for layer in model.model.layers):
        block.observers.append(lambda layer, experts, guesses: log.append(("step" if len(experts) == 1 else "", layer)))
    model.generate(PROMPT, max_new_tokens=12, do_sample=False)
    steps, current = [], None
    for kind, layer in log:
        if kind in ("step", ""):  # decode steps only (a prefill of 8 tokens needs more experts than fit)
            current = (layer, []) if kind else None
            if current:
                steps.append(current)
        elif current is not None and kind != WRITE_BACK:
            current[1].append((kind, layer))
    assert any(any(k == DEMAND for k, _ in seq) for _, seq in steps)
    assert any(any(k == SPECULATIVE for k, _ in seq) for _, seq in steps)
    for layer, seq in steps:
        kinds = [k for k, _ in seq]
        if DEMAND in kinds:
            last_demand = max(i for i, k in enumerate(kinds) if k == DEMAND)
            assert all(k == DEMAND for k in kinds[: last_demand + 1]), (layer, kinds)
        assert all(lay == layer for k, lay in seq if k == DEMAND)
        assert all(lay > layer for k, lay in seq if k == SPECULATIVE)


def test_an_evicted_expert_is_remapped_not_copied_back() -> None:
    from tests.test_cache import LAYOUT, ORIGINAL_BYTES, build

    cache = build(2, policy="lru", spare=2)
    cache.fetch(0, 5)  # evicts 0 (least recently used); its slot still holds it
    assert cache.resident(0) == {1, 5}
    h2d = sum(cache.stats.h2d_bytes)
    weights = cache.fetch(0, 0)  # a miss, served by re-mapping 0's old slot
    assert cache.stats.remaps[0] == 1 and sum(cache.stats.h2d_bytes) == h2d
    assert weights["w1"].W_q.data_ptr() == cache.device_buf[cache.slot_of[0][0]].data_ptr()
    assert torch.equal(cache.device_buf[cache.slot_of[0][0]], ORIGINAL_BYTES[(0, 0)])
    cache.check_invariants()
    for e in range(8):  # the victims' write-backs still landed where they belong
        assert torch.equal(cache.expert_bytes(0, e), ORIGINAL_BYTES[(0, e)])
    assert sum(cache.stats.d2h_bytes) == 2 * LAYOUT.nbytes


@pytest.mark.parametrize("cap_experts", [0, 1])
def test_speculative_bytes_are_capped_per_token(cap_experts: int) -> None:
    model = load_model(tiny_model_path(), experts_on_device=2, progress=False)
    nbytes = model.expert_cache.layout.nbytes
    for block in (layer.mlp for layer in model.model.layers):
        block.prefetch = PrefetchConfig(max_bytes_per_token=cap_experts * nbytes)
    engine = simulate_copies(model)
    copied: list[int] = []
    engine.observers.append(lambda rec: rec.kind == SPECULATIVE and copied.append(rec.nbytes))
    model.generate(PROMPT, max_new_tokens=10, do_sample=False)
    assert sum(copied) <= cap_experts * nbytes * 9  # 9 decode tokens
    assert (sum(copied) > 0) == (cap_experts > 0)


def test_gated_and_capped_guesses_replay_to_the_live_counters(tmp_path) -> None:
    model = load_model(
        tiny_model_path(),
        experts_on_device=3,
        policy="lfu_decay",
        # the replay models guesses that evict (mode "evict"); "auto" staging is measured by the twin instead
        prefetch=PrefetchConfig(mode="evict", min_confidence=0.25, max_bytes_per_token=300_000),
        progress=False,
        kv_lending=False,  # the replay keeps K fixed (no slots lent by the KV cache)
    )
    with RoutingRecorder(model) as rec:
        model.generate(PROMPT, max_new_tokens=10, do_sample=False)
    z = dict(np.load(rec.save(tmp_path / "t.npz")))
    live = model.expert_cache.stats
    s = replay_file(z, "lfu_decay", 3, ReplayOptions.live(count_prefill=True))
    assert (s.hits, s.misses, s.prefetch_loads) == (live.hits, live.misses, live.prefetch_loads)
    assert (s.predicted, s.correct, s.needed) == (live.predicted, live.correct, live.needed)


def _longest_demand_wait(prefetch: PrefetchConfig) -> tuple[float, float]:
    """The copy simulator's longest wait of a demand load behind a speculative copy, and one chunk's duration."""
    model = load_model(tiny_model_path(), experts_on_device=2, prefetch=prefetch, progress=False)
    nbytes = model.expert_cache.layout.nbytes
    engine = simulate_copies(model, compute_s=0.2 * nbytes / 12.3e9)  # compute much shorter than a copy
    model.generate(PROMPT, max_new_tokens=10, do_sample=False)
    if prefetch.mode == "auto":
        assert sum(model.expert_cache.stats.staged) > 0 and sum(model.expert_cache.stats.staged_used) > 0
    chunk_s = -(-nbytes // prefetch.chunks) / engine.h2d_bytes_per_s
    return engine.stats.longest_demand_wait_behind_speculative_s, chunk_s


def test_a_demand_copy_waits_behind_at_most_one_speculative_chunk() -> None:
    """Prefetch "auto" issues a guess in chunks, one per layer step, and drops guesses not started when a demand
    load comes: on the copy simulator's clock no demand load queues behind more than one chunk. Guesses that
    evict (mode "evict", whole experts) do make demand loads wait, so the measure is live."""
    longest, chunk_s = _longest_demand_wait(PrefetchConfig())
    assert longest <= chunk_s * 1.01
    evicting, _ = _longest_demand_wait(PrefetchConfig(mode="evict"))
    assert evicting > 0
