"""Getting the pre-quantized shards: download (resumable, pinned, only needed files) and model resolution."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DEMO_REPO = "lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo"
DEMO_REVISION = "main"  # pin a commit hash here when publishing; every download goes through this constant
NEEDED_FILES = ["*.safetensors", "*.json", "tokenizer.model"]


class DownloadError(RuntimeError):
    """The shards could not be fetched; the message says why and what to do."""


def download(
    repo_id: str = DEMO_REPO,
    revision: str = DEMO_REVISION,
    local_dir: str | os.PathLike | None = None,
    token: str | None = None,
) -> Path:
    """Fetch the checkpoint files (resumable; already complete files are skipped) and return the folder.

    The token comes from ``token``, ``HF_TOKEN`` or a Colab secret named ``HF_TOKEN`` (read by
    huggingface_hub itself); it is never printed.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, token=token)
        need = sum(
            (s.size or 0)
            for s in info.siblings or []
            if s.rfilename.endswith((".safetensors", ".json")) or s.rfilename == "tokenizer.model"
        )
        target = Path(local_dir) if local_dir else Path(os.environ.get("HF_HOME", Path.home() / ".cache"))
        target.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(target).free
        have = _bytes_present(Path(local_dir)) if local_dir else 0
        if need - have > free:
            raise DownloadError(
                f"not enough disk space in {target}: need {(need - have) / 1e9:.1f} GB more, {free / 1e9:.1f} GB free"
            )
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=NEEDED_FILES, local_dir=local_dir, token=token
        )
    except (GatedRepoError, RepositoryNotFoundError) as err:
        raise DownloadError(
            f"{repo_id}: access denied or not found ({type(err).__name__}). If the repo is gated, accept its "
            "terms on the hub and set a token: the HF_TOKEN environment variable, or a Colab secret named HF_TOKEN."
        ) from None
    except HfHubHTTPError as err:
        raise DownloadError(f"{repo_id}: the hub answered with an error: {str(err).splitlines()[0]}") from None
    except (OSError, ValueError) as err:
        if isinstance(err, DownloadError):
            raise
        if "disk" in str(err).lower() or getattr(err, "errno", None) == 28:
            raise DownloadError(f"ran out of disk space while downloading {repo_id}: {err}") from None
        raise DownloadError(
            f"could not reach the Hugging Face hub for {repo_id} ({type(err).__name__}); check the network. "
            "Offline, use the embedded model (no --model) or a local directory."
        ) from None
    return Path(path)


def _bytes_present(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def resolve_model(model: str | os.PathLike | None) -> tuple[Path, str]:
    """A model argument → (local folder, description). ``None``: the demo repo on a GPU, else embedded."""
    import torch

    from .tiny import tiny_forced, tiny_model_path

    if model is None:
        if tiny_forced() or not torch.cuda.is_available():
            return tiny_model_path(), "the embedded tiny model (no GPU, or COLAB_HELPERS_TINY=1)"
        return download(), DEMO_REPO
    if Path(model).is_dir():
        return Path(model), str(model)
    if "/" in str(model) and not os.path.exists(model):
        return download(str(model)), str(model)
    raise FileNotFoundError(f"{model}: no such directory (give a checkpoint folder or a hub repo id)")
