"""The reader is strict: every broken checkpoint fails with a message naming the file, nothing half-loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from colab_helpers.model import load_model
from colab_helpers.weights.checkpoint import INDEX_FILE, Checkpoint, CheckpointError, shard_name


@pytest.fixture
def ckpt(make_checkpoint, tmp_path) -> Path:
    """A private copy of a valid 2-bit checkpoint to break."""
    dst = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint(2), dst)
    return dst


def expert_file(path: Path) -> Path:
    return path / shard_name(2 + 3, 17)  # layer 0, expert 3 (2 layers x 8 experts + trunk = 17 files)


def test_a_valid_checkpoint_has_the_real_layout(make_checkpoint) -> None:
    path = make_checkpoint(2)
    index = json.loads((path / INDEX_FILE).read_text())
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert files == [shard_name(i, 17) for i in range(1, 18)]
    trunk = load_file(path / shard_name(1, 17))
    assert "model.layers.0.block_sparse_moe.gate.weight" in trunk
    assert trunk["model.layers.0.self_attn.q_proj.W_q"].dtype == torch.uint8
    expert = load_file(path / shard_name(2, 17))
    assert len(expert) == 21 and "w1.W_q" in expert and "w2.meta.meta_zero.zero" in expert
    assert expert["w1.meta.meta_zero.scale"].shape == ()
    assert index["weight_map"]["model.layers.0.block_sparse_moe.experts.0.w1.W_q"] == shard_name(2, 17)
    total = sum(t.numel() * t.element_size() for f in files for t in load_file(path / f).values())
    assert index["metadata"]["total_size"] == total
    ck = Checkpoint.open(path)
    assert ck.quant.experts.nbits == 2 and ck.config.num_hidden_layers == 2


def test_missing_shard_is_named(ckpt: Path) -> None:
    expert_file(ckpt).unlink()
    with pytest.raises(CheckpointError, match=expert_file(ckpt).name):
        load_model(ckpt, progress=False)


def test_truncated_shard_is_named(ckpt: Path) -> None:
    f = expert_file(ckpt)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{f.name}: truncated"):
        load_model(ckpt, progress=False)


def test_truncated_header_is_named(ckpt: Path) -> None:
    f = ckpt / shard_name(1, 17)
    f.write_bytes(f.read_bytes()[:5])
    with pytest.raises(CheckpointError, match=f.name):
        load_model(ckpt, progress=False)


def test_wrong_dtype_names_file_and_key(ckpt: Path) -> None:
    f = expert_file(ckpt)
    tensors = load_file(f)
    tensors["w2.meta.meta_scale.scale"] = tensors["w2.meta.meta_scale.scale"].float()
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=rf"{f.name}: tensor 'w2.meta.meta_scale.scale' is F32"):
        load_model(ckpt, progress=False)


def test_wrong_shape_names_file_and_key(ckpt: Path) -> None:
    f = ckpt / shard_name(1, 17)
    tensors = load_file(f)
    tensors["model.norm.weight"] = torch.ones(7, dtype=torch.float16)
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=rf"{f.name}: tensor 'model.norm.weight' is F16 \[7\]"):
        load_model(ckpt, progress=False)


def test_missing_key_in_expert_file(ckpt: Path) -> None:
    f = expert_file(ckpt)
    tensors = load_file(f)
    del tensors["w3.W_q"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=rf"{f.name}: missing tensor 'w3.W_q'"):
        load_model(ckpt, progress=False)


def test_broken_index_json(ckpt: Path) -> None:
    (ckpt / INDEX_FILE).write_text('{"weight_map": {')
    with pytest.raises(CheckpointError, match=f"{INDEX_FILE}: not valid JSON"):
        load_model(ckpt, progress=False)


def test_index_missing_an_entry(ckpt: Path) -> None:
    index = json.loads((ckpt / INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.1.block_sparse_moe.experts.7.w2.W_q"]
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model.layers.1.block_sparse_moe.experts.7.w2.W_q"):
        load_model(ckpt, progress=False)


def test_index_pointing_to_a_missing_file(ckpt: Path) -> None:
    index = json.loads((ckpt / INDEX_FILE).read_text())
    for k in index["weight_map"]:
        if k.startswith("model.layers.0.block_sparse_moe.experts.1."):
            index["weight_map"][k] = "model-99999-of-00017.safetensors"
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-99999-of-00017.safetensors: file is missing"):
        load_model(ckpt, progress=False)


def test_missing_config(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: file is missing"):
        load_model(ckpt, progress=False)


def test_quantization_settings_default_to_the_public_demo(make_checkpoint, tmp_path: Path) -> None:
    """Without our config section the reader expects the demo settings; a 4-bit file then fails clearly."""
    dst = tmp_path / "c"
    shutil.copytree(make_checkpoint(4), dst)
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["offloading_quantization"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"W_q' is U8 \[32, 2048\], expected U8 \[4, 8192\]"):
        Checkpoint.open(dst)
