"""A chat widget over ``ChatSession`` that works in Colab (ipywidgets 7.7) and in Jupyter (ipywidgets 8).

Where widget callbacks arrive decides how an answer can be stopped:

- **Main thread** (Colab, classic Notebook 6): clicks queue until the running callback returns, and
  updates from other threads do not render in Colab (``docs/COLAB.md``). So the answer is generated
  inside the Send callback, the transcript is rewritten every few tokens, and the notebook's own
  interrupt (Colab's ■, Kernel → Interrupt) stops it: ``KeyboardInterrupt``, partial answer kept.
- **A kernel subshell** (JupyterLab 4 with ipykernel 7, ``commsOverSubshells``): SIGINT never reaches
  that thread, so the interrupt does nothing. The Send callback then hands the answer to a worker
  thread and returns, the next click is delivered at once, and the **Stop** button shown in this
  mode ends the answer (``ChatSession.stop``). Cells keep running meanwhile; the expert cache's lock
  keeps the model correct, and a second message to the same conversation is refused.

The way to stop is decided once, before the first answer, and kept (``ChatUI.subshell``). Deciding per click
does not work: ipykernel 7.4 routes a comm's next message to the shell it last published from, so in
JupyterLab the first Send after a cell touched the widget arrives on the main thread and later ones on
the subshell, and a widget that followed the thread offered Kernel → Interrupt for one answer and a
Stop button for the next. What does not change is whether the front end opened kernel subshells: when
it has (JupyterLab with ``commsOverSubshells``), every answer runs on a worker thread with the Stop
button, even one whose click came on the main thread (the main thread is then free, so the Stop click
is delivered there at once); otherwise (Colab, Notebook 6) every answer runs in the callback and the
interrupt stops it. The widget decides when it is built if the kernel already says, else at the first
callback (a click arriving off the main thread also means subshells), and never again.

The widget watches its session, so turns made with ``chat()`` from a cell appear as they stream, and a
widget built over a session that already has turns (a second ``ChatUI`` in a later cell, after ``chat()``
calls) shows them at once with their notes and the last answer's numbers, or the answer in flight.
Everything the buttons do is a method (``send``, ``stop``, ``clear``) and all state is Python
(``transcript``, ``sampling``, ``status``), so tests drive it headlessly. Only widget classes, traits
and calls present in both ipywidgets 7.7 and 8 are used (no ``Text.on_submit``, no 8-only layouts);
Ctrl+Enter / Shift+Enter is a small key handler shipped as a Javascript output beside the widget.
"""

from __future__ import annotations

import contextvars
import html
import json
import sys
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TextIO

from .generation import GenerationResult, GenerationStats, SamplingConfig
from .session import SessionBusy

if TYPE_CHECKING:
    from .session import ChatSession, ChatTurn

NOTE_MAIN_THREAD = (
    "Stop an answer with the notebook's interrupt: Colab's ■ beside the cell, or Kernel → Interrupt in "
    "Jupyter. The text so far is kept and the conversation goes on; clicks wait until the answer ends."
)
NOTE_SUBSHELL = (
    "Stop ends an answer early: the text so far is kept and the conversation goes on (Kernel → Interrupt "
    "does not reach it here). Cells can run meanwhile; a message to this conversation from a cell is "
    "refused until the answer ends."
)
NOTE_UNKNOWN = (
    "To stop an answer early: in Colab or Notebook 6 use the interrupt (■ / Kernel → Interrupt); in "
    "JupyterLab a Stop button appears here when it works. The text so far is kept."
)
STOP_NOTE = NOTE_MAIN_THREAD  # what Colab users read (kept for older imports)
# an answer's end, in words (GenerationStats.stop_reason)
STOP_WORDS = {
    "eos": "answer complete",
    "length": "max new tokens reached",
    "stopped": "stopped early",
    "interrupted": "stopped early",
    "out_of_memory": "out of GPU memory",
}
KEYS_HINT = "Ctrl+Enter (or Shift+Enter) sends, Enter starts a new line"
ROLE_NAMES = {"user": "You", "assistant": "Model"}
ROLE_COLORS = {"user": "#1a5fb4", "assistant": "#26a269"}
CSS_CHAT, CSS_PROMPT, CSS_SEND = "colab-helpers-chat", "colab-helpers-prompt", "colab-helpers-send"

# Ctrl/Cmd/Shift+Enter in the prompt clicks this chat's Send button. Registered once per page, in the
# capture phase so the notebook's own Shift+Enter / Ctrl+Enter (run cell) never sees the key. Blurring
# first makes the text box sync its value before the click reaches the kernel.
KEYS_JS = (
    "(function(){if(window.__colabHelpersChatKeys){return;}window.__colabHelpersChatKeys=true;"
    "window.addEventListener('keydown',function(e){"
    "if(e.key!=='Enter'||!(e.ctrlKey||e.metaKey||e.shiftKey)){return;}"
    "var t=e.target;if(!t||!t.closest){return;}var box=t.closest('." + CSS_PROMPT + "');if(!box){return;}"
    "e.preventDefault();e.stopPropagation();e.stopImmediatePropagation();"
    "var chat=box.closest('." + CSS_CHAT + "');var send=chat&&chat.querySelector('." + CSS_SEND + "');"
    "if(send&&!send.disabled){t.blur();send.click();}"
    "},true);})();"
)


# Notebook 6 (ipywidgets 7.7.1) loses a widget displayed by a Run All sent while the kernel was starting: the
# widget manager re-renders the cell and the view comes back hidden (docs/notebooks.md). The widget cannot
# see that from the kernel, so this output watches its own cell: when the chat is still not visible a few
# seconds after the output rendered, it says to run the cell again, and it removes the line once the chat
# shows. Classic Notebook only (``Jupyter.notebook``); JupyterLab and Colab do not lose the widget.
RERUN_LINE = (
    "The chat box did not appear (Notebook 6 loses widgets shown while the kernel was still starting): "
    "run this cell again to show it."
)
WATCH_JS = (
    "(function(el){if(!(window.Jupyter&&window.Jupyter.notebook)||(window.google&&window.google.colab)){return;}"
    "var node=el&&(el.jquery?el[0]:el);if(!node){return;}var started=Date.now();"
    "var timer=setInterval(function(){var out=node.closest&&node.closest('.output');"
    "var age=Date.now()-started;if(!out){if(age>60000){clearInterval(timer);}return;}"
    "var chat=out.querySelector('." + CSS_CHAT + "');var shown=!!chat&&chat.offsetParent!==null;"
    "if(shown){node.textContent='';clearInterval(timer);return;}"
    "if(age>5000&&!node.textContent){var line=document.createElement('div');line.className='colab-helpers-rerun';"
    "line.style.color='#c01c28';line.textContent=" + json.dumps(RERUN_LINE) + ";node.appendChild(line);}"
    "if(age>600000){clearInterval(timer);}},500);"
    "})(typeof element!=='undefined'?element:null);"
)


def _widgets():
    """ipywidgets, imported only when a UI is built (core modules never import it)."""
    try:
        import ipywidgets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the chat widget needs ipywidgets: pip install 'ipywidgets>=7.7'") from err
    return ipywidgets


def kernel_has_subshells() -> bool | None:
    """Whether the front end opened kernel subshells (JupyterLab's ``commsOverSubshells``): True/False when an
    ipykernel with subshell support runs this code, None when nothing says (no kernel, an older ipykernel)."""
    kernel_module = sys.modules.get("ipykernel.kernelbase")
    if kernel_module is None:
        return None
    kernel_class = kernel_module.Kernel
    if not kernel_class.initialized():
        return None
    manager = getattr(getattr(kernel_class.instance(), "shell_channel_thread", None), "manager", None)
    if manager is None or not hasattr(manager, "list_subshell"):
        return None
    try:
        return bool(manager.list_subshell())
    except Exception:  # the kernel's internals changed: fall back to the first callback's thread
        return None


def max_new_tokens_cap(context: int, limit: int = 2048) -> int:
    """The slider's top: a quarter of the context stays for the conversation, so a useful prompt always fits
    (at the context length itself every message would be refused)."""
    return max(1, min(limit, int(context) - max(1, int(context) // 4)))


def _vram_gb(model: Any) -> float | None:
    """GB in use on the model's GPU right now (None on a CPU)."""
    import torch

    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration):
        return None
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 1e9


def stats_line(stats: GenerationStats | None) -> str:
    """The short line under the chat, in words: tokens, speed, cache hit rate, prefetch precision, GPU memory
    (on a GPU only) and how the answer ended."""
    if stats is None:
        return ""
    parts = [f"{stats.new_tokens} tokens", f"{stats.tokens_per_s:.2f} tok/s", f"cache hit rate {stats.hit_rate:.0%}"]
    parts.append(f"prefetch precision {stats.prefetch_precision:.0%}")
    if stats.vram_gb is not None:
        parts.append(f"VRAM {stats.vram_gb:.2f} GB in use")
    parts.append(STOP_WORDS.get(stats.stop_reason, stats.stop_reason))
    return " · ".join(parts)


def turn_note(turn: ChatTurn) -> str | None:
    """The grey note after an answer, from what the session recorded: every view shows the same."""
    if turn.error:
        return "[error]"
    if turn.stop_reason in ("interrupted", "stopped"):
        return "[stopped]"
    if turn.stop_reason == "length":
        return "[max new tokens reached]"
    return None


def render_transcript(
    turns: list[tuple[str, str]], notes: dict[int, str] | None = None, cursor: bool = False, forgotten: int = 0
) -> str:
    """The transcript as HTML; every message is escaped (``& < >``), newlines kept. ``forgotten`` turns that no
    longer fit the context are named in a first line (the model does not see them any more)."""
    notes = notes or {}
    rows = []
    if forgotten:
        rows.append(
            f'<div class="colab-helpers-forgotten" style="color:#888;font-style:italic;margin:4px 0">'
            f"{forgotten} earlier turn(s) no longer fit the model's context and were forgotten: the model does not "
            "see them any more (lower max new tokens, or Clear, to make room)</div>"
        )
    for i, (role, text) in enumerate(turns):
        who = ROLE_NAMES.get(role, role)
        color = ROLE_COLORS.get(role, "#444")
        body = html.escape(text, quote=False)
        if cursor and i == len(turns) - 1 and role == "assistant":
            body += "▌"
        note = f' <span style="color:#888">{html.escape(notes[i], quote=False)}</span>' if i in notes else ""
        rows.append(
            f'<div style="margin:4px 0"><b style="color:{color}">{who}:</b> '
            f'<span style="white-space:pre-wrap">{body}</span>{note}</div>'
        )
    if not turns and not forgotten:
        rows.append('<div style="color:#888">No messages yet: type below and press Send (or Ctrl+Enter).</div>')
    return '<div style="font-family:sans-serif;line-height:1.4">' + "".join(rows) + "</div>"


class ChatUI:
    """Transcript, prompt box, Send/Stop/Clear, sampling sliders and one status line over a ``ChatSession``.

    ``send(text)``, ``stop()`` and ``clear()`` are what the buttons call; ``transcript`` is the list of
    ``(role, text)`` shown, ``status`` the last message to the user. Display with ``display(ui)`` or by
    ending a cell with ``ui``.
    """

    def __init__(
        self,
        session: ChatSession,
        refresh_every: int = 4,
        refresh_seconds: float = 0.5,
        max_new_tokens_limit: int = 2048,
        title: str | None = None,
        height: str = "24em",
    ) -> None:
        w = _widgets()
        self.session = session
        self.refresh_every = max(1, refresh_every)
        self.refresh_seconds = refresh_seconds
        self.height = height
        self.status = ""
        self.status_line = ""
        self.last_result: GenerationResult | None = None
        self.renders = 0  # how many times the transcript HTML was rewritten (streaming is visible in tests)
        self.worker: threading.Thread | None = None  # the answer's thread in the Stop-button mode
        # how answers stop, decided once (module docstring): True = worker thread + Stop button (kernel subshells,
        # JupyterLab), False = in the callback + the notebook's interrupt (Colab, Notebook 6), None = not known yet
        self.subshell: bool | None = False if "google.colab" in sys.modules else kernel_has_subshells() or None
        self._error = False  # the status line shows an error (cleared by the next action)
        self._box_message: str | None = None  # the prompt box's text while its answer runs (cleared at "start")
        self._just_answered = False  # the box was emptied by the last answer and not touched since
        self._pieces = 0
        self._started = self._last_refresh = 0.0
        # session events (any thread) and the first look at the session take turns, so a widget built while an
        # answer ends never misses that end (it would stay "generating…" with Send disabled)
        self._events = threading.RLock()

        s = session.sampling
        limit = max_new_tokens_cap(int(session.max_context), max_new_tokens_limit)
        knob = {"style": {"description_width": "initial"}, "continuous_update": False}
        self.max_new_tokens = w.IntSlider(
            value=min(s.max_new_tokens, limit),
            min=1,
            max=limit,
            step=1,
            description="max new tokens",
            layout=w.Layout(width="auto"),
            **knob,
        )
        self.temperature = w.FloatSlider(
            value=s.temperature,
            min=0.0,
            max=1.5,
            step=0.05,
            description="temperature (0 = greedy)",
            layout=w.Layout(width="auto"),
            **knob,
        )
        self.top_p = w.FloatSlider(
            value=s.top_p, min=0.05, max=1.0, step=0.05, description="top-p", layout=w.Layout(width="auto"), **knob
        )
        for slider in (self.max_new_tokens, self.temperature, self.top_p):
            slider.observe(self._on_knob, names="value")
        self._on_knob()

        self.header = w.HTML(value=f"<b>{html.escape(title, quote=False)}</b>" if title else "")
        self.transcript_html = w.HTML(value="", layout=w.Layout(width="auto"))
        # synced on blur (a click elsewhere, or Ctrl+Enter), so the Send click always reads the whole text
        self.prompt = w.Textarea(
            value="",
            placeholder=f"Type a message. {KEYS_HINT}.",
            rows=3,
            continuous_update=False,
            layout=w.Layout(width="auto"),
        )
        self.prompt.add_class(CSS_PROMPT)
        self.prompt.observe(self._on_typed, names="value")
        self.send_button = w.Button(description="Send", button_style="primary", icon="paper-plane", tooltip=KEYS_HINT)
        self.send_button.add_class(CSS_SEND)
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.clear_button = w.Button(description="Clear", icon="trash")
        self.send_button.on_click(self._on_send_click)
        self.stop_button.on_click(self._on_stop_click)
        self.clear_button.on_click(self._on_clear_click)
        self.status_html = w.HTML(value="", layout=w.Layout(width="auto"))
        self.note_html = w.HTML(value="", layout=w.Layout(width="auto"))
        self.widget = w.VBox(
            [
                self.header,
                self.transcript_html,
                self.prompt,
                w.HBox([self.send_button, self.stop_button, self.clear_button]),
                # a grid of equal columns, as many as fit: never one slider stretched alone over a whole row
                w.HBox(
                    [self.max_new_tokens, self.temperature, self.top_p],
                    layout=w.Layout(
                        width="auto",
                        display="grid",
                        grid_template_columns="repeat(auto-fit, minmax(17em, 1fr))",
                        grid_gap="0 1em",
                    ),
                ),
                self.status_html,
                self.note_html,
            ],
            layout=w.Layout(width="auto"),
        )
        self.widget.add_class(CSS_CHAT)
        self._show_mode()
        with self._events:
            session.watchers.append(self._on_session)
            self._show_session()

    # ---- state -----------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while the session answers (a message from this widget or from ``chat()`` in a cell)."""
        return self.session.busy

    @property
    def transcript(self) -> list[tuple[str, str]]:
        """What the model remembers, then the message in flight: ``[(role, text), ...]``."""
        out: list[tuple[str, str]] = []
        for turn in self.session.turns:
            out += [("user", turn.user), ("assistant", turn.assistant)]
        flight = self.session.in_flight
        if flight is not None:
            out += [("user", flight[0]), ("assistant", flight[1])]
        return out

    @property
    def sampling(self) -> SamplingConfig:
        """The session's sampling settings, which the sliders write (so ``chat()`` uses them too)."""
        return self.session.sampling

    def _on_knob(self, change: dict | None = None) -> None:
        """Sliders → ``session.sampling`` (read by the next answer; the seed is kept)."""
        if change is not None:
            self._heard_from_front_end()
            self._clear_error()
        self.session.sampling = replace(
            self.session.sampling,
            max_new_tokens=int(self.max_new_tokens.value),
            temperature=float(self.temperature.value),
            top_p=float(self.top_p.value),
        )

    # ---- actions ---------------------------------------------------------------------------------

    def send(self, text: str | None = None) -> GenerationResult | None:
        """Send ``text`` (default: the prompt box) and stream the answer; None when nothing was generated."""
        message = self.prompt.value if text is None else text
        if text is None:
            self._box_message = message  # the box empties when the answer starts (it no longer looks unsent)
        try:
            result = self.session.send(message, sampling=self.sampling)
        except (ValueError, SessionBusy) as err:  # empty, too long or busy: nothing changed, the text stays
            self._set_status(str(err), error=True)
            return None
        except KeyboardInterrupt:  # stopped before generation began (tokenizing): nothing to keep
            self._restore_box(message)
            self._set_status("stopped before the answer began; the conversation is unchanged")
            return None
        except Exception as err:  # a bug: say so on the status line (never a stale "generating…"), then raise
            self._restore_box(message)
            self._set_status(f"{type(err).__name__}: {err}", error=True)
            raise
        finally:
            self._box_message = None
        if text is None and result.stats.stop_reason == "out_of_memory":
            self._restore_box(message)  # nothing useful came back: the text stays to send again
        elif text is None:
            self._just_answered = True  # a second click of a double-click, delivered now, finds the box empty
        return result

    def _restore_box(self, message: str) -> None:
        """Put the unsent text back when the box was emptied at the answer's start and the answer failed."""
        if not self.prompt.value and message:
            self.prompt.value = message

    def stop(self) -> bool:
        """End the running answer after its current token; False when none runs."""
        return self.session.stop()

    def clear(self) -> None:
        """Forget the conversation (and its KV cache); sliders keep their values."""
        self._clear_error()
        try:
            self.session.clear()  # the session tells every view (see ``_on_session``)
        except SessionBusy as err:
            self._set_status(str(err), error=True)

    # ---- session events (any thread, any sender) -------------------------------------------------

    def _show_session(self) -> None:
        """Show the session as it is now: earlier turns with their notes, the last answer's numbers, or the
        answer in flight (Send disabled until its "end" event).

        ``in_flight``, not ``busy``: the session clears it before telling its views "end" (and still holds its
        lock a moment after), so a widget that sees it set is sure to be told the end."""
        if self.session.in_flight is not None:
            self._pieces = 0
            self._started = self._last_refresh = time.perf_counter()
            self._set_enabled(False)
            self._set_status("generating…")
            self._render(cursor=True)
        elif self.session.turns and self.session.last_result is not None:
            self._finish(self.session.last_result)
        else:
            self._render()

    def _on_session(self, event: str, detail: object) -> None:
        with self._events:
            self._on_session_event(event, detail)

    def _on_session_event(self, event: str, detail: object) -> None:
        if event == "start":
            if self._box_message is not None and self.prompt.value == self._box_message:
                self.prompt.value = ""  # this widget's own message: shown in the transcript from now on
            self._pieces = 0
            self._started = self._last_refresh = time.perf_counter()
            self._set_enabled(False)
            self._set_status("generating…")
            self._render(cursor=True)
        elif event == "text":
            self._on_text(str(detail))
        elif event == "end":
            self._set_enabled(True)
            if isinstance(detail, GenerationResult):
                self._finish(detail)
            elif isinstance(detail, KeyboardInterrupt):
                self._set_status("stopped before the answer began; the conversation is unchanged")
                self._render()
            else:
                self._set_status(f"{type(detail).__name__}: {detail}", error=True)
                self._render()
        elif event == "clear":
            self.last_result = None
            self._just_answered = False
            self._set_status("conversation cleared")
            self._render()

    def _on_text(self, piece: str) -> None:
        self._pieces += 1
        now = time.perf_counter()
        if self._pieces % self.refresh_every == 0 or now - self._last_refresh >= self.refresh_seconds:
            self._last_refresh = now
            self._render(cursor=True)
            self._live_stats()

    def _finish(self, result: GenerationResult) -> None:
        self.last_result = result
        messages = []
        if result.extra.get("dropped_turns"):
            n = result.extra["dropped_turns"]
            messages.append(f"the {n} oldest turn(s) no longer fit the context and were forgotten")
        if result.stats.stop_reason in ("interrupted", "stopped"):
            messages.append("stopped: the partial answer is kept and the conversation goes on")
        if result.error:
            messages.append(result.error)
        self._set_status("; ".join(messages), error=bool(result.error), stats=stats_line(result.stats))
        self._render()

    def _live_stats(self) -> None:
        """Tokens, speed, cache hit rate, prefetch precision (and GPU memory on a GPU) so far in this answer; one
        streamed text piece is about one token."""
        elapsed = time.perf_counter() - self._started
        parts = [f"~{self._pieces} tokens so far", f"~{self._pieces / max(elapsed, 1e-6):.1f} tok/s"]
        stats = getattr(getattr(self.session.model, "expert_cache", None), "stats", None)
        if stats is not None:
            parts += [f"cache hit rate {stats.hit_rate:.0%}", f"prefetch precision {stats.precision:.0%}"]
        vram = _vram_gb(self.session.model)
        if vram is not None:
            parts.append(f"VRAM {vram:.2f} GB in use")
        self._set_status("generating…", stats=" · ".join(parts))

    # ---- rendering -------------------------------------------------------------------------------

    def _render(self, cursor: bool = False) -> None:
        notes = {2 * i + 1: note for i, turn in enumerate(self.session.turns) if (note := turn_note(turn))}
        body = render_transcript(self.transcript, notes, cursor, self.session.forgotten)
        # newest text at the bottom, kept in view: a column-reverse scroller starts scrolled to its end
        self.transcript_html.value = (
            f'<div class="colab-helpers-transcript" style="max-height:{self.height};overflow-y:auto;'
            "display:flex;flex-direction:column-reverse;border:1px solid #ccc;border-radius:4px;"
            f'padding:4px 8px;box-sizing:border-box">{body}</div>'
        )
        self.renders += 1

    def _set_status(self, text: str, error: bool = False, stats: str = "") -> None:
        """The one status line: a message (red for errors) and the answer's numbers."""
        self.status = text
        self._error = error
        self.status_line = " · ".join(p for p in (text, stats) if p)
        color = "#c01c28" if error else "#555"
        self.status_html.value = (
            f'<span class="colab-helpers-status" style="color:{color};font-family:monospace">'
            f"{html.escape(self.status_line)}</span>"
            if self.status_line
            else ""
        )

    def _set_enabled(self, enabled: bool) -> None:
        for control in (self.send_button, self.clear_button, self.prompt):
            control.disabled = not enabled
        self.stop_button.disabled = enabled

    def _clear_error(self) -> None:
        """The user acted again: a red message has been read; the last answer's numbers come back."""
        if self._error:
            self._set_status("", stats=stats_line(self.last_result.stats) if self.last_result else "")

    def _on_typed(self, change: dict) -> None:
        """The prompt box changed (synced on blur): an error has been read, the box is the user's again."""
        self._just_answered = False
        if change.get("new"):
            self._clear_error()

    def _show_mode(self) -> None:
        """Stop button and note for where callbacks run (see the module docstring)."""
        note = {True: NOTE_SUBSHELL, False: NOTE_MAIN_THREAD, None: NOTE_UNKNOWN}[self.subshell]
        self.stop_button.layout.display = None if self.subshell else "none"
        self.note_html.value = f'<div style="color:#666;font-size:90%;line-height:1.4">{html.escape(note)}</div>'

    def _heard_from_front_end(self) -> None:
        """A callback arrived: decide how answers stop, if the widget was built before the kernel could say
        (once: see the module docstring)."""
        if self.subshell is not None:
            return
        off_main = threading.current_thread() is not threading.main_thread()
        self.subshell = off_main or bool(kernel_has_subshells())
        self._show_mode()

    # ---- button callbacks ------------------------------------------------------------------------

    def _on_send_click(self, _button: Any = None) -> None:
        self._heard_from_front_end()
        empty = not (self.prompt.value or "").strip()
        if empty and (self.busy or self._just_answered):
            return  # a double-click's second click: the box was emptied by the answer it started
        self._clear_error()
        if self.busy:
            self._set_status("still answering: wait for the answer or stop it", error=True)
            return
        if not self.subshell:  # main thread: generate here (the only place updates render in Colab)
            self._send_quietly()
            return
        # the worker keeps the click's context, so the kernel still routes this widget's next clicks to the
        # subshell (ipykernel 7 sends a comm's messages to where it last published from)
        context = contextvars.copy_context()
        self.worker = threading.Thread(
            target=context.run, args=(self._send_quietly,), name="colab-helpers-chat", daemon=True
        )
        self.worker.start()  # the callback returns: the next click (Stop) is delivered at once

    def _send_quietly(self) -> None:
        try:
            self.send()
        except Exception:  # already shown in the status line; a callback's traceback would go to a log
            pass

    def _on_stop_click(self, _button: Any = None) -> None:
        self._heard_from_front_end()
        if self.stop():
            self._set_status("stopping…")

    def _on_clear_click(self, _button: Any = None) -> None:
        self._heard_from_front_end()
        self.clear()

    def _ipython_display_(self) -> None:
        from IPython.display import Javascript, display

        display(self.widget)
        display(Javascript(KEYS_JS + WATCH_JS))


def open_chat(session: ChatSession, **kwargs: Any) -> ChatUI:
    """Build a ``ChatUI`` for ``session`` and display it (the notebook one-liner)."""
    from IPython.display import display

    ui = ChatUI(session, **kwargs)
    display(ui)
    return ui


def chat(
    message: str,
    session: ChatSession,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    out: TextIO | None = None,
) -> GenerationResult | None:
    """Plain-Python chat: print the answer as it streams, then the stats line; returns the result.

    Shares ``session`` (and so the conversation) with any ``ChatUI`` built on it. A bad prompt prints
    why instead of raising; Colab's stop button ends the answer and keeps it.
    """
    out = out or sys.stdout
    overrides = {
        k: v
        for k, v in {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}.items()
        if v is not None
    }
    sampling: SamplingConfig = replace(session.sampling, **overrides)

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    try:
        result = session.send(message, on_text=write, sampling=sampling)
    except (ValueError, SessionBusy) as err:
        print(f"not sent: {err}", file=out)
        return None
    print(file=out)
    if result.error:
        print(f"error: {result.error}", file=out)
    print(f"({stats_line(result.stats)})", file=out)
    return result


__all__ = [
    "ChatUI",
    "kernel_has_subshells",
    "max_new_tokens_cap",
    "NOTE_MAIN_THREAD",
    "NOTE_SUBSHELL",
    "STOP_NOTE",
    "chat",
    "open_chat",
    "render_transcript",
    "stats_line",
    "turn_note",
]
