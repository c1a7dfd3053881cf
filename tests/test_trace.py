"""Trace replay (vs. hand counts, Belady and an exhaustive optimum), the CLI, the timing model, and recording
a running model whose live cache counters the replay must reproduce exactly."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import MixtralConfig, MixtralForCausalLM

from colab_helpers.model import load_model
from colab_helpers.runtime.moe import PrefetchConfig
from colab_helpers.runtime.policies import POLICIES
from colab_helpers.sim.trace import (
    ReplayOptions,
    RoutingRecorder,
    TimingModel,
    cli_main,
    parse_ks,
    replay,
    replay_file,
)
from colab_helpers.usage import UsageError
from colab_helpers.weights.checkpoint import save_checkpoint

ALL = [*sorted(POLICIES), "belady"]


def trace(steps: list[list[int]]) -> np.ndarray:
    """One layer's steps -> ``[T, 1, k]`` int8 with -1 padding."""
    k = max(len(s) for s in steps)
    out = np.full((len(steps), 1, k), -1, dtype=np.int8)
    for t, s in enumerate(steps):
        out[t, 0, : len(s)] = s
    return out


def optimal_misses(steps: list[list[int]], capacity: int) -> int:
    """Exhaustive minimum of misses for a cold cache where each step's experts must be resident together."""
    best = {frozenset(): 0}
    for s in map(set, steps):
        nxt: dict[frozenset, int] = {}
        for cache, cost in best.items():
            cost += len(s - cache)
            others = sorted(cache - s)
            for kept in itertools.combinations(others, min(capacity - len(s), len(others))):
                state = frozenset(s | set(kept))
                nxt[state] = min(nxt.get(state, cost), cost)
        best = nxt
    return min(best.values())


# --------------------------------------------------------------------------------------------------
# replay semantics
# --------------------------------------------------------------------------------------------------


def test_lru_replay_matches_a_hand_count() -> None:
    # K=2: [0,1] 2 misses; [0,2] hit 0, miss 2 (evicts 1); [1,0] miss 1 (evicts 2), hit 0; [2,1] miss, hit
    s = replay(trace([[0, 1], [0, 2], [1, 0], [2, 1]]), "lru", 2)
    assert (sum(s.hits), sum(s.misses), s.tokens) == (3, 5, 4)
    # K=3: [0,1] 2 misses, [0,2] 1 miss, [1,0] hits, [2,1] hits
    assert sum(replay(trace([[0, 1], [0, 2], [1, 0], [2, 1]]), "lru", 3).hits) == 5


def test_padding_is_skipped_and_initial_residency_is_honoured() -> None:
    a = trace([[0, 1], [2, -1], [-1, -1]])
    s = replay(a, "lru", 2)
    assert s.accesses == 3 and sum(s.misses) == 3
    warm = replay(a, "lru", 2, options=ReplayOptions(initial="warm"))  # experts 0 and 1 resident
    assert (sum(warm.hits), sum(warm.misses)) == (2, 1)
    explicit = replay(a, "lru", 2, options=ReplayOptions(initial=[1]))  # 0 fills the free slot, 1 hits
    assert (sum(explicit.hits), sum(explicit.misses)) == (1, 2)


def test_belady_keeps_what_returns_soonest() -> None:
    steps = [[0], [1], [2], [3], [0], [1], [2], [3]]
    assert sum(replay(trace(steps), "lru", 3).hits) == 0  # LRU's worst case: a cycle one longer than the cache
    assert sum(replay(trace(steps), "belady", 3).hits) == 3
    assert sum(replay(trace(steps), "belady", 3).misses) == optimal_misses(steps, 3)


def routing(max_experts: int = 6):
    """(steps, k, E, K): random single-layer routing with k distinct experts per step."""

    @st.composite
    def build(draw):
        e = draw(st.integers(3, max_experts))
        k = draw(st.integers(1, 2))
        step = st.lists(st.integers(0, e - 1), min_size=k, max_size=k, unique=True)
        steps = draw(st.lists(step, min_size=1, max_size=24))
        return steps, k, e, draw(st.integers(k, e))

    return build()


@settings(max_examples=60, deadline=None)
@given(case=routing(max_experts=5))
def test_belady_is_the_exhaustive_optimum(case) -> None:
    steps, _, e, cap = case
    s = replay(trace(steps), "belady", cap, options=ReplayOptions(num_experts=e))
    assert sum(s.misses) == optimal_misses(steps, cap)


@settings(max_examples=60, deadline=None)
@given(case=routing())
def test_every_policy_is_bounded_by_belady_and_monotone_in_capacity(case) -> None:
    steps, _, e, cap = case
    a, opts = trace(steps), ReplayOptions(num_experts=e)
    best = replay(a, "belady", cap, options=opts)
    distinct = len({x for s in steps for x in s})
    for name in ALL:
        s = replay(a, name, cap, options=opts)
        assert s.accesses == sum(len(x) for x in steps)
        assert sum(s.misses) >= distinct  # a cold cache misses each expert at least once
        assert sum(s.hits) <= sum(best.hits), name
        if cap < e:  # all three are stack algorithms: a larger cache never hits less
            assert sum(replay(a, name, cap + 1, options=opts).hits) >= sum(s.hits), name
        if cap == e:
            assert sum(s.misses) == distinct


def test_replay_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        replay(trace([[0, 1]]), "nope", 2)
    with pytest.raises(ValueError, match=r"\[T, L, k\]"):
        replay(np.zeros((3, 2)), "lru", 2)
    with pytest.raises(ValueError, match="experts_on_device"):
        replay(trace([[0, 1]]), "lru", 0)


def test_a_victim_outside_the_candidates_is_caught() -> None:
    class Rogue(POLICIES["lru"]):
        def victim(self, layer, candidates):
            return 99

    with pytest.raises(RuntimeError, match="not one of"):
        replay(trace([[0], [1], [2]]), Rogue, 2)


# --------------------------------------------------------------------------------------------------
# command line on a synthetic trace
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def synthetic_trace(tmp_path):
    """Two sequences, 4 layers, top-2 of 8, skewed per-layer popularity, one dropped record."""
    rng = np.random.default_rng(0)
    arrays = {}
    for name, steps in (("alpha", 60), ("beta", 40)):
        a = np.full((steps, 4, 2), -1, dtype=np.int8)
        for t, layer in itertools.product(range(steps), range(4)):
            p = rng.dirichlet(np.ones(8) * 0.5)
            a[t, layer] = rng.choice(8, size=2, replace=False, p=p)
        a[-1, 2] = -1  # a dropped record: padding at the end of one layer
        arrays[f"{name}_decode_experts"] = a
        arrays[f"{name}_decode_weights"] = np.full(a.shape, 0.5, dtype=np.float16)  # ignored
    path = tmp_path / "synthetic.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("policy", ALL)
def test_layers_replay_independently(synthetic_trace, policy: str) -> None:
    a = np.load(synthetic_trace)["alpha_decode_experts"]
    opts = ReplayOptions(num_experts=8)
    whole = replay(a, policy, [2, 3, 4, 5], options=opts)
    for layer, cap in enumerate([2, 3, 4, 5]):
        alone = replay(a[:, layer : layer + 1], policy, cap, options=opts)
        assert (alone.hits[0], alone.misses[0]) == (whole.hits[layer], whole.misses[layer])


def test_cli_json_is_one_object_of_hit_rates(synthetic_trace, capsys) -> None:
    assert cli_main([str(synthetic_trace), "--experts-on-device", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == set(ALL)
    for name, rate in out.items():
        assert rate == pytest.approx(replay_file(synthetic_trace, name, 3).hit_rate)
        assert 0 <= rate <= out["belady"]


def test_cli_replays_only_the_sequences_asked_for(synthetic_trace, capsys) -> None:
    assert cli_main([str(synthetic_trace), "--experts-on-device", "3", "--json", "--sequences", "beta"]) == 0
    out = json.loads(capsys.readouterr().out)
    beta = {k: v for k, v in np.load(synthetic_trace).items() if not k.startswith("alpha")}
    assert out["lru"] == pytest.approx(replay_file(beta, "lru", 3).hit_rate)
    assert out["lru"] != pytest.approx(replay_file(synthetic_trace, "lru", 3).hit_rate)
    with pytest.raises(UsageError, match="--sequences: no gamma in the trace; it has alpha, beta"):
        cli_main([str(synthetic_trace), "--sequences", "gamma"])


def test_cli_is_reachable_through_the_package_entry_point(synthetic_trace, capsys) -> None:
    from colab_helpers.cli import main

    assert main(["replay", str(synthetic_trace), "--experts-on-device", "2-4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"2", "3", "4"} and set(out["3"]) == set(ALL)


def test_cli_table_lists_policies_sweeps_and_speed(synthetic_trace, capsys) -> None:
    assert cli_main([str(synthetic_trace), "--experts-on-device", "3,5", "--half-lives", "4,inf"]) == 0
    text = capsys.readouterr().out
    assert "2 sequences, 100 decode steps, 4 layers, top-2" in text
    for row in (*ALL, "lfu_decay[h=4]", "lfu_decay[h=inf]"):
        assert f"\n{row} " in text
    assert "K=3" in text and "K=5" in text and "tok/s" in text
    assert parse_ks("2-4,6") == [2, 3, 4, 6]


# --------------------------------------------------------------------------------------------------
# timing model
# --------------------------------------------------------------------------------------------------


def test_timing_model_arithmetic() -> None:
    m = TimingModel()
    assert m.compute_s == pytest.approx((64 * 66_404_364 + 1.24e9) / 240e9)  # ~22.9 ms
    assert m.transfer_s(1) == pytest.approx(66_404_364 / 12.3e9)  # ~5.4 ms; write-back overlaps
    assert TimingModel(duplex=False).transfer_s(1) == pytest.approx(66_404_364 / 12.3e9 + 66_404_364 / 13.1e9)
    p = m.project(demand_loads=10, prefetch_loads=2)
    assert p.overlapped == pytest.approx(1 / max(12 * m.transfer_s(1), m.compute_s))
    assert p.serialized == pytest.approx(1 / (12 * m.transfer_s(1) + m.compute_s))
    assert p.pipelined == pytest.approx(1 / (max(2 * m.transfer_s(1), m.compute_s) + 10 * m.transfer_s(1)))
    assert p.serialized < p.pipelined < p.overlapped
    assert m.project_hit_rate(1.0).overlapped == pytest.approx(1 / m.compute_s)  # compute-bound
    # PERFORMANCE.md's ceilings for LRU hit rates: 4 per layer ~7 tok/s, 5 ~10, 6 ~14
    assert [round(m.project_hit_rate(h).overlapped) for h in (0.612, 0.713, 0.809)] == [7, 10, 15]


# --------------------------------------------------------------------------------------------------
# recording a running model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=128,
    )
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():  # sharper routers than the 0.02 init, so routing varies from token to token
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("tiny_mixtral")
    save_checkpoint(model, out, optimize=False, progress=False)
    return out


PROMPT = torch.tensor([[1, 5, 7, 9, 11]])
NEW_TOKENS = 6


def record(path, tmp_path, policy: str, k: int, prefetch: bool):
    """Generate with a recorder attached; also snapshot the live counters when decoding starts."""
    # the replay models guesses that evict (mode "evict") and a fixed K per layer (no slots lent by the KV cache);
    # "auto" staging and lending are measured by the twin
    model = load_model(path, experts_on_device=k, progress=False, policy=policy,
                       prefetch=PrefetchConfig(enabled=prefetch, mode="evict"), kv_lending=False)  # fmt: skip
    stats, at_decode = model.expert_cache.stats, {}

    def snapshot(layer, experts, guesses) -> None:
        if len(experts) == 1 and not at_decode:  # layer 0 of the first decode step: prefill is all counted
            at_decode.update(hits=list(stats.hits), misses=list(stats.misses))

    model.model.layers[0].mlp.observers.append(snapshot)
    with RoutingRecorder(model) as rec:
        model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert not rec._attached and all(rec._observe not in b.observers for b in rec.blocks)
    return model, rec.save(tmp_path / "trace.npz"), at_decode


def test_recorded_lru_trace_replays_to_the_live_counters(tiny_checkpoint, tmp_path) -> None:
    model, path, at_decode = record(tiny_checkpoint, tmp_path, "lru", 2, prefetch=False)
    z = dict(np.load(path))
    decode = z["recorded_decode_experts"]
    assert decode.dtype == np.int8 and decode.shape == (NEW_TOKENS - 1, 2, 2)  # first token comes from prefill
    assert (decode >= 0).all() and (decode < 8).all()
    assert z["recorded_prefill_experts"].shape == (PROMPT.shape[1], 2, 2)
    assert z["recorded_forward_tokens"].tolist() == [PROMPT.shape[1]] + [1] * (NEW_TOKENS - 1)
    assert "recorded_decode_guesses" not in z

    live = model.expert_cache.stats
    decode_only = replay_file(z, "lru", 2, ReplayOptions.live())
    assert decode_only.hits == [a - b for a, b in zip(live.hits, at_decode["hits"], strict=True)]
    assert decode_only.misses == [a - b for a, b in zip(live.misses, at_decode["misses"], strict=True)]
    everything = replay_file(z, "lru", 2, ReplayOptions.live(count_prefill=True))
    assert (everything.hits, everything.misses) == (live.hits, live.misses)
    # the plain decode array, replayed on its own, is a valid trace for the CLI conventions too
    assert replay(decode, "lru", 2).accesses == decode.size


def test_recorded_trace_with_prefetch_replays_exactly_for_lfu_decay(tiny_checkpoint, tmp_path, capsys) -> None:
    model, path, _ = record(tiny_checkpoint, tmp_path, "lfu_decay", 3, prefetch=True)
    z = dict(np.load(path))
    guesses = z["recorded_decode_guesses"]
    assert guesses.shape == (NEW_TOKENS - 1, 2, 1, 2)  # [T, L, lookahead, n]
    assert (guesses[:, 1] == -1).all() and (guesses[:, 0] >= 0).all()  # the last layer guesses nothing
    live = model.expert_cache.stats
    s = replay_file(z, "lfu_decay", 3, ReplayOptions.live(count_prefill=True))
    assert (s.hits, s.misses, s.prefetch_loads) == (live.hits, live.misses, live.prefetch_loads)
    assert (s.predicted, s.correct, s.needed) == (live.predicted, live.correct, live.needed)
    assert [w * model.expert_cache.layout.nbytes for w in s.wasted_loads] == live.wasted_bytes
    assert s.precision == pytest.approx(live.precision) and s.recall == pytest.approx(live.recall)
    assert cli_main([str(path), "--experts-on-device", "3", "--prefetch", "--initial", "warm", "--order", "live"]) == 0
    assert "overlapped / pipelined" in capsys.readouterr().out
