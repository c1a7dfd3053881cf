"""Command-line mistakes: one exception type, an argparse parser that raises it, and checked argument types.

Every ``python -m colab_helpers`` subcommand builds its parser from ``ArgumentParser`` here, so a bad
option never prints argparse's usage block and exits by itself: it raises ``UsageError``, and
``cli.main`` turns that (and the library's own errors) into one line on stderr and exit code 2.
The types check what can be checked before anything loads; what needs the model (its expert count)
is checked where the model is known, raising the same ``UsageError``.
"""

from __future__ import annotations

import argparse
import math
from typing import NoReturn


class UsageError(ValueError):
    """A mistake on the command line; the message names the problem and what to do instead."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a parse error raises ``UsageError`` (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    """An integer ≥ 1 (experts per layer, tokens)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (GB of memory)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number ≥ 0 (temperature)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def probability(text: str) -> float:
    """A number in (0, 1] (top-p)."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def device_name(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; whether a GPU is present is checked by ``require_device``."""
    value = text.strip().lower()
    kind, _, index = value.partition(":")
    if value in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"{text!r}: choose cuda, cuda:N, cpu or auto")


def require_device(device: str):
    """The ``torch.device`` to run on; ``UsageError`` when it names a GPU this machine does not have."""
    import torch

    if device in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise UsageError(
                f"--device {device}: torch sees no CUDA GPU on this machine (torch {torch.__version__}, {build}); "
                "use --device cpu, or leave --device out"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def check_experts_on_device(k: int | None, num_experts: int, what: str = "this model") -> None:
    """``UsageError`` unless 1 ≤ k ≤ the experts per layer (None: let the planner choose)."""
    if k is not None and not 1 <= k <= num_experts:
        raise UsageError(f"--experts-on-device {k}: {what} has {num_experts} experts per layer; give 1..{num_experts}")
