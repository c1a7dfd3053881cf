"""Walkthrough ``expert_cache_and_prefetch``: record routing, how sticky it is, hit rates per policy, prefetch."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def record_routing(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32):
    """Answer each prompt in a fresh conversation while a ``RoutingRecorder`` listens.

    Returns the recorder (one sequence per prompt) and each answer's ``GenerationResult`` (its stats
    hold the live cache's hit rate and prefetch precision/recall).
    """
    from ..conversation.generation import SamplingConfig
    from ..conversation.session import ChatSession
    from ..sim.trace import RoutingRecorder

    recorder = RoutingRecorder(model, name="prompt0")
    results = []
    with recorder:
        for i, prompt in enumerate(prompts):
            if i:
                recorder.new_sequence(f"prompt{i}")
            session = ChatSession(model, tokenizer, SamplingConfig(max_new_tokens=max_new_tokens))
            results.append(session.send(prompt))
    return recorder, results


def expert_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """``[L, E]`` share of decode steps in which each layer used each expert (``experts``: ``[T, L, k]``)."""
    t, n_layers, _ = experts.shape
    counts = np.zeros((n_layers, num_experts))
    for layer in range(n_layers):
        ids = experts[:, layer].reshape(-1)
        counts[layer] = np.bincount(ids[ids >= 0], minlength=num_experts)[:num_experts]
    return counts / max(t, 1)


def reuse_rate(experts: np.ndarray) -> float:
    """Share of a step's experts that the same layer also used one step before: why an expert cache works."""
    same = total = 0
    for t in range(1, len(experts)):
        for layer in range(experts.shape[1]):
            now = {int(e) for e in experts[t, layer] if e >= 0}
            before = {int(e) for e in experts[t - 1, layer] if e >= 0}
            same += len(now & before)
            total += len(now)
    return same / total if total else 0.0


def plot_expert_heatmap(counts: np.ndarray, ax=None, title: str = "expert use per layer (share of decode steps)"):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, max(2.5, 0.35 * counts.shape[0] + 1)))
    im = ax.imshow(counts, cmap="viridis", aspect="auto", vmin=0)
    if counts.size <= 128:
        for (r, c), v in np.ndenumerate(counts):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < counts.max() / 2 else "k")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    plt.colorbar(im, ax=ax)
    return ax


def hit_rate_sweep(
    trace, ks: Iterable[int], policies: Sequence[str] = ("lru", "lfu_decay", "lfu", "belady"), options=None
):
    """``{policy: [hit rate for each k]}`` replaying every sequence of ``trace`` (arrays or an .npz path)."""
    from ..sim.trace import replay_file

    ks = list(ks)
    return {p: [replay_file(trace, p, k, options).hit_rate for k in ks] for p in policies}


def random_routing(trace: Mapping[str, np.ndarray], num_experts: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``trace`` with every recorded choice replaced by ``top_k`` distinct experts drawn uniformly at random.

    Same sequences, lengths and padding, so replaying it gives the hit rate of uniformly random routing
    *with the same cold start and the same number of steps*: the fair baseline for the curves of a
    short trace (the steady-state ``K / E`` ignores the cold misses every real replay pays).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for key, value in trace.items():
        if key.endswith("_guesses"):
            continue  # guesses of a real router mean nothing for random routing
        if key.endswith("_experts") and value.ndim == 3:  # [tokens, layers, k]
            value = value.copy()
            valid = (value >= 0).all(axis=-1)
            k = value.shape[-1]
            rows = np.argsort(rng.random((int(valid.sum()), num_experts)), axis=-1)[:, :k]
            value[valid] = rows.astype(value.dtype)
        out[key] = value
    return out


def plot_hit_rates(
    ks: Sequence[int],
    sweep: dict[str, list[float]],
    num_experts: int = 8,
    top_k: int = 2,
    ax=None,
    random: Sequence[float] | None = None,
    title: str = "cache hit rate against cache size, per eviction policy",
):
    """Hit rate against experts per layer on the GPU, one line per policy, plus the random-routing baseline.

    ``random``: the hit rates of ``random_routing`` replayed the same way (see there); without it the
    baseline line is left out rather than drawn from a formula that does not match the replay.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    for name, rates in sweep.items():
        ax.plot(ks, rates, "o-" if name != "belady" else "k:", label=name if name != "belady" else "belady (ceiling)")
    if random is not None:
        ax.plot(ks, random, color="gray", lw=1, ls="--", label="uniformly random routing (same replay)")
    ax.set_xticks(list(ks))
    ax.set_xlabel(f"experts per layer on the GPU (of {num_experts}, top-{top_k} routing)")
    ax.set_ylabel("cache hit rate")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


def plot_prefetch_effect(
    ks: Sequence[int],
    without: Sequence[float],
    with_prefetch: Sequence[float],
    policy: str = "lfu_decay",
    ax=None,
    title: str = "what the recorded prefetch guesses do to the hit rate",
):
    """Replayed hit rate with and without the recorded prefetch guesses, against cache size."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(list(ks), without, "s--", label=policy)
    ax.plot(list(ks), with_prefetch, "o-", label=f"{policy} + prefetch")
    ax.set_xticks(list(ks))
    ax.set_xlabel("experts per layer on the device")
    ax.set_ylabel("cache hit rate")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    return ax


def stickiness_line(experts: np.ndarray, num_experts: int, top_k: int) -> str:
    """The reuse rate next to chance, in words that follow the numbers (never "far more" at 1.4x)."""
    rate, chance = reuse_rate(experts), top_k / num_experts
    ratio = rate / chance if chance else 0.0
    if ratio >= 2:
        verdict = "far more often than chance"
    elif ratio > 1.1:
        verdict = "more often than chance"
    elif ratio >= 0.9:
        verdict = "about as often as chance"
    else:
        verdict = "less often than chance"
    return (
        f"an expert used at step t is used again at step t+1: {rate:.0%}, vs {chance:.0%} if routing were "
        f"uniformly random ({ratio:.1f}x): {verdict}"
    )


def load_for_cache_walkthrough(choice, experts_on_device_tiny: int = 2):
    """The model the walkthrough records from: the real Mixtral with the planner's cache on a GPU (its own
    routing and prefetch guesses, recorded live), else the embedded tiny model with a small cache (kept small:
    its KV budget would lend it more slots than it has experts)."""
    from ..model import load_model, load_tokenizer
    from .setup import plan_for

    if choice.tiny:
        model = load_model(
            choice.path,
            device=choice.device,
            experts_on_device=experts_on_device_tiny,
            progress=False,
            kv_lending=False,
        )
    else:
        plan = plan_for(choice)
        model = load_model(
            choice.path,
            device=choice.device,
            experts_on_device=plan.experts_on_device,
            spare_slots=plan.spare_slots,
            context=plan.context,
        )
    return model, load_tokenizer(choice.path)


def t4_projection(choice, ks: Sequence[int], lfu_decay_rates: Sequence[float], trace=None) -> str:
    """Projected T4 decode speed of Mixtral-8x7B from hit rates, saying whose routing they come from.

    Mixtral's own routing when this run recorded it (a GPU with the real model) or when ``trace`` names a
    recorded trace; otherwise the tiny model's, labelled an illustration.
    """
    from ..sim.timing import TimingModel

    if trace is not None:
        ks = list(range(2, 7))
        lfu_decay_rates = hit_rate_sweep(trace, ks, ["lfu_decay"])["lfu_decay"]
        source = f"the routing trace {trace}"
    elif not choice.tiny:
        source = f"{choice.name}'s own routing, recorded above"
    else:
        source = "the embedded tiny model's routing (an illustration of the method only: not Mixtral's routing)"
    timing = TimingModel()
    copy_ms = 1e3 * timing.transfer_s(1)
    compute_ms = 1e3 * timing.compute_s
    lines = [
        f"idealized T4 bound for Mixtral-8x7B from {source} (lfu_decay; no host cost, no prefetch): each miss "
        f"copies one expert ({copy_ms:.2f} ms), a token's compute reads its weights once ({compute_ms:.1f} ms)"
    ]
    for k, h in zip(ks, lfu_decay_rates, strict=True):
        p = timing.project_hit_rate(h)
        misses = (1 - h) * timing.num_layers * timing.experts_per_token
        bound = "PCIe bound: compute hidden behind copies" if p.transfer_s >= p.compute_s else "compute bound"
        lines.append(
            f"  K={k}: hit rate {h:.2f} -> {misses:5.2f} misses/token x {copy_ms:.2f} ms = {1e3 * p.transfer_s:5.1f} ms"
            f" of copies vs {compute_ms:.1f} ms compute: {p.overlapped:5.2f} tok/s overlapped ({bound}), "
            f"{p.serialized:5.2f} serialized"
        )
    lines.append("the calibrated T4 twin (host launches, syncs, streams, prefetch): python -m colab_helpers twin")
    return "\n".join(lines)
