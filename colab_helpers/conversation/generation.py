"""One streaming generation path for the CLI, the chat session and the widget: stock ``generate`` plus a callback.

Tokens reach ``on_text`` on the calling thread (Colab renders only main-thread updates). Ctrl-C or
Colab's stop button ends the answer cleanly: what was generated is kept and the stats say so.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..runtime.host_embedding import HostIds, feeding_host_ids
from ..weights.tokenizer import require_chat_template


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding knobs; ``temperature == 0`` means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def generate_kwargs(self) -> dict:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens, "temperature": None, "top_p": None}
        return {
            "do_sample": True,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": None,
        }


@dataclass
class GenerationStats:
    """What one answer cost: speed, cache behaviour, bytes moved, and why it stopped."""

    new_tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float = 0.0
    hit_rate: float = 0.0
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    prefetch_precision: float = 0.0
    prefetch_recall: float = 0.0
    stop_reason: str = "length"  # "eos" | "length" | "stopped" | "interrupted" | "out_of_memory"
    vram_gb: float | None = None
    lent_slots: int = 0  # expert slots the KV cache's unreached tail still lends at the end (kv_arena.KVArena)

    @property
    def tokens_per_s(self) -> float:
        decode = self.seconds - self.first_token_seconds
        return (self.new_tokens - 1) / decode if self.new_tokens > 1 and decode > 0 else 0.0

    def line(self) -> str:
        s = (
            f"{self.new_tokens} tokens in {self.seconds:.2f}s ({self.tokens_per_s:.2f} tok/s decode), "
            f"cache hit rate {self.hit_rate:.1%}, moved {self.h2d_bytes / 2**20:.1f} MiB in / "
            f"{self.d2h_bytes / 2**20:.1f} MiB out, prefetch precision {self.prefetch_precision:.1%} "
            f"recall {self.prefetch_recall:.1%}"
        )
        if self.lent_slots:
            s += f", {self.lent_slots} expert slots lent by the KV cache"
        if self.vram_gb is not None:
            s += f", VRAM {self.vram_gb:.2f} GB"
        return s + f" [{self.stop_reason}]"


class PromptTooLongError(ValueError):
    """The prompt plus the answer would not fit the context the model was planned (and trained) for."""


def planned_context(model) -> int:
    """Tokens of prompt + answer the model is planned for: the memory plan's KV budget when it was
    loaded with one (``load_model``), else ``OffloadConfig.context``, never above the position table."""
    limit = int(model.config.max_position_embeddings)
    plan = getattr(model, "memory_plan", None)
    if plan is not None:
        return min(int(plan.context), limit)
    cfg = getattr(model, "offload_config", None)
    return min(int(cfg.context), limit) if cfg is not None else limit


def check_prompt_fits(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    """Raise ``PromptTooLongError`` (saying what to do) unless prompt + answer fit ``context`` tokens."""
    if prompt_tokens + max_new_tokens <= context:
        return
    if prompt_tokens >= context:
        raise PromptTooLongError(
            f"prompt is {prompt_tokens} tokens but this model's context is {context} tokens (prompt + answer): "
            "shorten the prompt"
        )
    raise PromptTooLongError(
        f"prompt is {prompt_tokens} tokens and up to {max_new_tokens} new ones would pass this model's context "
        f"of {context} tokens: lower max new tokens to {context - prompt_tokens} or shorten the prompt"
    )


def chat_prompt_ids(tokenizer, message: str) -> torch.Tensor:
    """One user message rendered with the tokenizer's chat template, ready for ``generate`` ([1, T])."""
    require_chat_template(tokenizer)
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return encoded["input_ids"]


class CallbackStreamer(BaseStreamer):
    """Decodes new tokens incrementally and hands text pieces to ``on_text`` (no threads)."""

    def __init__(
        self, tokenizer, on_text: Callable[[str], None] | None, skip_prompt: bool = True, host_ids=None
    ) -> None:
        self.tokenizer = tokenizer
        self.host_ids = host_ids  # a ``HostIds`` the host embedding reads the next forward's id from
        self.on_text = on_text
        self.skip_prompt = skip_prompt
        self.token_ids: list[int] = []
        self.text = ""
        self.first_token_time: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt:  # generate() first sends the prompt
            self.skip_prompt = False
            return
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        new = value.reshape(-1).tolist()  # ``generate`` hands the streamer host tokens: no device read here
        self.token_ids.extend(new)
        if self.host_ids is not None:
            self.host_ids.append(new)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        piece, self.text = text[len(self.text) :], text
        if piece and self.on_text is not None:
            self.on_text(piece)

    def end(self) -> None:
        pass


class StopOnEvent(StoppingCriteria):
    """Ends generation after the current token once ``event`` is set (a Stop button on another thread)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    cache: object = None  # the KV cache after the answer (reused by the chat session)
    error: str | None = None
    extra: dict = field(default_factory=dict)


def _kv_cache_kwarg(model) -> str:
    """transformers 5.2x renamed ``past_key_values`` to ``cache``; use whichever this version's forward takes."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _output_cache(out, passed):
    """The KV cache after generate: the one we passed (updated in place), else the one generate made."""
    if passed is not None:
        return passed
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def prefill(model, input_ids: torch.Tensor, cache, chunk: int) -> None:
    """Run all prompt tokens but the last through ``model`` into ``cache``, ``chunk`` tokens at a time.

    Activations then scale with the chunk, not the prompt (the memory plan counts one chunk);
    ``generate`` afterwards sees the cache and feeds only the last token. Starts after what ``cache``
    already holds (a chat continuation).
    """
    kv = _kv_cache_kwarg(model)
    stop = int(input_ids.shape[-1]) - 1
    with torch.no_grad():
        for start in range(cache.get_seq_length(), stop, chunk):
            end = min(start + chunk, stop)
            mask = torch.ones(1, end, dtype=torch.long, device=input_ids.device)
            model(input_ids=input_ids[:, start:end], attention_mask=mask, logits_to_keep=1, **{kv: cache})


def _prefill_chunk(model) -> int | None:
    path = getattr(model, "attention_path", None)
    return getattr(path, "prefill_chunk", None)


def _vram_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 1e9


def generate_stream(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    sampling: SamplingConfig = SamplingConfig(),
    on_text: Callable[[str], None] | None = None,
    past_key_values=None,
    stop: threading.Event | None = None,
) -> GenerationResult:
    """Generate from ``input_ids`` ([1, T]) streaming text to ``on_text``; never raises on Ctrl-C or OOM.

    On an interrupt the partial answer is returned (``stop_reason="interrupted"``); setting ``stop``
    (from any thread) ends it after the current token (``"stopped"``); on CUDA out of memory the KV
    cache is dropped, memory released, and ``error`` says what happened. A prompt that with
    ``max_new_tokens`` would not fit ``planned_context(model)`` raises ``PromptTooLongError`` before
    anything runs (past the position table a model computes garbage).
    """
    check_prompt_fits(int(input_ids.shape[-1]), sampling.max_new_tokens, planned_context(model))
    cache = getattr(model, "expert_cache", None)
    if cache is not None:
        cache.stats.reset()
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    device = next(model.parameters()).device
    host_ids = input_ids  # as given (the tokenizer's: on the host); only a host embedding table reads it
    input_ids = input_ids.to(device)
    streamer = CallbackStreamer(tokenizer, on_text)
    stats = GenerationStats(prompt_tokens=int(input_ids.shape[-1]))
    eos = model.generation_config.eos_token_id
    start = time.perf_counter()
    error = None
    try:
        chunk = _prefill_chunk(model)
        if past_key_values is None:  # preallocated: a decoded token writes its own K/V, never a copy of all
            from ..runtime.kv_cache import new_kv_cache

            past_key_values = new_kv_cache(model, int(input_ids.shape[-1]) + sampling.max_new_tokens)
        # a host-RAM embedding table gathers each forward's rows from these host ids: no read-back per token
        streamer.host_ids = fed = HostIds(host_ids, past_key_values)
        cached = past_key_values.get_seq_length()
        kv = {_kv_cache_kwarg(model): past_key_values}
        if stop is not None:
            kv["stopping_criteria"] = StoppingCriteriaList([StopOnEvent(stop)])
        with feeding_host_ids(model, fed):
            if chunk and input_ids.shape[-1] - 1 - cached > chunk:  # a long prompt: bounded activations
                prefill(model, input_ids, past_key_values, chunk)
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                streamer=streamer,
                return_dict_in_generate=True,
                **kv,
                **sampling.generate_kwargs(),
            )
        new_ids = out.sequences[0, input_ids.shape[-1] :].tolist()
        past_key_values = _output_cache(out, past_key_values)
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        stats.stop_reason = "eos" if new_ids and new_ids[-1] in eos_ids else "length"
        if stop is not None and stop.is_set() and stats.stop_reason == "length":
            stats.stop_reason = "stopped"
    except KeyboardInterrupt:
        new_ids = list(streamer.token_ids)
        stats.stop_reason = "interrupted"
    except torch.OutOfMemoryError:
        new_ids = list(streamer.token_ids)
        past_key_values = None
        stats.stop_reason = "out_of_memory"
        error = "out of GPU memory: the KV cache was released; try a shorter prompt or fewer max new tokens"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    stats.seconds = time.perf_counter() - start
    stats.new_tokens = len(new_ids)
    if streamer.first_token_time is not None:
        stats.first_token_seconds = streamer.first_token_time - start
    if cache is not None:
        cache.engine.synchronize()
        summary = cache.stats.summary()
        stats.hit_rate, stats.h2d_bytes, stats.d2h_bytes = (
            summary["hit_rate"],
            summary["h2d_bytes"],
            summary["d2h_bytes"],
        )
        stats.prefetch_precision, stats.prefetch_recall = summary["prefetch_precision"], summary["prefetch_recall"]
    arena = getattr(model, "kv_arena", None)
    stats.lent_slots = arena.lent if arena is not None else 0
    stats.vram_gb = _vram_gb(device)
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    return GenerationResult(text, new_ids, stats, past_key_values, error)
