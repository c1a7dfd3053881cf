"""GPU offloading benchmark: every variant of the engine on a full-size Mixtral-8x7B-shaped model, one run.

The model has random weights in the real quantized layout, made on the GPU (nothing is downloaded).
Routing comes from the model's own (random) routers, or is forced from a real Mixtral routing trace
(``--trace``; default: the shared trace when present). Printed as tables:

- decode tokens/s of: ours (full: planned cache, prefetch, best policy), ours without prefetch, ours
  with the smallest cache, naive whole-layer offloading, everything resident;
- measured host→device / device→host bandwidth, and low-bit kernel bandwidth (CUDA events over a CUDA
  graph replay, as ``kernel_bench.py``) as a fraction of peak;
- projected T4 tokens/s from the timing model, with its inputs.

Every variant is first checked against the memory planner: one that cannot fit this GPU (everything
resident needs ≈18 GB, more than a 15 GB T4 has) is skipped with a note instead of running out of memory.
``--emulate-t4`` on a bigger GPU caps the caching allocator to a free T4's 15.0 GB
(``torch.cuda.set_per_process_memory_fraction``), plans the cache for that VRAM and Colab's 12.7 GB of
host RAM, and reports the measured RSS against 12.7 GB. PCIe and memory bandwidth are the bigger GPU's:
the T4 projection table converts the measured loads per token with the T4 timing model.

``--cpu-smoke`` runs every variant at tiny sizes on the CPU in seconds (CI uses it). ``--json`` is
rewritten after every variant, so a run stopped half-way still leaves its results.
Usage: ``python benchmarks/gpu_offload.py [--emulate-t4] --json r.json`` on a CUDA machine, or ``--cpu-smoke``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from colab_helpers.model import OffloadConfig, assemble_model
from colab_helpers.runtime.experts import ExpertLayout
from colab_helpers.runtime.kernels import expert_mlp
from colab_helpers.runtime.moe import PrefetchConfig
from colab_helpers.sim.synthetic import ScriptedRouter, mixtral_8x7b_config, random_experts, random_trunk, smoke_config
from colab_helpers.weights.checkpoint import QuantConfig
from colab_helpers.weights.model_spec import ModelSpec

T4_VRAM_BUDGET_GB = 15.0  # what torch.cuda.mem_get_info reports free on a fresh Colab T4 (≈15.1 GB)
COLAB_RAM_GB = 12.7  # a free Colab session's host RAM
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
    full_k: int | list[int]  # experts per layer for "ours (full)": one for all layers, or per layer
    small_k: int
    policy: str
    cap_vram_gb: float | None  # caching-allocator cap for every variant (T4 emulation); None: the whole GPU
    trace: str | None
    naive_tokens: int
    ram_budget_gb: float | None = None  # host RAM the plan may use (T4 emulation: Colab's 12.7 GB)


@dataclass
class VariantResult:
    name: str
    experts_on_device: int | list[int]
    prefetch: str
    tokens_per_s: float | None  # None: skipped (does not fit this GPU)
    hit_rate: float
    misses_per_token: float
    prefetch_loads_per_token: float
    h2d_mb_per_token: float
    prefetch_precision: float
    prefetch_recall: float
    note: str = ""
    rss_gb: float | None = None  # this process's RSS after building the variant
    vram_peak_gb: float | None = None  # caching allocator's peak reserved memory during the variant

    @classmethod
    def skipped(cls, name: str, k, prefetch: bool, why: str) -> VariantResult:
        return cls(name, k, "on" if prefetch else "off", None, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, f"skipped: {why}")


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


def _t4_attention():
    from colab_helpers.sim.t4_emulation import t4_attention

    return t4_attention()


def build_model(config, quant: QuantConfig, settings: BenchSettings, k, prefetch: bool, policy: str):
    cfg = OffloadConfig(
        device=settings.device,
        experts_on_device=k if isinstance(k, int) else tuple(k),  # per layer, as the planner gives it
        policy=policy,
        prefetch=PrefetchConfig(enabled=prefetch),
        progress=False,
        dense_on_cpu=True,
        attention=_t4_attention() if settings.cap_vram_gb is not None else None,  # T4 emulation: its path
        embedding_on_host=_cuda(settings),  # the planner's choice for Mixtral on a GPU: planned_experts counts it
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


def _cuda(settings: BenchSettings) -> bool:
    return settings.device.startswith("cuda")


def why_it_does_not_fit(config, quant: QuantConfig, settings: BenchSettings, k) -> str | None:
    """None when the memory planner says ``k`` experts per layer fit this GPU (under the cap), else its reasons."""
    if not _cuda(settings):
        return None
    from colab_helpers.planning.planner import Budget, measure_budget

    here = measure_budget(settings.device)
    vram = here.vram
    if settings.cap_vram_gb is not None:
        vram = min(vram, int(settings.cap_vram_gb * 1e9) - torch.cuda.memory_reserved())
    if settings.ram_budget_gb is not None:  # the emulated machine's RAM, not this one's (which may grow on demand)
        budget = Budget(vram, int(settings.ram_budget_gb * 1e9))
    else:
        budget = Budget(vram, here.ram, rss_now=here.rss_now, measured=True)
    return plan_reasons(config, quant, budget, settings, k)


def plan_reasons(config, quant: QuantConfig, budget, settings: BenchSettings, k) -> str | None:
    """The planner's verdict on ``k`` experts per layer for this benchmark's short context: None = fits."""
    from colab_helpers.planning.planner import plan_memory

    context = settings.prompt_tokens + settings.new_tokens + 8
    plan = plan_memory(config, quant, budget, "cuda", context=context, experts_on_device=k, suggest=False)
    return None if plan.fits else "; ".join(plan.reasons)


def planned_experts(config, quant: QuantConfig, budget) -> int | list[int]:
    """The planner's experts per layer for a 4096-token chat within ``budget`` (see ``t4_budget``)."""
    from colab_helpers.planning.planner import plan_memory

    k = plan_memory(config, quant, budget, "cuda", context=4096).experts_on_device
    return k if isinstance(k, int) else list(k)


def t4_budget(settings: BenchSettings):
    """A free T4's budget: given (T4 emulation), or this GPU's measured one but no more than a T4 has."""
    from colab_helpers.planning.planner import Budget, measure_budget

    if settings.cap_vram_gb is not None:
        return Budget.given(settings.cap_vram_gb, settings.ram_budget_gb or COLAB_RAM_GB)
    here = measure_budget(settings.device)
    vram, ram = min(here.vram, int(T4_VRAM_BUDGET_GB * 1e9)), min(here.ram, int(COLAB_RAM_GB * 1e9))
    return Budget(vram, ram, rss_now=min(here.rss_now, ram), measured=True)


def _rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e9


def run_variant(name, config, quant, settings, trace, k, prefetch, policy, note="") -> VariantResult:
    """Build, check and time one variant; a variant that does not fit (planner or a real OOM) is skipped."""
    why = why_it_does_not_fit(config, quant, settings, k)
    if why:
        return VariantResult.skipped(name, k, prefetch, why)
    if _cuda(settings):
        torch.cuda.reset_peak_memory_stats()
    model, oom = None, None
    try:
        model = build_model(config, quant, settings, k, prefetch, policy)
        rss = _rss_gb()
        routing = force_routing(model, trace, "gsm8k0")
        tps, s = time_decode(model, settings, settings.new_tokens)
    except torch.cuda.OutOfMemoryError as err:
        oom = str(err).splitlines()[0]
    if oom is not None:  # outside the except block, so its traceback no longer holds the model's tensors
        model = None
        _free()
        return VariantResult.skipped(name, k, prefetch, f"out of memory although the planner said it fits: {oom}")
    accesses = s["hits"] + s["misses"]
    tokens = max(1, accesses / (config.num_hidden_layers * config.num_experts_per_tok))
    result = VariantResult(
        name,
        k,
        "on" if prefetch else "off",
        tps,
        s["hit_rate"],
        s["misses"] / tokens,
        s["speculative_bytes"] / model.expert_cache.layout.nbytes / tokens,  # in expert units: chunks count
        s["h2d_bytes"] / tokens / 1e6,
        s["prefetch_precision"],
        s["prefetch_recall"],
        note or routing,
        rss_gb=rss,
        vram_peak_gb=torch.cuda.max_memory_reserved() / 1e9 if _cuda(settings) else None,
    )
    if settings.ram_budget_gb is not None and rss > settings.ram_budget_gb:
        result.note += f"; RSS {rss:.2f} GB is over the {settings.ram_budget_gb} GB RAM budget"
    del model
    _free()
    return result


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def naive_offload(
    config, quant, settings: BenchSettings, compute_tps: float | None, compute_from: str
) -> VariantResult:
    """Whole-layer offloading (accelerate ``device_map`` style): every token copies all of a layer's
    experts in before using it, synchronously. Timed: the copies of ``naive_tokens`` tokens; compute
    per token taken from the all-resident run (``compute_from`` says which run when that was skipped)."""
    layout = ExpertLayout.of(ModelSpec.of(config, quant))
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
    tps = 1.0 / (copy_s + (1.0 / compute_tps if compute_tps else 0.0))
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
        f"copies measured ({copy_s * 1e3:.1f} ms/token) + compute of {compute_from}",
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


def kernel_bandwidth(config, quant, settings: BenchSettings, repeats: int = 20) -> dict[str, float | str]:
    """One expert as decode runs it (``kernels.expert_mlp``: w1 and w3 in one fused launch, then w2 with the
    weighted sum into the layer output): packed bytes read per second.

    On CUDA: timed with CUDA events over a CUDA-graph replay of several distinct expert buffers (more
    bytes than the L2 holds), as ``kernel_bench.py`` does, so Python launch overhead is not counted;
    eager launches only if graph capture fails (said in ``timing``). On the CPU: wall clock, eager.
    """
    from colab_helpers.runtime.kernels import use_fused_kernel
    from colab_helpers.weights.quant import QuantizedWeight

    layout = ExpertLayout.of(ModelSpec.of(config, quant))
    tensors = next(random_experts(config, quant, settings.device, distinct=1))[2]
    staging = torch.empty(layout.nbytes, dtype=torch.uint8)
    layout.pack(tensors, staging)
    copies = 1
    if _cuda(settings):
        l2 = torch.cuda.get_device_properties(settings.device).L2_cache_size
        copies = min(8, max(2, math.ceil(3 * l2 / layout.nbytes)))
    experts: list[dict[str, QuantizedWeight]] = []
    for _ in range(copies):
        buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=settings.device)
        buf.copy_(staging)
        experts.append(layout.weights(buf))
    dtype = torch.float16 if _cuda(settings) else torch.float32
    x = torch.randn(1, config.hidden_size, device=settings.device, dtype=dtype)
    coef = torch.tensor(0.5, dtype=dtype, device=settings.device)
    out = torch.zeros_like(x)
    calls = [lambda w=w: expert_mlp(x, w, coef, out) for w in experts]
    if _cuda(settings):
        seconds, timing = _cuda_seconds_per_call(calls, repeats)
    else:
        for call in calls:
            call()
        start = time.perf_counter()
        for _ in range(repeats):
            for call in calls:
                call()
        seconds, timing = (time.perf_counter() - start) / (repeats * len(calls)), "wall clock, eager (CPU)"
    gbs = layout.nbytes / seconds / 1e9
    name = torch.cuda.get_device_name() if _cuda(settings) else "cpu"
    peak = next((v for k, v in PEAK_GBS.items() if k in name), None)
    shapes = ModelSpec.of(config).expert_shapes
    return {
        "expert_us": seconds * 1e6,
        "kernel_gbs": gbs,
        "peak_gbs": peak,  # None: not in PEAK_GBS (JSON has no NaN)
        "fraction_of_peak": gbs / peak if peak else None,
        "expert_shape": str(shapes["w1"]),
        "timing": timing,
        "fused_kernel": use_fused_kernel(x, experts[0]["w1"]),  # False: the dequantize + matmul path was timed
    }


def _cuda_seconds_per_call(calls, repeats: int) -> tuple[float, str]:
    """``kernel_bench.time_per_call`` (CUDA events, graph replay), falling back to eager launches."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kernel_bench import time_per_call

    try:
        return time_per_call(calls, graph=True, reps=repeats), f"CUDA events over a CUDA graph of {len(calls)} experts"
    except Exception as err:  # capture can fail (a host sync inside); say so and time eager launches instead
        torch.cuda.synchronize()
        why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return time_per_call(calls, graph=False, reps=repeats), f"CUDA events, eager launches (graph failed: {why})"


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
    from colab_helpers.sim.trace import TimingModel

    timing = TimingModel()
    rows = []
    for r in results.values():
        if r.name.startswith("naive") or r.name.startswith("everything") or r.tokens_per_s is None:
            continue
        proj = timing.project(r.misses_per_token, r.prefetch_loads_per_token)
        rows.append((r.name, r.misses_per_token, r.prefetch_loads_per_token, proj.pipelined))
    return rows


def _k_text(k) -> str:
    """``5`` or ``6x11, 5x21`` for per-layer lists."""
    if isinstance(k, int):
        return str(k)
    runs: list[list[int]] = []
    for v in k:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return ", ".join(f"{v}x{n}" for v, n in runs)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_tables(results: dict[str, VariantResult], bw: dict, kb: dict, settings: BenchSettings) -> None:
    print(
        "\n| variant | experts/layer on device | prefetch | decode tok/s | hit rate | misses/token | "
        "H2D MB/token | prefetch precision | recall | RSS GB | VRAM peak GB | notes |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results.values():
        if r.tokens_per_s is None:
            print(f"| {r.name} | {_k_text(r.experts_on_device)} | {r.prefetch} | skipped | | | | | | | | {r.note} |")
            continue
        print(
            f"| {r.name} | {_k_text(r.experts_on_device)} | {r.prefetch} | {r.tokens_per_s:.2f} | {r.hit_rate:.3f} | "
            f"{r.misses_per_token:.1f} | {r.h2d_mb_per_token:.0f} | {r.prefetch_precision:.2f} | "
            f"{r.prefetch_recall:.2f} | {_fmt(r.rss_gb, '.2f')} | {_fmt(r.vram_peak_gb, '.2f')} | {r.note} |"
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, every variant, seconds")
    ap.add_argument(
        "--emulate-t4",
        action="store_true",
        help=f"cap VRAM to a free T4's {T4_VRAM_BUDGET_GB} GB and plan for Colab's {COLAB_RAM_GB} GB of RAM",
    )
    ap.add_argument("--quick", action="store_true", help="only resident, ours (full), the paper's baseline, naive")
    ap.add_argument("--trace", default=None, help="routing trace .npz (default: the shared trace if present)")
    ap.add_argument("--routing", choices=["auto", "model", "trace"], default="auto")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument(
        "--full-k", type=int, default=None, help="experts per layer for 'ours (full)' (default: a T4's plan; smoke: 5)"
    )
    ap.add_argument("--policy", default="lfu_decay")
    ap.add_argument("--json", default=None, help="also write all results to this JSON file (after every variant)")
    args = ap.parse_args(argv)

    if args.cpu_smoke:
        config = smoke_config()
        settings = BenchSettings("cpu", None, args.new_tokens or 16, 8, args.full_k or 5, 1, args.policy, None, None, 2)
    else:
        if not torch.cuda.is_available():
            print("needs CUDA (use --cpu-smoke on a CPU machine)", file=sys.stderr)
            return 2
        config = mixtral_8x7b_config()
        emulate = args.emulate_t4
        settings = BenchSettings(
            "cuda",
            None,
            args.new_tokens or 48,
            16,
            args.full_k or 5,
            1,
            args.policy,
            T4_VRAM_BUDGET_GB if emulate else None,
            None,
            2,
            COLAB_RAM_GB if emulate else None,
        )
    settings = replace(settings, trace=args.trace)
    quant = QuantConfig()
    emulation = None
    if settings.cap_vram_gb is not None:  # 15.0 GB minus what the runtime holds outside the allocator; no flash
        from colab_helpers.sim.t4_emulation import cap_like_t4

        emulation = cap_like_t4("cuda", int(settings.cap_vram_gb * 1e9))
    if _cuda(settings) and args.full_k is None:  # the cache a free T4 gets (on a bigger GPU: as if it were one)
        settings = replace(settings, full_k=planned_experts(config, quant, t4_budget(settings)))
    trace, trace_path = (None, None)
    if args.routing != "model":
        trace, trace_path = load_trace(args.trace, config.num_hidden_layers)
        if args.routing == "trace" and trace is None:
            raise SystemExit("no trace found: pass --trace PATH")
        settings = replace(settings, trace=trace_path)  # the one used (the report names it; the twin reads it)
    started = time.perf_counter()
    device_name = torch.cuda.get_device_name() if settings.device == "cuda" else "cpu"
    print(f"# gpu_offload benchmark on {device_name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(
        f"# model: {config.num_hidden_layers} layers, hidden {config.hidden_size}, random 4-bit attention / "
        f"2-bit experts; routing: {'trace ' + trace_path if trace is not None else 'model'}"
    )
    if settings.cap_vram_gb is not None:
        print(
            f"# T4 emulation: caching allocator capped to {emulation['cap_bytes'] / 1e9:.3f} GB "
            f"({settings.cap_vram_gb} GB - {emulation['runtime_outside_bytes'] / 1e9:.3f} GB the runtime holds "
            f"outside it), T4 attention (memory-efficient SDPA, chunked prefill), plan for {settings.ram_budget_gb} "
            f"GB host RAM; PCIe and memory bandwidth are this GPU's (see the T4 projection table)"
        )

    results: dict[str, VariantResult] = {}
    bw: dict = {}
    kb: dict = {}

    def save(partial: bool = True) -> None:
        if args.json:
            payload = {
                "results": [asdict(r) for r in results.values()],
                "bandwidth": bw,
                "kernel": kb,
                "settings": asdict(settings),
                "device": device_name,
                "torch": torch.__version__,
                "partial": partial,
                "wall_s": time.perf_counter() - started,
                "t4_emulation": emulation,
                "routing": f"trace {trace_path}" if trace is not None else "the model's random routers (no trace)",
            }
            Path(args.json).write_text(json.dumps(payload, indent=2))

    def step(key: str, name: str, k, prefetch: bool, policy: str, note: str = "") -> None:
        results[key] = run_variant(name, config, quant, settings, trace, k, prefetch, policy, note)
        r = results[key]
        done = "skipped: " + r.note[9:] if r.tokens_per_s is None else f"{r.tokens_per_s:.2f} tok/s"
        print(f"  {name}: {done}", file=sys.stderr, flush=True)
        save()

    # cheap measurements first: a run stopped by a time box still has them
    bw.update(bandwidth(settings, ExpertLayout.of(ModelSpec.of(config, quant)).nbytes))
    kb.update(kernel_bandwidth(config, quant, settings))
    save()
    full_k, experts = settings.full_k, config.num_local_experts
    step("resident", "everything resident", experts, False, "lru", "all experts on the device")
    step("ours (full)", "ours (full)", full_k, True, settings.policy)
    baseline = "ours, LRU, no prefetch (paper's public code)"
    step(baseline, baseline, full_k, False, "lru")
    compute = next((r for r in results.values() if r.tokens_per_s), None)
    results["naive"] = naive_offload(
        config,
        quant,
        settings,
        compute.tokens_per_s if compute else None,
        "the all-resident run" if compute is results["resident"] else f"'{compute.name}'" if compute else "none",
    )
    save()
    if not args.quick:
        step("ours, no prefetch", "ours, no prefetch", full_k, False, settings.policy)
        step("ours, LRU + prefetch", "ours, LRU + prefetch", full_k, True, "lru")
        small = smallest_fitting_k(config, quant, settings, settings.small_k)
        step("ours, smallest cache", "ours, smallest cache", small, True, settings.policy)

    print_tables(results, bw, kb, settings)
    print(f"\nwall time {time.perf_counter() - started:.1f}s")
    save(partial=False)
    full, base = results["ours (full)"], results[baseline]
    ratio = full.tokens_per_s / base.tokens_per_s if full.tokens_per_s and base.tokens_per_s else float("nan")
    print(f"ours (full) / paper-public-code-equivalent tokens/s: {ratio:.2f}")
    return 0


def smallest_fitting_k(config, quant: QuantConfig, settings: BenchSettings, k: int) -> int:
    """``k`` or, when its host store does not fit the RAM budget (a T4 with 1 per layer), the next that does."""
    for candidate in range(k, config.num_local_experts + 1):
        if why_it_does_not_fit(config, quant, settings, candidate) is None:
            return candidate
    return k


if __name__ == "__main__":
    raise SystemExit(main())
