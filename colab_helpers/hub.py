"""Getting the pre-quantized shards: only the needed files, one pinned revision, resumable, sizes checked.

huggingface_hub does the transfer: it resumes partial files, shows tqdm progress bars and reads a
token from ``HF_TOKEN`` or Colab's secret of that name by itself. This module adds what it does not:
a disk-space check before the first byte, a size check of every file against the hub's listing
afterwards (a short or swapped file is fetched again, or named), a complete local copy used when the
hub is unreachable, and one clear message per failure that never contains the token.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEMO_REPO = "lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo"
# The one pin: every download resolves this to a commit first and fetches that commit only. Set it to
# the commit hash (HfApi().model_info(DEMO_REPO).sha) when publishing; "main" follows the branch.
DEMO_REVISION = "main"
NEEDED_FILES = ("*.safetensors", "*.json", "tokenizer.model")  # shards, index, configs, tokenizer
TOKEN_HELP = (
    "If the repo is gated or private, accept its terms on huggingface.co with your account and give a token: "
    "set the HF_TOKEN environment variable, or in Colab add a secret named HF_TOKEN (key icon on the left, "
    "enable notebook access); huggingface_hub reads both by itself."
)
_NETWORK_MODULES = {"httpx", "httpx2", "requests", "urllib3", "aiohttp"}
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")


class DownloadError(RuntimeError):
    """The shards could not be fetched; the message says why and what to do."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None  # None when the hub does not say


@dataclass(frozen=True)
class RemoteListing:
    """The files we need at one commit, with the sizes the hub reports for them."""

    repo_id: str
    revision: str  # the commit hash the listing was made at
    files: tuple[RemoteFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)


def is_needed(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in NEEDED_FILES)


def list_remote(repo_id: str, revision: str, token: str | None = None) -> RemoteListing:
    """Ask the hub which needed files exist at ``revision`` and how big each is."""
    import huggingface_hub as hf

    info = hf.HfApi().model_info(repo_id, revision=revision, files_metadata=True, token=token)
    files = tuple(
        RemoteFile(s.rfilename, None if s.size is None else int(s.size))
        for s in info.siblings or []
        if is_needed(s.rfilename)
    )
    if not any(f.name.endswith(".safetensors") for f in files):
        raise DownloadError(f"{repo_id}@{revision}: the hub lists no .safetensors files; is this the right repo?")
    return RemoteListing(repo_id, info.sha or revision, files)


def local_sizes(listing: RemoteListing, folder: Path | None) -> dict[str, int]:
    """Sizes of the needed files already on disk (``folder``, or the hub cache when None)."""
    out = {}
    for f in listing.files:
        path = folder / f.name if folder is not None else _cached_path(listing, f.name)
        if path is not None and path.is_file():
            out[f.name] = path.stat().st_size
    return out


def _cached_path(listing: RemoteListing, name: str) -> Path | None:
    import huggingface_hub as hf

    found = hf.try_to_load_from_cache(listing.repo_id, name, revision=listing.revision)
    return Path(found) if isinstance(found, str) else None


def check_disk_space(listing: RemoteListing, target: Path, present: dict[str, int]) -> int:
    """Bytes still to fetch; raise before the first byte when the disk cannot hold them."""
    missing = sum(f.size or 0 for f in listing.files if present.get(f.name) != f.size)
    free = shutil.disk_usage(_existing_parent(target)).free
    if missing > free:
        raise DownloadError(
            f"not enough disk space in {target}: {missing / 1e9:.1f} GB still to download, {free / 1e9:.1f} GB free. "
            "Free some space (an old ~/.cache/huggingface) or pass local_dir on a bigger disk."
        )
    return missing


def _existing_parent(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def size_mismatches(listing: RemoteListing, folder: Path) -> list[tuple[str, int | None, int | None]]:
    """``(name, expected, found)`` for every needed file whose size differs from the listing (None: missing)."""
    found = local_sizes(listing, folder)
    return [
        (f.name, f.size, found.get(f.name)) for f in listing.files if f.size is not None and found.get(f.name) != f.size
    ]


def download(
    repo_id: str = DEMO_REPO,
    revision: str | None = None,
    local_dir: str | os.PathLike | None = None,
    token: str | None = None,
) -> Path:
    """Fetch the checkpoint files (resumable; complete files are skipped) and return the folder.

    ``revision`` defaults to ``DEMO_REVISION`` for the demo repo and "main" for any other. The token
    comes from ``token``, ``HF_TOKEN`` or a Colab secret named ``HF_TOKEN``; it is never printed.
    Without a network, a complete earlier download is used as it is.
    """
    revision = revision or (DEMO_REVISION if repo_id == DEMO_REPO else "main")
    folder = Path(local_dir).expanduser() if local_dir is not None else None
    target = folder if folder is not None else _hub_cache()
    with _explained(repo_id, revision, target, token):
        try:
            listing = list_remote(repo_id, revision, token)
        except Exception as err:
            if not _is_network_error(err):
                raise
            offline = _complete_local_copy(repo_id, revision, folder)
            if offline is None:
                raise
            print(f"the hub is unreachable; using the complete local copy in {offline}", file=sys.stderr)
            return offline
        check_disk_space(listing, target, local_sizes(listing, folder))
        path = Path(_snapshot(listing, folder, token))
        _refetch_mismatched(listing, path, folder, token)
    return path


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _snapshot(listing: RemoteListing, folder: Path | None, token: str | None) -> str:
    """Only the listed files, at the listed commit; huggingface_hub resumes partial files and draws bars."""
    import huggingface_hub as hf

    names = [f.name for f in listing.files]
    return hf.snapshot_download(
        listing.repo_id, revision=listing.revision, allow_patterns=names, local_dir=folder, token=token
    )


def _refetch_mismatched(listing: RemoteListing, path: Path, folder: Path | None, token: str | None) -> None:
    """Fetch again every file whose size is not what the hub says; name the ones that stay wrong."""
    import huggingface_hub as hf

    bad = size_mismatches(listing, path)
    for name, expected, found in bad:
        print(f"{name}: {found} bytes on disk, the hub lists {expected}; fetching it again", file=sys.stderr)
        hf.hf_hub_download(
            listing.repo_id, name, revision=listing.revision, local_dir=folder, token=token, force_download=True
        )
    still = size_mismatches(listing, path) if bad else []
    if still:
        detail = "; ".join(
            f"{n}: expected {e:,} B, found {'nothing' if f is None else f'{f:,} B'}" for n, e, f in still
        )
        raise DownloadError(f"{listing.repo_id}: files differ from the hub's listing after a retry: {detail}")


def _complete_local_copy(repo_id: str, revision: str, folder: Path | None) -> Path | None:
    """A finished earlier download (every shard's header and size check out), or None."""
    from .checkpoint import Checkpoint, CheckpointError

    candidate = folder
    if candidate is None:
        import huggingface_hub as hf

        try:
            candidate = Path(hf.snapshot_download(repo_id, revision=revision, local_files_only=True))
        except Exception:
            return None
    try:
        Checkpoint.open(candidate, verify=True)
    except (CheckpointError, OSError):
        return None
    return candidate


# --------------------------------------------------------------------------------------------------
# errors: one clear message each, never the token
# --------------------------------------------------------------------------------------------------


def _is_network_error(err: BaseException) -> bool:
    """No route to the hub: DNS, refused or dropped connections, timeouts, offline mode."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(err, HfHubHTTPError):
        return False
    if isinstance(err, (ConnectionError, TimeoutError, socket.gaierror, OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return True
    return any(cls.__module__.split(".")[0] in _NETWORK_MODULES for cls in type(err).__mro__[:-2])


def _scrub(text: str, token: str | None) -> str:
    """Remove anything that looks like a token from text we show."""
    for secret in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if secret:
            text = text.replace(secret, "***")
    return _TOKEN_RE.sub("hf_***", text)


@contextlib.contextmanager
def _explained(repo_id: str, revision: str, target: Path, token: str | None) -> Iterator[None]:
    """Turn whatever the hub, the network or the disk raised into one ``DownloadError`` that says what to do."""
    try:
        yield
    except DownloadError as err:
        raise DownloadError(_scrub(str(err), token)) from None
    except Exception as err:
        message = _message(err, repo_id, revision, target)
        if message is None:
            raise
        raise DownloadError(_scrub(message, token)) from None


def _message(err: Exception, repo_id: str, revision: str, target: Path) -> str | None:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(err, GatedRepoError):
        return f"{repo_id} is gated and this session has no access (401/403). {TOKEN_HELP}"
    if isinstance(err, RepositoryNotFoundError):
        return f"{repo_id}: not found, or private (401). Check the spelling. {TOKEN_HELP}"
    if isinstance(err, RevisionNotFoundError):
        return f"{repo_id}: revision {revision!r} does not exist (see DEMO_REVISION in colab_helpers/hub.py)"
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(_existing_parent(target)).free
        return (
            f"ran out of disk space while downloading {repo_id} into {target} ({free / 1e9:.1f} GB free now). "
            "Free some space and run again: finished files are kept and the partial one resumes."
        )
    if _is_network_error(err):
        return (
            f"could not reach the Hugging Face hub for {repo_id} ({type(err).__name__}) and there is no complete "
            "local copy. Check the network connection and run again (finished files are kept), or use a local "
            "checkpoint folder, or the embedded tiny model (no --model)."
        )
    if isinstance(err, HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            return f"{repo_id}: the hub refused access ({status}). {TOKEN_HELP}"
        return f"{repo_id}: the hub answered with an error: {str(err).splitlines()[0]}"
    return None


# --------------------------------------------------------------------------------------------------
# what the CLI and notebooks call
# --------------------------------------------------------------------------------------------------

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(model: str | os.PathLike | None) -> tuple[Path, str]:
    """A model argument → (local folder, description). ``None``: the demo repo on a GPU, else embedded.

    An existing folder is used as is; ``owner/name`` that is not a local path is a hub repo id; anything
    else is an error naming what was expected.
    """
    import torch

    from .tiny import tiny_forced, tiny_model_path

    if model is None:
        if tiny_forced() or not torch.cuda.is_available():
            return tiny_model_path(), "the embedded tiny model (no GPU, or COLAB_HELPERS_TINY=1)"
        return download(), DEMO_REPO
    path = Path(model).expanduser()
    if path.is_dir():
        return path, str(model)
    if path.exists():
        raise FileNotFoundError(f"{model}: is a file; give the checkpoint folder that holds config.json")
    text = str(model)
    if _REPO_ID.match(text) and not text.startswith((".", "~")):
        return download(text), text
    raise FileNotFoundError(f"{model}: no such directory (give a checkpoint folder or a hub repo id 'owner/name')")
