"""GPU offloading benchmark: every variant of the engine on a full-size Mixtral-8x7B-shaped model, one run.

The model has random weights in the real quantized layout, made on the GPU (nothing is downloaded).
VRAM is capped to a free T4's budget for the offloaded variants. Routing comes from the model's own
(random) routers, or is forced from a real Mixtral routing trace (``--trace``; default: the shared
trace when present). Printed as tables:

- decode tokens/s of: ours (full: planned cache, prefetch, best policy), ours without prefetch, ours
  with the smallest cache, naive whole-layer offloading, everything resident;
- measured host→device / device→host bandwidth, and low-bit kernel bandwidth as a fraction of peak;
- projected T4 tokens/s from the timing model, with its inputs.

``--cpu-smoke`` runs every variant at tiny sizes on the CPU in well under two minutes (CI uses it).
Usage: ``python benchmarks/gpu_offload.py`` on a CUDA machine (≈5 min on one H200), or ``--cpu-smoke``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from colab_helpers.checkpoint import QuantConfig, expert_shapes
from colab_helpers.experts import ExpertLayout
from colab_helpers.model import OffloadConfig, assemble_model
from colab_helpers.moe import PrefetchConfig, expert_forward
from colab_helpers.synthetic import ScriptedRouter, mixtral_8x7b_config, random_experts, random_trunk

T4_VRAM_BUDGET_GB = 15.0  # what torch.cuda.mem_get_info reports free on a fresh Colab T4 (≈15.1 GB)
PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L4": 300.0, "T4": 320.0, "A10": 600.0}
DEFAULT_TRACES = (
    "../shared/traces/mixtral-8x7b-instruct-routing.npz",
    "shared/traces/mixtral-8x7b-instruct-routing.npz",
)


@dataclass(frozen=True)
class BenchSettings:
    device: str
    layers: int | None  # None: the full 32
    new_tokens: int
    prompt_tokens: int
    full_k: int
    small_k: int
    policy: str
    cap_vram_gb: float | None
    trace: str | None
    naive_tokens: int


@dataclass
class VariantResult:
    name: str
    experts_on_device: int
    prefetch: str
    tokens_per_s: float
    hit_rate: float
    misses_per_token: float
    prefetch_loads_per_token: float
    h2d_mb_per_token: float
    prefetch_precision: float
    prefetch_recall: float
    note: str = ""


class _TokenClock:
    """A generate() streamer that only records when each new token arrived."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:
            self._prompt = False
            return
        _sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(config, quant: QuantConfig, settings: BenchSettings, k: int, prefetch: bool, policy: str):
    cfg = OffloadConfig(
        device=settings.device,
        experts_on_device=k,
        policy=policy,
        prefetch=PrefetchConfig(enabled=prefetch),
        progress=False,
        dense_on_cpu=True,
    )
    trunk = random_trunk(config, quant, settings.device)
    return assemble_model(config, quant, trunk, random_experts(config, quant, settings.device), cfg)


def force_routing(model, trace: np.ndarray | None, seq_name: str) -> str:
    """Replace each router with a ``ScriptedRouter`` over the trace; returns a description."""
    if trace is None:
        return "model's own routers (random weights)"
    for layer_idx, layer in enumerate(model.model.layers):
        dev = layer.mlp.gate.weight.device
        layer.mlp.gate = ScriptedRouter(trace[:, layer_idx % trace.shape[1]], model.config.num_local_experts, dev)
    blocks = [layer.mlp for layer in model.model.layers]
    for i, block in enumerate(blocks):
        block.link(blocks[i + 1 : i + 1 + block.prefetch.lookahead])
    return f"forced from trace {seq_name} (prefetch guesses = the trace's next-layer choice: an oracle bound)"


def time_decode(model, settings: BenchSettings, new_tokens: int) -> tuple[float, dict]:
    """Decode tokens/s after a short prompt, and the cache counters for the decode steps only."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, settings.prompt_tokens), generator=gen).to(settings.device)
    cache = model.expert_cache
    clock = _TokenClock()
    _sync()
    model.generate(ids, max_new_tokens=1, do_sample=False)  # warm-up (kernels, allocator)
    cache.stats.reset()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock)
    _sync()
    n = len(clock.times) - 1
    tps = n / (clock.times[-1] - clock.times[0]) if n > 0 else 0.0
    return tps, cache.stats.summary()


def run_variant(name, config, quant, settings, trace, k, prefetch, policy, note="") -> VariantResult:
    model = build_model(config, quant, settings, k, prefetch, policy)
    routing = force_routing(model, trace, "gsm8k0")
    tps, s = time_decode(model, settings, settings.new_tokens)
    accesses = s["hits"] + s["misses"]
    tokens = max(1, accesses / (config.num_hidden_layers * config.num_experts_per_tok))
    result = VariantResult(
        name,
        k,
        "on" if prefetch else "off",
        tps,
        s["hit_rate"],
        s["misses"] / tokens,
        s["prefetch_loads"] / tokens,
        s["h2d_bytes"] / tokens / 1e6,
        s["prefetch_precision"],
        s["prefetch_recall"],
        note or routing,
    )
    del model
    _free()
    return result


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def naive_offload(config, quant, settings: BenchSettings, resident_tps: float) -> VariantResult:
    """Whole-layer offloading (accelerate ``device_map`` style): every token copies all of a layer's
    experts in before using it, synchronously. Timed: the copies of ``naive_tokens`` tokens; compute
    per token taken from the all-resident run."""
    layout = ExpertLayout.for_model(config, quant)
    pin = settings.device.startswith("cuda")
    host = torch.empty(config.num_local_experts, layout.nbytes, dtype=torch.uint8, pin_memory=pin)
    dev = torch.empty_like(host, device=settings.device)
    _sync()
    start = time.perf_counter()
    for _ in range(settings.naive_tokens):
        for _layer in range(config.num_hidden_layers):
            dev.copy_(host, non_blocking=pin)
            _sync()
    copy_s = (time.perf_counter() - start) / settings.naive_tokens
    tps = 1.0 / (copy_s + (1.0 / resident_tps if resident_tps else 0.0))
    moved = config.num_hidden_layers * config.num_local_experts * layout.nbytes
    del host, dev
    _free()
    return VariantResult(
        "naive whole-layer offload",
        0,
        "off",
        tps,
        0.0,
        config.num_hidden_layers * 8,
        0.0,
        moved / 1e6,
        0,
        0,
        f"copies measured ({copy_s * 1e3:.1f} ms/token) + resident compute",
    )


def bandwidth(settings: BenchSettings, nbytes: int, repeats: int = 10) -> dict[str, float]:
    """Pinned host↔device copy bandwidth in GB/s (on CPU: memcpy, for the smoke run)."""
    pin = settings.device.startswith("cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=settings.device)
    out = {}
    for name, dst, src in (("h2d_gbs", dev, host), ("d2h_gbs", host, dev)):
        dst.copy_(src)
        _sync()
        start = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src, non_blocking=pin)
        _sync()
        out[name] = nbytes * repeats / (time.perf_counter() - start) / 1e9
    return out


def kernel_bandwidth(config, quant, settings: BenchSettings, repeats: int = 20) -> dict[str, float]:
    """One resident expert's decode GEMVs (w1, w3, w2): packed bytes read per second."""
    from colab_helpers.quant import QuantizedWeight

    layout = ExpertLayout.for_model(config, quant)
    tensors = next(random_experts(config, quant, settings.device, distinct=1))[2]
    buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=settings.device)
    staging = torch.empty(layout.nbytes, dtype=torch.uint8)
    layout.pack(tensors, staging)
    buf.copy_(staging)
    weights: dict[str, QuantizedWeight] = layout.weights(buf)
    dtype = torch.float16 if settings.device.startswith("cuda") else torch.float32
    x = torch.randn(1, config.hidden_size, device=settings.device, dtype=dtype)
    expert_forward(x, weights)
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        expert_forward(x, weights)
    _sync()
    seconds = (time.perf_counter() - start) / repeats
    gbs = layout.nbytes / seconds / 1e9
    name = torch.cuda.get_device_name() if settings.device.startswith("cuda") else "cpu"
    peak = next((v for k, v in PEAK_GBS.items() if k in name), None)
    shapes = expert_shapes(config)
    return {
        "expert_us": seconds * 1e6,
        "kernel_gbs": gbs,
        "peak_gbs": peak or float("nan"),
        "fraction_of_peak": gbs / peak if peak else float("nan"),
        "expert_shape": str(shapes["w1"]),
    }


def load_trace(path: str | None, layers: int) -> tuple[np.ndarray | None, str | None]:
    candidates = [path] if path else list(DEFAULT_TRACES)
    for p in candidates:
        if p and Path(p).is_file():
            z = np.load(p)
            return z["gsm8k0_decode_experts"][:, :layers].astype(np.int64), p
    if path:
        raise FileNotFoundError(path)
    return None, None


def project_t4(results: dict[str, VariantResult]) -> list[tuple[str, float, float, float]]:
    """The T4 timing model (docs/PERFORMANCE.md physics) fed with the measured loads per token.

    Returns (variant, demand misses/token, prefetch loads/token, projected tok/s): prefetch loads
    overlap compute, demand misses stall (``Projection.pipelined``). Full-size runs only.
    """
    from colab_helpers.trace import TimingModel

    timing = TimingModel()
    rows = []
    for r in results.values():
        if r.name.startswith("naive") or r.name.startswith("everything"):
            continue
        proj = timing.project(r.misses_per_token, r.prefetch_loads_per_token)
        rows.append((r.name, r.misses_per_token, r.prefetch_loads_per_token, proj.pipelined))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, every variant, < 2 min")
    ap.add_argument("--trace", default=None, help="routing trace .npz (default: the shared trace if present)")
    ap.add_argument("--routing", choices=["auto", "model", "trace"], default="auto")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--full-k", type=int, default=5, help="experts per layer for 'ours (full)' (T4 plan: 5)")
    ap.add_argument("--policy", default="lfu_decay")
    ap.add_argument("--json", default=None, help="also write all results to this JSON file")
    args = ap.parse_args(argv)

    if args.cpu_smoke:
        from transformers import MixtralConfig

        config = MixtralConfig(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            vocab_size=512,
            max_position_embeddings=512,
        )
        settings = BenchSettings(
            "cpu", None, args.new_tokens or 16, 8, args.full_k, 1, args.policy, None, args.trace, 2
        )
    else:
        if not torch.cuda.is_available():
            print("needs CUDA (use --cpu-smoke on a CPU machine)", file=sys.stderr)
            return 2
        config = mixtral_8x7b_config()
        settings = BenchSettings(
            "cuda", None, args.new_tokens or 48, 16, args.full_k, 1, args.policy, T4_VRAM_BUDGET_GB, args.trace, 2
        )
    quant = QuantConfig()
    trace, trace_path = (None, None)
    if args.routing != "model":
        trace, trace_path = load_trace(args.trace, config.num_hidden_layers)
        if args.routing == "trace" and trace is None:
            raise SystemExit("no trace found: pass --trace PATH")
    started = time.perf_counter()
    device_name = torch.cuda.get_device_name() if settings.device == "cuda" else "cpu"
    print(f"# gpu_offload benchmark on {device_name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(
        f"# model: {config.num_hidden_layers} layers, hidden {config.hidden_size}, random 4-bit attention / "
        f"2-bit experts; routing: {'trace ' + trace_path if trace is not None else 'model'}"
    )

    results: dict[str, VariantResult] = {}
    # everything resident first (no cap: all experts on the device), then the T4-capped variants
    results["resident"] = run_variant(
        "everything resident",
        config,
        quant,
        settings,
        trace,
        config.num_local_experts,
        False,
        "lru",
        note="all experts on the device; VRAM not capped (does not fit a T4)",
    )
    if settings.cap_vram_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, settings.cap_vram_gb * 1e9 / total))
    variants = [
        ("ours (full)", settings.full_k, True, settings.policy),
        ("ours, no prefetch", settings.full_k, False, settings.policy),
        ("ours, LRU + prefetch", settings.full_k, True, "lru"),
        ("ours, LRU, no prefetch (paper's public code)", settings.full_k, False, "lru"),
        ("ours, smallest cache", settings.small_k, True, settings.policy),
    ]
    for name, k, prefetch, policy in variants:
        results[name] = run_variant(name, config, quant, settings, trace, k, prefetch, policy)
        print(f"  {name}: {results[name].tokens_per_s:.2f} tok/s", file=sys.stderr, flush=True)
    results["naive"] = naive_offload(config, quant, settings, results["resident"].tokens_per_s)
    bw = bandwidth(settings, ExpertLayout.for_model(config, quant).nbytes)
    kb = kernel_bandwidth(config, quant, settings)

    print(
        "\n| variant | experts/layer on device | prefetch | decode tok/s | hit rate | misses/token | "
        "H2D MB/token | prefetch precision | recall | notes |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results.values():
        print(
            f"| {r.name} | {r.experts_on_device} | {r.prefetch} | {r.tokens_per_s:.2f} | {r.hit_rate:.3f} | "
            f"{r.misses_per_token:.1f} | {r.h2d_mb_per_token:.0f} | {r.prefetch_precision:.2f} | "
            f"{r.prefetch_recall:.2f} | {r.note} |"
        )
    print("\n| measurement | value |\n| --- | --- |")
    for k, v in {**bw, **kb}.items():
        print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    print("\n| projected on a free T4 (timing model) | demand misses/token | prefetch loads/token | tok/s |")
    print("| --- | --- | --- | --- |")
    for name, misses, loads, tps in project_t4(results):
        print(f"| {name} | {misses:.1f} | {loads:.1f} | {tps:.2f} |")
    if settings.device == "cpu":
        print("(smoke run: tiny model, so the T4 projection above is not meaningful)")
    full, base = results["ours (full)"], results["ours, LRU, no prefetch (paper's public code)"]
    print(f"\nwall time {time.perf_counter() - started:.1f}s")
    if args.json:
        payload = {
            "results": [asdict(r) for r in results.values()],
            "bandwidth": bw,
            "kernel": kb,
            "settings": asdict(replace(settings)),
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    ratio = full.tokens_per_s / base.tokens_per_s if base.tokens_per_s else float("nan")
    print(f"ours (full) / paper-public-code-equivalent tokens/s: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
