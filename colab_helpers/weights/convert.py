"""Streaming converter: a transformers MoE checkpoint (hub repo or folder) -> the offloading layout.

The family (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, Phi-3.5-MoE, gpt-oss, DeepSeek-V2) comes from the source's
config.json; its adapter says how the published shards name experts and router (``families/source_names.py``; gpt-oss's
published MXFP4 experts are decoded by ``mxfp4.py`` first, the one quantized source accepted). A source is
read one safetensors shard at a time, each tensor straight from the memory map, and quantized with the same
per-tensor functions as ``save_checkpoint`` (HQQ's optimizer, on the GPU when there is one). An expert is
written as soon as its w1/w2/w3 have all been seen; what is still incomplete at the end of a shard (an expert
whose matrices straddle shards) is kept already quantized, so host RAM stays near one source shard. After
each shard a small staging file (its trunk pieces and the pending expert pieces) and a progress manifest
are written atomically: an interrupted run, rerun, continues where it stopped and produces the same bytes.
With ``delete_source`` each downloaded shard is deleted once consumed, so a free Colab disk holds the
output plus at most two source shards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import (
    CONFIG_FILE,
    INDEX_FILE,
    Checkpoint,
    CheckpointError,
    QuantConfig,
    config_from_dict,
    expert_file,
    stored_expert_matrix,
    stored_trunk_tensor,
    trunk_file,
    write_layout_metadata,
    write_shard,
    write_text,
)
from .families import MoEArchitecture, UnsupportedFamilyError, detect_family
from .families.source_names import SourceKey, SourceNames, UnexpectedTensorError, source_names
from .model_spec import ModelSpec

GB = 10**9
MB = 10**6
STATE_DIR = ".convert"  # inside the output folder: manifest, staging files, deletable downloads
MANIFEST = "progress.json"
PENDING = "pending"  # staging files: an incomplete expert's quantized pieces as pending.<layer>.<expert>.<key>
SOURCE_DTYPES = {torch.bfloat16, torch.float16, torch.float32}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
)
ASSUMED_DOWNLOAD_BPS = 100 * MB  # typical hub -> Colab throughput; only used for the time estimate
PYTHON_RSS = 550 * MB  # measured baseline of torch + transformers + colab_helpers (planner.Margins)
# Host bytes per parameter of the largest matrix while HQQ's optimizer runs on it: peak RSS (VmHWM) measured
# here at up to 74 B/param on CPU (its fp32 temporaries); on a GPU the host holds the source and fp32 copies only.
HQQ_SCRATCH_PER_PARAM = {"cpu": 80, "cuda": 8}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConvertError(ValueError):
    """The source cannot be converted, or the output folder holds something else; the message says what."""


# --------------------------------------------------------------------------------------------------
# source tensor names
# --------------------------------------------------------------------------------------------------


def classify(key: str, names: SourceNames) -> SourceKey | None:
    """What source tensor ``key`` is, in the family's published names (``block_sparse_moe.experts.N.w1``,
    ``mlp.experts.N.gate_proj``) or transformers 5's fused ones (``mlp.experts.gate_up_proj``); ``None`` for
    tensors the layout does not keep (rotary ``inv_freq``)."""
    try:
        return names.classify(key)
    except UnexpectedTensorError as err:
        raise ConvertError(
            f"{err} (is the source already quantized, or a LoRA adapter? merge it into the base weights first)"
        ) from None


# --------------------------------------------------------------------------------------------------
# where the source lives (a hub repo or a folder); every hub call goes through _hub_download/_hub_listing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A checkpoint in sharded safetensors (any supported family): file sizes, and where to fetch each file from."""

    description: str  # "owner/name@commit" or the folder's absolute path
    files: dict[str, int]  # every file name -> size in bytes
    root: Path | None = None  # local folder; None for a hub repo
    repo_id: str | None = None
    revision: str | None = None  # the commit hash the listing was made at
    token: str | None = field(default=None, repr=False)

    @property
    def remote(self) -> bool:
        return self.root is None

    def fetch(self, name: str, local_dir: Path | None = None) -> Path:
        """The file on local disk: as it is for a folder; downloaded (resumable) for a repo."""
        if self.root is not None:
            return self.root / name
        return _hub_download(self.repo_id, name, self.revision, local_dir, self.token)


def _hub_listing(repo_id: str, revision: str, token: str | None) -> tuple[str, dict[str, int]]:
    """(commit hash, {file: size}) of a hub repo at ``revision``."""
    import huggingface_hub as hf

    from .hub import _explained

    with _explained(repo_id, revision, Path.cwd(), token):
        info = hf.HfApi().model_info(repo_id, revision=revision, files_metadata=True, token=token)
    return info.sha or revision, {s.rfilename: int(s.size or 0) for s in info.siblings or []}


def _hub_download(repo_id: str, name: str, revision: str, local_dir: Path | None, token: str | None) -> Path:
    """One file at one commit; huggingface_hub resumes a partial file and skips a complete one."""
    import huggingface_hub as hf

    from .hub import _explained

    with _explained(repo_id, revision, local_dir or Path.cwd(), token):
        return Path(hf.hf_hub_download(repo_id, name, revision=revision, local_dir=local_dir, token=token))


def open_source(src: str | os.PathLike, revision: str | None = None, token: str | None = None) -> Source:
    """A local folder, or a hub repo id (``owner/name``) listed at ``revision`` (default: main)."""
    path = Path(src).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ConvertError(f"{src}: --revision applies to hub repos, and this is a local folder")
        files = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
        return Source(str(path.resolve()), files, root=path)
    text = str(src)
    if path.exists() or not _REPO_ID.match(text) or text.startswith((".", "~", "/")):
        raise ConvertError(f"{src}: no such folder, and not a hub repo id 'owner/name'")
    commit, files = _hub_listing(text, revision or "main", token)
    return Source(f"{text}@{commit}", files, repo_id=text, revision=commit, token=token)


def _read_json_file(source: Source, name: str, into: Path) -> dict:
    if name not in source.files:
        raise ConvertError(f"{source.description}: has no {name}")
    try:
        return json.loads(source.fetch(name, into).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConvertError(f"{source.description}: {name} is not readable JSON ({err})") from err


# --------------------------------------------------------------------------------------------------
# the plan: what will be read and written, and the time/disk/RAM it takes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConversionPlan:
    """Everything decided before the first shard is read; ``report()`` is what the CLI prints first."""

    source: Source
    config: object  # the family's transformers config (MixtralConfig, OlmoeConfig, ...)
    arch: MoEArchitecture
    quant: QuantConfig
    shards: tuple[str, ...]  # source safetensors files, in processing order
    shard_tensors: dict[str, tuple[str, ...]]  # file -> tensor names (from the index)
    source_bytes: int
    max_shard_bytes: int
    output_bytes: int
    trunk_bytes: int
    params: int
    quantize_seconds: float  # measured rate x parameters
    download_seconds: float  # assumed throughput x bytes still to fetch (0 for a folder)
    delete_source: bool
    device: str

    @property
    def spec(self) -> ModelSpec:
        """The one model description of the output: its tensors and their bytes."""
        return ModelSpec.of(self.arch, self.quant)

    @property
    def disk_bytes(self) -> int:
        """Peak extra disk: the output, the staged trunk pieces and the source shards held at once."""
        held = 2 * self.max_shard_bytes if self.delete_source else self.source_bytes
        return self.output_bytes + self.trunk_bytes + (held if self.source.remote else 0)

    @property
    def ram_bytes(self) -> int:
        """Peak host RAM: Python and torch, one source shard mapped, HQQ scratch; or the trunk at the end."""
        return PYTHON_RSS + max(self.max_shard_bytes + hqq_scratch_bytes(self.arch, self.device), 2 * self.trunk_bytes)

    @property
    def output_files(self) -> int:
        return 1 + self.arch.total_experts

    def machine_check(self, out: str | os.PathLike) -> str:
        """This plan against this machine: free disk where ``out`` goes, available RAM, and a GPU or not."""
        import psutil

        from .hub import _existing_parent

        free = shutil.disk_usage(_existing_parent(Path(out))).free
        ram = psutil.virtual_memory().available
        ok = {True: "enough", False: "NOT ENOUGH"}
        gpu = (
            "a GPU: HQQ runs there" if torch.cuda.is_available() else "no GPU: HQQ runs on the CPU (slow at full size)"
        )
        return "\n".join(
            [
                f"disk: {free / GB:.1f} GB free at {out}, the conversion needs {self.disk_bytes / GB:.2f} GB: "
                f"{ok[free >= self.disk_bytes]}",
                f"RAM:  {ram / GB:.1f} GB available, the conversion needs {self.ram_bytes / GB:.2f} GB: "
                f"{ok[ram >= self.ram_bytes]}",
                f"this machine has {gpu}",
            ]
        )

    def report(self) -> str:
        a, q = self.arch, self.quant
        eta = self.quantize_seconds + self.download_seconds
        held = (
            f"at most two source shards ({2 * self.max_shard_bytes / GB:.2f} GB) with --delete-source"
            if self.delete_source
            else f"all source shards ({self.source_bytes / GB:.2f} GB) in the hub cache"
        )
        lines = [
            f"convert {self.source.description}: {a.name} {_layers(a)} x {a.num_experts} experts, "
            f"hidden {a.hidden}, {self.params / 1e9:.2f} B parameters in {len(self.shards)} shards "
            f"({_size(self.source_bytes)}, largest {_size(self.max_shard_bytes)})",
            f"  to {q.experts.nbits}-bit experts (group {q.experts.group_size}), {q.attention.nbits}-bit attention "
            f"(group {q.attention.group_size}), HQQ optimizer on {self.device}",
            f"  output: {self.output_bytes / GB:.3f} GB ({self.output_files} files)",
            f"  disk:   {self.disk_bytes / GB:.3f} GB at the peak (output + staged trunk"
            + (f" + {held})" if self.source.remote else "; the source folder is read in place)"),
            f"  RAM:    {self.ram_bytes / GB:.3f} GB at the peak (Python + one source shard + HQQ scratch)",
            f"  time:   about {_duration(eta)} (quantizing {_duration(self.quantize_seconds)}: measured rate here; "
            + (
                f"downloading {_duration(self.download_seconds)} at an assumed {ASSUMED_DOWNLOAD_BPS / MB:.0f} MB/s)"
                if self.source.remote
                else "no download)"
            ),
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "source": self.source.description,
            "shards": len(self.shards),
            "source_gb": round(self.source_bytes / GB, 3),
            "output_gb": round(self.output_bytes / GB, 3),
            "disk_peak_gb": round(self.disk_bytes / GB, 3),
            "ram_peak_gb": round(self.ram_bytes / GB, 3),
            "eta_seconds": round(self.quantize_seconds + self.download_seconds, 1),
            "expert_bits": self.quant.experts.nbits,
            "attn_bits": self.quant.attention.nbits,
            "device": self.device,
        }


def _layers(arch: MoEArchitecture) -> str:
    dense = len(arch.dense_layers)
    return f"{arch.num_layers} layers" + (f" ({dense} dense)" if dense else "")


def hqq_scratch_bytes(arch, device: str) -> int:
    """Host memory HQQ's optimizer needs for the biggest quantized matrix (Mixtral: an expert's w1) on ``device``;
    ``arch`` is a ``MoEArchitecture`` or a transformers config."""
    per = HQQ_SCRATCH_PER_PARAM["cuda" if str(device).startswith("cuda") else "cpu"]
    return per * max(o * i for o, i in _quantized_shapes(ModelSpec.of(arch)))


def _size(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / MB:.1f} MB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def quantize_device(device: str | torch.device | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def measure_quantize_rate(quant: QuantConfig, device: torch.device, optimize: bool = True) -> float:
    """Seconds per parameter of HQQ quantization on ``device``, timed on one 0.5M-parameter matrix."""
    from .checkpoint import quantize_matrix

    w = torch.randn(256, 2048, device=device)
    quantize_matrix(w[:64, :256], quant.experts, optimize, device)  # warm-up: imports, kernels
    start = time.perf_counter()
    quantize_matrix(w, quant.experts, optimize, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / w.numel()


def plan_conversion(
    src: str | os.PathLike,
    expert_bits: int = 2,
    attn_bits: int = 4,
    revision: str | None = None,
    delete_source: bool = False,
    device: str | torch.device | None = None,
    token: str | None = None,
    optimize: bool = True,
    meta_dir: Path | None = None,
) -> ConversionPlan:
    """Read the source's config and index (small files) and size the conversion; nothing big is fetched."""
    try:
        quant = QuantConfig.for_bits(attn_bits, expert_bits)
    except ValueError as err:
        raise ConvertError(str(err)) from None
    source = open_source(src, revision, token)
    delete_source = delete_source and source.remote  # only shards this converter downloads, never a user's folder
    meta = meta_dir if source.remote else None
    cfg_dict = _read_json_file(source, CONFIG_FILE, meta)
    config = _family_config(cfg_dict, source)
    arch = ModelSpec.of(config).arch
    quant = quant.fitted(arch)  # a smaller expert scale group where the shapes need it (gpt-oss at 3/4 bits)
    spec = ModelSpec.of(arch, quant)
    _check_shapes(spec, source)
    shard_tensors = _shard_tensors(source, meta)
    _refuse_quantized(source, shard_tensors)
    shards = tuple(sorted(shard_tensors))
    sizes = [source.files[s] for s in shards]
    dev = quantize_device(device)
    params = arch.total_params
    rate = measure_quantize_rate(quant, dev, optimize)
    present = sum(source.files[s] for s in shards if _cached(source, s, meta_dir, delete_source))
    return ConversionPlan(
        source=source,
        config=config,
        arch=arch,
        quant=quant,
        shards=shards,
        shard_tensors=shard_tensors,
        source_bytes=sum(sizes),
        max_shard_bytes=max(sizes),
        output_bytes=spec.checkpoint_bytes,
        trunk_bytes=spec.trunk_bytes,
        params=params,
        quantize_seconds=rate * params,
        download_seconds=(sum(sizes) - present) / ASSUMED_DOWNLOAD_BPS if source.remote else 0.0,
        delete_source=delete_source,
        device=str(dev),
    )


def _family_config(cfg: dict, source: Source):
    """The family's transformers config from config.json; any other family refused with the supported list."""
    try:
        adapter = detect_family(cfg)
    except UnsupportedFamilyError as err:
        raise ConvertError(f"{source.description}: {err}") from None
    archs = cfg.get("architectures") or [adapter.MODEL_CLASS]
    if adapter.MODEL_CLASS.lower() not in {str(a).lower() for a in archs}:
        raise ConvertError(
            f"{source.description}: config.json describes {cfg.get('model_type')!r} {archs}, not a "
            f"{adapter.MODEL_CLASS}; only causal language models convert"
        )
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        if not (method == "mxfp4" and adapter.MODEL_TYPE == "gpt_oss"):  # openai's own release: decoded here
            raise ConvertError(f"{source.description}: already quantized ({method}); convert the bf16/fp16 original")
        cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    try:
        return config_from_dict(cfg, CONFIG_FILE)  # as the layout reads it back (Mixtral: architecture fields)
    except (CheckpointError, ValueError, TypeError, KeyError) as err:
        raise ConvertError(f"{source.description}: config.json: {' '.join(str(err).split())}") from None


def _quantized_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """Every matrix shape HQQ quantizes: experts, and the trunk's attention (shared-expert and dense MLPs too)."""
    return [*spec.expert_shapes.values(), *spec.quantized_trunk_shapes.values()]


def _check_shapes(spec: ModelSpec, source: Source) -> None:
    try:
        for shape in spec.quantized_trunk_shapes.values():
            spec.quant.attention.num_groups(shape)
        for shape in spec.expert_shapes.values():
            spec.quant.experts.num_groups(shape)
    except ValueError as err:
        raise ConvertError(f"{source.description}: {err}") from None


def _shard_tensors(source: Source, meta_dir: Path | None) -> dict[str, tuple[str, ...]]:
    if INDEX_FILE in source.files:
        weight_map = _read_json_file(source, INDEX_FILE, meta_dir).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{source.description}: {INDEX_FILE} has no 'weight_map'")
        out: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            out.setdefault(file, []).append(key)
        missing = sorted(f for f in out if f not in source.files)
        if missing:
            raise ConvertError(f"{source.description}: {INDEX_FILE} names files that are not there: {missing[:3]}")
        return {f: tuple(sorted(k)) for f, k in out.items()}
    if "model.safetensors" in source.files:
        from .checkpoint import read_header

        path = source.fetch("model.safetensors", meta_dir)
        return {"model.safetensors": tuple(sorted(read_header(path)))}
    raise ConvertError(
        f"{source.description}: no safetensors checkpoint ({INDEX_FILE} or model.safetensors); "
        "convert .bin checkpoints with transformers' save_pretrained first"
    )


def _refuse_quantized(source: Source, shard_tensors: dict[str, tuple[str, ...]]) -> None:
    """A checkpoint already in the offloading layout (HQQ ``W_q`` codes: the embedded model, a previous convert's
    output) has no bf16/fp16 weights to quantize; say so before the plan, not inside the progress bars."""
    if any(key.endswith(".W_q") for keys in shard_tensors.values() for key in keys):
        raise ConvertError(
            f"{source.description}: already quantized (HQQ tensors in the offloading layout, as convert writes "
            "them): load it with colab_helpers.load_model, or convert the bf16/fp16 original"
        )


def _cached(source: Source, name: str, download_dir: Path | None, delete_source: bool) -> bool:
    if not source.remote:
        return True
    if delete_source:
        return download_dir is not None and (download_dir / name).is_file()
    import huggingface_hub as hf

    return isinstance(hf.try_to_load_from_cache(source.repo_id, name, revision=source.revision), str)


# --------------------------------------------------------------------------------------------------
# resumable state: a manifest and one staging file per consumed source shard
# --------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """``OUT/.convert/progress.json``: the settings it was started with and the shards already consumed."""

    settings: dict
    done: list[str] = field(default_factory=list)
    complete: bool = False

    @classmethod
    def load_or_start(cls, state: Path, settings: dict) -> Progress:
        path = state / MANIFEST
        if not path.is_file():
            return cls(settings)
        data = json.loads(path.read_text())
        if data.get("settings") != settings:
            diff = _settings_diff(data.get("settings"), settings)
            raise ConvertError(
                f"{state.parent} holds a conversion with other settings ({diff}); "
                "give another output folder, or delete this one to start over"
            )
        return cls(settings, list(data.get("done", [])), bool(data.get("complete", False)))

    def save(self, state: Path) -> None:
        write_text(state / MANIFEST, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")


def _settings_diff(old: dict | None, new: dict) -> str:
    old = old or {}
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys[:3]) or "unreadable manifest"


def _staging_name(shard: str) -> str:
    return f"part-{shard}"


# --------------------------------------------------------------------------------------------------
# the conversion
# --------------------------------------------------------------------------------------------------


class _Converter:
    """Consumes source shards in order; writes expert files as they complete and one staging file per shard."""

    def __init__(self, plan: ConversionPlan, out: Path, optimize: bool, progress: bool) -> None:
        self.plan, self.out, self.optimize, self.progress = plan, out, optimize, progress
        self.state = out / STATE_DIR
        self.config, self.arch, self.quant = plan.config, plan.arch, plan.quant
        self.names = source_names(plan.arch)
        self.spec = plan.spec
        self.layout_names = {e.model_name: e.name for e in self.spec.trunk}  # transformers 5 -> layout
        self.device = torch.device(plan.device)
        self.pending: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (layer, expert) -> quantized mats
        self.n_mats = len(self.spec.expert_tensors) // 3  # 7 tensors per matrix

    # ---- one shard ----

    def consume(self, shard: str, path: Path) -> None:
        from safetensors import safe_open
        from tqdm.auto import tqdm

        trunk: dict[str, torch.Tensor] = {}
        names = self.plan.shard_tensors[shard]
        with safe_open(path, framework="pt", device="cpu") as f:
            missing = sorted(set(names) - set(f.keys()))
            if missing:
                raise ConvertError(f"{shard}: the index lists {missing[0]!r} but the file does not hold it")
            bar = tqdm(names, desc=shard, unit="tensor", leave=False, disable=not self.progress)
            for key in bar:
                kind = classify(key, self.names)
                if kind is None:
                    continue
                if kind.kind == "fused":
                    self._fused(shard, f, key, kind)
                    continue
                if kind.kind.startswith("mxfp4"):  # gpt-oss's published experts: decoded with their scales
                    if kind.kind == "mxfp4_blocks":
                        self._mxfp4(shard, f, key, kind)
                    continue
                weight = f.get_tensor(key)
                self._check_dtype(shard, key, weight)
                if kind.kind == "trunk":
                    self._check_trunk_shape(shard, kind.name, weight)
                    name = self.layout_names.get(kind.name)
                    if name is None:  # a tied lm_head the layout does not store (every family but Mixtral)
                        continue
                    trunk.update(stored_trunk_tensor(name, weight, self.quant, self.optimize, self.device))
                else:
                    self._expert_matrix(shard, key, kind.layer, kind.expert, kind.name, weight)
                del weight
            bar.close()
        staged = dict(trunk)
        for (layer, e), mats in sorted(self.pending.items()):
            for rel, t in mats.items():
                staged[f"{PENDING}.{layer}.{e}.{rel}"] = t
        write_shard(staged, self.state / _staging_name(shard))

    def _check_dtype(self, shard: str, key: str, weight: torch.Tensor) -> None:
        if weight.dtype not in SOURCE_DTYPES:
            raise ConvertError(f"{shard}: tensor {key!r} is {weight.dtype}; the source must be bf16, fp16 or fp32")

    def _check_trunk_shape(self, shard: str, name: str, weight: torch.Tensor) -> None:
        want = self.names.trunk[name]
        if tuple(weight.shape) != tuple(want):
            raise _shape_error(shard, name, weight.shape, want)

    def _fused(self, shard: str, f, key: str, kind: SourceKey) -> None:
        a = self.arch
        sl = f.get_slice(key)
        shape = tuple(sl.get_shape())
        i = a.expert_intermediate
        want = a.fused_expert_shapes["gate_up_proj" if kind.name == "gate_up" else "down_proj"]
        if shape != want:
            raise _shape_error(shard, key, shape, want)
        for e in range(a.num_experts):
            block = sl[e : e + 1][0]  # one expert read from the memory map, not the whole layer
            self._check_dtype(shard, key, block)
            if a.expert_layout == "interleaved":  # gpt-oss: [H, 2I] gate/up columns alternating, down [I, H]
                if kind.name == "gate_up":
                    self._expert_matrix(shard, key, kind.layer, e, "w1", block[:, ::2].T)
                    self._expert_matrix(shard, key, kind.layer, e, "w3", block[:, 1::2].T)
                else:
                    self._expert_matrix(shard, key, kind.layer, e, "w2", block.T)
                continue
            if kind.name == "gate_up":
                self._expert_matrix(shard, key, kind.layer, e, "w1", block[:i])
                self._expert_matrix(shard, key, kind.layer, e, "w3", block[i:])
            else:
                self._expert_matrix(shard, key, kind.layer, e, "w2", block)

    def _mxfp4(self, shard: str, f, key: str, kind: SourceKey) -> None:
        """gpt-oss's published MXFP4 experts (``*_blocks`` with their ``*_scales`` from the same shard), decoded
        as transformers does (``mxfp4.dequantize``), one expert at a time, in float32 (exact), then HQQ."""
        from .mxfp4 import BLOCK, dequantize

        a = self.arch
        scales_key = key.removesuffix("_blocks") + "_scales"
        if scales_key not in f.keys():
            raise ConvertError(f"{shard}: {key!r} has no {scales_key!r} beside it; MXFP4 blocks need their scales")
        blocks, scales = f.get_slice(key), f.get_slice(scales_key)
        h, i, e_n = a.hidden, a.expert_intermediate, a.num_experts
        rows, cols = (2 * i, h) if kind.name == "gate_up" else (h, i)
        want = (e_n, rows, cols // BLOCK, BLOCK // 2)
        if tuple(blocks.get_shape()) != want or tuple(scales.get_shape()) != want[:3]:
            raise _shape_error(shard, key, (*blocks.get_shape(), "/", *scales.get_shape()), want)
        for e in range(e_n):
            w = dequantize(blocks[e : e + 1][0], scales[e : e + 1][0])  # [rows, cols], as published (not transposed)
            if kind.name == "gate_up":  # rows alternate gate, up
                self._expert_matrix(shard, key, kind.layer, e, "w1", w[::2])
                self._expert_matrix(shard, key, kind.layer, e, "w3", w[1::2])
            else:
                self._expert_matrix(shard, key, kind.layer, e, "w2", w)

    def _expert_matrix(self, shard: str, key: str, layer: int, e: int, mat: str, weight: torch.Tensor) -> None:
        a = self.arch
        if layer not in a.moe_layers or not 0 <= e < a.num_experts:
            size = f"{len(a.moe_layers)} MoE layers x {a.num_experts}"
            raise ConvertError(f"{shard}: tensor {key!r} is outside the {size} experts config.json describes")
        want = a.expert_shapes[mat]
        if tuple(weight.shape) != want:
            raise _shape_error(shard, key, weight.shape, want)
        mats = self.pending.setdefault((layer, e), {})
        mats.update(stored_expert_matrix(mat, weight, self.quant, self.optimize, self.device))
        if len(mats) == 3 * self.n_mats:
            write_shard(mats, self.out / expert_file(self.config, layer, e))
            del self.pending[(layer, e)]

    # ---- resume and finish ----

    def restore_pending(self, last_done: str) -> None:
        """The expert pieces still incomplete after the last consumed shard (saved in its staging file)."""
        from safetensors import safe_open

        pat = re.compile(rf"^{PENDING}\.(\d+)\.(\d+)\.(.+)$")
        with safe_open(self.state / _staging_name(last_done), framework="pt", device="cpu") as f:
            for key in f.keys():
                if m := pat.match(key):
                    self.pending.setdefault((int(m[1]), int(m[2])), {})[m[3]] = f.get_tensor(key)

    def finish(self) -> None:
        """The trunk file from the staging files, then index, config, tokenizer, model card; verified."""
        from safetensors import safe_open

        c = self.config
        if self.pending:
            (layer, e), mats = next(iter(sorted(self.pending.items())))
            have = sorted({k.split(".")[0] for k in mats})
            raise ConvertError(f"the source has no complete expert {layer}.{e}: only {have} of w1, w2, w3 were found")
        for layer in self.arch.moe_layers:
            for e in range(self.arch.num_experts):
                if not (self.out / expert_file(c, layer, e)).is_file():
                    raise ConvertError(f"the source holds no weights for expert {layer}.{e}")
        trunk: dict[str, torch.Tensor] = {}
        for shard in self.plan.shards:
            with safe_open(self.state / _staging_name(shard), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if not key.startswith(f"{PENDING}."):
                        trunk[key] = f.get_tensor(key)
        expected = self.spec.trunk_tensors
        tied = self.arch.tie_embeddings and "lm_head.weight" in expected and "lm_head.weight" not in trunk
        if tied and "model.embed_tokens.weight" in trunk:  # Mixtral's layout stores lm_head even when tied
            trunk["lm_head.weight"] = trunk["model.embed_tokens.weight"].clone()
        missing = sorted(set(expected) - set(trunk))
        if missing:
            raise ConvertError(f"the source holds no {missing[0]!r} (and {len(missing) - 1} more trunk tensors)")
        write_shard({k: trunk[k] for k in expected}, self.out / trunk_file(c))
        del trunk
        write_layout_metadata(self.out, c, self.quant)
        src = self.plan.source
        for name in TOKENIZER_FILES:
            if name in src.files:
                path = src.fetch(name, self.state / "source" if src.remote else None)
                tmp = self.out / (name + ".partial")
                shutil.copyfile(path, tmp)
                os.replace(tmp, self.out / name)
        write_text(self.out / "README.md", model_card(self.plan))
        try:
            Checkpoint.open(self.out, verify=True)
        except CheckpointError as err:
            raise ConvertError(f"the written checkpoint does not verify: {err}") from None


def _shape_error(shard: str, key: str, got, want) -> ConvertError:
    return ConvertError(f"{shard}: tensor {key!r} has shape {list(got)}, config.json implies {list(want)}")


def model_card(plan: ConversionPlan) -> str:
    """The README written next to the shards (and pushed with them)."""
    q, a = plan.quant, plan.arch
    name = plan.source.description.split("@")[0].rstrip("/").split("/")[-1]
    return f"""---
library_name: colab_helpers
tags: [{a.family}, hqq, offloading, quantized]
---
# {name}: {q.experts.nbits}-bit experts, {q.attention.nbits}-bit attention (offloading layout)

Converted from `{plan.source.description}` with `python -m colab_helpers convert`:
HQQ quantization (half-quadratic optimizer), experts {q.experts.nbits}-bit (group {q.experts.group_size},
scale group {q.experts.scale_group_size}), {_attention_like(a)} {q.attention.nbits}-bit (group {q.attention.group_size},
scale group {q.attention.scale_group_size}); embeddings, norms, router and `lm_head` in float16.
{_layers(a)} x {a.num_experts} experts; one trunk file plus one file per expert, the
layout of `lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo` (see `docs/checkpoint_format.md` of
colab_helpers); the settings are in `config.json` under `offloading_quantization`.

```python
import colab_helpers as ch
model = ch.load_model(ch.download("OWNER/THIS-REPO"), device="cuda")  # experts on the GPU: as many as fit
```

Output size: {plan.output_bytes / GB:.2f} GB. The license of the source model applies.
"""


def _attention_like(arch: MoEArchitecture) -> str:
    """What the trunk quantizes with attention's settings."""
    extra = ["the shared expert"] * bool(arch.shared_intermediate)
    extra += ["the dense layers' MLPs"] * bool(arch.dense_layers)
    return "attention" + (f" (and {' and '.join(extra)})" if extra else "")


def _settings(plan: ConversionPlan, optimize: bool) -> dict:
    return {
        "source": plan.source.description,
        "shards": {s: plan.source.files[s] for s in plan.shards},
        "attention": plan.quant.attention.to_dict(),
        "experts": plan.quant.experts.to_dict(),
        "optimize": optimize,
    }


def _check_disk(plan: ConversionPlan, out: Path, progress: Progress) -> None:
    from .hub import _existing_parent

    left = [s for s in plan.shards if s not in progress.done]
    remaining = sum(plan.source.files[s] for s in left)
    if plan.source.remote:
        held = min(remaining, 2 * plan.max_shard_bytes) if plan.delete_source else remaining
    else:
        held = 0
    need = plan.output_bytes + plan.trunk_bytes + held - _bytes_under(out)
    free = shutil.disk_usage(_existing_parent(out)).free
    if need > free:
        raise ConvertError(
            f"not enough disk space in {out}: the conversion needs {need / GB:.2f} GB more, {free / GB:.2f} GB free"
            + ("" if plan.delete_source or not plan.source.remote else "; --delete-source needs less")
        )


def _bytes_under(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    expert_bits: int = 2,
    attn_bits: int = 4,
    revision: str | None = None,
    delete_source: bool = False,
    push_to_hub: str | None = None,
    device: str | torch.device | None = None,
    token: str | None = None,
    optimize: bool = True,
    progress: bool = True,
    plan: ConversionPlan | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Convert ``src`` (hub repo id or folder) into the offloading layout in ``out``; resumable.

    Prints the plan (time, disk, RAM) first. Rerun after an interruption with the same arguments:
    consumed shards are skipped, and the output is byte-identical to an uninterrupted run.
    """
    from tqdm.auto import tqdm

    say = log or print  # a summary, not an error: stdout (Jupyter shows stderr in red)
    out = Path(out).expanduser()
    state = out / STATE_DIR
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a folder")
    if plan is None:
        plan = _plan_or_leave_nothing(
            out,
            src,
            expert_bits,
            attn_bits,
            revision,
            delete_source,
            device,
            token,
            optimize,
            meta_dir=state / "source",
        )
    state.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob("*.partial"):
        stale.unlink()
    say(plan.report())
    prog = Progress.load_or_start(state, _settings(plan, optimize))
    if not prog.complete:
        _check_disk(plan, out, prog)
        conv = _Converter(plan, out, optimize, progress)
        if prog.done:
            say(f"resuming: {len(prog.done)} of {len(plan.shards)} source shards already converted")
            conv.restore_pending(prog.done[-1])
        download_dir = state / "source" if plan.delete_source else None
        total = tqdm(total=plan.source_bytes, desc="converting", unit="B", unit_scale=True, disable=not progress)
        total.update(sum(plan.source.files[s] for s in prog.done))
        for shard in plan.shards:
            if shard in prog.done:
                continue
            path = plan.source.fetch(shard, download_dir)
            conv.consume(shard, path)
            prog.done.append(shard)
            prog.save(state)
            if plan.delete_source and plan.source.remote:
                path.unlink(missing_ok=True)
            total.update(plan.source.files[shard])
        total.close()
        conv.finish()
        prog.complete = True
        prog.save(state)
        for shard in plan.shards:
            (state / _staging_name(shard)).unlink(missing_ok=True)
        if plan.delete_source:
            shutil.rmtree(state / "source", ignore_errors=True)
    say(f"done: {out} ({plan.output_bytes / GB:.3f} GB); load it with colab_helpers.load_model({str(out)!r})")
    if push_to_hub:
        push(out, push_to_hub, token)
        say(f"pushed to https://huggingface.co/{push_to_hub}")
    return out


def _plan_or_leave_nothing(out: Path, src, *args, meta_dir: Path) -> ConversionPlan:
    """``plan_conversion``; a refused source (missing, another family, already quantized) leaves no ``out`` behind
    when this call made it (a hub source's config is fetched into ``out/.convert/source`` before it is judged)."""
    made = not out.exists()
    try:
        return plan_conversion(src, *args, meta_dir=meta_dir)
    except BaseException:
        if made and out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        raise


def push(out: Path, repo_id: str | None, token: str | None = None) -> None:
    """Upload a finished conversion (shards, index, config, tokenizer, model card) to a hub model repo.

    The token comes from ``token``, ``HF_TOKEN`` or Colab's secret of that name (huggingface_hub reads
    both); it needs write access. ``repo_id=None`` only says how to push.
    """
    import huggingface_hub as hf

    from .hub import _explained

    if repo_id is None:
        print(f"not pushed: set a hub repo id ('you/name') to upload {out}")
        return
    if not _REPO_ID.match(repo_id):
        raise ConvertError(f"--push-to-hub {repo_id!r}: expected a repo id 'owner/name'")
    with _explained(repo_id, "main", out, token):
        api = hf.HfApi()
        api.create_repo(repo_id, token=token, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(out),
            token=token,
            ignore_patterns=[f"{STATE_DIR}/*", "*.partial"],
            commit_message="colab_helpers convert",
        )


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from ..usage import ArgumentParser

    p = ArgumentParser(prog="python -m colab_helpers convert", description=__doc__.split("\n")[0])
    p.add_argument(
        "src",
        help="hub repo id (owner/name) or local folder of a transformers Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE or "
        "Phi-3.5-MoE, gpt-oss or DeepSeek-V2 checkpoint (the family is read from its config.json)",
    )
    p.add_argument("out", help="output folder (rerun with the same arguments to resume)")
    p.add_argument("--expert-bits", type=int, default=2, choices=(2, 3, 4), help="expert bit width (default 2)")
    p.add_argument("--attn-bits", type=int, default=4, choices=(2, 3, 4), help="attention bit width (default 4)")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit (default main)")
    p.add_argument("--delete-source", action="store_true", help="delete each downloaded source shard once consumed")
    p.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO",
        help="upload the result to this hub model repo (default: no upload)",
    )
    p.add_argument("--device", default=None, help="where HQQ runs: cuda or cpu (default: cuda when present)")
    p.add_argument("--plan-only", action="store_true", help="print the estimate (time, disk, RAM) and stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``python -m colab_helpers convert``: exit 0 when done; one line and exit 2 when the input is wrong
    (1 when the network, the hub or the disk failed, as for every download)."""
    from ..usage import UsageError
    from .hub import DownloadError

    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.delete_source and Path(args.src).expanduser().is_dir():
            raise ConvertError(f"{args.src}: --delete-source only deletes shards it downloads, not a local folder")
        if args.plan_only:
            plan = plan_conversion(
                args.src, args.expert_bits, args.attn_bits, args.revision, args.delete_source, args.device
            )
            print(plan.report())
            return 0
        convert(
            args.src,
            args.out,
            args.expert_bits,
            args.attn_bits,
            args.revision,
            args.delete_source,
            args.push_to_hub,
            args.device,
            progress=not args.no_progress,
        )
    except (ConvertError, DownloadError, CheckpointError, UsageError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return getattr(err, "exit_code", 2)  # DownloadError: 1 when the network, the hub or the disk failed
    return 0


__all__ = [
    "ConversionPlan",
    "ConvertError",
    "Source",
    "classify",
    "cli_main",
    "convert",
    "open_source",
    "plan_conversion",
    "push",
]
