"""Convert the trained tiny model (``scripts/train_tiny.py`` output) into the embedded checkpoint.

Writes the real shard layout (one trunk file, one file per expert, index, config, tokenizer) into
``colab_helpers/data/tiny-mixtral`` with HQQ-optimized 4-bit attention and low-bit experts, then
prints greedy answers from the offloaded model so the result can be eyeballed.

Usage: ``python scripts/make_tiny_checkpoint.py [--src build/tiny_hf] [--expert-bits 2]``
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, MixtralForCausalLM

from colab_helpers.conversation.generation import chat_prompt_ids
from colab_helpers.model import load_model
from colab_helpers.weights.checkpoint import save_checkpoint
from colab_helpers.weights.tiny import TINY_MODEL_DIR

QUESTIONS = ("What is the capital of France?", "What is 12 + 7?", "Recite the Zen of Python.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="build/tiny_hf")
    ap.add_argument("--out", default=str(TINY_MODEL_DIR))
    ap.add_argument("--expert-bits", type=int, default=2)
    args = ap.parse_args()
    model = MixtralForCausalLM.from_pretrained(args.src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.src)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    save_checkpoint(model, out, attn_bits=4, expert_bits=args.expert_bits, tokenizer=tok)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    quantized = load_model(out, experts_on_device=2, progress=False)
    for q in QUESTIONS:
        ids = chat_prompt_ids(tok, q)
        new = quantized.generate(ids, max_new_tokens=48, do_sample=False)[0, ids.shape[1] :]
        print(f"{q!r} -> {tok.decode(new, skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
