"""A multi-turn conversation over one model: chat template, reused KV cache, safe interrupts.

Each turn renders the whole conversation with the tokenizer's chat template, keeps the KV cache of
the longest prefix already computed, and feeds only the new tokens. An interrupted or failed answer
leaves the conversation and the cache consistent, so the next turn just works.

One session answers one message at a time: a second ``send`` while an answer runs (a cell during a
widget answer, on a kernel subshell) is refused with ``SessionBusy`` instead of being interleaved
into the same conversation. ``stop()`` ends the running answer from any thread. Views (the chat
widget) follow every turn, whoever sent it, through ``watchers``.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..runtime.kv_cache import new_kv_cache
from .generation import GenerationResult, SamplingConfig, generate_stream, planned_context


class SessionBusy(RuntimeError):
    """A second message was sent while this conversation is still answering one."""


# watcher(event, detail): "start" (message), "text" (piece), "end" (GenerationResult or the exception
# that ended the answer), "clear" (None). Called on the thread that runs the answer.
Watcher = Callable[[str, object], None]


@dataclass
class ChatTurn:
    user: str
    assistant: str
    stop_reason: str
    error: str | None = None  # what went wrong in this answer (out of memory), for views built later


@dataclass
class ChatSession:
    """Conversation state plus the KV cache that matches it."""

    model: object
    tokenizer: object
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_context: int | None = None  # tokens; default: the context the model was planned for (planned_context)
    system_prompt: str | None = None
    turns: list[ChatTurn] = field(default_factory=list)
    forgotten: int = 0  # oldest turns dropped because the conversation outgrew the context (views say so)
    last_result: GenerationResult | None = None
    _cache: DynamicCache | None = None
    _cached_ids: list[int] = field(default_factory=list)
    in_flight: tuple[str, str] | None = None  # (message, answer so far) while an answer runs
    watchers: list[Watcher] = field(default_factory=list, repr=False)
    _answering: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_context is None:
            self.max_context = planned_context(self.model)

    # ---- public ----------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while an answer is being generated."""
        return self._answering.locked()

    def send(
        self, message: str, on_text: Callable[[str], None] | None = None, sampling: SamplingConfig | None = None
    ) -> GenerationResult:
        """Answer ``message``; raises ``ValueError`` (conversation untouched) on an empty or too long prompt,
        ``SessionBusy`` while another answer of this session runs."""
        if not self._answering.acquire(blocking=False):
            raise SessionBusy(
                "this conversation is still answering the previous message; "
                "wait for it to finish or stop it, then send again"
            )
        try:
            return self._send(message, on_text, sampling or self.sampling)
        finally:
            self._answering.release()

    def stop(self) -> bool:
        """Ask the running answer to end after its current token (any thread); False when none runs."""
        if not self.busy:
            return False
        self._stop.set()
        return True

    def clear(self) -> None:
        """Forget the conversation and release its KV cache (refused while answering)."""
        if not self._answering.acquire(blocking=False):
            raise SessionBusy("cannot clear while an answer is being generated: stop it first")
        try:
            self.turns = []
            self.forgotten = 0
            self.reset_cache()
        finally:
            self._answering.release()
        self._notify("clear", None)

    # ---- internals -------------------------------------------------------------------------------

    def _send(self, message: str, on_text: Callable[[str], None] | None, sampling: SamplingConfig) -> GenerationResult:
        message = (message or "").strip()
        if not message:
            raise ValueError("empty message: type something first")
        ids, dropped = self._prompt_ids(message, sampling.max_new_tokens)
        self._stop.clear()
        self.in_flight = (message, "")
        self._notify("start", message)

        def piece(text: str) -> None:
            self.in_flight = (message, self.in_flight[1] + text)
            if on_text is not None:
                on_text(text)
            self._notify("text", text)

        try:
            result = self._answer(message, ids, dropped, sampling, piece)
        except BaseException as err:  # a bug or an interrupt outside generate: views must not stay "generating"
            self.in_flight = None
            self._notify("end", err)
            raise
        self.in_flight = None
        self._notify("end", result)
        return result

    def _answer(
        self, message: str, ids: list[int], dropped: int, sampling: SamplingConfig, on_text: Callable[[str], None]
    ) -> GenerationResult:
        if dropped:
            self.turns = self.turns[dropped:]
            self.forgotten += dropped
            self.reset_cache()
        common = _common_prefix(self._cached_ids, ids)
        if common == len(ids):  # always feed at least one token
            common -= 1
        if self._cache is None or common == 0:
            self.reset_cache()
            self._cache = new_kv_cache(self.model, self.max_context)  # preallocated, reused turn after turn
            common = 0
        elif common < len(self._cached_ids):
            _truncate(self._cache, common)
        self._cached_ids = ids[:common]
        prompt = torch.tensor([ids])
        result = generate_stream(
            self.model, self.tokenizer, prompt, sampling, on_text, past_key_values=self._cache, stop=self._stop
        )
        if result.cache is None:  # out of memory: the cache was dropped
            self.reset_cache()
        else:
            valid = len(ids) + len(result.token_ids) - 1 if result.token_ids else common
            _truncate(self._cache, valid)
            self._cached_ids = (ids + result.token_ids)[:valid]
        self.in_flight = None  # the turn below replaces it (views never show both)
        self.turns.append(ChatTurn(message, result.text, result.stats.stop_reason, result.error))
        self.last_result = result
        if dropped:
            result.extra["dropped_turns"] = dropped
        return result

    def _notify(self, event: str, detail: object) -> None:
        for watch in list(self.watchers):
            try:
                watch(event, detail)
            except Exception as err:  # a broken view must not break the conversation
                warnings.warn(f"chat view failed on {event!r}: {type(err).__name__}: {err}", stacklevel=2)

    def reset_cache(self) -> None:
        if self._cache is not None:  # the model's KV arena lends its tail to the expert cache again
            self._cache.release_arena()
        self._cache = None
        self._cached_ids = []

    @property
    def cached_tokens(self) -> int:
        return len(self._cached_ids)

    def messages(self, next_user: str | None = None) -> list[dict[str, str]]:
        msgs = []
        for t in self.turns:
            msgs += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.assistant}]
        if next_user is not None:
            msgs.append({"role": "user", "content": next_user})
        if self.system_prompt and msgs:  # Mixtral's template has no system role: prefix the first message
            msgs[0] = {"role": "user", "content": f"{self.system_prompt}\n\n{msgs[0]['content']}"}
        return msgs

    def _render(self, turns: list[ChatTurn], message: str) -> list[int]:
        saved, self.turns = self.turns, turns
        try:
            ids = self.tokenizer.apply_chat_template(self.messages(message), add_generation_prompt=True, tokenize=True)
        finally:
            self.turns = saved
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def _prompt_ids(self, message: str, max_new: int) -> tuple[list[int], int]:
        """Token ids of the conversation plus ``message``, dropping oldest turns to fit the context."""
        budget = min(self.max_context, planned_context(self.model)) - max_new
        for dropped in range(len(self.turns) + 1):
            ids = self._render(self.turns[dropped:], message)
            if len(ids) <= budget:
                return ids, dropped
        raise ValueError(
            f"prompt is {len(ids)} tokens but the context budget leaves {max(budget, 0)} for it "
            f"({self.max_context} context - {max_new} new tokens): shorten it or lower max new tokens"
        )


def _truncate(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions of every layer (layers may differ after an interrupt)."""
    for layer in cache.layers:
        extra = layer.get_seq_length() - length
        if extra > 0:
            layer.crop(-extra)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
