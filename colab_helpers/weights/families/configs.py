"""Find a model's config.json: a local folder or file, a shipped flagship config, or the hub (config.json only).

Shipped configs (``colab_helpers/data/configs``, typed from the public model cards) answer first for the
repo ids they name, so planning a flagship model needs no network; any other repo id is fetched with
``huggingface_hub.hf_hub_download`` of config.json alone (no weights).
"""

from __future__ import annotations

import json
from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "data" / "configs"


class ConfigNotFoundError(ValueError):
    """No config.json for what was asked; the message says what was tried and what is shipped."""


def shipped() -> dict[str, Path]:
    """``{repo_id: path}`` of the shipped configs (file ``Org--Name.json`` is repo ``Org/Name``)."""
    return {p.stem.replace("--", "/", 1): p for p in sorted(SHIPPED_DIR.glob("*.json"))}


def _shipped_match(ref: str) -> Path | None:
    want = ref.strip().lower()
    for repo, path in shipped().items():
        if want in (repo.lower(), repo.split("/", 1)[1].lower()):
            return path
    return None


def read_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigNotFoundError(f"{path}: not a readable JSON config ({err})") from err
    if not isinstance(data, dict):
        raise ConfigNotFoundError(f"{path}: expected a JSON object")
    return data


def load_config(ref: str) -> tuple[dict, str]:
    """``(config dict, where it came from)`` for a folder, a .json file, a shipped repo id or a hub repo id."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigNotFoundError("config.json: file is missing in that folder (a model folder has one)")
        return read_config(path / "config.json"), str(path / "config.json")
    if path.is_file():
        return read_config(path), str(path)
    if (found := _shipped_match(ref)) is not None:
        return read_config(found), f"shipped config {found.name} (typed from the public model card)"
    if ref.count("/") != 1 or ref.startswith((".", "/", "~")):
        raise ConfigNotFoundError(f"no such folder or file, and not a hub repo id; shipped configs: {_names()}")
    return _from_hub(ref)


def _from_hub(repo_id: str) -> tuple[dict, str]:
    """config.json from the hub cache, else from the hub: one quick reachability probe first, so an offline
    machine gets one line at once instead of the library's retries (about 25 s of "Retrying in ..." lines)."""
    import logging

    from huggingface_hub import hf_hub_download

    from ..hub import _endpoint, _hub_cache, _offline_mode

    endpoint, cache = _endpoint(), _hub_cache()
    try:
        return read_config(Path(hf_hub_download(repo_id, "config.json", cache_dir=cache, local_files_only=True))), (
            f"hub {repo_id} config.json (cached)"
        )
    except Exception:  # not cached: ask the hub
        pass
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    try:
        if _offline_mode():
            raise ConnectionError("HF_HUB_OFFLINE is set")
        _probe(f"{endpoint}/{repo_id}/resolve/main/config.json")
        hub_log.setLevel(logging.ERROR)  # its retry lines would break the one-line error
        local = hf_hub_download(repo_id, "config.json", cache_dir=cache, endpoint=endpoint)
    except Exception as err:  # offline, unknown repo, gated, network: all one line
        why = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise ConfigNotFoundError(
            f"could not get its config.json from the hub ({why}); "
            f"shipped for offline planning: {_names()}; or give a local folder or config.json"
        ) from err
    finally:
        hub_log.setLevel(level)
    return read_config(Path(local)), f"hub {repo_id} config.json"


def _probe(url: str, timeout_s: float = 10.0) -> None:
    """One HEAD with a short timeout: any HTTP answer (even 401/404) means the hub is reachable; a network
    error is raised as ``ConnectionError`` naming the host."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(url, timeout=timeout_s, follow_redirects=False)
    except Exception as err:
        host = url.split("/")[2]
        raise ConnectionError(f"{host} is unreachable: {' '.join(str(err).split()) or type(err).__name__}") from err


def _names() -> str:
    return ", ".join(shipped())
