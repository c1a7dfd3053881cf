"""The KV cache's unreached tail lent to the expert cache as slots (``kv_arena.KVArena``, ``ExpertCache.lend``)."""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import MixtralForCausalLM

from colab_helpers.conversation.session import ChatSession
from colab_helpers.model import load_model
from colab_helpers.runtime.kv_arena import LEND_ALIGN, KVArena, lent_slot_starts
from colab_helpers.runtime.kv_cache import PreallocatedCache, new_kv_cache
from colab_helpers.runtime.policies import POLICIES
from colab_helpers.sim.copysim import simulate_copies
from colab_helpers.weights.tiny import tiny_model_path
from tests.test_cache import EXPERTS, LAYERS, LAYOUT, ORIGINAL_BYTES, build

KV = "cache" if "cache" in inspect.signature(MixtralForCausalLM.forward).parameters else "past_key_values"


def test_mixtral_on_a_free_t4_lends_eight_slots_needed_back_every_507_tokens() -> None:
    # 4096 tokens x 131,072 B (32 layers x K,V x 8 heads x 128 x fp16) = 536,870,912 B; a slot is 66,404,736 B,
    # 66,404,864 B once aligned: 8 fit, the last bytes' first; each is 506.6 positions of KV
    starts = lent_slot_starts(4096, 131_072, 66_404_736)
    assert starts == [3589, 3082, 2576, 2069, 1562, 1056, 549, 42]
    assert 536_870_912 - 8 * 66_404_864 == 5_632_000  # 42.97 positions before the first lent byte


def _arena(capacity: int, cache, layers: int = 2, heads: int = 2, head_dim: int = 8) -> KVArena:
    return KVArena(layers, heads, head_dim, capacity, torch.float32, "cpu", cache)


def test_lent_slots_are_the_arena_tail_and_positions_before_a_start_never_touch_them() -> None:
    cache = build([2, 2, 2])
    per_token = 2 * 2 * 2 * 8 * 4
    capacity = -(-(3 * LAYOUT.nbytes + 5 * per_token) // per_token)
    arena = _arena(capacity, cache)
    assert arena.bytes_per_token == per_token and len(arena.slot_starts) == 3 and arena.lent == 3
    base, end = arena.buf.data_ptr(), arena.buf.data_ptr() + arena.buf.nbytes
    for j, start in enumerate(arena.slot_starts):
        slot = arena._lent[j]
        buf = cache._slot_bufs[slot]
        assert base + start * per_token <= buf.data_ptr() and buf.data_ptr() + buf.nbytes <= end
        assert (buf.data_ptr() - base) % LEND_ALIGN == 0
        assert buf.data_ptr() < base + (start + 1) * per_token  # position ``start`` reaches it
    assert cache.capacity == [3, 3, 3] and cache.base_capacity == [2, 2, 2]  # fewest first, then lowest index
    before = [cache._slot_bufs[s].clone() for s in arena._lent]
    first = min(arena.slot_starts)
    for layer in range(2):  # every position a conversation of ``first`` tokens writes
        arena.keys(layer)[:, :, :first].fill_(7.0)
        arena.values(layer)[:, :, :first].fill_(-7.0)
    assert all(torch.equal(cache._slot_bufs[s], b) for s, b in zip(arena._lent, before, strict=True))


@settings(max_examples=25, deadline=None)
@given(
    policy=st.sampled_from(sorted(POLICIES)),
    simulated=st.booleans(),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["step", "step", "guess", "lend", "take"]),
            st.integers(0, LAYERS - 1),
            st.sets(st.integers(0, EXPERTS - 1), min_size=1, max_size=3),
        ),
        min_size=20,
        max_size=40,
    ),
)
def test_lending_and_giving_back_keep_every_expert_intact(policy, simulated, ops) -> None:
    cache = build([2, 1, 3], policy, spare=1)
    if simulated:  # asynchronous copies on a CPU: a missing wait reads poison or raises CopyHazard
        simulate_copies(cache)
    stand_ins = torch.zeros(8, LAYOUT.nbytes, dtype=torch.uint8)  # the KV tail's slot-sized pieces
    lent: dict[int, int] = {}  # piece -> slot id
    returned: set[int] = set()
    for kind, a, experts in ops:
        if kind == "step":
            order = cache.demand(a, experts)
            for e in order:
                w = cache.weights(a, e)
                slot = cache.slot_of[a][e]
                assert w["w1"].W_q.data_ptr() == cache._slot_bufs[slot].data_ptr()
                assert torch.equal(cache._slot_bufs[slot], ORIGINAL_BYTES[(a, e)]), f"{a}.{e} served wrong bytes"
                cache.release(a, e)
            cache.end_step(a)
        elif kind == "guess":
            for e in experts:
                cache.stage(a, e)
            cache.pump(4)
        elif kind == "lend":
            for piece in [p for p in range(8) if p not in lent][: a + 1]:
                lent[piece] = cache.lend(stand_ins[piece])
                returned.discard(piece)
        elif lent:  # "take": the KV cache needs a piece back
            piece = sorted(lent)[a % len(lent)]
            cache.give_back(lent.pop(piece))
            stand_ins[piece].fill_(0xAB)  # the conversation writes its K/V there
            returned.add(piece)
        cache.check_invariants()
        assert sum(cache.capacity) == sum(cache.base_capacity) + len(lent)
        assert all(len(cache.slot_of[layer]) <= cache.capacity[layer] for layer in range(LAYERS))
        for piece in returned:
            assert bool((stand_ins[piece] == 0xAB).all()), "the cache wrote into a slot it gave back"
    for (layer, e), expected in ORIGINAL_BYTES.items():
        assert torch.equal(cache.expert_bytes(layer, e), expected)


def test_giving_back_a_slot_writes_back_the_borrowers_victim_and_moves_what_it_holds() -> None:
    cache = build([2, 2, 2], "lru", spare=1)
    piece = torch.zeros(LAYOUT.nbytes, dtype=torch.uint8)
    slot = cache.lend(piece)
    assert cache.capacity[0] == 3
    cache.fetch(0, 5)  # the layer has room: a load, no eviction, no write-back
    assert cache.slot_of[0][5] == slot and sum(cache.stats.d2h_bytes) == 0 and cache.resident(0) == {0, 1, 5}
    cache.fetch(0, 0)
    cache.give_back(slot)  # layer 0 is over: LRU's victim (1) goes back to the host; 5 moves out of the piece
    assert cache.resident(0) == {0, 5} and cache.capacity == [2, 2, 2]
    assert sum(cache.stats.d2h_bytes) == LAYOUT.nbytes and sum(cache.stats.moved_bytes) == LAYOUT.nbytes
    assert cache.slot_of[0][5] != slot and sum(cache.stats.given_back) == 1
    piece.fill_(0)
    cache.check_invariants()
    for (layer, e), expected in ORIGINAL_BYTES.items():
        assert torch.equal(cache.expert_bytes(layer, e), expected)


@pytest.fixture(scope="module")
def models():
    lending = load_model(tiny_model_path(), experts_on_device=2, progress=False)
    plain = load_model(tiny_model_path(), experts_on_device=2, progress=False, kv_lending=False)
    return lending, plain


def test_a_conversation_past_the_lent_slot_matches_one_without_lending(models) -> None:
    lending, plain = models
    arena = lending.kv_arena
    assert plain.kv_arena is None and arena is not None and arena.lent >= 1
    start = min(arena.slot_starts)
    total = start + 12
    ids = torch.randint(3, lending.config.vocab_size, (1, total), generator=torch.Generator().manual_seed(3))
    logits = {}
    for name, model in (("lending", lending), ("plain", plain)):
        cache = new_kv_cache(model, total)
        steps = []
        with torch.no_grad():
            steps.append(model(ids[:, : start - 4], use_cache=True, **{KV: cache}).logits)
            for t in range(start - 4, total):  # one token at a time across the slot's first position
                steps.append(model(ids[:, t : t + 1], use_cache=True, **{KV: cache}).logits)
                if name == "lending" and t == start - 1:
                    assert arena.lent == len(arena.slot_starts)  # positions < start: still lent
                if name == "lending" and t == start:
                    assert arena.lent == len(arena.slot_starts) - 1  # position ``start`` took it back
        logits[name] = torch.cat(steps, dim=1)
        if name == "lending":
            assert cache.arena is arena and sum(model.expert_cache.stats.given_back) >= 1
            cache.release_arena()
            assert arena.lent == len(arena.slot_starts)  # the next conversation starts with every slot lent
        model.expert_cache.check_invariants()
    assert torch.equal(logits["lending"], logits["plain"])


def test_one_conversation_holds_the_arena_at_a_time(models) -> None:
    lending, _ = models
    first = new_kv_cache(lending, 64)
    second = new_kv_cache(lending, 64)
    assert first.arena is lending.kv_arena and second.arena is None  # its own buffers, as without an arena
    assert isinstance(second, PreallocatedCache)
    first.release_arena()
    third = new_kv_cache(lending, 64)
    assert third.arena is lending.kv_arena
    del third  # collected: the arena is free again
    assert new_kv_cache(lending, 64).arena is lending.kv_arena


def test_a_chat_session_crops_and_resets_lend_again(models) -> None:
    from colab_helpers.conversation.generation import SamplingConfig
    from colab_helpers.weights.tokenizer import load_tokenizer

    lending, _ = models
    arena = lending.kv_arena
    session = ChatSession(lending, load_tokenizer(tiny_model_path()), SamplingConfig(max_new_tokens=8))
    session.send("word " * (min(arena.slot_starts) + 4))
    assert session._cache.arena is arena and arena.lent == len(arena.slot_starts) - 1
    session.reset_cache()
    assert arena.lent == len(arena.slot_starts)
    lending.expert_cache.check_invariants()


def test_the_plan_names_the_slots_the_arena_lends() -> None:
    from colab_helpers.planning.planner import Budget, plan_memory
    from tests.test_cache import CONFIG, QUANT

    plan = plan_memory(CONFIG, QUANT, Budget.given(1.0, 8.0), "cuda", context=256, experts_on_device=2)
    head_dim = CONFIG.hidden_size // CONFIG.num_attention_heads
    arena = KVArena(LAYERS, CONFIG.num_key_value_heads, head_dim, 256, torch.float16, "cpu", build([2, 2, 2]))
    assert plan.kv_lent_slot_starts == arena.slot_starts and arena.lent == len(arena.slot_starts) > 0


def test_the_twin_lends_at_the_free_t4_plans_positions() -> None:
    import numpy as np

    from colab_helpers.sim.twin_project import planned
    from colab_helpers.sim.twin_record import EngineRun, build_narrow_engine

    plan = planned()  # 15 GB / 12.7 GB: the twin's default plan
    routing = np.tile(np.array([0, 1]), (4, len(plan.per_layer), 1))
    model = build_narrow_engine(EngineRun(tuple(plan.per_layer)), routing)
    assert model.kv_arena.slot_starts == plan.kv_lent_slot_starts == [3589, 3082, 2576, 2069, 1562, 1056, 549, 42]
    assert model.kv_arena.lent == 8 and sum(model.expert_cache.capacity) == plan.device_experts + 8


def test_transformers_generate_writes_into_the_arena_and_answers_as_without_lending(models) -> None:
    lending, plain = models
    arena = lending.kv_arena
    start = min(s for s in arena.slot_starts if s >= 30)  # the prompt stays below it, the answer crosses it
    ids = torch.randint(3, lending.config.vocab_size, (1, start - 10), generator=torch.Generator().manual_seed(4))
    given_back = sum(lending.expert_cache.stats.given_back)
    outs = [
        m.generate(
            ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        for m in (lending, plain)
    ]
    assert sum(lending.expert_cache.stats.given_back) > given_back  # no second KV: generate used the arena
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert all(torch.equal(a, b) for a, b in zip(outs[0].scores, outs[1].scores, strict=True))
    del outs  # the arena's cache: collected, the next conversation binds again
    assert new_kv_cache(lending, 8).arena is arena


def test_a_crop_lends_again_only_what_the_conversation_no_longer_reaches(models) -> None:
    lending, plain = models
    arena = lending.kv_arena
    start = min(s for s in arena.slot_starts if s >= 30)
    ids = torch.randint(3, lending.config.vocab_size, (1, start + 20), generator=torch.Generator().manual_seed(5))
    logits = {}
    for name, model in (("lending", lending), ("plain", plain)):
        cache = new_kv_cache(model, start + 40)
        with torch.no_grad():
            model(ids[:, : start + 10], use_cache=True, **{KV: cache})  # past the slot at ``start``
            for layer in cache.layers:  # a chat turn keeping only a common prefix (session._truncate)
                layer.crop(-5)
            if name == "lending":  # the slot at ``start`` is still inside the conversation: not lent again
                assert arena.lent == sum(s >= start + 10 for s in arena.slot_starts)
            steps = [
                model(ids[:, t : t + 1], use_cache=True, **{KV: cache}).logits for t in range(start + 5, start + 20)
            ]
        logits[name] = torch.cat(steps, dim=1)
        if name == "lending":
            cache.release_arena()
    assert torch.equal(logits["lending"], logits["plain"])
