"""The numbers the notebooks, README and docs quote, in one place, each with the command and date behind it.

Notebooks print these (never a figure typed into markdown); ``tests/test_figures.py`` checks that the README
and docs quote the same checkpoint size and projected speed. Nothing here ran on a GPU: the tok/s are the
T4 twin's projections (``python -m colab_helpers twin``, docs/benchmarks.md), the rest is arithmetic from
the checkpoint format or a replay of the recorded routing trace (never shipped: pass its path). When a
change moves a figure, ``remeasure(TRACE)`` reruns every twin row's command and says which moved; update
them here, with the date, and point ``PROJECTED`` at the row of the engine's default configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

GB = 10**9
GIB = 2**30

# ---- the checkpoint -------------------------------------------------------------------------------

CHECKPOINT_BYTES = 18_239_794_688
"""The pre-quantized Mixtral-8x7B (2-bit experts in groups of 16, 4-bit attention in groups of 64, fp16 rest):
exact, from the shapes and the format (docs/checkpoint_format.md; ``walkthroughs.fits.mixtral_components``
sums to it, tested)."""
EXPERT_BYTES = 66_404_364
"""One 2-bit expert (w1, w2, w3 with steps and zeros): what a cache miss copies over PCIe."""


def checkpoint_size_spellings() -> tuple[str, ...]:
    """Every way a text may write the checkpoint size: bytes, GB (10^9, 2 or 1 decimals), GiB."""
    b = CHECKPOINT_BYTES
    return (f"{b:,}", f"{b / GB:.2f} GB", f"{b / GB:.1f} GB", f"{b / GIB:.2f} GiB", f"{b / GIB:.1f} GiB")


def checkpoint_size() -> str:
    """The size as every notebook prints it."""
    return f"{CHECKPOINT_BYTES:,} B = {CHECKPOINT_BYTES / GB:.2f} GB = {CHECKPOINT_BYTES / GIB:.2f} GiB"


# ---- the PCIe bound -------------------------------------------------------------------------------

H2D_BYTES_PER_S = 12.3e9
"""Pinned host->device copy rate of a T4 (PCIe 3.0 x16), the twin's and ``timing.TimingModel``'s figure."""


def expert_copy_ms() -> float:
    """Milliseconds to copy one 2-bit expert host->device on a T4: the price of every miss and every wrong guess."""
    return 1e3 * EXPERT_BYTES / H2D_BYTES_PER_S


def pcie_bound_tok_s(loads_per_token: float) -> float:
    """tokens/s when copies dominate: 1 / (loads per token x one copy). Compute hides behind the copies,
    so nothing (no prefetch either) beats it for that many loads; only fewer loads do."""
    return 1e3 / (loads_per_token * expert_copy_ms()) if loads_per_token else float("inf")


# ---- the T4 twin: projected decode speed of Mixtral-8x7B on a free Colab T4 ---------------------


@dataclass(frozen=True)
class TwinRun:
    """One projection of the T4 twin (not a measurement): the engine's own schedule, simulated on a T4."""

    configuration: str
    tok_s: float
    hit_rate: float
    loads_per_token: float  # expert copies host->device per token: demand misses + speculative
    demand_misses_per_token: float
    speculative_per_token: float
    h2d_busy_ms: float  # per token
    total_ms: float  # per token
    command: str
    wasted_per_token: float = 0.0  # speculative loads whose layer did not use them


TRACE = "mixtral-8x7b-instruct-routing.npz"  # the recorded real routing (not shipped; read from its own folder)
_TWIN = "python -m colab_helpers twin --json --tokens 96 --warmup 32 --trace TRACE.npz"
TWIN_DATE = (
    "2026-12-07, this CPU machine (no GPU), main after issue 19 (prefetch auto, embedding in host RAM, KV lending)"
)
"""When the twin rows were produced. Plan: ``plan --vram-gb 15 --ram-gb 12.7`` (the embedding table in host RAM,
179 experts on the GPU: 6 per layer in 19 layers, 5 in 13; the KV budget's unreached tail lends 8 more slots, 7 of
them still lent in the recorded window: a 16-token prompt, 32 tokens of warm-up, 96 recorded), ``lfu_decay``, the
trace's four sequences back to back. Loads are host->device bytes per token in expert units (a guess copied in
chunks counts its chunks)."""

TWIN_NO_PREFETCH = TwinRun(
    "prefetch off", 12.24, 0.834, 10.62, 10.62, 0.0, 57.4, 81.7, _TWIN + " --no-prefetch", wasted_per_token=0.0
)
TWIN_AUTO = TwinRun(
    "prefetch auto (default), recall 0.8", 12.61, 0.834, 11.10, 9.67, 1.43, 59.9, 79.3, _TWIN, wasted_per_token=0.47
)
"""Gated, preemptible prefetch ("auto", the engine's default): a guess is copied only into a free spare slot, in
chunks paced one per layer step, and dropped when a demand copy comes; nothing resident is evicted for it."""
TWIN_AUTO_R05 = TwinRun(
    "prefetch auto, recall 0.5", 12.35, 0.834, 11.77, 10.04, 1.73, 63.5, 81.0, _TWIN + " --recall 0.5",
    wasted_per_token=1.15,
)  # fmt: skip
TWIN_AUTO_R09 = TwinRun(
    "prefetch auto, recall 0.9", 12.68, 0.834, 10.88, 9.56, 1.33, 58.8, 78.9, _TWIN + " --recall 0.9",
    wasted_per_token=0.26,
)  # fmt: skip
TWIN_AUTO_R10 = TwinRun(
    "prefetch auto, every guess right (recall 1.0)", 12.80, 0.834, 10.63, 9.41, 1.21, 57.4, 78.1,
    _TWIN + " --recall 1.0", wasted_per_token=0.0,
)  # fmt: skip
TWIN_NO_LENDING = TwinRun(
    "prefetch auto, recall 0.8, no KV lending (before)", 11.63, 0.813, 12.45, 10.88, 1.56, 67.2, 86.0,
    _TWIN + " --no-kv-lending", wasted_per_token=0.50,
)  # fmt: skip
"""The default before the KV cache lent its tail: 179 slots instead of 186 in this window."""
TWIN_NO_LENDING_NO_PREFETCH = TwinRun(
    "prefetch off, no KV lending (before)", 11.30, 0.813, 11.95, 11.95, 0.0, 64.5, 88.5,
    _TWIN + " --no-prefetch --no-kv-lending", wasted_per_token=0.0,
)  # fmt: skip
TWIN_EVICT = TwinRun(
    "guesses that evict (old default), recall 0.8", 10.23, 0.945, 15.05, 2.66, 12.40, 81.3, 97.7,
    _TWIN + " --prefetch-mode evict", wasted_per_token=3.96,
)  # fmt: skip
"""Every guess copied at once, evicting what the policy picks: the default before issue 19. On a saturated bus a
wrong guess is a whole 5.4 ms copy that also evicts an expert needed later, so it is slower than no prefetch."""
TWIN_EVICT_R10 = TwinRun(
    "guesses that evict, every guess right (recall 1.0)", 13.01, 0.994, 10.62, 0.41, 10.22, 57.4, 76.8,
    _TWIN + " --prefetch-mode evict --recall 1.0",
    wasted_per_token=0.0,
)  # fmt: skip
TWIN_LONG = TwinRun(
    "prefetch auto, after a 1200-token prompt (5 slots lent)", 11.87, 0.820, 12.00, 10.49, 1.51, 64.8, 84.2,
    _TWIN + " --prompt-tokens 1200", wasted_per_token=0.46,
)  # fmt: skip
TWIN_LONG_NO_LENDING = TwinRun(
    "prefetch auto, after a 1200-token prompt, no KV lending", 11.23, 0.805, 12.97, 11.36, 1.61, 70.0, 89.1,
    _TWIN + " --prompt-tokens 1200 --no-kv-lending", wasted_per_token=0.49,
)  # fmt: skip

PROJECTED = TWIN_AUTO
"""THE projected speed the README and docs headline: the engine's default configuration today."""
PAPER_T4_TOK_S = 2.09
"""Measured by the paper (arXiv 2312.17238, Table 2) on a T4, with its prefetch: the only GPU measurement quoted."""


def twin_rows() -> tuple[TwinRun, ...]:
    return (
        TWIN_NO_PREFETCH,
        TWIN_AUTO,
        TWIN_AUTO_R05,
        TWIN_AUTO_R09,
        TWIN_AUTO_R10,
        TWIN_NO_LENDING_NO_PREFETCH,
        TWIN_NO_LENDING,
        TWIN_EVICT,
        TWIN_EVICT_R10,
        TWIN_LONG,
        TWIN_LONG_NO_LENDING,
    )


def twin_table() -> str:
    """The twin's rows as text, with the PCIe bound each row's loads allow, the command and the date."""
    lines = [
        f"{'configuration':<58}{'tok/s':>7}{'loads/token':>13}{'demand':>8}{'guessed':>9}{'wasted':>8}"
        f"{'H2D busy':>10}{'token':>8}{'PCIe bound':>12}"
    ]
    for r in twin_rows():
        lines.append(
            f"{r.configuration:<58}{r.tok_s:>7.2f}{r.loads_per_token:>13.1f}{r.demand_misses_per_token:>8.1f}"
            f"{r.speculative_per_token:>9.1f}{r.wasted_per_token:>8.1f}{r.h2d_busy_ms:>8.1f}ms{r.total_ms:>6.1f}ms"
            f"{pcie_bound_tok_s(r.loads_per_token):>10.1f}/s"
        )
    lines.append(
        f"projected, not measured: {_TWIN} [--no-prefetch | --recall R | --prefetch-mode evict | --no-kv-lending | "
        f"--prompt-tokens N] ({TWIN_DATE})"
    )
    return "\n".join(lines)


def remeasure(trace: str, run: Callable[[list[str]], str] | None = None) -> str:
    """Rerun every twin row's command on ``trace`` and say, row by row, whether the stored figures still hold.

    For whoever updates this module after an engine change (then update the rows and ``TWIN_DATE``).
    ``run`` takes an argv and returns its stdout (default: a subprocess of this Python).
    """
    import json
    import shlex
    import subprocess
    import sys

    def default_run(argv: list[str]) -> str:
        return subprocess.run([sys.executable, *argv[1:]], check=True, capture_output=True, text=True).stdout

    run = run or default_run
    lines = []
    for row in twin_rows():
        argv = [trace if a == "TRACE.npz" else a for a in shlex.split(row.command)]
        now = json.loads(run(argv).strip().splitlines()[-1])
        pairs = [
            ("tok/s", row.tok_s, now["tok_s"], 0.005),
            ("loads/token", row.loads_per_token, now["loads_per_token"], 0.05),
            ("hit rate", row.hit_rate, now["hit_rate"], 0.0005),
        ]
        off = [f"{name} {old} -> {new:g}" for name, old, new, tol in pairs if abs(old - new) > tol]
        lines.append(f"{row.configuration}: {'changed: ' + ', '.join(off) if off else 'unchanged'}")
    return "\n".join(lines)


def projected_speed() -> str:
    """The headline projection in one line, labelled as one."""
    return (
        f"projected (T4 twin, not measured): {PROJECTED.tok_s:.1f} tok/s with the default prefetch, "
        f"{TWIN_NO_PREFETCH.tok_s:.1f} with prefetch off; the paper measured {PAPER_T4_TOK_S} tok/s on a T4"
    )


def tok_s_spellings(run: TwinRun = PROJECTED) -> tuple[str, ...]:
    """How a text may quote a projected speed: two decimals or one."""
    return (f"{run.tok_s:.2f}", f"{run.tok_s:.1f}")


# ---- eviction policies on the real routing trace ---------------------------------------------------

REPLAY_COMMAND = "python -m colab_helpers replay TRACE.npz"
REPLAY_DATE = "2026-12-07, this CPU machine"
REPLAY_KS = (2, 3, 4, 5, 6)
REPLAY_HIT_RATES = {
    "lru": (0.373, 0.496, 0.612, 0.713, 0.809),
    "lfu_decay": (0.373, 0.514, 0.631, 0.735, 0.827),
    "lfu": (0.373, 0.512, 0.628, 0.730, 0.825),
    "belady": (0.373, 0.604, 0.739, 0.829, 0.894),
}
"""Hit rate per expert selection on the real Mixtral trace (4 sequences, 585 decode steps, cold cache per
sequence and layer): the reason ``lfu_decay`` is the default (docs/cache_policies.md)."""


def replay_table() -> str:
    lines = [f"{'policy':<11}" + "".join(f"{'K=' + str(k):>8}" for k in REPLAY_KS)]
    for policy, rates in REPLAY_HIT_RATES.items():
        lines.append(f"{policy:<11}" + "".join(f"{h:>8.3f}" for h in rates))
    lines.append(f"real Mixtral routing trace, hit rate per expert selection: {REPLAY_COMMAND} ({REPLAY_DATE})")
    return "\n".join(lines)
