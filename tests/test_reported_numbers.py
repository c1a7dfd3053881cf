"""Numbers shown to users (tok/s, hit rate, bytes moved each way, prefetch precision/recall, per layer) equal
values computed by hand on small scripted cases; time comes from a fake clock, never from the wall."""

from __future__ import annotations

import time

import pytest
import torch

from colab_helpers.conversation.chat import stats_line
from colab_helpers.conversation.generation import GenerationStats, SamplingConfig, generate_stream
from colab_helpers.model import load_model
from colab_helpers.runtime.moe import OffloadedMoE, PrefetchConfig
from tests.test_cache import LAYOUT, build

PROMPT = torch.tensor([[1, 17, 45, 99, 3, 64, 12, 7, 88, 23, 5, 41]])
MIB = 2**20


class NoTokenizer:
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


# --------------------------------------------------------------------------------------------------
# the lines users read
# --------------------------------------------------------------------------------------------------

HAND = GenerationStats(
    new_tokens=5,
    prompt_tokens=12,
    seconds=10.0,
    first_token_seconds=6.0,  # the prefill (and the first token it yields) took 6 s; 4 decode tokens in 4 s
    hit_rate=0.75,
    h2d_bytes=3 * MIB,
    d2h_bytes=2 * MIB,
    prefetch_precision=0.5,
    prefetch_recall=0.25,
    stop_reason="eos",
)


def test_decode_tok_s_leaves_out_the_first_token_and_its_prefill() -> None:
    assert HAND.tokens_per_s == 1.0  # (5 - 1) tokens / (10 - 6) s; counting the first token would say 1.25
    assert GenerationStats(new_tokens=1, seconds=3.0, first_token_seconds=3.0).tokens_per_s == 0.0
    assert GenerationStats(new_tokens=3, seconds=2.0, first_token_seconds=2.0).tokens_per_s == 0.0  # no decode time


def test_cli_stats_line_says_each_number_in_its_place() -> None:
    assert HAND.line() == (
        "5 tokens in 10.00s (1.00 tok/s decode), cache hit rate 75.0%, moved 3.0 MiB in / 2.0 MiB out, "
        "prefetch precision 50.0% recall 25.0% [eos]"
    )
    vram = GenerationStats(**{**HAND.__dict__, "vram_gb": 1.5})
    assert vram.line().endswith("recall 25.0%, VRAM 1.50 GB [eos]")


def test_chat_stats_line_says_each_number_in_its_place() -> None:
    # the numbers, in order; how the line names the stop reason and VRAM is the widget's wording
    assert stats_line(HAND).startswith("5 tokens · 1.00 tok/s · cache hit rate 75% · prefetch precision 50% · ")


# --------------------------------------------------------------------------------------------------
# the cache's counters on a scripted sequence
# --------------------------------------------------------------------------------------------------


def step(cache, layer: int, experts: list[int]) -> None:
    """One layer step as ``OffloadedMoE`` runs it: demand, then each expert's weights and release."""
    for e in cache.demand(layer, experts):
        cache.weights(layer, e)
        cache.release(layer, e)
    cache.end_step(layer)


def test_hit_rate_and_bytes_each_way_by_hand() -> None:
    """Layers 0-2 hold 2, 3 and 8 experts (0..k-1 resident at load), LRU, one spare slot."""
    cache = build([2, 3, 8], policy="lru", spare=1)
    step(cache, 0, [0, 1])  # 2 hits
    step(cache, 0, [2])  # miss: 0 (older than 1) goes; 2 copied in, 0 written back
    step(cache, 0, [0])  # miss: 1 goes; 0's old slot still holds it (re-mapped, no copy in), 1 written back
    step(cache, 1, [1, 4])  # 1 hit, 1 miss (0 goes): one copy each way
    step(cache, 2, [5, 7])  # 2 hits (everything resident)
    s, n = cache.stats, LAYOUT.nbytes
    assert (s.hits, s.misses) == ([2, 1, 2], [2, 1, 0])
    assert (s.h2d_bytes, s.d2h_bytes, s.remaps) == ([n, n, 0], [2 * n, n, 0], [1, 0, 0])
    summary = s.summary()
    assert summary["hit_rate"] == 5 / 8 and summary["hits"] == 5 and summary["misses"] == 3
    assert summary["h2d_bytes"] == 2 * n and summary["d2h_bytes"] == 3 * n and summary["remaps"] == 1


def test_prefetch_precision_and_recall_by_hand() -> None:
    """Precision: guesses then used / guesses; recall: guesses then used / experts used while guessing."""
    cache = build([2, 2, 2], spare=1)
    cache.score_prediction(1, {4, 5}, {4, 6, 7})  # 2 guesses, 1 right, 3 used
    cache.score_prediction(2, {3, 5, 6}, {3, 5})  # 3 guesses, 2 right, 2 used
    s = cache.stats
    assert (s.predicted, s.correct, s.needed) == ([0, 2, 3], [0, 1, 2], [0, 3, 2])
    assert s.precision == 3 / 5 and s.recall == 3 / 5
    cache.score_prediction(1, {0}, {1, 2, 3, 4, 5})  # 1 guess, 0 right, 5 used
    assert s.precision == 3 / 6 and s.recall == 3 / 10
    summary = s.summary()
    assert summary["prefetch_precision"] == 0.5 and summary["prefetch_recall"] == 0.3


# --------------------------------------------------------------------------------------------------
# generate_stream: what one answer reports
# --------------------------------------------------------------------------------------------------


class FakeClock:
    """``time.perf_counter`` that only moves when the model runs: a prefill forward costs ``prefill`` s,
    a one-token decode forward ``decode`` s."""

    def __init__(self, model, prefill: float = 5.0, decode: float = 1.0) -> None:
        self.now = 100.0
        model.register_forward_pre_hook(lambda m, a, kw: self._tick(kw), with_kwargs=True)
        self.prefill, self.decode = prefill, decode

    def _tick(self, kwargs) -> None:
        self.now += self.decode if kwargs["input_ids"].shape[-1] == 1 else self.prefill

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def tiny_path(make_checkpoint):
    return make_checkpoint(2)


def test_generate_stream_times_with_a_fake_clock(tiny_path, monkeypatch) -> None:
    model = load_model(tiny_path, experts_on_device=2, progress=False)
    model.generation_config.eos_token_id = None  # all 6 tokens
    clock = FakeClock(model)
    monkeypatch.setattr(time, "perf_counter", clock)
    r = generate_stream(model, NoTokenizer(), PROMPT, SamplingConfig(max_new_tokens=6))
    st = r.stats
    assert (st.new_tokens, st.prompt_tokens) == (6, 12)
    assert st.first_token_seconds == 5.0  # the prefill forward, which yields the first token
    assert st.seconds == 5.0 + 5 * 1.0  # then 5 decode forwards of 1 s
    assert st.tokens_per_s == 1.0  # 5 decode tokens in 5 s (not 6 / 10 or 6 / 5)


def observe(model) -> list[tuple[int, list[list[int]], list[list[int]] | None]]:
    """Every MoE layer step of ``model``: (cache layer, experts per token, prefetch guesses tried)."""
    seen: list = []
    for block in model.modules():
        if isinstance(block, OffloadedMoE):
            block.observers.append(lambda layer, choice, tried: seen.append((layer, choice, tried)))
    return seen


def test_answer_stats_count_this_answer_only_and_per_layer(tiny_path) -> None:
    """Accesses per layer, hit rate, bytes and prefetch scores of the second answer, from its own routing."""
    # 3 guesses for top-2 routing: precision (of 3 per step) and recall (of 2) differ
    model = load_model(tiny_path, experts_on_device=1, prefetch=PrefetchConfig(experts=3), progress=False)
    model.generation_config.eos_token_id = None
    generate_stream(model, NoTokenizer(), PROMPT, SamplingConfig(max_new_tokens=4))  # a first answer
    seen = observe(model)
    r = generate_stream(model, NoTokenizer(), PROMPT[:, :7], SamplingConfig(max_new_tokens=5))
    cache = model.expert_cache
    accesses = [0] * cache.num_layers
    predicted = correct = needed = 0
    pending: dict[int, set[int]] = {}
    for layer, choice, tried in seen:
        used = {e for row in choice for e in row}
        accesses[layer] += len(used)
        if layer in pending:  # the previous layer guessed for this one
            guess = pending.pop(layer)
            predicted, correct, needed = predicted + len(guess), correct + len(guess & used), needed + len(used)
        if tried and tried[0]:
            pending[layer + 1] = set(tried[0])
    s = cache.stats
    assert [h + m for h, m in zip(s.hits, s.misses, strict=True)] == accesses  # per layer, this answer only
    assert sum(s.misses) > 0 and predicted > 0 and correct / predicted != correct / needed
    st = r.stats
    assert st.hit_rate == sum(s.hits) / sum(accesses)
    assert (st.prefetch_precision, st.prefetch_recall) == (correct / predicted, correct / needed)
    n = cache.layout.nbytes
    # each way from the cache's own per-layer byte counters (checked by hand on a scripted cache above); the two
    # differ here (a re-map copies nothing in), so a swapped pair shows
    assert st.h2d_bytes == sum(s.h2d_bytes) and st.d2h_bytes == sum(s.d2h_bytes)
    assert st.h2d_bytes != st.d2h_bytes and st.d2h_bytes >= sum(s.misses) * n


def test_a_full_cache_reports_every_access_a_hit_and_nothing_moved(tiny_path) -> None:
    model = load_model(tiny_path, experts_on_device=8, progress=False)
    st = generate_stream(model, NoTokenizer(), PROMPT, SamplingConfig(max_new_tokens=3)).stats
    assert st.hit_rate == 1.0 and st.h2d_bytes == st.d2h_bytes == 0


# --------------------------------------------------------------------------------------------------
# replay --json
# --------------------------------------------------------------------------------------------------


def test_replay_json_hit_rates_by_hand(tmp_path, capsys) -> None:
    """One layer, cold cache, LRU. K=2: [0,1] 2 misses; [0,2] hit, miss (1 goes); [1,0] miss (2 goes), hit;
    [2,1] miss (0 goes), hit: 3 hits of 8. K=3: 3 misses then 5 hits. Two layers of one step each count alike."""
    import json

    import numpy as np

    from colab_helpers.sim.trace import cli_main

    steps = np.array([[[0, 1]], [[0, 2]], [[1, 0]], [[2, 1]]], dtype=np.int8)  # [T, L=1, k=2]
    path = tmp_path / "hand.npz"
    np.savez(path, hand_decode_experts=steps, num_experts=np.array(3))
    assert cli_main([str(path), "--experts-on-device", "2,3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["2"]["lru"] == 3 / 8 and out["3"]["lru"] == 5 / 8
    assert out["2"]["belady"] == 3 / 8  # at K=2 every eviction is forced (the step's other expert stays)


# --------------------------------------------------------------------------------------------------
# the chat widget's status after a turn
# --------------------------------------------------------------------------------------------------


def test_widget_status_says_how_many_old_turns_were_forgotten_and_the_answers_stats() -> None:
    pytest.importorskip("ipywidgets")
    from colab_helpers.conversation.chat import ChatUI
    from colab_helpers.conversation.session import ChatSession
    from colab_helpers.model import load_tokenizer
    from colab_helpers.weights.tiny import tiny_model_path

    path = tiny_model_path()
    model = load_model(path, experts_on_device=2, progress=False)
    session = ChatSession(model, load_tokenizer(path), SamplingConfig(max_new_tokens=16), max_context=64)
    ui = ChatUI(session, refresh_every=1000, refresh_seconds=60)
    for q in ("What is 2 + 3?", "What is the capital of Spain?", "What is 5 + 6?", "What is the capital of Peru?"):
        result = ui.send(q)
        n = result.extra.get("dropped_turns", 0)
        if n:
            break
    assert n >= 1, "the context never overflowed: the test no longer reaches the branch"
    assert "oldest turn" in ui.status and str(n) in ui.status  # how many were forgotten, whatever the wording
    assert stats_line(result.stats) in ui.status_line


def test_replay_prefetch_precision_and_recall_by_hand() -> None:
    """Layer 0 guesses 3 experts for layer 1 ([2, 4, 5]); layer 1 uses [2, 3] at both steps: 3 guesses, 1 right,
    2 used per step, so precision 1/3 and recall 1/2 (with top-n = top-k the two would be equal)."""
    import numpy as np

    from colab_helpers.sim.trace import ReplayOptions, replay

    experts = np.array([[[0, 1], [2, 3]]] * 2, dtype=np.int8)  # [T=2, L=2, k=2]
    guesses = np.full((2, 2, 1, 3), -1, dtype=np.int8)  # [T, L, d=1, n=3]
    guesses[:, 0, 0] = [2, 4, 5]
    s = replay(experts, "lru", 8, guesses=guesses, options=ReplayOptions(prefetch=True, num_experts=8))
    assert (s.predicted, s.correct, s.needed) == ([0, 6], [0, 2], [0, 4])
    assert s.precision == 1 / 3 and s.recall == 1 / 2
