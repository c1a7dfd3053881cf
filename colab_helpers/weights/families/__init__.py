"""Mixture-of-experts families: one small adapter module per family, saying what differs.

``detect_family(config_dict)`` picks the adapter from ``model_type`` (or ``architectures``) in a
config.json and refuses any other family with the list of supported ones; ``architecture(config_dict)``
builds the family's transformers config from the dict and returns its ``MoEArchitecture``. The planner
(``plan --model``), ``replay --model``, the converter's family detection, the checkpoint layout
(``model_spec.ModelSpec``) and the loader (``load_model``: the family's stock class, ``OffloadedMoE`` per
MoE layer) use this; ``source_names`` maps each family's published checkpoint names onto transformers 5's.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .base import MoEArchitecture

FAMILY_MODULES = (
    "mixtral",
    "olmoe",
    "qwen2_moe",
    "qwen3_moe",
    "phimoe",
    "gpt_oss",
    "deepseek_v2",
)  # model_type == module name


class UnsupportedFamilyError(ValueError):
    """The config names a model family no adapter covers; the message lists the supported ones."""


def adapters() -> dict[str, ModuleType]:
    """``{model_type: adapter module}`` for every family the installed transformers ships."""
    import transformers

    out = {}
    for name in FAMILY_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        if hasattr(transformers, module.CONFIG_CLASS):
            out[name] = module
    return out


def supported() -> str:
    return ", ".join(f"{m.MODEL_CLASS} ({t})" for t, m in adapters().items())


def detect_family(config: dict) -> ModuleType:
    """The adapter for a config.json's dict; ``UnsupportedFamilyError`` naming the supported families."""
    found = adapters()
    model_type = config.get("model_type")
    if model_type in found:
        return found[model_type]
    by_class = {m.MODEL_CLASS.lower(): m for m in found.values()}
    for arch in config.get("architectures") or ():
        if str(arch).lower() in by_class:
            return by_class[str(arch).lower()]
    what = model_type or ", ".join(config.get("architectures") or ()) or "no model_type"
    raise UnsupportedFamilyError(f"model family {what!r} is not supported; supported: {supported()}")


def transformers_config(config: dict):
    """The family's transformers config built from a config.json dict (unknown keys kept, as ``from_dict`` does)."""
    import transformers

    module = detect_family(config)
    cls = getattr(transformers, module.CONFIG_CLASS)
    fields = {k: v for k, v in config.items() if k not in ("architectures", "auto_map", "transformers_version")}
    return cls.from_dict(fields)


def architecture(config: dict) -> MoEArchitecture:
    """``MoEArchitecture`` of a config.json's dict."""
    return detect_family(config).from_config(transformers_config(config))


def from_transformers(config) -> MoEArchitecture:
    """``MoEArchitecture`` of a transformers config object (``MixtralConfig``, ``OlmoeConfig`` ...)."""
    return detect_family({"model_type": config.model_type}).from_config(config)


__all__ = [
    "MoEArchitecture",
    "UnsupportedFamilyError",
    "adapters",
    "architecture",
    "detect_family",
    "from_transformers",
    "supported",
    "transformers_config",
]
