"""``python -m colab_helpers twin [--paper] [--model M] [--json]``: the twin's command line (docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .twin import (
    FITTED,
    NUM_EXPERTS,
    NUM_LAYERS,
    PAPER_RECALL,
    PAPER_T4,
    PRESETS,
    TOP_K,
    Hardware,
    PaperSetup,
    decode_rows,
    paper_tok_s,
)
from .twin_family import TRACE_ENV, trace_path
from .twin_project import FREE_T4, EngineProjection, compare_with_offload, planned, project_ours


def _parser() -> argparse.ArgumentParser:
    from ..usage import ArgumentParser, positive_float, positive_int

    p = ArgumentParser(
        prog="python -m colab_helpers twin",
        description="Discrete-event twin of decode on a GPU: calibrate on the paper (--paper) or project ours.",
    )
    p.add_argument("--paper", action="store_true", help="the paper's four T4 variants vs its Table 2")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument(
        "--model",
        default=None,
        help="project this model: a folder, config.json or hub repo id, as for plan --model (default: Mixtral-8x7B)",
    )
    p.add_argument(
        "--trace",
        type=Path,
        default=None,
        help=f"routing trace .npz of the projected model (default: ${TRACE_ENV}; none is shipped)",
    )
    p.add_argument(
        "--routing",
        choices=("auto", "trace", "synthetic"),
        default="auto",
        help="auto (default): the trace when one is given and is of this model, else synthetic routing, labelled "
        "SYNTHETIC; trace: refuse to run without one; synthetic: ignore any trace",
    )
    p.add_argument("--sequences", default=None, help="comma-separated sequence names of the trace (default: all)")
    p.add_argument("--hardware", choices=sorted(PRESETS), default="t4", help="GPU preset to simulate (default t4)")
    p.add_argument(
        "--h2d-gbs",
        type=positive_float,
        default=None,
        help="override pinned host->device GB/s, e.g. measured (default: the preset's)",
    )
    p.add_argument(
        "--d2h-gbs",
        type=positive_float,
        default=None,
        help="override pinned device->host GB/s, e.g. measured (default: the preset's)",
    )
    p.add_argument(
        "--kernel-efficiency",
        type=positive_float,
        default=None,
        help="override: fraction of HBM peak our kernels reach (default: the preset's)",
    )
    p.add_argument(
        "--vram-gb",
        type=positive_float,
        default=FREE_T4["vram_gb"],
        help="plan for this much free VRAM, GB (default %(default)s, a free T4)",
    )
    p.add_argument(
        "--ram-gb",
        type=positive_float,
        default=FREE_T4["ram_gb"],
        help="plan for this much host RAM, GB (default %(default)s, a free T4)",
    )
    p.add_argument(
        "--embedding-on-gpu",
        action="store_true",
        help="plan with the embedding table on the GPU (default: where the planner puts it; on a free T4, host RAM)",
    )
    p.add_argument(
        "--experts-on-device",
        type=positive_int,
        default=None,
        help="fixed K per layer instead of the plan (default: planned)",
    )
    p.add_argument(
        "--recall", type=float, default=PAPER_RECALL, help="prefetch guess recall (= precision) (default %(default)s)"
    )
    p.add_argument("--no-prefetch", action="store_true", help="simulate without speculative prefetch")
    p.add_argument(
        "--no-kv-lending",
        action="store_true",
        help="simulate without the KV cache lending its unreached tail as expert slots (kv_arena.KVArena)",
    )
    p.add_argument(
        "--prompt-tokens",
        type=positive_int,
        default=16,
        help="conversation length before the warm-up: the longer, the fewer slots the KV cache still lends "
        "(default %(default)s)",
    )
    p.add_argument(
        "--prefetch-mode",
        choices=("auto", "evict"),
        default="auto",
        help="auto (default): guesses load only into free slots, in chunks, paced; evict: a guess may evict",
    )
    p.add_argument(
        "--chunks", type=int, default=None, help="auto: chunks per speculative load (default: PrefetchConfig's, 8)"
    )
    p.add_argument(
        "--chunks-per-step",
        type=int,
        default=None,
        help="auto: speculative chunks issued per layer step (default: PrefetchConfig's, 1)",
    )
    p.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        help="next-router probability a guess needs (default: PrefetchConfig's, 0)",
    )
    p.add_argument("--policy", default="lfu_decay", help="eviction policy (default lfu_decay)")
    p.add_argument("--tokens", type=positive_int, default=48, help="decode steps recorded (default 48)")
    p.add_argument("--warmup", type=_non_negative_int, default=32, help="decode steps run first (default 32)")
    p.add_argument(
        "--compare-offload",
        type=Path,
        default=None,
        metavar="JSON",
        help="benchmarks/gpu_offload.py --json report: predict its 'ours (full)' tok/s with its measured "
        "bandwidth (default: none)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON object to this file (default: none)")
    return p


def _trace_for(report: dict, path: Path | None) -> dict:
    """The routing trace a GPU run used (``path``, else the one its report names); a run on its model's own
    (random) routers gets seeded random routing."""
    used = (report.get("settings") or {}).get("trace")
    source = path or (Path(used) if used else None)
    if source is None:
        rng = np.random.default_rng(0)
        rows = np.argsort(rng.random((256, NUM_LAYERS, NUM_EXPERTS)), axis=2)[:, :, :TOP_K]
        return {"random_decode_experts": rows.astype(np.int8)}
    return dict(np.load(find_trace(source)))


def _non_negative_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def find_trace(path: Path | None) -> Path:
    """``--trace``, else ``$COLAB_HELPERS_TRACE``; FileNotFoundError saying how to give one."""
    found = trace_path(path)
    if found is None:
        raise FileNotFoundError(
            f"no routing trace: give --trace PATH or set {TRACE_ENV} (none is shipped; `python -m colab_helpers "
            "record` saves one from a model)"
        )
    if not found.is_file():
        raise FileNotFoundError(f"routing trace not found: {found}")
    return found


def _hardware(args: argparse.Namespace) -> Hardware:
    gbs = {"h2d_bytes_per_s": args.h2d_gbs, "d2h_bytes_per_s": args.d2h_gbs}
    return PRESETS[args.hardware].with_measured(
        **{k: v * 1e9 for k, v in gbs.items() if v is not None}, kernel_efficiency=args.kernel_efficiency
    )


def paper_report(figures: dict[str, float], setup: PaperSetup, hw: Hardware) -> str:
    lines = [
        f"twin of the paper's implementation on {hw.name}: K={setup.experts_on_device} LRU, loads and write-backs "
        "on the compute stream (its public code), 'full' = + next-layer guesses on a copy stream at recall "
        f"{setup.recall} (Fig. 2 of arXiv 2312.17238)",
        "fitted factors: " + ", ".join(f"{name} = {getattr(setup, name)}" for name in FITTED),
        "",
        f"{'variant':<14}{'paper tok/s':>12}{'twin tok/s':>12}{'error':>9}",
    ]
    for v, paper in PAPER_T4.items():
        lines.append(f"{v:<14}{paper:>12.3f}{figures[v]:>12.3f}{figures[v] / paper - 1:>+9.1%}")
    lines.append(f"\n{hw.source}")
    return "\n".join(lines)


def ours_report(p: EngineProjection) -> str:
    d = p.to_dict()
    ks = sorted(set(p.experts_on_device))
    k_text = ", ".join(f"{k} in {p.experts_on_device.count(k)} layers" for k in reversed(ks))
    lines = [
        f"twin of our engine on {p.hardware.name}, {p.notes.get('model', 'Mixtral-8x7B')}: {k_text}, {p.policy}, "
        f"prefetch recall {p.recall} ({p.tokens} decode steps recorded after warm-up); "
        f"KV cache lending {p.notes.get('kv_lent_slots', 0)} expert slots at the end",
        f"routing: {p.notes.get('routing', 'the recorded routing trace')}",
        f"projected {d['tok_s']:.2f} tok/s   hit rate {d['hit_rate']:.3f}"
        f"   expert loads/token {d['loads_per_token']:.1f}"
        f"   syncs/token {d['syncs_per_token']:.0f}   launches/token {d['launches_per_token']:.0f}"
        f" (dispatch_count, forward only; simulated with generate's own: {d['simulated_syncs_per_token']:.0f}"
        f" and {d['simulated_launches_per_token']:.0f}, {d['fused_launches_per_token']:.0f} fused)",
        "per token (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in d["ms_per_token"].items()),
        f"\n{p.hardware.source}",
    ]
    return "\n".join(lines)


def cli_main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        names = [n.strip() for n in args.sequences.split(",")] if args.sequences else None
        hw = _hardware(args)
        if args.compare_offload is not None:
            report = json.loads(args.compare_offload.read_text())
            trace = _trace_for(report, args.trace)
            got = compare_with_offload(report, trace, args.tokens, args.warmup)
            print(
                f"twin vs {got['device']}: predicted {got['predicted_tok_s']:.2f} tok/s, measured "
                f"{got['measured_tok_s']:.2f} (x{got['predicted_over_measured']:.2f}); inputs {got['inputs']}"
            )
            _emit(got, args)
            return 0
        target = _target(args.model)
        if args.paper:
            if target is not None and target.family is not None:
                raise ValueError("--paper reproduces the paper's Mixtral-8x7B runs; it takes no other --model")
            trace = dict(np.load(find_trace(args.trace)))
            setup = PaperSetup()
            figures = paper_tok_s(decode_rows(trace, names), setup, hw)
            print(paper_report(figures, setup, hw))
            if args.json:
                fitted = {n: getattr(setup, n) for n in FITTED}
                _emit({**{k: round(v, 3) for k, v in figures.items()}, **fitted}, args)
            return 0
        proj = _project(args, target, names, hw)
    except (OSError, ValueError, KeyError) as err:
        print(f"twin: {err}", file=sys.stderr)
        return 2
    print(ours_report(proj))
    _emit(proj.to_dict(), args)
    return 0


@dataclass(frozen=True)
class Target:
    """The model ``--model`` names: its architecture and bit widths; ``family`` None when it is Mixtral-8x7B's shape
    at the demo's bit widths (the twin's own narrow Mixtral, exactly as without ``--model``)."""

    name: str
    arch: object  # families.MoEArchitecture
    quant: object  # checkpoint.QuantConfig
    family: object | None  # twin_family.FamilyTwin


def _target(model: str | None) -> Target | None:
    if model is None:
        return None
    from ..planning.planner import model_for_cli
    from ..weights.model_spec import ModelSpec
    from .twin_family import FamilyTwin, is_stock_mixtral

    config, quant, _ = model_for_cli(model, 2)
    arch = ModelSpec.of(config, quant).arch
    family = None if is_stock_mixtral(arch, quant) else FamilyTwin(arch, quant)
    return Target(f"{model} ({arch.name}, {quant.experts.nbits}-bit experts)", arch, quant, family)


def _routing(args: argparse.Namespace, target: Target | None, names: list[str] | None) -> tuple[np.ndarray, str]:
    """Decode rows ``[T, L, k]`` for the projected model and what they are (see ``twin_family``'s docstring)."""
    from .twin_family import STICKINESS, synthetic_routing, trace_mismatch

    arch = None if target is None else target.arch
    mixtral = target is None or target.family is None
    path = trace_path(args.trace)
    if args.routing != "synthetic" and path is not None:
        trace = dict(np.load(find_trace(path)))
        why = None if arch is None else trace_mismatch(trace, arch)
        if why is None:
            return np.concatenate(decode_rows(trace, names)), f"the recorded routing trace {path.name}"
        if args.trace is not None or args.routing == "trace" or mixtral:
            raise ValueError(f"{path}: a trace of another model ({why}); give this model's or --routing synthetic")
    if args.routing == "trace":
        raise FileNotFoundError(
            f"no routing trace: give --trace PATH or set {TRACE_ENV} (none is shipped; `python -m colab_helpers "
            "record` saves one), or --routing synthetic"
        )
    if path is None and args.routing == "auto":  # said on stderr as well as in the report's routing line
        print(
            "twin: no routing trace given, so this projection runs on SYNTHETIC routing; for a recorded one: "
            "python -m colab_helpers record PROMPT --out T.npz (on a GPU with the real model), then --trace T.npz",
            file=sys.stderr,
        )
    if names:
        raise ValueError("--sequences names sequences of a trace; synthetic routing has none")
    if arch is None:
        from ..weights.model_spec import ModelSpec
        from .synthetic import mixtral_8x7b_config

        arch = ModelSpec.of(mixtral_8x7b_config()).arch
    tokens = max(256, args.tokens + args.warmup + 32)  # the prompt's 16 rows, warm-up and recorded steps
    rows = synthetic_routing(len(arch.moe_layers), arch.num_experts, arch.top_k, tokens)
    label = (
        f"SYNTHETIC routing (not a recorded trace of this model): each of a token's {arch.top_k} experts repeats "
        f"one the previous token used at that layer with probability {STICKINESS} (fitted to Mixtral-8x7B's trace), "
        f"else is uniform over the {arch.num_experts}"
    )
    return rows, label


def _project(args: argparse.Namespace, target: Target | None, names: list[str] | None, hw: Hardware):
    from .twin_family import planned as family_plan

    routing, label = _routing(args, target, names)
    on_host = False  # a fixed K (no plan): the embedding table on the GPU
    layers = NUM_LAYERS if target is None else len(target.arch.moe_layers)
    if args.experts_on_device:
        experts = NUM_EXPERTS if target is None else target.arch.num_experts
        if args.experts_on_device > experts:
            raise ValueError(f"--experts-on-device {args.experts_on_device}: the model has {experts} experts per layer")
        ks = (args.experts_on_device,) * layers
    else:
        where = False if args.embedding_on_gpu else None  # None: where the planner puts the table
        if target is None or target.family is None:
            plan = planned(args.vram_gb, args.ram_gb, where)
        else:
            plan = family_plan(target.arch, target.quant, args.vram_gb, args.ram_gb, where)
        ks, on_host = tuple(plan.per_layer), plan.embedding_on_host  # the engine runs as planned
    family = None if target is None else target.family
    proj = project_ours(
        routing, ks, hw, args.recall, args.policy, not args.no_prefetch, args.tokens, args.warmup, family,
        _prefetch_config(args), on_host, kv_lending=not args.no_kv_lending and family is None,
        prompt_tokens=args.prompt_tokens,
    )  # fmt: skip
    proj.notes["embedding"] = "host RAM (rows sent per token)" if on_host else "GPU"
    proj.notes["model"] = "Mixtral-8x7B (2-bit experts)" if target is None else target.name
    proj.notes["routing"] = label
    return proj


def _prefetch_config(args: argparse.Namespace):
    """The ``PrefetchConfig`` the twin's engine runs with: the engine's defaults, with the flags given."""
    from ..runtime.moe import PrefetchConfig

    given = {"mode": args.prefetch_mode, "chunks": args.chunks, "chunks_per_step": args.chunks_per_step}
    given["min_confidence"] = args.min_confidence
    if (
        given["chunks"] is not None
        and given["chunks"] < 1
        or given["chunks_per_step"] is not None
        and given["chunks_per_step"] < 0
    ):
        raise ValueError("--chunks must be >= 1 and --chunks-per-step >= 0")
    return PrefetchConfig(**{k: v for k, v in given.items() if v is not None})


def _emit(obj: dict, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(obj))
    if args.out is not None:
        args.out.write_text(json.dumps(obj, indent=2))
