"""Host syncs and kernel launches per MoE layer per decode token, counted on a CPU as the CUDA path issues them.

Uses ``colab_helpers.dispatch_count`` (a ``TorchDispatchMode`` plus patches; fused Triton kernels count as
their launches). Two models: the embedded tiny model and a random Mixtral-shaped model (synthetic weights,
8 experts, top-2, smaller widths). Half of each layer's experts are cached, prefetch on and off. With
``--families`` also the tiny random model of every supported family (``colab_helpers.random_moe``, saved with
``save_checkpoint`` and loaded with ``load_model``).

Usage: ``python benchmarks/dispatch_counts.py [--tokens 8] [--dtype float16] [--families] [--json]``
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import MixtralConfig

from colab_helpers.checkpoint import QuantConfig
from colab_helpers.dispatch_count import count_decode
from colab_helpers.model import OffloadConfig, assemble_model, load_model
from colab_helpers.moe import PrefetchConfig
from colab_helpers.synthetic import random_experts, random_trunk
from colab_helpers.tiny import tiny_model_path

PROMPT = torch.tensor([[1, 17, 45, 99, 3, 64, 12, 7, 88, 23, 5, 41]])


def random_mixtral(cfg: OffloadConfig):
    mcfg = MixtralConfig(
        hidden_size=512,
        intermediate_size=1792,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=256,
        max_position_embeddings=256,
    )
    quant = QuantConfig()
    return assemble_model(mcfg, quant, random_trunk(mcfg, quant), random_experts(mcfg, quant), cfg)


def saved_families() -> dict[str, str]:
    """``{family: checkpoint folder}``: each family's tiny random model written once, in a temporary folder."""
    import tempfile

    from colab_helpers.checkpoint import save_checkpoint
    from colab_helpers.random_moe import families, random_model

    root = tempfile.mkdtemp(prefix="dispatch_counts_")
    out = {}
    for family in families():
        out[family] = f"{root}/{family}"
        save_checkpoint(random_model(family), out[family], optimize=False, progress=False)
    return out


def _loader(path: str):
    return lambda kw: load_model(path, check_memory=False, **kw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--families", action="store_true", help="also every supported family's tiny random model")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    family_paths = saved_families() if args.families else {}
    rows = []
    for prefetch in (True, False):
        kw = dict(
            dtype=dtype,
            experts_on_device=4,
            prefetch=PrefetchConfig(enabled=prefetch),
            dense_on_cpu=False,
            progress=False,
        )
        models = {
            "embedded tiny": lambda kw: load_model(tiny_model_path(), check_memory=False, **kw),
            "random Mixtral (512/1792, 4 layers)": lambda kw: random_mixtral(OffloadConfig(**kw)),
            **{f"tiny random {f}": _loader(path) for f, path in family_paths.items()},
        }
        for name, make in models.items():
            model = make(kw)
            d = count_decode(model, PROMPT % model.config.vocab_size, tokens=args.tokens)
            rows.append({"model": name, "prefetch": prefetch, **d.summary(), "moe_ops": dict(d.moe.ops)})
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"# {args.tokens} decode tokens, {args.dtype}, 4 of 8 experts cached, counts as on CUDA")
    print(
        "| model | prefetch | syncs / MoE layer / token | launches / MoE layer / token "
        "| syncs / token | launches / token |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | {'on' if r['prefetch'] else 'off'} | {r['syncs_per_layer_token']:.2f} | "
            f"{r['launches_per_layer_token']:.1f} | {r['syncs_per_token']:.1f} | {r['launches_per_token']:.1f} |"
        )
    ops = rows[0]["moe_ops"]
    tokens_layers = args.tokens * 4
    print("\nMoE ops per layer per token (embedded tiny, prefetch on):")
    for op, n in sorted(ops.items(), key=lambda kv: -kv[1]):
        print(f"  {op}: {n / tokens_layers:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
