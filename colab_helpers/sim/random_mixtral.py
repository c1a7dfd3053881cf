"""Small Mixtral checkpoints in the hub's format (sharded safetensors, transformers names), made locally.

``save_hub_format`` takes a model of any family: transformers 5's ``save_pretrained`` writes the names the
published checkpoints use (Mixtral and Phi-3.5-MoE ``block_sparse_moe.experts.N.w1``, OLMoE and the Qwen MoEs
``mlp.experts.N.gate_proj``), so a tiny random model of a family saved here is a hub source of that family.

What the converter reads from the hub, without the hub: tests use random weights; the offline notebook
uses the embedded model's dequantized weights (so the converted result still answers sensibly).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def small_config(layers: int = 2, hidden: int = 256, intermediate: int = 512, vocab: int = 128) -> MixtralConfig:
    """Shapes that satisfy every 2/3/4-bit group constraint of the layout."""
    return MixtralConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )


def random_mixtral(config: MixtralConfig | None = None, seed: int = 0) -> MixtralForCausalLM:
    """Random weights; routers scaled up so routing is varied (the 0.02 init routes almost uniformly)."""
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config or small_config()).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


def save_hub_format(
    model: torch.nn.Module,
    out: str | os.PathLike,
    max_shard_size: str | int = "200KB",
    dtype: torch.dtype = torch.bfloat16,
    fused: bool = False,
    tokenizer_from: str | os.PathLike | None = None,
) -> Path:
    """``save_pretrained`` (any transformers causal LM) in ``dtype`` with small shards, so experts straddle shard
    boundaries.

    With ``fused`` the shards hold transformers 5's in-memory names (``mlp.experts.gate_up_proj``)
    instead of the classic per-expert names ``save_pretrained`` writes.
    """
    out = Path(out)
    model = model.to(dtype)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    if fused:
        _rewrite_fused(model, out)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).is_file():
                shutil.copyfile(Path(tokenizer_from) / name, out / name)
    return out


def _rewrite_fused(model: torch.nn.Module, out: Path) -> None:
    """Replace the shards with ones keyed by the state dict's own (fused) names, two tensors per layer apart."""
    import json

    from safetensors.torch import save_file

    for old in out.glob("model*.safetensors"):
        old.unlink()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(sd)
    n = 4
    files = {k: f"model-{i % n + 1:05d}-of-{n:05d}.safetensors" for i, k in enumerate(keys)}
    for f in sorted(set(files.values())):
        save_file({k: sd[k] for k in keys if files[k] == f}, out / f, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())}, "weight_map": files}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_example_source(out: str | os.PathLike, max_shard_size: str | int = "300KB") -> Path:
    """The embedded tiny model, dequantized to bf16 and saved like a hub Mixtral: the notebook's offline source."""
    from ..model import dequantized_reference
    from ..weights.tiny import tiny_model_path

    model = dequantized_reference(tiny_model_path())
    return save_hub_format(model, out, max_shard_size, torch.bfloat16, tokenizer_from=tiny_model_path())


def conversion_paths(source: str | None, out: str | os.PathLike | None, expert_bits: int) -> tuple[str, Path]:
    """The notebook's source and output folder: ``None`` source is the offline example (saved now, in a
    fresh temporary folder); ``None`` output is ``<repo name>-<bits>bit`` beside it. Prints both."""
    import tempfile

    if source is None:
        root = Path(tempfile.mkdtemp(prefix="colab_helpers_convert_"))
        source = str(save_example_source(root / "example-source"))
        print(f"SOURCE: the embedded tiny model saved like a hub Mixtral (bf16 shards) in {source} (offline example)")
        default = root / f"example-{expert_bits}bit"
    else:
        print(f"SOURCE: {source}")
        default = Path(f"{Path(str(source).rstrip('/')).name}-{expert_bits}bit")
    folder = Path(out).expanduser() if out is not None else default
    print(f"OUTPUT: {folder}")
    return source, folder
