"""The writer against the published checkpoint: stock-shape files have the public shards' exact byte counts.

docs/checkpoint_format.md lists the public repo's file sizes: 66,406,180 B for each expert file and
1,240,395,944 B for the trunk. Its sizes table gives the tensor payloads, 66,404,364 B and 1,240,277,504 B;
the difference is the safetensors framing (8-byte length + JSON header padded to 8 bytes: 1,816 B and
118,440 B). One stock-shape expert is really quantized and written by the writer; the trunk (1.2 GB) is
assembled by the writer's own ``trunk_tensors`` but not written: its header is rebuilt by
``safetensors_header``, which is checked byte for byte against what safetensors wrote for the expert file.
The written expert is also decoded by hqq's own ``HQQLinear`` and compared with our dequantizer.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_quant import _hqq_dequantize
from transformers import MixtralConfig

import colab_helpers.weights.quant as quant
from colab_helpers.weights.checkpoint import QuantConfig, expert_tensors, trunk_tensors, write_shard
from colab_helpers.weights.quant import DEMO_EXPERT_SPEC, SUFFIXES, QuantizedWeight

EXPERT_FILE_BYTES = 66_406_180  # each of model-00002..00257-of-00257.safetensors
EXPERT_PAYLOAD = 66_404_364
TRUNK_FILE_BYTES = 1_240_395_944  # model-00001-of-00257.safetensors
TRUNK_PAYLOAD = 1_240_277_504
ATTENTION_LAYER_BYTES = 22_292_496

_ST_NAME = {torch.uint8: "U8", torch.int32: "I32", torch.float16: "F16"}
_ST_ORDER = {torch.uint8: 0, torch.float16: 1, torch.int32: 2}  # safetensors' Dtype order (larger first)


def safetensors_header(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> bytes:
    """The header safetensors writes: tensors by dtype (descending) then name, compact JSON, space-padded to 8."""
    entries, offset = [], 0
    for name in sorted(tensors, key=lambda n: (-_ST_ORDER[tensors[n][0]], n)):
        dtype, shape = tensors[name]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        info = {"dtype": _ST_NAME[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        entries.append(f"{json.dumps(name)}:{json.dumps(info, separators=(',', ':'))}")
        offset += nbytes
    header = ("{" + ",".join(entries) + "}").encode()
    return header + b" " * (-len(header) % 8)


def describe(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}


def payload(tensors: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in tensors.values())


@pytest.fixture(scope="module")
def stock_expert(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """One stock-shape expert (w1/w3 14336x4096, w2 4096x14336) quantized to 2 bits and written (~15 s, 1.5 GB)."""
    gen = torch.Generator().manual_seed(0)
    h, i = 4096, 14336
    gate_up = torch.randn(1, 2 * i, h, generator=gen, dtype=torch.float16) * 0.02
    down = torch.randn(1, h, i, generator=gen, dtype=torch.float16) * 0.02
    path = tmp_path_factory.mktemp("stock") / "model-00002-of-00257.safetensors"
    write_shard(expert_tensors(gate_up, down, 0, DEMO_EXPERT_SPEC, optimize=False), path)
    return path, gate_up[0, :i].clone()


@pytest.mark.slow
def test_a_stock_expert_file_has_the_public_shards_exact_size(stock_expert) -> None:
    path, _ = stock_expert
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert len(tensors) == 21 and payload(tensors) == EXPERT_PAYLOAD
    assert raw[8 : 8 + n] == safetensors_header(describe(tensors))  # our header model is safetensors' own
    assert len(raw) == 8 + n + EXPERT_PAYLOAD == EXPERT_FILE_BYTES


@pytest.mark.slow
def test_a_stock_expert_decodes_identically_with_hqq(stock_expert) -> None:
    path, w1_source = stock_expert
    with safe_open(path, framework="pt") as f:
        t = {s: f.get_tensor(f"w1.{s}") for s in SUFFIXES}
    w1 = QuantizedWeight.from_tensors(DEMO_EXPERT_SPEC, (14336, 4096), t)
    ours = w1.dequantize()
    assert torch.equal(ours, _hqq_dequantize(w1))  # hqq's HQQLinear reads the same bytes to the same weights
    err = ((ours.float() - w1_source.float()).norm() / w1_source.float().norm()).item()
    assert err < 0.4  # and they are the source's w1 within 2-bit error (test_writer_fidelity.MAX_REL_ERR)


def test_the_stock_trunk_has_the_public_shards_exact_size(monkeypatch) -> None:
    """The writer's trunk for stock Mixtral: names, dtypes and shapes give the public file's exact byte count."""
    cfg = MixtralConfig()  # stock Mixtral-8x7B shapes
    real_quantize, done = quant.quantize, {}

    def quantize_once_per_shape(weight, spec, optimize=True):  # 128 projections, 2 distinct shapes
        key = (tuple(weight.shape), spec)
        if key not in done:
            gen = torch.Generator().manual_seed(len(done))
            done[key] = real_quantize(torch.randn(weight.shape, generator=gen) * 0.02, spec, optimize=False)
        return done[key]

    monkeypatch.setattr(quant, "quantize", quantize_once_per_shape)
    h, v, e = cfg.hidden_size, cfg.vocab_size, cfg.num_local_experts
    sd = {n: torch.empty(v, h, dtype=torch.float16) for n in ("model.embed_tokens.weight", "lm_head.weight")}
    sd["model.norm.weight"] = torch.empty(h, dtype=torch.float16)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        sd[p + "input_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"] = sd["model.norm.weight"]
        sd[p + "mlp.gate.weight"] = torch.empty(e, h, dtype=torch.float16)
        for proj, (out_f, in_f) in {"q": (4096, h), "k": (1024, h), "v": (1024, h), "o": (h, 4096)}.items():
            sd[f"{p}self_attn.{proj}_proj.weight"] = torch.zeros(()).expand(out_f, in_f)  # only the shape is read
    trunk = trunk_tensors(sd, cfg, QuantConfig(), optimize=False)
    attention = {k: t for k, t in trunk.items() if k.startswith("model.layers.0.self_attn.")}
    assert len(attention) == 28 and payload(attention) == ATTENTION_LAYER_BYTES
    assert payload(trunk) == TRUNK_PAYLOAD
    assert 8 + len(safetensors_header(describe(trunk))) + TRUNK_PAYLOAD == TRUNK_FILE_BYTES
