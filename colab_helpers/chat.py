"""A chat widget over ``ChatSession`` that works in Colab (ipywidgets 7.7) and in Jupyter (ipywidgets 8).

Colab renders only updates made by the running cell or callback, and queues clicks until that
callback returns (``docs`` in ``../shared/docs/COLAB.md``). So generation runs on the main thread
inside the Send callback and the transcript ``HTML`` is rewritten every few tokens; a Stop button could
never be clicked, so the UI points at Colab's own stop (■), which raises ``KeyboardInterrupt``: the
session keeps the partial answer and the UI restores itself in ``finally``.

Everything the buttons do is a method (``send``, ``clear``) and all state is Python (``transcript``,
``sampling``, ``status``), so tests drive the widget headlessly. Only widget classes, traits and calls
present in both ipywidgets 7.7 and 8 are used (no ``Text.on_submit``, no 8-only layouts).
"""

from __future__ import annotations

import html
import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TextIO

from .generation import GenerationResult, GenerationStats, SamplingConfig
from .session import SessionBusy

if TYPE_CHECKING:
    from .session import ChatSession

STOP_NOTE = (
    "To stop an answer early, use Colab's stop button (■ next to the cell, or Runtime → Interrupt execution): "
    "the text so far is kept and the conversation goes on. Clicks made during an answer wait until it ends."
)
ROLE_NAMES = {"user": "You", "assistant": "Model"}
ROLE_COLORS = {"user": "#1a5fb4", "assistant": "#26a269"}


def _widgets():
    """ipywidgets, imported only when a UI is built (core modules never import it)."""
    try:
        import ipywidgets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the chat widget needs ipywidgets: pip install 'ipywidgets>=7.7'") from err
    return ipywidgets


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
    """The short line under the chat: speed, cache hit rate, prefetch precision, VRAM, why it stopped."""
    if stats is None:
        return ""
    parts = [f"{stats.new_tokens} tokens", f"{stats.tokens_per_s:.2f} tok/s", f"cache hit rate {stats.hit_rate:.0%}"]
    parts.append(f"prefetch precision {stats.prefetch_precision:.0%}")
    parts.append("VRAM -" if stats.vram_gb is None else f"VRAM {stats.vram_gb:.2f} GB")
    return " · ".join(parts) + f" · [{stats.stop_reason}]"


def render_transcript(turns: list[tuple[str, str]], notes: dict[int, str] | None = None, cursor: bool = False) -> str:
    """The transcript as HTML; every message is escaped (``& < >``), newlines kept."""
    notes = notes or {}
    rows = []
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
    if not rows:
        rows.append('<div style="color:#888">No messages yet: type below and press Send.</div>')
    return '<div style="font-family:sans-serif;line-height:1.4">' + "".join(rows) + "</div>"


class ChatUI:
    """Transcript, prompt box, Send/Clear, sampling sliders and a stats line over one ``ChatSession``.

    ``send(text)`` and ``clear()`` are what the buttons call; ``transcript`` is the list of
    ``(role, text)`` shown, ``status`` the last message to the user. Display with ``display(ui)``
    or by ending a cell with ``ui``.
    """

    def __init__(
        self,
        session: ChatSession,
        refresh_every: int = 4,
        refresh_seconds: float = 0.5,
        max_new_tokens_limit: int = 2048,
        title: str | None = None,
    ) -> None:
        w = _widgets()
        self.session = session
        self.refresh_every = max(1, refresh_every)
        self.refresh_seconds = refresh_seconds
        self.busy = False
        self.status = ""
        self.last_result: GenerationResult | None = None
        self.renders = 0  # how many times the transcript HTML was rewritten (streaming is visible in tests)
        self._pending: str | None = None  # the answer being streamed
        self._pending_user: str | None = None
        self._pieces = 0
        self._started = self._last_refresh = 0.0
        self._notes: dict[int, str] = {}  # transcript index -> note ("stopped", "error")

        s = session.sampling
        limit = max(1, min(max_new_tokens_limit, int(session.max_context) - 1))
        knob = {"style": {"description_width": "initial"}, "continuous_update": False}
        self.max_new_tokens = w.IntSlider(
            value=min(s.max_new_tokens, limit), min=1, max=limit, step=1, description="max new tokens", **knob
        )
        self.temperature = w.FloatSlider(
            value=s.temperature, min=0.0, max=1.5, step=0.05, description="temperature (0 = greedy)", **knob
        )
        self.top_p = w.FloatSlider(value=s.top_p, min=0.05, max=1.0, step=0.05, description="top-p", **knob)
        for slider in (self.max_new_tokens, self.temperature, self.top_p):
            slider.observe(self._on_knob, names="value")
        self._on_knob()

        self.header = w.HTML(value=f"<b>{html.escape(title, quote=False)}</b>" if title else "")
        self.transcript_html = w.HTML(value=render_transcript([]), layout=w.Layout(width="100%"))
        self.prompt = w.Textarea(
            value="", placeholder="Type a message, then press Send", rows=3, layout=w.Layout(width="100%")
        )
        self.send_button = w.Button(description="Send", button_style="primary", icon="paper-plane")
        self.clear_button = w.Button(description="Clear", icon="trash")
        self.send_button.on_click(self._on_send_click)
        self.clear_button.on_click(self._on_clear_click)
        self.stats_html = w.HTML(value="")
        self.status_html = w.HTML(value="")
        self.note_html = w.HTML(value=f'<span style="color:#666;font-size:90%">{html.escape(STOP_NOTE)}</span>')
        self.widget = w.VBox(
            [
                self.header,
                self.transcript_html,
                self.prompt,
                w.HBox([self.send_button, self.clear_button]),
                w.HBox([self.max_new_tokens, self.temperature, self.top_p]),
                self.stats_html,
                self.status_html,
                self.note_html,
            ],
            layout=w.Layout(width="100%"),
        )
        self._render()

    # ---- state -----------------------------------------------------------------------------------

    @property
    def transcript(self) -> list[tuple[str, str]]:
        """What the model remembers, then the message in flight: ``[(role, text), ...]``."""
        out: list[tuple[str, str]] = []
        for turn in self.session.turns:
            out += [("user", turn.user), ("assistant", turn.assistant)]
        if self._pending_user is not None:
            out.append(("user", self._pending_user))
            if self._pending is not None:
                out.append(("assistant", self._pending))
        return out

    @property
    def sampling(self) -> SamplingConfig:
        """The session's sampling settings, which the sliders write (so ``chat()`` uses them too)."""
        return self.session.sampling

    def _on_knob(self, change: dict | None = None) -> None:
        """Sliders → ``session.sampling`` (read by the next answer; the seed is kept)."""
        self.session.sampling = replace(
            self.session.sampling,
            max_new_tokens=int(self.max_new_tokens.value),
            temperature=float(self.temperature.value),
            top_p=float(self.top_p.value),
        )

    # ---- actions ---------------------------------------------------------------------------------

    def send(self, text: str | None = None) -> GenerationResult | None:
        """Send ``text`` (default: the prompt box) and stream the answer; None when nothing was generated."""
        if self.busy:  # a re-entrant call (should not happen: callbacks run one at a time)
            return None
        message = self.prompt.value if text is None else text
        self.busy = True
        self._set_enabled(False)
        self._pending_user, self._pending, self._pieces = (message or "").strip(), "", 0
        self._started = self._last_refresh = time.perf_counter()
        self._set_status("generating…")
        self._render(cursor=True)
        try:
            result = self.session.send(message, on_text=self._on_text, sampling=self.sampling)
        except ValueError as err:  # empty or too long: the session is untouched, the text stays in the box
            self._set_status(str(err), error=True)
            return None
        except KeyboardInterrupt:  # stopped before generation began (tokenizing): nothing to keep
            self._set_status("stopped before the answer began; the conversation is unchanged")
            return None
        except Exception as err:
            self._set_status(f"{type(err).__name__}: {err}", error=True)
            raise
        finally:
            self._pending_user = self._pending = None
            self.busy = False
            self._set_enabled(True)
            self._render()
        self._finish(result, from_box=text is None)
        return result

    def clear(self) -> None:
        """Forget the conversation (and its KV cache); sliders keep their values."""
        self.session.clear()
        self._notes.clear()
        self.last_result = None
        self.stats_html.value = ""
        self._set_status("conversation cleared")
        self._render()

    # ---- internals -------------------------------------------------------------------------------

    def _finish(self, result: GenerationResult, from_box: bool) -> None:
        self.last_result = result
        if from_box:
            self.prompt.value = ""
        index = len(self.transcript) - 1
        messages = []
        if result.extra.get("dropped_turns"):
            n = result.extra["dropped_turns"]
            messages.append(f"the {n} oldest turn(s) no longer fit the context and were forgotten")
            self._notes = {}
        if result.stats.stop_reason == "interrupted":
            self._notes[index] = "[stopped]"
            messages.append("stopped: the partial answer is kept and the conversation goes on")
        elif result.stats.stop_reason == "length":
            self._notes[index] = "[max new tokens reached]"
        if result.error:
            self._notes[index] = "[error]"
            messages.append(result.error)
        self.stats_html.value = f'<span style="font-family:monospace">{html.escape(stats_line(result.stats))}</span>'
        self._set_status("; ".join(messages), error=bool(result.error))
        self._render()

    def _on_text(self, piece: str) -> None:
        self._pending = (self._pending or "") + piece
        self._pieces += 1
        now = time.perf_counter()
        if self._pieces % self.refresh_every == 0 or now - self._last_refresh >= self.refresh_seconds:
            self._last_refresh = now
            self._render(cursor=True)
            self._live_stats()

    def _live_stats(self) -> None:
        """Speed, cache hit rate, prefetch precision and VRAM so far in this answer (text pieces ≈ tokens)."""
        elapsed = time.perf_counter() - self._started
        parts = [f"generating… {self._pieces} pieces", f"~{self._pieces / max(elapsed, 1e-6):.1f} tok/s"]
        stats = getattr(getattr(self.session.model, "expert_cache", None), "stats", None)
        if stats is not None:
            parts += [f"cache hit rate {stats.hit_rate:.0%}", f"prefetch precision {stats.precision:.0%}"]
        vram = _vram_gb(self.session.model)
        parts.append("VRAM -" if vram is None else f"VRAM {vram:.2f} GB")
        self.stats_html.value = f'<span style="font-family:monospace">{html.escape(" · ".join(parts))}</span>'

    def _render(self, cursor: bool = False) -> None:
        self.transcript_html.value = render_transcript(self.transcript, self._notes, cursor)
        self.renders += 1

    def _set_status(self, text: str, error: bool = False) -> None:
        self.status = text
        color = "#c01c28" if error else "#555"
        self.status_html.value = f'<span style="color:{color}">{html.escape(text)}</span>' if text else ""

    def _set_enabled(self, enabled: bool) -> None:
        for control in (self.send_button, self.clear_button, self.prompt):
            control.disabled = not enabled

    def _on_send_click(self, _button: Any = None) -> None:
        try:
            self.send()
        except Exception:  # already shown in the status line; a callback's traceback would go to a log
            pass

    def _on_clear_click(self, _button: Any = None) -> None:
        if not self.busy:
            self.clear()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def open_chat(session: ChatSession, **kwargs: Any) -> ChatUI:
    """Build a ``ChatUI`` for ``session`` and display it (the notebook one-liner)."""
    from IPython.display import display

    ui = ChatUI(session, **kwargs)
    display(ui.widget)
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


__all__ = ["ChatUI", "STOP_NOTE", "chat", "open_chat", "render_transcript", "stats_line"]
