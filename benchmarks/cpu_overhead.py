"""CPU overhead of offloading: the same embedded model and weights, offloaded vs all experts resident.

"Resident" is a plain transformers ``MixtralForCausalLM`` holding the dequantized weights; "offloaded"
is ``load_model`` with a small expert cache (misses swap experts between the host store and the
"device" slots, here both in RAM). Runs alternate so machine noise hits both alike; the best of the
repeats counts. The last line ends with the ratio offloaded/resident tokens/s (goal: at least 0.7).

Usage: ``python benchmarks/cpu_overhead.py [--experts-on-device 4] [--tokens 64] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import time

import torch

from colab_helpers.conversation.generation import chat_prompt_ids
from colab_helpers.model import dequantized_reference, load_model, load_tokenizer
from colab_helpers.runtime.moe import PrefetchConfig
from colab_helpers.weights.tiny import tiny_model_path


def decode_tokens_per_s(model, ids: torch.Tensor, tokens: int) -> float:
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts-on-device", type=int, default=4, help="of 8 (default 4: half, as on a T4 plan of 5-6)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefetch", action="store_true", help="also prefetch (on a CPU copies are synchronous)")
    args = ap.parse_args(argv)

    path = tiny_model_path()
    tok = load_tokenizer(path)
    ids = chat_prompt_ids(tok, "Recite the Zen of Python.")
    resident = dequantized_reference(path)
    offloaded = load_model(
        path,
        experts_on_device=args.experts_on_device,
        progress=False,
        prefetch=PrefetchConfig(enabled=args.prefetch),
    )
    for m in (resident, offloaded):  # warm-up
        decode_tokens_per_s(m, ids, 4)
    best = {"resident": 0.0, "offloaded": 0.0}
    offloaded.expert_cache.stats.reset()
    for _ in range(args.repeats):
        best["resident"] = max(best["resident"], decode_tokens_per_s(resident, ids, args.tokens))
        best["offloaded"] = max(best["offloaded"], decode_tokens_per_s(offloaded, ids, args.tokens))
    same = torch.equal(
        resident.generate(ids, max_new_tokens=16, do_sample=False),
        offloaded.generate(ids, max_new_tokens=16, do_sample=False),
    )
    s = offloaded.expert_cache.stats.summary()
    cfg = offloaded.config
    print(
        f"# embedded model: {cfg.num_hidden_layers} layers x {cfg.num_local_experts} experts, top-"
        f"{cfg.num_experts_per_tok}; {torch.get_num_threads()} threads; best of {args.repeats} x {args.tokens} tokens"
    )
    print("| variant | experts/layer in fast memory | tokens/s | cache hit rate |")
    print("| --- | --- | --- | --- |")
    print(f"| resident (plain transformers) | {cfg.num_local_experts} | {best['resident']:.1f} | 1.000 |")
    print(f"| offloaded (colab_helpers) | {args.experts_on_device} | {best['offloaded']:.1f} | {s['hit_rate']:.3f} |")
    print(f"greedy outputs identical: {same}")
    ratio = best["offloaded"] / best["resident"]
    print(f"ratio offloaded/resident tokens/s: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
