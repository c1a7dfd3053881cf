"""The chat widget driven from code on the embedded model: what a user clicking in Colab would see.

nbval has no widget frontend, so the buttons' handlers are called directly and the assertions are on
Python state (``transcript``, ``status``, the session and its KV cache) and on the HTML the widget holds.
``IPYWIDGETS7_PATH`` (a folder made with ``pip install --no-deps --target DIR ipywidgets==7.7.1
ipython_genutils``) additionally runs the same flow under Colab's ipywidgets 7.7.
"""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("ipywidgets")

from colab_helpers.conversation import chat as chat_module  # noqa: E402
from colab_helpers.conversation.chat import STOP_WORDS, ChatUI, chat, max_new_tokens_cap, render_transcript  # noqa: E402
from colab_helpers.conversation.generation import SamplingConfig  # noqa: E402
from colab_helpers.conversation.session import ChatSession  # noqa: E402
from colab_helpers.model import load_model, load_tokenizer  # noqa: E402
from colab_helpers.weights.tiny import tiny_model_path  # noqa: E402

GREEDY = SamplingConfig(max_new_tokens=24)
IPYWIDGETS_7_API = {"Button", "FloatSlider", "HBox", "HTML", "IntSlider", "Layout", "Textarea", "VBox"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matrices are too small to split; one thread also avoids oversubscribed shared runners."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return load_model(tiny_model_path(), experts_on_device=2, progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tiny_model_path())


@pytest.fixture
def session(model, tokenizer) -> ChatSession:
    return ChatSession(model, tokenizer, GREEDY)


def stats_line_words(stop_reason: str) -> str:
    return STOP_WORDS[stop_reason]


def _watch(ui: ChatUI) -> list[tuple[str, bool]]:
    """Every value the transcript HTML takes, with whether Send was disabled at that moment."""
    seen: list[tuple[str, bool]] = []
    ui.transcript_html.observe(lambda change: seen.append((change["new"], ui.send_button.disabled)), names="value")
    return seen


def test_send_streams_the_answer_into_the_transcript(session) -> None:
    ui = ChatUI(session, refresh_every=2, refresh_seconds=60)
    seen = _watch(ui)
    live: list[str] = []
    ui.status_html.observe(lambda change: live.append(change["new"]), names="value")
    ui.prompt.value = "What is 2 + 3?"
    ui.send_button.click()
    result = ui.last_result
    assert result is not None and result.text
    assert ui.transcript == [("user", "What is 2 + 3?"), ("assistant", result.text)]
    streaming = [value for value, disabled in seen if "▌" in value]
    assert len(streaming) >= 3, "the transcript was not refreshed while tokens arrived"
    assert all(disabled for value, disabled in seen if "▌" in value), "Send stayed clickable during generation"
    assert not ui.send_button.disabled and not ui.clear_button.disabled and not ui.prompt.disabled and not ui.busy
    assert ui.prompt.value == ""
    assert "▌" not in ui.transcript_html.value and "What is 2 + 3?" in ui.transcript_html.value
    assert any("generating" in v and "tokens so far" in v and "tok/s" in v and "cache hit rate" in v for v in live)
    assert all(v.count("generating") <= 1 for v in live), "one status line, one 'generating…'"
    stats = ui.status_html.value
    assert "generating" not in stats
    assert "tok/s" in stats and "cache hit rate" in stats and "prefetch precision" in stats
    for log_like in ("pieces", "VRAM -", "[eos]", "[length]"):  # plain words (VRAM only on a GPU)
        assert not any(log_like in v for v in [*live, stats]), log_like
    assert stats_line_words(result.stats.stop_reason) in stats


def test_interrupt_mid_stream_keeps_the_partial_answer_and_the_next_turn_works(session, model, tokenizer) -> None:
    ui = ChatUI(session)
    on_text = ui._on_text
    pieces: list[str] = []

    def stop_after_three(piece: str) -> None:  # what Colab's stop button does: KeyboardInterrupt mid-generate
        on_text(piece)
        pieces.append(piece)
        assert ui.send_button.disabled and ui.busy
        if len(pieces) == 3:
            raise KeyboardInterrupt

    ui._on_text = stop_after_three
    stopped = ui.send("Recite the Zen of Python.")
    assert stopped is not None and stopped.stats.stop_reason == "interrupted"
    assert stopped.text and stopped.text == "".join(pieces)
    assert ui.transcript == [("user", "Recite the Zen of Python."), ("assistant", stopped.text)]
    assert session.turns[-1].assistant == stopped.text
    assert "stopped" in ui.status and "[stopped]" in ui.transcript_html.value
    assert not ui.busy and not ui.send_button.disabled and not ui.clear_button.disabled and not ui.prompt.disabled
    assert session.cached_tokens == session._cache.get_seq_length() > 0
    model.expert_cache.check_invariants()

    ui._on_text = on_text
    follow = ui.send("What is 2 + 3?")
    assert follow is not None and follow.stats.stop_reason in ("eos", "length") and follow.text
    assert [role for role, _ in ui.transcript] == ["user", "assistant", "user", "assistant"]
    # the reused KV cache gives what a fresh session with the same history computes from scratch
    fresh = ChatSession(model, tokenizer, GREEDY)
    fresh.turns = list(session.turns[:1])
    assert fresh.send("What is 2 + 3?").text == follow.text
    assert session.cached_tokens == session._cache.get_seq_length()


def test_interrupt_before_generation_changes_nothing(session, monkeypatch) -> None:
    ui = ChatUI(session)
    ui.send("What is 2 + 3?")
    before = list(ui.transcript)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(session, "send", interrupted)
    assert ui.send("What is the capital of France?") is None
    assert ui.transcript == before and "unchanged" in ui.status
    assert not ui.busy and not ui.send_button.disabled


def test_bad_prompts_show_a_message_and_break_nothing(model, tokenizer) -> None:
    session = ChatSession(model, tokenizer, GREEDY, max_context=64)
    ui = ChatUI(session)
    first = ui.send("What is 2 + 3?")
    before, cached = list(ui.transcript), session.cached_tokens

    ui.prompt.value = "   "
    ui.send_button.click()
    assert "empty message" in ui.status and ui.transcript == before

    ui.prompt.value = "word " * 200
    ui.send_button.click()
    assert "prompt is" in ui.status and "shorten it" in ui.status
    assert ui.prompt.value == "word " * 200, "the text to fix must stay in the box"
    assert ui.transcript == before and session.cached_tokens == cached
    assert not ui.busy and not ui.send_button.disabled and not ui.prompt.disabled
    assert "prompt is" not in ui.transcript_html.value and first.text in ui.transcript_html.value

    again = ui.send("What is 3 + 4?")
    assert again is not None and again.text and len(ui.transcript) == 4
    assert "prompt is" not in ui.status_line and "tok/s" in ui.status_line


def test_clear_forgets_the_conversation_and_keeps_the_sliders(session) -> None:
    ui = ChatUI(session)
    ui.max_new_tokens.value = 7
    ui.send("What is 2 + 3?")
    assert session.cached_tokens > 0
    ui.clear_button.click()
    assert ui.transcript == [] and session.turns == [] and session.cached_tokens == 0
    assert "cleared" in ui.status and "No messages yet" in ui.transcript_html.value and "tok/s" not in ui.status_line
    assert ui.max_new_tokens.value == 7 and session.sampling.max_new_tokens == 7
    assert ui.send("What is the capital of France?").text


def test_sliders_reach_the_sampling_config(session, monkeypatch) -> None:
    import colab_helpers.conversation.session as session_module

    ui = ChatUI(session)
    ui.max_new_tokens.value = 3
    ui.temperature.value = 0.7
    ui.top_p.value = 0.9
    assert (session.sampling.max_new_tokens, session.sampling.temperature, session.sampling.top_p) == (3, 0.7, 0.9)
    assert ui.sampling is session.sampling

    used: list[SamplingConfig] = []
    real = session_module.generate_stream

    def spy(model, tokenizer, ids, sampling, *args, **kwargs):
        used.append(sampling)
        return real(model, tokenizer, ids, sampling, *args, **kwargs)

    monkeypatch.setattr(session_module, "generate_stream", spy)
    result = ui.send("Recite the Zen of Python.")
    assert used[-1].max_new_tokens == 3 and used[-1].temperature == 0.7 and used[-1].top_p == 0.9
    assert used[-1].generate_kwargs()["do_sample"] is True
    assert result.stats.new_tokens <= 3
    if result.stats.stop_reason == "length":
        assert "[max new tokens reached]" in ui.transcript_html.value


def test_transcript_html_is_escaped() -> None:
    html = render_transcript([("user", "<script>alert(1)</script> & <b>x</b>"), ("assistant", "a < b > c")])
    assert "<script>" not in html and "<b>x</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;x&lt;/b&gt;" in html and "a &lt; b &gt; c" in html


def test_plain_chat_prints_the_streamed_answer(session) -> None:
    out = io.StringIO()
    result = chat("What is 2 + 3?", session, max_new_tokens=12, out=out)
    text = out.getvalue()
    assert result is not None and text.startswith(result.text) and "tok/s" in text
    assert session.sampling.max_new_tokens == GREEDY.max_new_tokens, "a per-call override must not stick"
    out = io.StringIO()
    assert chat("  ", session, out=out) is None and "not sent: empty message" in out.getvalue()
    assert len(session.turns) == 1


def test_a_turn_made_with_chat_in_a_cell_streams_into_the_widget(session) -> None:
    ui = ChatUI(session, refresh_every=1, refresh_seconds=60)
    seen = _watch(ui)
    result = chat("What is 2 + 3?", session, out=io.StringIO())
    assert result is not None and ui.transcript == [("user", "What is 2 + 3?"), ("assistant", result.text)]
    assert sum("▌" in value for value, _ in seen) >= 3, "the cell's answer did not stream into the widget"
    assert all(disabled for value, disabled in seen if "▌" in value), "Send stayed clickable during the cell's answer"
    assert ui.transcript_html.value.count("What is 2 + 3?") == 1 and "▌" not in ui.transcript_html.value
    assert ui.last_result is result and "tok/s" in ui.status_line and not ui.send_button.disabled


def _stop_after(n: int):
    """An on_text that raises KeyboardInterrupt at the n-th piece: what Colab's ■ does to a cell's answer."""
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == n:
            raise KeyboardInterrupt

    return on_text


def test_a_new_widget_shows_the_conversation_so_far(session) -> None:
    """Turns made before the widget existed (``chat()`` in cells, or an earlier widget) show at once, with notes."""
    first = chat("What is 2 + 3?", session, out=io.StringIO())
    cut = chat("Recite the Zen of Python.", session, max_new_tokens=3, out=io.StringIO())
    stopped = session.send("What is the capital of France?", on_text=_stop_after(2))
    assert cut.stats.stop_reason == "length" and stopped.stats.stop_reason == "interrupted"

    ui = ChatUI(session)
    assert ui.transcript == [
        ("user", "What is 2 + 3?"),
        ("assistant", first.text),
        ("user", "Recite the Zen of Python."),
        ("assistant", cut.text),
        ("user", "What is the capital of France?"),
        ("assistant", stopped.text),
    ]
    page = ui.transcript_html.value
    assert "No messages yet" not in page and page.count("What is 2 + 3?") == 1
    assert page.count("[max new tokens reached]") == 1 and page.count("[stopped]") == 1 and "▌" not in page
    order = [page.index(x) for x in ("[max new tokens reached]", "What is the capital of France?", "[stopped]")]
    assert order == sorted(order), "each note follows its own answer"
    assert ui.last_result is stopped and "tok/s" in ui.status_line and "stopped" in ui.status
    assert not ui.busy and not ui.send_button.disabled and not ui.prompt.disabled

    # a second widget over the same session (the chat cell re-run) shows the same, and both follow the next turn
    again = ChatUI(session)
    assert again.transcript_html.value == page
    follow = again.send("What is 3 + 4?")
    assert follow is not None and ui.transcript == again.transcript and len(ui.transcript) == 8
    assert ui.transcript_html.value == again.transcript_html.value and "[stopped]" in ui.transcript_html.value


def test_a_widget_built_during_an_answer_follows_it(session) -> None:
    """Built while an answer streams: the text in flight with the cursor, Send disabled, then the turn once."""
    built: list[ChatUI] = []

    def build_mid_answer(event: str, detail: object) -> None:
        if event == "text" and session.in_flight and len(session.in_flight[1]) > 0 and not built:
            built.append(ChatUI(session, refresh_every=1))

    session.watchers.append(build_mid_answer)
    result = chat("What is 2 + 3?", session, out=io.StringIO())
    ui = built[0]
    assert result is not None and ui.renders >= 2
    assert ui.transcript == [("user", "What is 2 + 3?"), ("assistant", result.text)]
    assert ui.transcript_html.value.count("What is 2 + 3?") == 1 and "▌" not in ui.transcript_html.value
    assert ui.last_result is result and "tok/s" in ui.status_line and "generating" not in ui.status_line
    assert not ui.send_button.disabled and ui.stop_button.disabled

    # the first look at a busy session: the message in flight with the cursor, Send disabled until the end
    seen: list[tuple[str, bool, str]] = []

    def build_while_busy(event: str, detail: object) -> None:
        if event == "text" and not seen:
            late = ChatUI(session)
            seen.append((late.transcript_html.value, late.send_button.disabled, late.status))

    session.watchers.append(build_while_busy)
    chat("What is the capital of France?", session, out=io.StringIO())
    page, disabled, status = seen[0]
    assert "What is the capital of France?" in page and "▌" in page and disabled and status == "generating…"


def test_widgets_built_on_one_thread_while_another_answers_all_end_ready(session) -> None:
    """A widget built just as an answer ends (cell on the main thread, answer on a worker) never stays disabled."""
    worker = threading.Thread(target=chat, args=("Recite the Zen of Python.", session), kwargs={"out": io.StringIO()})
    worker.start()
    uis = [ChatUI(session)]
    while worker.is_alive() and len(uis) < 200:
        uis.append(ChatUI(session))
    worker.join(timeout=120)
    assert len(uis) > 2, "no widget was built during the answer"
    final = session.turns[-1].assistant
    for ui in uis:
        assert not ui.send_button.disabled and ui.stop_button.disabled and "▌" not in ui.transcript_html.value
        assert final in ui.transcript_html.value and "tok/s" in ui.status_line and "generating" not in ui.status_line


def test_no_stale_status_after_an_error(session, monkeypatch) -> None:
    ui = ChatUI(session)

    def broken(*args, **kwargs):
        raise KeyError(5)

    monkeypatch.setattr("colab_helpers.conversation.session.generate_stream", broken)
    ui.prompt.value = "What is 2 + 3?"
    ui.send_button.click()  # the callback swallows it; the status line says what happened
    assert "KeyError" in ui.status and "generating" not in ui.status_line and "#c01c28" in ui.status_html.value
    assert not ui.busy and not ui.send_button.disabled and ui.stop_button.disabled and ui.transcript == []
    assert ui.prompt.value == "What is 2 + 3?", "the unsent text stays in the box"


def test_on_a_subshell_the_answer_runs_on_a_worker_and_stop_ends_it(session, model) -> None:
    """JupyterLab's commsOverSubshells: callbacks arrive on a non-main thread, where SIGINT never lands."""
    ui = ChatUI(session, refresh_every=1)
    assert ui.stop_button.layout.display == "none" and "Stop" in ui.note_html.value  # mode not known yet
    session.sampling = replace(session.sampling, max_new_tokens=200)
    first_text = threading.Event()
    session.watchers.append(lambda event, detail: first_text.set() if event == "text" else None)

    def click_from_a_subshell(button) -> None:
        thread = threading.Thread(target=button.click)
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive(), "a callback on a subshell must return at once"

    ui.prompt.value = "Recite the Zen of Python."
    click_from_a_subshell(ui.send_button)
    assert ui.subshell is True and ui.stop_button.layout.display is None and "Stop ends" in ui.note_html.value
    assert first_text.wait(timeout=120) and ui.busy and not ui.stop_button.disabled and ui.send_button.disabled
    click_from_a_subshell(ui.send_button)  # a second Send during the answer is refused, not interleaved
    click_from_a_subshell(ui.stop_button)
    ui.worker.join(timeout=120)
    result = ui.last_result
    assert result is not None and result.stats.stop_reason == "stopped" and 0 < result.stats.new_tokens < 200
    assert "[stopped]" in ui.transcript_html.value and "stopped" in ui.status
    assert [t.user for t in session.turns] == ["Recite the Zen of Python."]
    assert not ui.busy and ui.stop_button.disabled and not ui.send_button.disabled and ui.prompt.value == ""
    model.expert_cache.check_invariants()


def test_main_thread_front_ends_keep_the_interrupt_route(session) -> None:
    ui = ChatUI(session)
    ui.max_new_tokens.value = 5  # any callback on the main thread tells the widget where it runs
    assert ui.subshell is False and ui.stop_button.layout.display == "none"
    assert "Interrupt" in ui.note_html.value and "■" in ui.note_html.value


def test_layout_and_keys_are_wired_for_the_browser(session) -> None:
    ui = ChatUI(session)
    assert chat_module.CSS_PROMPT in ui.prompt._dom_classes and chat_module.CSS_SEND in ui.send_button._dom_classes
    assert chat_module.CSS_CHAT in ui.widget._dom_classes and not ui.prompt.continuous_update
    assert "max-height" in ui.transcript_html.value and "column-reverse" in ui.transcript_html.value
    for name in (chat_module.CSS_PROMPT, chat_module.CSS_CHAT, chat_module.CSS_SEND, "ctrlKey", "shiftKey"):
        assert name in chat_module.KEYS_JS
    assert ui.prompt.layout.width == "auto" and ui.widget.layout.width == "auto"


def test_chat_module_uses_only_the_ipywidgets_api_shared_by_7_7_and_8() -> None:
    tree = ast.parse(Path(chat_module.__file__).read_text())
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "w"
    }
    assert used and used <= IPYWIDGETS_7_API, f"widgets outside the 7.7/8 common set: {used - IPYWIDGETS_7_API}"
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert "on_submit" not in attributes, "Text.on_submit is deprecated in 7.7 and gone in 8"
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any("ipywidgets" in ast.unparse(n) for n in top_level), "ipywidgets must be imported lazily"


def test_importing_the_chat_module_does_not_import_ipywidgets() -> None:
    code = "import sys, colab_helpers.conversation.chat; print('ipywidgets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


IPYWIDGETS7_SCRIPT = textwrap.dedent(
    """
    import torch
    import ipywidgets
    assert ipywidgets.__version__.startswith("7."), ipywidgets.__version__
    from colab_helpers.conversation.chat import ChatUI
    from colab_helpers.conversation.generation import SamplingConfig
    from colab_helpers.model import load_model, load_tokenizer
    from colab_helpers.conversation.session import ChatSession
    from colab_helpers.weights.tiny import tiny_model_path

    torch.set_num_threads(1)
    path = tiny_model_path()
    session = ChatSession(load_model(path, experts_on_device=2, progress=False), load_tokenizer(path),
                          SamplingConfig(max_new_tokens=16))
    ui = ChatUI(session, refresh_every=2)
    ui.max_new_tokens.value = 12
    ui.prompt.value = "What is 2 + 3?"
    ui.send_button.click()
    assert ui.transcript[-1][0] == "assistant" and ui.transcript[-1][1], ui.transcript
    assert session.sampling.max_new_tokens == 12 and ui.renders > 3
    again = ChatUI(session)  # a widget built later shows the conversation so far
    assert again.transcript == ui.transcript and "No messages yet" not in again.transcript_html.value
    assert again.transcript_html.value == ui.transcript_html.value and "tok/s" in again.status_line
    ui.send("   ")
    assert "empty" in ui.status
    ui.clear_button.click()
    assert ui.transcript == []
    print("ok", ipywidgets.__version__)
    """
)


@pytest.mark.skipif(not os.environ.get("IPYWIDGETS7_PATH"), reason="set IPYWIDGETS7_PATH to an ipywidgets 7.7 install")
def test_the_widget_works_with_colab_ipywidgets_7() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.environ["IPYWIDGETS7_PATH"], os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", IPYWIDGETS7_SCRIPT], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith("ok 7.")


# ---- issue 22: what a user touches ---------------------------------------------------------------------------


def test_a_double_click_on_send_answers_once_and_shows_no_error(session) -> None:
    """Notebook 6 delivers the second click of a double-click after the answer, with the box already emptied: it
    is ignored (no red "empty message" over the numbers). A click on an empty box after the user typed, or
    before any answer, still says why nothing was sent."""
    ui = ChatUI(session)
    ui.prompt.value = "What is 2 + 3?"
    ui.send_button.click()
    numbers = ui.status_line
    ui.send_button.click()  # the second click of the double-click
    assert len(session.turns) == 1 and ui.status_line == numbers and "#c01c28" not in ui.status_html.value
    ui.prompt.value = "x"
    ui.prompt.value = ""  # the user typed, then emptied the box: a deliberate empty send
    ui.send_button.click()
    assert "empty message" in ui.status and len(session.turns) == 1


def test_the_message_leaves_the_box_when_its_answer_starts(session) -> None:
    ui = ChatUI(session)
    box_at_start: list[str] = []
    session.watchers.append(lambda event, _detail: box_at_start.append(ui.prompt.value) if event == "start" else None)
    ui.prompt.value = "What is 2 + 3?"
    ui.send_button.click()
    assert box_at_start == [""] and ui.transcript[0] == ("user", "What is 2 + 3?")


def test_a_red_error_clears_on_the_next_action(session) -> None:
    ui = ChatUI(session)
    ui.send("What is 2 + 3?")
    numbers = ui.status_line
    for act in (
        lambda: setattr(ui.prompt, "value", "a new message"),
        lambda: setattr(ui.temperature, "value", 0.5),
        lambda: ui.clear_button.click(),
    ):
        ui.send("   ")
        assert "#c01c28" in ui.status_html.value and "empty message" in ui.status
        act()
        assert "#c01c28" not in ui.status_html.value and "empty message" not in ui.status_line
    assert numbers  # the first two actions brought the numbers back, Clear says "cleared"


def test_the_max_new_tokens_slider_leaves_room_for_a_prompt(model, tokenizer) -> None:
    """At the slider's top a normal message still fits (it used to reach 1023 of 1024, where every message is
    refused); when old turns stop fitting, the transcript says so instead of dropping them silently."""
    session = ChatSession(model, tokenizer, GREEDY, max_context=128)
    ui = ChatUI(session)
    assert ui.max_new_tokens.max == max_new_tokens_cap(128) == 96
    assert max_new_tokens_cap(1024) == 768 and max_new_tokens_cap(8192) == 2048
    ui.max_new_tokens.value = ui.max_new_tokens.max
    assert ui.send("What is 2 + 3?") is not None, ui.status  # fits at the slider's top
    ui.max_new_tokens.value = 60
    for i in range(8):
        result = ui.send(f"Tell me about the number {i} in a few words please.")
        assert result is not None, ui.status  # never refused at a slider value the widget offers
        if session.forgotten:
            break
    assert session.forgotten > 0, "the conversation never outgrew the context: make the test's messages longer"
    assert "earlier turn(s) no longer fit the model" in ui.transcript_html.value
    ui.clear_button.click()
    assert session.forgotten == 0 and "no longer fit" not in ui.transcript_html.value


def test_the_stop_mode_is_decided_once_before_the_first_answer(session, monkeypatch) -> None:
    """JupyterLab delivers the first click after a cell on the main thread and later ones on a subshell: the widget
    keeps the Stop-button mode it chose (kernel subshells exist) for every answer, whichever thread clicks."""
    monkeypatch.setattr(chat_module, "kernel_has_subshells", lambda: True)
    ui = ChatUI(session)
    assert ui.subshell is True and ui.stop_button.layout.display is None and "Stop ends" in ui.note_html.value
    ui.prompt.value = "What is 2 + 3?"
    ui.send_button.click()  # on the main thread, as JupyterLab's first click after a cell
    assert ui.worker is not None, "the answer runs on a worker: the Stop button can end it"
    ui.worker.join(timeout=120)
    assert ui.subshell is True and ui.stop_button.layout.display is None and len(session.turns) == 1

    monkeypatch.setattr(chat_module, "kernel_has_subshells", lambda: None)
    nb6 = ChatUI(session)  # nothing known at build time: the first callback decides, then it stays
    assert nb6.subshell is None
    nb6.max_new_tokens.value = 9
    assert nb6.subshell is False
    thread = threading.Thread(target=nb6.top_p.__setattr__, args=("value", 0.5))
    thread.start()
    thread.join()
    assert nb6.subshell is False and nb6.stop_button.layout.display == "none"


def test_sliders_share_their_row_evenly_and_the_rerun_hint_ships(session) -> None:
    ui = ChatUI(session)
    row = ui.widget.children[4]
    assert row.layout.display == "grid" and "minmax" in row.layout.grid_template_columns
    assert {s.layout.width for s in (ui.max_new_tokens, ui.temperature, ui.top_p)} == {"auto"}
    assert "Jupyter.notebook" in chat_module.WATCH_JS and chat_module.CSS_CHAT in chat_module.WATCH_JS
    assert "run this cell again" in chat_module.WATCH_JS
