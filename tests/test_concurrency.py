"""Two generations at once on one model (a widget on a kernel subshell and a cell, or two threads).

Every forward must be correct and the expert cache consistent: each MoE layer's cache step holds
``ExpertCache.lock``. One conversation answers one message at a time (``SessionBusy``), and
``stop()`` ends an answer from another thread.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colab_helpers.conversation.generation import SamplingConfig, chat_prompt_ids, generate_stream
from colab_helpers.conversation.session import ChatSession, SessionBusy
from colab_helpers.model import load_model, load_tokenizer
from colab_helpers.weights.tiny import tiny_model_path

PROMPTS = [
    "What is the capital of France?",
    "What is 12 plus 7?",
    "Tell me a Zen saying.",
    "What is the capital of Japan?",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tiny_model_path())


@pytest.fixture(scope="module")
def model():
    # one expert slot per layer: nearly every token swaps, the most contention a cache can see
    return load_model(tiny_model_path(), experts_on_device=1, progress=False)


@pytest.fixture(scope="module")
def sequential(model, tokenizer) -> dict[str, list[int]]:
    """Greedy answers computed one at a time: what every concurrent run must reproduce exactly."""
    sampling = SamplingConfig(max_new_tokens=16)
    return {p: generate_stream(model, tokenizer, chat_prompt_ids(tokenizer, p), sampling).token_ids for p in PROMPTS}


@pytest.fixture
def fast_switching():
    """Switch threads every microsecond so layer steps of two generations really interleave."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def _run_threads(targets) -> list:
    results: list = [None] * len(targets)
    errors: list[BaseException] = []

    def run(i, fn):
        try:
            results[i] = fn()
        except BaseException as err:  # reported below, with the thread's traceback
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a generation hung"
    if errors:
        raise errors[0]
    return results


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.sampled_from(PROMPTS), min_size=2, max_size=3))
def test_concurrent_generations_give_the_sequential_greedy_outputs(
    model, tokenizer, sequential, fast_switching, picks
) -> None:
    sampling = SamplingConfig(max_new_tokens=16)
    cache = model.expert_cache

    def one(prompt):
        def fn():
            result = generate_stream(model, tokenizer, chat_prompt_ids(tokenizer, prompt), sampling)
            cache.check_invariants()  # also checked while the other thread is mid-answer
            return result.token_ids

        return fn

    got = _run_threads([one(p) for p in picks])
    assert got == [sequential[p] for p in picks]
    cache.check_invariants()


def test_two_sessions_on_two_threads_match_their_sequential_conversations(model, tokenizer, fast_switching) -> None:
    sampling = SamplingConfig(max_new_tokens=12)
    convos = [PROMPTS[:2], PROMPTS[2:]]

    def talk(messages):
        session = ChatSession(model, tokenizer, sampling)
        return [session.send(m).token_ids for m in messages]

    expected = [talk(c) for c in convos]
    got = _run_threads([lambda c=c: talk(c) for c in convos])
    assert got == expected
    model.expert_cache.check_invariants()


def test_raw_model_generate_from_two_threads(model, tokenizer, fast_switching) -> None:
    ids = [chat_prompt_ids(tokenizer, p) for p in PROMPTS[:2]]
    kwargs = {"max_new_tokens": 10, "do_sample": False, "temperature": None, "top_p": None}

    def gen(x):
        with torch.no_grad():
            return model.generate(x, attention_mask=torch.ones_like(x), **kwargs)[0].tolist()

    expected = [gen(x) for x in ids]
    assert _run_threads([lambda x=x: gen(x) for x in ids]) == expected
    model.expert_cache.check_invariants()


def _answer_in_background(session: ChatSession, message: str):
    """Start an answer on another thread and wait until its first piece of text has arrived."""
    started, release = threading.Event(), threading.Event()
    box: dict = {}

    def on_text(_piece: str) -> None:
        started.set()
        release.wait(timeout=60)

    def run() -> None:
        box["result"] = session.send(message, on_text=on_text)

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(timeout=120), "the answer never began"
    return thread, release, box


def test_a_second_message_while_answering_is_refused_and_changes_nothing(model, tokenizer) -> None:
    session = ChatSession(model, tokenizer, SamplingConfig(max_new_tokens=8))
    thread, release, box = _answer_in_background(session, PROMPTS[0])
    assert session.busy and session.in_flight is not None and session.in_flight[0] == PROMPTS[0]
    with pytest.raises(SessionBusy, match="still answering"):
        session.send(PROMPTS[1])
    with pytest.raises(SessionBusy, match="cannot clear"):
        session.clear()
    release.set()
    thread.join(timeout=120)
    assert [t.user for t in session.turns] == [PROMPTS[0]] and not session.busy and session.in_flight is None
    assert session.send(PROMPTS[1]).text  # and the conversation goes on


def test_stop_from_another_thread_ends_the_answer_and_keeps_it(model, tokenizer) -> None:
    session = ChatSession(model, tokenizer, SamplingConfig(max_new_tokens=200))
    events: list[str] = []
    session.watchers.append(lambda event, detail: events.append(event))
    thread, release, box = _answer_in_background(session, PROMPTS[2])
    assert session.stop()
    release.set()
    thread.join(timeout=120)
    result = box["result"]
    assert result.stats.stop_reason == "stopped" and 0 < result.stats.new_tokens < 200
    assert session.turns[-1].assistant == result.text and session.turns[-1].stop_reason == "stopped"
    assert events[0] == "start" and events[-1] == "end" and "text" in events
    assert not session.stop()  # nothing to stop now
    follow = session.send(PROMPTS[0])
    assert follow.stats.stop_reason in ("eos", "length") and follow.text


def test_watchers_hear_the_end_of_a_failed_answer(model, tokenizer, monkeypatch) -> None:
    session = ChatSession(model, tokenizer, SamplingConfig(max_new_tokens=8))
    events: list[tuple[str, object]] = []
    session.watchers.append(lambda event, detail: events.append((event, detail)))

    def broken(*args, **kwargs):
        raise KeyError(3)

    monkeypatch.setattr("colab_helpers.conversation.session.generate_stream", broken)
    with pytest.raises(KeyError):
        session.send(PROMPTS[0])
    assert [e for e, _ in events] == ["start", "end"] and isinstance(events[-1][1], KeyError)
    assert session.in_flight is None and not session.busy and session.turns == []
