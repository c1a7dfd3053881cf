"""The on-disk layout of pre-quantized MoE shards (any supported family): names, strict checks, reading, writing.

One trunk file holds every non-expert tensor under full names (Mixtral: the public demo's old
``block_sparse_moe`` names; other families: transformers 5 names); each routed expert lives in a file of
its own under keys relative to the expert (``w1.W_q`` ...). The index maps full names to files; the
family is config.json's ``model_type`` (none: Mixtral). Every file is checked (size, header, key set,
dtype, shape) before a byte is used, and every error names the file and the key. See ``docs/checkpoint_format.md``.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import MixtralConfig

from .families import MoEArchitecture, UnsupportedFamilyError, detect_family, transformers_config
from .model_spec import (  # noqa: F401  (QUANT_CONFIG_KEY, to_transformers_name: re-exported)
    QUANT_CONFIG_KEY,
    ModelSpec,
    QuantConfig,
    TrunkEntry,
    to_transformers_name,
)
from .quant import SUFFIXES, QuantSpec

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
ATTENTION_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_MATS = ("w1", "w2", "w3")  # gate, down, up

_ST_DTYPES = {
    "U8": torch.uint8,
    "I8": torch.int8,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or does not hold what the layout says."""


class UnsupportedCheckpointFamily(CheckpointError, UnsupportedFamilyError):
    """config.json names a model family no adapter covers; the message lists the supported ones."""


# --------------------------------------------------------------------------------------------------
# names and expected shapes
# --------------------------------------------------------------------------------------------------


def spec_of(cfg, quant: QuantConfig | None = None) -> ModelSpec:
    """The one model description (``model_spec.ModelSpec``) of a transformers config or ``MoEArchitecture``."""
    return ModelSpec.of(cfg, quant)


def legacy_names(cfg) -> bool:
    """Mixtral keeps the public demo's old names (``block_sparse_moe``) in the trunk and the index."""
    return spec_of(cfg).legacy_names


def expert_prefix(layer: int, expert: int, cfg=None) -> str:
    """The index's name prefix of one expert (``layer`` is the decoder layer); ``cfg`` None means Mixtral."""
    block = "block_sparse_moe" if cfg is None or legacy_names(cfg) else "mlp"
    return f"model.layers.{layer}.{block}.experts.{expert}."


# --------------------------------------------------------------------------------------------------
# safetensors headers (read ourselves: cheap, and lets us name truncated files precisely)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check the file is exactly as long as the header says."""
    if not path.is_file():
        raise CheckpointError(f"{path.name}: file is missing (expected at {path})")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path.name}: truncated ({size} bytes, no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise CheckpointError(f"{path.name}: truncated or not a safetensors file (header {n} B)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path.name}: unreadable safetensors header ({err})") from err
    header.pop("__metadata__", None)
    infos, end = {}, 0
    for key, entry in header.items():
        dtype = _ST_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path.name}: tensor {key!r} has unsupported dtype {entry.get('dtype')!r}")
        begin, stop = entry["data_offsets"]
        infos[key] = TensorInfo(dtype, tuple(entry["shape"]), stop - begin)
        end = max(end, stop)
    if size != 8 + n + end:
        raise CheckpointError(f"{path.name}: truncated or corrupt: {size} bytes on disk, header promises {8 + n + end}")
    return infos


def check_tensors(
    path: Path, infos: dict[str, TensorInfo], expected: dict[str, tuple[torch.dtype, tuple]], exact: bool
) -> None:
    """Every expected key present with its dtype and shape; with ``exact``, nothing else either."""
    for key, (dtype, shape) in expected.items():
        info = infos.get(key)
        if info is None:
            raise CheckpointError(f"{path.name}: missing tensor {key!r}")
        if info.dtype != dtype or tuple(info.shape) != tuple(shape):
            raise CheckpointError(
                f"{path.name}: tensor {key!r} is {_ST_NAMES.get(info.dtype)} {list(info.shape)}, expected "
                f"{_ST_NAMES[dtype]} {list(shape)}"
            )
    if exact:
        extra = sorted(set(infos) - set(expected))
        if extra:
            raise CheckpointError(f"{path.name}: unexpected tensors {extra[:5]}")


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A verified checkpoint directory: config, quantization settings and where each tensor lives."""

    root: Path
    config: MixtralConfig  # or the family's transformers config (OlmoeConfig, Qwen2MoeConfig ...)
    quant: QuantConfig
    trunk_files: dict[str, str]  # full layout name -> file
    expert_files: dict[tuple[int, int], str]  # (decoder layer, expert) -> file

    @property
    def spec(self) -> ModelSpec:
        """The one model description: family, layers, experts, top-k, every tensor's shape and bytes."""
        return ModelSpec.of(self.config, self.quant)

    @property
    def arch(self) -> MoEArchitecture:
        """The family adapter's view of the model: MoE layers, experts, top-k, shapes."""
        return self.spec.arch

    @property
    def family(self) -> str:
        """config.json's ``model_type`` (``mixtral`` when it has none, like a bare demo config)."""
        return self.arch.family

    @classmethod
    def open(cls, root: str | os.PathLike, verify: bool = True) -> Checkpoint:
        """Read config and index; with ``verify`` also check every file's size, keys, dtypes, shapes."""
        root = Path(root)
        cfg_dict = _read_json(root / CONFIG_FILE)
        config = config_from_dict(cfg_dict, root / CONFIG_FILE)
        quant = QuantConfig.from_config_dict(cfg_dict)
        index = _read_json(root / INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{INDEX_FILE}: no 'weight_map' object")
        spec = ModelSpec.of(config, quant)
        trunk_files = {}
        for key in spec.trunk_tensors:
            if key not in weight_map:
                raise CheckpointError(f"{INDEX_FILE}: no entry for {key!r}")
            trunk_files[key] = weight_map[key]
        expert_files = {}
        rel_keys = list(spec.expert_tensors)
        for layer in spec.moe_layers:
            for e in range(spec.num_experts):
                prefix = expert_prefix(layer, e, config)
                files = {weight_map.get(prefix + k) for k in rel_keys}
                if None in files:
                    missing = next(prefix + k for k in rel_keys if prefix + k not in weight_map)
                    raise CheckpointError(f"{INDEX_FILE}: no entry for {missing!r}")
                if len(files) != 1:
                    raise CheckpointError(f"{INDEX_FILE}: expert {layer}.{e} is split across files {sorted(files)}")
                expert_files[(layer, e)] = files.pop()
        ckpt = cls(root, config, quant, trunk_files, expert_files)
        if verify:
            ckpt.verify()
        return ckpt

    def files(self) -> list[str]:
        return sorted(set(self.trunk_files.values()) | set(self.expert_files.values()))

    def verify(self) -> None:
        """Check every referenced file against the layout without reading tensor data."""
        trunk_expected = self.spec.trunk_tensors
        by_file: dict[str, dict] = {}
        for key, file in self.trunk_files.items():
            by_file.setdefault(file, {})[key] = trunk_expected[key]
        for file, expected in by_file.items():
            check_tensors(self.root / file, read_header(self.root / file), expected, exact=False)
        expert_expected = dict(self.spec.expert_tensors)
        for file in sorted(set(self.expert_files.values())):
            check_tensors(self.root / file, read_header(self.root / file), expert_expected, exact=True)

    def load_trunk(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """All non-expert tensors under transformers 5 names, read file by file (mmap)."""
        from safetensors import safe_open

        out = {}
        by_file: dict[str, list[str]] = {}
        for key, file in self.trunk_files.items():
            by_file.setdefault(file, []).append(key)
        for file, keys in by_file.items():
            with safe_open(self.root / file, framework="pt", device=str(device)) as f:
                for key in keys:
                    out[to_transformers_name(key)] = f.get_tensor(key)
        return out

    def iter_experts(self) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        """Yield ``(decoder layer, expert, {rel_key: tensor})``, one file open at a time (mmap, no full copy)."""
        from safetensors import safe_open

        for (layer, e), file in sorted(self.expert_files.items()):
            with safe_open(self.root / file, framework="pt", device="cpu") as f:
                yield layer, e, {k: f.get_tensor(k) for k in f.keys()}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.name}: file is missing (expected at {path})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path.name}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name}: expected a JSON object")
    return data


ARCHITECTURE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "num_local_experts",
    "num_experts_per_tok",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "sliding_window",
    "head_dim",
    "hidden_act",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
)


def config_from_dict(cfg: dict, path: Path | str = CONFIG_FILE):
    """The model's transformers config from config.json's dict: a ``MixtralConfig`` from the architecture
    fields only (the rest of the file is ignored; a config without ``model_type`` is Mixtral, as the public
    demo's), any other supported family's config from its whole dict (``families.transformers_config``).
    An unsupported family raises ``UnsupportedCheckpointFamily`` listing the supported ones."""
    name = Path(path).name
    if cfg.get("model_type", "mixtral") != "mixtral" or "model_type" not in cfg and cfg.get("architectures"):
        try:
            family = detect_family(cfg).MODEL_TYPE
        except UnsupportedFamilyError as err:
            raise UnsupportedCheckpointFamily(f"{name}: {err}") from err
        if family != "mixtral":
            try:
                return transformers_config({k: v for k, v in cfg.items() if k != QUANT_CONFIG_KEY})
            except Exception as err:  # transformers' own validation of the fields
                raise CheckpointError(f"{name}: not a valid {family} config ({err})") from err
    fields = {k: cfg[k] for k in ARCHITECTURE_FIELDS if k in cfg and cfg[k] is not None}
    if "rope_parameters" in cfg and "rope_theta" not in fields:
        fields["rope_theta"] = cfg["rope_parameters"].get("rope_theta", 1e6)
    rope_theta = fields.pop("rope_theta", 1e6)
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if k not in fields:
            raise CheckpointError(f"{name}: missing {k!r}")
    config = MixtralConfig(**fields, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    return config


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def expert_matrices(gate_up: torch.Tensor, down: torch.Tensor, expert: int) -> dict[str, torch.Tensor]:
    """One expert's ``w1``/``w2``/``w3`` ([out, in] each) from transformers 5's fused expert tensors.

    ``gate_up`` is ``[E, 2I, H]`` (gate rows first, then up rows), ``down`` is ``[E, H, I]``; the expert
    computes ``down @ (silu(gate @ x) * (up @ x))``, so ``w1`` = gate, ``w3`` = up, ``w2`` = down.
    """
    inter = gate_up.shape[1] // 2
    return {"w1": gate_up[expert, :inter], "w2": down[expert], "w3": gate_up[expert, inter:]}


def interleaved_expert_matrices(gate_up: torch.Tensor, down: torch.Tensor, expert: int) -> dict[str, torch.Tensor]:
    """``expert_matrices`` for gpt-oss: ``gate_up`` [E, H, 2I] with gate and up columns alternating
    (``GptOssExperts``: gate = ``[..., ::2]``, up = ``[..., 1::2]``), ``down`` [E, I, H]; transposed views."""
    return {"w1": gate_up[expert, :, ::2].T, "w2": down[expert].T, "w3": gate_up[expert, :, 1::2].T}


def num_files(cfg) -> int:
    """One trunk file plus one file per expert (of the MoE layers)."""
    return 1 + spec_of(cfg).total_experts


def trunk_file(cfg) -> str:
    return shard_name(1, num_files(cfg))


def expert_file(cfg, layer: int, expert: int) -> str:
    """The file of expert ``expert`` of decoder layer ``layer`` (MoE layers numbered in order, no gaps)."""
    a = spec_of(cfg).arch
    return shard_name(2 + a.moe_layers.index(layer) * a.num_experts + expert, num_files(cfg))


def stored_dense(weight: torch.Tensor) -> torch.Tensor:
    """Embeddings, norms, biases, routers and ``lm_head`` are stored as float16."""
    return weight.detach().to("cpu", torch.float16).contiguous()


def quantize_matrix(
    weight: torch.Tensor, spec: QuantSpec, optimize: bool = True, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """The 7 stored tensors (``{suffix: tensor}``, on the CPU) of one linear; quantized on ``device``.

    The one per-tensor path of every writer: ``save_checkpoint`` and the streaming converter.
    """
    from .quant import quantize

    w = weight.detach().contiguous()  # gpt-oss experts arrive as transposed views
    if device is not None:
        w = w.to(device)
    qw = quantize(w, spec, optimize=optimize)
    return {k: t.to("cpu").contiguous() for k, t in qw.tensors().items()}


def stored_attention(
    name: str, weight: torch.Tensor, quant: QuantConfig, optimize: bool = True, device=None
) -> dict[str, torch.Tensor]:
    """``...self_attn.q_proj.weight`` (or any trunk matrix quantized like attention) -> its 7 stored tensors
    under full names."""
    base = name.removesuffix(".weight")
    return {f"{base}.{k}": t for k, t in quantize_matrix(weight, quant.attention, optimize, device).items()}


def stored_expert_matrix(
    mat: str, weight: torch.Tensor, quant: QuantConfig, optimize: bool = True, device=None
) -> dict[str, torch.Tensor]:
    """One of an expert's ``w1``/``w2``/``w3`` -> its 7 stored tensors under keys relative to the expert."""
    return {f"{mat}.{k}": t for k, t in quantize_matrix(weight, quant.experts, optimize, device).items()}


def write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file, no metadata (like the public shards), written atomically: a crash leaves either
    the old file or the complete new one, never half of one (the converter resumes on that)."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def layout_index(cfg, quant: QuantConfig) -> dict:
    """The index of a checkpoint in this layout, from config and settings alone (sizes are exact)."""
    spec = spec_of(cfg, quant)
    weight_map = dict.fromkeys(spec.trunk_tensors, trunk_file(cfg))
    for layer in spec.moe_layers:
        for e in range(spec.num_experts):
            for key in spec.expert_tensors:
                weight_map[expert_prefix(layer, e, cfg) + key] = expert_file(cfg, layer, e)
    return {"metadata": {"total_size": spec.checkpoint_bytes}, "weight_map": dict(sorted(weight_map.items()))}


# config.json keys of other families that say nothing about the architecture (dropped when writing)
_CONFIG_NOISE = (
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
)


def layout_config(cfg, quant: QuantConfig) -> dict:
    """``config.json`` of a written checkpoint: the architecture, the family (``model_type``, which ``open``
    reads back) and our quantization settings. Mixtral: its architecture fields only, as the public demo;
    other families: the whole transformers config (so it round-trips), less fields about something else."""
    if not legacy_names(cfg):
        cfg_dict = {k: v for k, v in cfg.to_dict().items() if k not in _CONFIG_NOISE}
        cfg_dict["model_type"] = cfg.model_type
        cfg_dict["architectures"] = [spec_of(cfg).arch.model_class]
        cfg_dict["torch_dtype"] = "float16"
        cfg_dict[QUANT_CONFIG_KEY] = quant.to_dict()
        return cfg_dict
    cfg_dict = {k: v for k, v in cfg.to_dict().items() if k in ARCHITECTURE_FIELDS or k == "model_type"}
    cfg_dict["model_type"] = "mixtral"
    cfg_dict["architectures"] = ["MixtralForCausalLM"]
    rope = getattr(cfg, "rope_parameters", None) or {}
    cfg_dict["rope_theta"] = rope.get("rope_theta", getattr(cfg, "rope_theta", 1e6))
    cfg_dict["torch_dtype"] = "float16"
    cfg_dict[QUANT_CONFIG_KEY] = quant.to_dict()
    return cfg_dict


def write_layout_metadata(out: Path, cfg, quant: QuantConfig) -> None:
    """Index, ``config.json`` and ``generation_config.json`` (the shards are written separately)."""
    write_text(out / INDEX_FILE, json.dumps(layout_index(cfg, quant), indent=2) + "\n")
    write_text(out / CONFIG_FILE, json.dumps(layout_config(cfg, quant), indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    write_text(out / "generation_config.json", json.dumps(gen, indent=2) + "\n")


def model_to_layout_names(sd: dict[str, torch.Tensor], cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """A transformers 5 state dict's trunk tensors under the layout's names (``ModelSpec.trunk``); experts excluded."""
    for entry in spec_of(cfg).trunk:
        yield entry.name, sd[entry.model_name]


# trunk matrices quantized with the attention settings (``ModelSpec.trunk``), by layout name
QUANTIZED_TRUNK = re.compile(
    r"\.(self_attn\.([qkvo]|q_[ab]|kv_a|kv_b)_proj(_with_mqa)?|mlp\.(shared_experts?\.)?(gate|up|down)_proj)\.weight$"
)  # kv_a_proj_with_mqa, kv_b_proj, q_a/q_b_proj: DeepSeek-V2's latent attention; shared_experts: its shared MLP


def stored_trunk_tensor(
    name: str, weight: torch.Tensor, quant: QuantConfig, optimize: bool = True, device=None
) -> dict[str, torch.Tensor]:
    """One source trunk tensor (layout name, any family) -> what the trunk file stores for it: the 7 tensors
    of a matrix quantized with the attention settings (``QUANTIZED_TRUNK``), else one float16 tensor."""
    if QUANTIZED_TRUNK.search(name):
        return stored_attention(name, weight, quant, optimize, device)
    return {name: stored_dense(weight)}


def trunk_tensors(
    sd: dict[str, torch.Tensor], cfg, quant: QuantConfig, optimize: bool = True, device=None
) -> dict[str, torch.Tensor]:
    """The trunk file's tensors under layout names: quantized attention (and shared/dense MLPs), float16 rest."""
    trunk: dict[str, torch.Tensor] = {}
    for name, weight in model_to_layout_names(sd, cfg):
        trunk.update(stored_trunk_tensor(name, weight, quant, optimize, device))
    return trunk


def expert_tensors(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    expert: int,
    spec: QuantSpec,
    optimize: bool = True,
    device=None,
    interleaved: bool = False,
) -> dict[str, torch.Tensor]:
    """One expert file's 21 tensors (keys relative to the expert: ``w1.W_q`` ...)."""
    tensors = {}
    split = interleaved_expert_matrices if interleaved else expert_matrices
    for mat, w in split(gate_up, down, expert).items():
        tensors.update({f"{mat}.{k}": t for k, t in quantize_matrix(w, spec, optimize, device).items()})
    return tensors


def save_checkpoint(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    attn_bits: int = 4,
    expert_bits: int = 2,
    tokenizer=None,
    optimize: bool = True,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> Path:
    """Write a transformers 5 model of any supported family (``MixtralForCausalLM``, ``OlmoeForCausalLM``,
    ``Qwen2MoeForCausalLM``, ``Qwen3MoeForCausalLM``, ``PhimoeForCausalLM``) in the offloading layout.

    Attention (and shared-expert / dense-layer MLPs) is quantized to ``attn_bits``, experts to
    ``expert_bits`` (HQQ's optimizer refines each group's zero when ``optimize``; on ``device`` when given);
    embeddings, norms, biases, routers and ``lm_head`` stay float16 (``ModelSpec.trunk``). The same per-tensor
    functions serve the streaming converter (``convert.py``), so a model saved here and the same model
    converted from its ``save_pretrained`` shards are byte-identical.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    arch = spec_of(cfg).arch  # UnsupportedFamilyError for any other model
    quant = QuantConfig.for_bits(attn_bits, expert_bits).fitted(arch)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    bar = tqdm(total=num_files(cfg), desc="quantizing", unit="file", disable=not progress)
    write_shard(trunk_tensors(sd, cfg, quant, optimize, device), out / trunk_file(cfg))
    bar.update(1)
    for layer in arch.moe_layers:
        p = f"model.layers.{layer}.mlp.experts."
        gate_up, down = sd[p + "gate_up_proj"], sd[p + "down_proj"]
        for e in range(arch.num_experts):
            write_shard(
                expert_tensors(gate_up, down, e, quant.experts, optimize, device, arch.expert_layout == "interleaved"),
                out / expert_file(cfg, layer, e),
            )
            bar.update(1)
    bar.close()
    write_layout_metadata(out, cfg, quant)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "QuantConfig",
    "SUFFIXES",
    "save_checkpoint",
]
