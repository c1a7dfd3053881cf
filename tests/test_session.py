"""Generation and chat sessions on the embedded model: streaming, multi-turn KV reuse, faults that lose nothing."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch

from colab_helpers.conversation.generation import SamplingConfig, chat_prompt_ids, generate_stream
from colab_helpers.conversation.session import ChatSession
from colab_helpers.model import load_model, load_tokenizer
from colab_helpers.weights.tiny import tiny_model_path

GREEDY = SamplingConfig(max_new_tokens=24)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tiny_model_path())


@pytest.fixture
def model():
    return load_model(tiny_model_path(), experts_on_device=2, progress=False)


def test_streamed_pieces_add_up_to_the_answer(model, tokenizer) -> None:
    ids = chat_prompt_ids(tokenizer, "What is the capital of France?")
    pieces: list[str] = []
    result = generate_stream(model, tokenizer, ids, GREEDY, on_text=pieces.append)
    assert len(pieces) > 3 and "".join(pieces) == result.text
    assert result.stats.new_tokens == len(result.token_ids) > 0
    assert result.stats.stop_reason in ("eos", "length")
    assert 0 < result.stats.hit_rate < 1 and result.stats.h2d_bytes > 0
    assert "tok/s" in result.stats.line()


def test_multi_turn_reuses_the_kv_cache_and_matches_a_fresh_session(model, tokenizer) -> None:
    chat = ChatSession(model, tokenizer, GREEDY)
    chat.send("What is 2 + 3?")
    cached_before = chat.cached_tokens
    assert cached_before > 0
    second = chat.send("What is the capital of Italy?")
    # the same conversation computed from scratch gives the same greedy answer
    fresh = ChatSession(model, tokenizer, GREEDY)
    fresh.turns = list(chat.turns[:1])
    assert fresh.send("What is the capital of Italy?").text == second.text
    assert chat.cached_tokens > cached_before


def test_interrupted_answer_is_kept_and_the_next_turn_works(model, tokenizer) -> None:
    chat = ChatSession(model, tokenizer, GREEDY)
    seen: list[str] = []

    def stop_after_three(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            raise KeyboardInterrupt

    result = chat.send("Recite the Zen of Python.", on_text=stop_after_three)
    assert result.stats.stop_reason == "interrupted"
    assert result.text and result.text == chat.turns[-1].assistant
    assert chat.cached_tokens == chat._cache.get_seq_length()
    model.expert_cache.check_invariants()
    follow = chat.send("What is 2 + 3?")
    assert follow.stats.stop_reason in ("eos", "length") and follow.text
    assert len(chat.turns) == 2


def test_sigint_in_the_middle_of_an_expert_swap_leaves_the_cache_consistent(model, tokenizer, monkeypatch) -> None:
    reference = {(lay, e): model.expert_cache.expert_bytes(lay, e) for lay in range(4) for e in range(8)}
    engine = model.expert_cache.engine
    real_copy = engine.copy
    calls = {"n": 0}

    def copy_then_sigint(*args, **kwargs):
        out = real_copy(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGINT)  # arrives between the load and the write-back
        return out

    monkeypatch.setattr(engine, "copy", copy_then_sigint)
    chat = ChatSession(model, tokenizer, GREEDY)
    result = chat.send("Recite the Zen of Python.")
    assert result.stats.stop_reason == "interrupted"
    cache = model.expert_cache
    cache.check_invariants()
    for (lay, e), data in reference.items():
        assert torch.equal(cache.expert_bytes(lay, e), data), f"expert {lay}.{e} corrupted by the interrupt"
    assert chat.send("What is 2 + 3?").text


def test_out_of_memory_releases_the_kv_cache_and_the_model_keeps_working(model, tokenizer, monkeypatch) -> None:
    chat = ChatSession(model, tokenizer, GREEDY)
    chat.send("What is 2 + 3?")
    layer = model.model.layers[1].self_attn
    real_forward = layer.forward
    state = {"armed": True}

    def oom_once(*args, **kwargs):
        if state["armed"]:
            state["armed"] = False
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", oom_once)
    result = chat.send("What is the capital of France?")
    assert result.stats.stop_reason == "out_of_memory" and "out of GPU memory" in result.error
    assert chat.cached_tokens == 0 and chat._cache is None
    model.expert_cache.check_invariants()
    again = chat.send("What is the capital of France?")
    assert again.error is None and again.text


def test_bad_prompts_are_refused_without_touching_the_conversation(model, tokenizer) -> None:
    chat = ChatSession(model, tokenizer, GREEDY, max_context=64)
    chat.send("What is 2 + 3?")
    turns, cached = list(chat.turns), chat.cached_tokens
    with pytest.raises(ValueError, match="empty message"):
        chat.send("   ")
    with pytest.raises(ValueError, match=r"prompt is \d+ tokens but the context budget leaves 40"):
        chat.send("word " * 200)
    assert chat.turns == turns and chat.cached_tokens == cached
    assert chat.send("What is 3 + 4?").text


def test_old_turns_are_dropped_to_fit_the_context(model, tokenizer) -> None:
    chat = ChatSession(model, tokenizer, SamplingConfig(max_new_tokens=16), max_context=64)
    dropped = 0
    for q in ("What is 2 + 3?", "What is the capital of Spain?", "What is 5 + 6?", "What is the capital of Peru?"):
        result = chat.send(q)
        dropped += result.extra.get("dropped_turns", 0)
        assert result.stats.prompt_tokens <= 64 - 16
    assert dropped >= 1 and len(chat.turns) == 4 - dropped
    assert chat.turns[-1].user == "What is the capital of Peru?"


def test_sampling_with_a_seed_is_reproducible(model, tokenizer) -> None:
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    a = ChatSession(model, tokenizer, sampling).send("What is the capital of France?").text
    b = ChatSession(model, tokenizer, sampling).send("What is the capital of France?").text
    assert a == b


def test_cli_generate_runs_offline_on_the_embedded_model() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "colab_helpers", "generate", "What is 2 + 3?", "--max-new-tokens", "12"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "COLAB_HELPERS_TINY": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "stats:" in out.stderr and "tok/s" in out.stderr and "hit rate" in out.stderr


def test_text_iterator_streamer_works_with_the_offloaded_model(model, tokenizer) -> None:
    """transformers' own threaded streamer (what most tutorials use) sees the same text."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    ids = tokenizer("The Zen of Python, by", return_tensors="pt").input_ids
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = Thread(
        target=model.generate, kwargs={"input_ids": ids, "max_new_tokens": 12, "streamer": streamer, "do_sample": False}
    )
    worker.start()
    text = "".join(streamer)
    worker.join()
    direct = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    assert text == tokenizer.decode(direct, skip_special_tokens=True) and text
