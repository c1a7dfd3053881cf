"""Walkthrough ``benchmark``: tokens/s against experts on the device, prefetch on and off."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BenchRow:
    experts_on_device: int
    prefetch: bool
    tokens_per_s: float
    hit_rate: float
    mib_in_per_token: float  # expert bytes copied in (prefill included) per generated token
    prefetch_precision: float
    new_tokens: int


def benchmark(
    path: str | os.PathLike,
    device: str,
    ks: Iterable[int],
    prompt: str = "Recite the Zen of Python.",
    max_new_tokens: int = 32,
    progress: bool = False,
    cpu_threads: int | None = 1,
) -> list[BenchRow]:
    """Decode speed and cache behaviour for each experts-per-layer value, prefetch on and off.

    One load per value (prefetch is switched on the loaded blocks); the same greedy prompt every time,
    after one untimed warm-up answer so first-call costs are not counted. A CPU run uses ``cpu_threads``
    torch threads (restored afterwards): small matrices gain nothing from more, and on a busy machine
    extra threads mostly wait on each other.
    """
    threads = torch.get_num_threads()
    if device == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    try:
        return _benchmark(path, device, ks, prompt, max_new_tokens, progress)
    finally:
        torch.set_num_threads(threads)


def _benchmark(
    path, device: str, ks: Iterable[int], prompt: str, max_new_tokens: int, progress: bool
) -> list[BenchRow]:
    import gc
    from dataclasses import replace

    from ..conversation.generation import SamplingConfig
    from ..conversation.session import ChatSession
    from ..model import load_model, load_tokenizer
    from ..planning.planner import MemoryPlanError

    tok = load_tokenizer(path)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    rows = []
    for k in ks:
        try:
            # K as the table says: no extra slots lent by the KV cache (they would blur the sizes compared)
            model = load_model(path, device=device, experts_on_device=k, progress=progress, kv_lending=False)
        except MemoryPlanError as err:
            print(f"k={k}: does not fit this machine, skipped ({str(err).splitlines()[0]})")
            continue
        ChatSession(model, tok, SamplingConfig(max_new_tokens=4)).send(prompt)  # warm-up
        for enabled in (True, False):
            for layer in model.model.layers:
                layer.mlp.prefetch = replace(layer.mlp.prefetch, enabled=enabled)
            st = ChatSession(model, tok, sampling).send(prompt).stats
            rows.append(
                BenchRow(
                    k,
                    enabled,
                    st.tokens_per_s,
                    st.hit_rate,
                    st.h2d_bytes / 2**20 / max(st.new_tokens, 1),
                    st.prefetch_precision,
                    st.new_tokens,
                )
            )
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def bench_table(rows: Sequence[BenchRow]) -> str:
    lines = [f"{'k':>3} {'prefetch':>9} {'tok/s':>7} {'hit rate':>9} {'MiB in/token':>13} {'precision':>10}"]
    for r in rows:
        lines.append(
            f"{r.experts_on_device:>3} {'on' if r.prefetch else 'off':>9} {r.tokens_per_s:>7.2f} {r.hit_rate:>9.1%} "
            f"{r.mib_in_per_token:>13.2f} {r.prefetch_precision:>10.1%}"
        )
    return "\n".join(lines)


NOISE = 0.02  # a speed ratio within 2% of 1 is reported as no difference (a CPU run's noise is often more)


def prefetch_effect(rows: Sequence[BenchRow]) -> str:
    """For each cache size, what prefetch did in this run: hit rate, bytes copied in, speed (from the table).

    A speed difference with nothing copied either way (every expert resident) is noise, whatever its size.
    """
    lines = []
    for k in sorted({r.experts_on_device for r in rows}):
        on = next((r for r in rows if r.experts_on_device == k and r.prefetch), None)
        off = next((r for r in rows if r.experts_on_device == k and not r.prefetch), None)
        if on is None or off is None:
            continue
        ratio = on.tokens_per_s / off.tokens_per_s if off.tokens_per_s else float("nan")
        if on.mib_in_per_token == off.mib_in_per_token == 0:
            speed = "no difference (nothing was copied either way, so prefetch had nothing to do: the gap is noise)"
        elif abs(ratio - 1) <= NOISE:
            speed = f"no difference (within {NOISE:.0%})"
        else:
            speed = "faster" if ratio > 1 else "slower"
        lines.append(
            f"k={k}: prefetch {'raised' if on.hit_rate > off.hit_rate else 'did not raise'} the hit rate "
            f"{off.hit_rate:.0%} -> {on.hit_rate:.0%}, copied {off.mib_in_per_token:.2f} -> "
            f"{on.mib_in_per_token:.2f} MiB/token, and ran {ratio:.2f}x: {speed}"
        )
    return "\n".join(lines)


def plot_benchmark(rows: Sequence[BenchRow], title: str = "decode speed and hit rate, prefetch on and off"):
    """tokens/s and hit rate against experts per layer, prefetch on vs off."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for enabled, style in ((True, "o-"), (False, "s--")):
        rs = [r for r in rows if r.prefetch == enabled]
        label = "prefetch on" if enabled else "prefetch off"
        a.plot([r.experts_on_device for r in rs], [r.tokens_per_s for r in rs], style, label=label)
        b.plot([r.experts_on_device for r in rs], [r.hit_rate for r in rs], style, label=label)
    ks = sorted({r.experts_on_device for r in rows})
    a.set_xticks(ks)
    b.set_xticks(ks)
    a.set_xlabel("experts per layer on the device")
    a.set_ylabel("decode tokens/s")
    b.set_xlabel("experts per layer on the device")
    b.set_ylabel("cache hit rate")
    b.set_ylim(0, 1.05)
    a.set_title("decode tokens/s")
    b.set_title("cache hit rate")
    fig.suptitle(title)
    a.legend()
    b.legend()
    fig.tight_layout()
    return fig
