"""Host syncs and kernel launches per MoE layer per decode token, counted on a CPU as the CUDA path issues them.

Uses ``colab_helpers.sim.dispatch_count`` (a ``TorchDispatchMode`` plus patches; fused Triton kernels count as
their launches). Two models: the embedded tiny model and a random Mixtral-shaped model (synthetic weights,
8 experts, top-2, smaller widths). Half of each layer's experts are cached, prefetch on and off. With
``--families`` also the tiny random model of every supported family (``colab_helpers.sim.random_moe``, saved with
``save_checkpoint`` and loaded with ``load_model``).

``--prefill-layer N`` instead counts one prefill chunk of N tokens through one full-size Mixtral-8x7B decoder
layer (4096/14336, 8 experts, top-2, random weights; vocabulary cut to 256), as the CUDA path issues it.

Usage: ``python benchmarks/dispatch_counts.py [--tokens 8] [--dtype float16] [--families] [--json]``
       ``python benchmarks/dispatch_counts.py --prefill-layer 1024``
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import MixtralConfig

from colab_helpers.model import OffloadConfig, assemble_model, load_model
from colab_helpers.runtime.moe import PrefetchConfig
from colab_helpers.sim.dispatch_count import count_decode
from colab_helpers.sim.synthetic import random_experts, random_trunk
from colab_helpers.weights.checkpoint import QuantConfig
from colab_helpers.weights.tiny import tiny_model_path

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

    from colab_helpers.sim.random_moe import families, random_model
    from colab_helpers.weights.checkpoint import save_checkpoint

    root = tempfile.mkdtemp(prefix="dispatch_counts_")
    out = {}
    for family in families():
        out[family] = f"{root}/{family}"
        save_checkpoint(random_model(family), out[family], optimize=False, progress=False)
    return out


def _loader(path: str):
    return lambda kw: load_model(path, check_memory=False, **kw)


def prefill_layer(tokens: int) -> dict:
    """One ``tokens``-token prefill chunk through one full-size Mixtral layer: syncs and launches, as on CUDA."""
    from colab_helpers.sim.dispatch_count import count_prefill
    from colab_helpers.sim.synthetic import mixtral_8x7b_config

    mcfg = mixtral_8x7b_config()
    mcfg.num_hidden_layers, mcfg.vocab_size = 1, 256
    quant = QuantConfig()
    cfg = OffloadConfig(experts_on_device=8, dense_on_cpu=False, progress=False)  # float32 on the CPU
    model = assemble_model(mcfg, quant, random_trunk(mcfg, quant), random_experts(mcfg, quant), cfg)
    ids = torch.randint(3, mcfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    c = count_prefill(model, ids)
    return {
        "tokens": tokens,
        "moe_syncs": c.moe.syncs,
        "moe_launches": c.moe.launches,
        "layer_syncs": c.total.syncs,
        "layer_launches": c.total.launches,
        "moe_ops": dict(c.moe.ops),
        "ops": dict(c.total.ops),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--families", action="store_true", help="also every supported family's tiny random model")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--prefill-layer", type=int, default=None, metavar="N", help="count an N-token prefill chunk")
    args = ap.parse_args(argv)
    if args.prefill_layer:
        r = prefill_layer(args.prefill_layer)
        if args.json:
            print(json.dumps(r))
            return 0
        print(f"# one {r['tokens']}-token prefill chunk, one full-size Mixtral layer, counts as on CUDA")
        print(f"MoE block: {r['moe_syncs']} syncs, {r['moe_launches']} launches")
        print(f"whole layer (+ embedding, norm, lm_head): {r['layer_syncs']} syncs, {r['layer_launches']} launches")
        for op, n in sorted(r["moe_ops"].items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {op}: {n}")
        return 0
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
