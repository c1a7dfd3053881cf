"""The embedded tiny model: a small Mixtral-architecture model shipped in the real shard layout.

It lets every notebook, test and CLI command run offline on a CPU. It was trained briefly on
synthetic chat data (``scripts/train_tiny.py``) and converted with ``save_checkpoint``
(``scripts/make_tiny_checkpoint.py``), so a broken cache or kernel shows up as visibly wrong text.
"""

from __future__ import annotations

import os
from pathlib import Path

TINY_MODEL_DIR = Path(__file__).parents[1] / "data" / "tiny-mixtral"
TINY_ENV = "COLAB_HELPERS_TINY"  # set to 1 to force the embedded model (CI, offline demos)


def tiny_model_path() -> Path:
    """Where the embedded checkpoint lives (inside the installed package)."""
    if not (TINY_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"the embedded model is missing from {TINY_MODEL_DIR}; reinstall colab_helpers")
    return TINY_MODEL_DIR


def tiny_forced() -> bool:
    return os.environ.get(TINY_ENV, "") not in ("", "0", "false", "False")
