"""Terminal chat (``python -m colab_helpers chat``): leaving never loses the conversation without a word."""

from __future__ import annotations

import argparse

import pytest

from colab_helpers import cli
from colab_helpers.model import load_model, load_tokenizer
from colab_helpers.weights.tiny import tiny_model_path


@pytest.fixture(scope="module")
def loaded():
    path = tiny_model_path()
    return load_model(path, experts_on_device=2, progress=False), load_tokenizer(path)


def _chat(monkeypatch, loaded, lines) -> tuple[int, list]:
    """Run cmd_chat on scripted prompt input (``KeyboardInterrupt`` items are Ctrl-C at the prompt)."""
    feed = iter(lines)

    def fake_input(prompt=""):
        item = next(feed, EOFError)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(cli, "_load", lambda args, chat: loaded)
    args = argparse.Namespace(max_new_tokens=8, temperature=0.0, top_p=1.0, seed=None)
    code = cli.cmd_chat(args)
    return code, list(feed)


def test_one_ctrl_c_at_the_prompt_asks_and_the_conversation_goes_on(monkeypatch, loaded, capsys) -> None:
    ctrl_c = KeyboardInterrupt
    lines = ["What is 2 + 3?", ctrl_c, "What is the capital of France?", ctrl_c, ctrl_c]
    code, left = _chat(monkeypatch, loaded, [*lines, "never read"])
    err = capsys.readouterr().err
    assert code == 0 and left == ["never read"]
    assert err.count("Ctrl-C again to quit and forget 1 turn(s)") == 1
    assert "Ctrl-C again to quit and forget 2 turn(s)" in err
    assert "bye (2 turn(s) forgotten: the conversation is not saved)" in err


def test_clear_confirms_and_leaving_says_what_is_forgotten(monkeypatch, loaded, capsys) -> None:
    code, _ = _chat(monkeypatch, loaded, ["What is 2 + 3?", "What is 3 + 4?", "/clear", "What is 1 + 1?", "/quit"])
    err = capsys.readouterr().err
    assert code == 0 and "(conversation cleared: 2 turn(s) forgotten)" in err
    assert "bye (1 turn(s) forgotten" in err


def test_ctrl_d_or_ctrl_c_with_nothing_to_lose_quits_at_once(monkeypatch, loaded, capsys) -> None:
    assert _chat(monkeypatch, loaded, [KeyboardInterrupt, "never read"]) == (0, ["never read"])
    assert _chat(monkeypatch, loaded, ["What is 2 + 3?", EOFError]) == (0, [])
    err = capsys.readouterr().err
    assert "Ctrl-C again" not in err and "bye (1 turn(s) forgotten" in err
