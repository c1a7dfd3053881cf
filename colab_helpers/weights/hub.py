"""Getting the pre-quantized shards: only the needed files, one pinned revision, resumable, sizes checked.

``download()`` asks the hub once which files the pinned revision has (at one commit), checks the disk,
then fetches what is missing with ``transfer.fetch_all``: a timeout on every request, bounded retries
with backoff for transient faults, true resume from the bytes on disk (HTTP Range), every file's hash
checked against the hub's id while it streams, a lock per file against a second process, one progress
bar. A file counts as present only with this commit's bytes (a stamp from an earlier check, or a rehash).
huggingface_hub supplies the listing, URLs, session and token (``HF_TOKEN`` or Colab's secret of that
name); it cannot resume a file across calls in 1.x or 2.x, hence the transfer module. When the hub is
unreachable or answers 5xx, a complete earlier download of the same revision is used as it is. After
a download the tokenizer and its chat template must load. Every failure is one ``DownloadError`` whose
message says what to do and never contains the token.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .hub_layout import Layout, RemoteFile, RemoteListing
from .transfer import (
    Corrupt,
    FileJob,
    GaveUp,
    NetConfig,
    describe,
    fetch_all,
    http_status,
    is_transient,
    retrying,
)

__all__ = [
    "DEMO_REPO",
    "DEMO_REVISION",
    "NEEDED_FILES",
    "DownloadError",
    "NetConfig",
    "RemoteFile",
    "RemoteListing",
    "download",
    "list_remote",
    "resolve_model",
]

DEMO_REPO = "lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo"
# The one pin: every download resolves this to a commit first and fetches that commit only. Set it to
# the commit hash (HfApi().model_info(DEMO_REPO).sha) when publishing; "main" follows the branch.
DEMO_REVISION = "main"
# shards, index, configs, and everything the tokenizer and its chat template may live in
NEEDED_FILES = (
    "*.safetensors",
    "*.json",
    "*.jinja",
    "tokenizer*",
    "special_tokens_map.json",
    "*.model",
    "vocab.*",
    "merges.txt",
)
TEMPLATE_FILE = "chat_template.jinja"
TOKEN_HELP = (
    "If the repo is gated or private, accept its terms on huggingface.co with your account and give a token: "
    "set the HF_TOKEN environment variable, or in Colab add a secret named HF_TOKEN (key icon on the left, "
    "enable notebook access); huggingface_hub reads both by itself."
)
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")


class DownloadError(RuntimeError):
    """The shards could not be fetched; the message says why and what to do.

    ``exit_code`` is what the CLI returns: 2 for a request that can never work as given (no such repo
    or revision, no access), 1 for the network, the hub or the disk.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def is_needed(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(base, p) for p in NEEDED_FILES)


def _endpoint() -> str:
    """``HF_ENDPOINT`` read now (tests and mirrors set it after import), else the library's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE).expanduser()


def _offline_mode() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return value.upper() in ("1", "ON", "YES", "TRUE") if value is not None else bool(constants.HF_HUB_OFFLINE)


def list_remote(repo_id: str, revision: str, token: str | None = None, net: NetConfig | None = None) -> RemoteListing:
    """Ask the hub once which needed files exist at ``revision``, at which commit, and how big each is."""
    import huggingface_hub as hf

    net = net or NetConfig()
    info = hf.HfApi(endpoint=_endpoint()).model_info(
        repo_id, revision=revision, files_metadata=True, token=token, timeout=net.timeout_s
    )
    files = tuple(
        RemoteFile(
            s.rfilename,
            None if s.size is None else int(s.size),
            (getattr(s.lfs, "sha256", None) if s.lfs is not None else None) or s.blob_id,
        )
        for s in info.siblings or []
        if is_needed(s.rfilename)
    )
    if not any(f.name.endswith(".safetensors") for f in files):
        raise DownloadError(f"{repo_id}@{revision}: the hub lists no .safetensors files; is this the right repo?", 2)
    return RemoteListing(repo_id, revision, info.sha or revision, files)


def check_disk_space(listing: RemoteListing, target: Path, on_disk: int) -> int:
    """Bytes still to fetch; raise before the first byte when the disk cannot hold them."""
    missing = max(listing.total_bytes - on_disk, 0)
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


def download(
    repo_id: str | None = None,
    revision: str | None = None,
    local_dir: str | os.PathLike | None = None,
    token: str | None = None,
    net: NetConfig | None = None,
    say: Callable[[str], None] | None = None,
) -> Path:
    """Fetch the checkpoint files (complete files are skipped, partial ones resume) and return the folder.

    ``repo_id`` defaults to ``DEMO_REPO``; ``revision`` to ``DEMO_REVISION`` for the demo repo and "main"
    for any other. Files go to the hub cache, or to ``local_dir``. The token comes from ``token``,
    ``HF_TOKEN`` or a Colab secret named ``HF_TOKEN``; it is never printed. When the hub is unreachable
    or answers 5xx, a complete earlier download of the same revision is used, with a message. Ctrl-C
    stops within a moment and keeps partial files for the next run.
    """
    repo_id = repo_id or DEMO_REPO
    revision = revision or (DEMO_REVISION if repo_id == DEMO_REPO else "main")
    net = net or NetConfig()
    shown = say or _stderr
    say = lambda message: shown(_scrub(message, token))  # noqa: E731 - retry lines quote the hub's answers
    folder = Path(local_dir).expanduser() if local_dir is not None else None
    layout = Layout.for_repo(repo_id, folder, _hub_cache())
    target = folder if folder is not None else layout.root
    with _explained(repo_id, revision, target, token):
        if _offline_mode():
            return _offline(repo_id, revision, layout, say, "HF_HUB_OFFLINE is set")
        local: list[Path | None] = []

        def local_copy_ready(err: BaseException) -> bool:
            if not local:
                local.append(_complete_local_copy(repo_id, revision, layout))
            return local[0] is not None

        say(f"hub: asking for the file list of {repo_id}@{revision} ({net.timeout_s:g} s timeout) ...")
        started = time.monotonic()
        try:
            listing = retrying(
                f"hub: file list of {repo_id}", lambda: list_remote(repo_id, revision, token, net), net, say,
                give_up=local_copy_ready,
            )  # fmt: skip
        except Exception as err:
            if not _falls_back(err):
                raise
            if local_copy_ready(err):
                unkeyed = not layout.cache and layout.read_record() is None
                say(
                    f"hub: the hub is unreachable or failing ({describe(err)}); using the complete local copy of "
                    f"{repo_id}@{revision} in {local[0]}"
                    + (" (no download record there: its revision could not be checked)" if unkeyed else "")
                )
                return local[0]
            raise DownloadError(_unreachable(repo_id, err, net, time.monotonic() - started)) from None
        path = _fetch(listing, layout, token, net, say)
        check_chat_template(path, f"{repo_id}@{listing.commit[:12]}")
    return path


def _falls_back(err: BaseException) -> bool:
    """A fault after which a complete local copy is the better answer: no route, a timeout, a 5xx."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    return isinstance(err, OfflineModeIsEnabled) or is_transient(err)


def _offline(repo_id: str, revision: str, layout: Layout, say, why: str) -> Path:
    path = _complete_local_copy(repo_id, revision, layout)
    if path is None:
        raise DownloadError(  # exit 2: the setting is the user's to change
            f"{repo_id}: could not reach the Hugging Face hub: {why} and there is no complete local copy of "
            f"{repo_id}@{revision} in {layout.root}. Unset HF_HUB_OFFLINE and run again with a network, "
            "or use a local checkpoint folder.",
            2,
        )
    say(f"hub: {why}; using the complete local copy in {path}")
    return path


def _fetch(listing: RemoteListing, layout: Layout, token: str | None, net: NetConfig, say) -> Path:
    """Fetch what is missing of ``listing`` into ``layout``; return the folder the model loads from."""
    import huggingface_hub as hf
    from huggingface_hub.utils import build_hf_headers

    layout.remember(listing)
    if unchecked := layout.unchecked(listing):
        say(
            f"hub: checking {len(unchecked)} files already on disk against the hub's hashes "
            f"({sum(f.size or 0 for f in unchecked) / 1e9:.2f} GB; once, later runs trust their stamps) ..."
        )
    todo = [f for f in listing.files if not layout.complete(listing, f)]
    unique = {layout.partial(listing, f): f for f in todo}  # files with the same content share one blob
    jobs = [
        FileJob(
            f.name,
            hf.hf_hub_url(listing.repo_id, f.name, revision=listing.commit, endpoint=_endpoint()),
            f.size,
            partial,
            layout.final(listing, f),
            etag=f.etag,
            stamp=layout.stamp(listing, f),
            lock=layout.lock(listing, f),
            commit=listing.commit,
        )
        for partial, f in unique.items()
    ]
    for orphan in layout.clean_orphans({j.partial for j in jobs}):
        say(f"hub: removed an abandoned partial file {orphan.name}")
    done_bytes = sum(f.size or 0 for f in listing.files if f not in todo)
    on_disk = done_bytes + sum(j.on_disk() for j in jobs)
    check_disk_space(listing, layout.root, on_disk)
    total = on_disk + sum(max((j.size or 0) - j.on_disk(), 0) for j in jobs)
    if jobs:
        resumed = sum(1 for j in jobs if j.on_disk())
        resuming = f" ({resumed} resume from partial files)" if resumed else ""
        say(
            f"hub: {repo_desc(listing)}: {len(jobs)} of {len(listing.files)} files to fetch, "
            f"{(total - on_disk) / 1e9:.2f} GB{resuming}"
        )
        _fetch_with_bar(jobs, listing, on_disk, total, build_hf_headers(token=token), net, say)
    for f in listing.files:
        layout.link(listing, f)
    path = layout.folder(listing.commit)
    bad = [f for f in listing.files if f.size is not None and not layout.complete(listing, f)]
    if bad:
        detail = "; ".join(f"{f.name}: expected {f.size:,} B" for f in bad)
        raise DownloadError(f"{listing.repo_id}: files differ from the hub's listing after the download: {detail}")
    layout.write_record(listing)
    return path


def repo_desc(listing: RemoteListing) -> str:
    return f"{listing.repo_id}@{listing.commit[:12]}"


def _fetch_with_bar(
    jobs: list[FileJob], listing: RemoteListing, on_disk: int, total: int, headers: dict, net: NetConfig, say
) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total,
        initial=on_disk,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"{listing.repo_id.split('/')[-1]} ({len(jobs)} files)",
        mininterval=0.5,
        file=sys.stderr,
    )
    try:
        fetch_all(jobs, headers, net, progress=bar.update, say=lambda m: bar.write(m, file=sys.stderr))
    except KeyboardInterrupt:
        bar.close()
        say("hub: interrupted; finished files and partial ones are kept, the next run resumes from them")
        raise
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------------
# a complete earlier download, and the chat template
# --------------------------------------------------------------------------------------------------


def _complete_local_copy(repo_id: str, revision: str, layout: Layout) -> Path | None:
    """A finished earlier download of ``revision`` (its commit remembered, shards and tokenizer check out)."""
    from .checkpoint import Checkpoint, CheckpointError

    commit = layout.commit_for(repo_id, revision)
    if commit is None:
        if layout.cache or layout.read_record() is not None:
            return None
        candidate = layout.root  # a folder without our record (older version, copied by hand): check it fully
    else:
        candidate = layout.folder(commit)
        if not candidate.is_dir():
            return None
        complete = layout.snapshot_verified(commit) if layout.cache else layout.recorded_files_complete()
        if not complete:
            return None
    if not candidate.is_dir():
        return None
    try:
        Checkpoint.open(candidate, verify=True)
        check_chat_template(candidate, repo_id)
    except (CheckpointError, OSError, DownloadError):
        return None
    return candidate


def check_chat_template(path: Path, what: str) -> None:
    """The tokenizer loads from ``path`` and has a chat template; else a ``DownloadError`` naming the file."""
    from .tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(path, local_files_only=True)
    except Exception as err:
        found = sorted(p.name for p in path.iterdir() if p.name.startswith(("tokenizer", "special_tokens")))
        raise DownloadError(
            f"{what}: the tokenizer in {path} does not load ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            f"tokenizer files there: {', '.join(found) or 'none'}"
        ) from None
    if not getattr(tok, "chat_template", None):
        raise DownloadError(
            f"{what}: no chat template: {path} has no {TEMPLATE_FILE} and tokenizer_config.json has no "
            "'chat_template' entry. Add one to the repo (generate --raw works without it)."
        )


# --------------------------------------------------------------------------------------------------
# errors: one clear message each, never the token
# --------------------------------------------------------------------------------------------------


def _unreachable(repo_id: str, err: BaseException, net: NetConfig, elapsed: float) -> str:
    status = http_status(err)
    what = (
        f"the hub answered {describe(err)}"
        if status is not None
        else f"could not reach the Hugging Face hub ({describe(err)})"
    )
    return (
        f"{repo_id}: {what}, {net.attempts} tries in {elapsed:.0f} s, and there is no complete local copy. "
        "Check the network connection and run again (finished files are kept, partial ones resume), "
        "or use a local checkpoint folder, or the embedded tiny model (no --model)."
    )


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
        raise DownloadError(_scrub(str(err), token), err.exit_code) from None
    except Exception as err:
        explained = _message(err, repo_id, revision, target)
        if explained is None:
            raise
        message, code = explained
        raise DownloadError(_scrub(message, token), code) from None


def _message(err: Exception, repo_id: str, revision: str, target: Path) -> tuple[str, int] | None:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, Corrupt):
        return (
            f"{repo_id}: {err} (fetched twice from byte 0; nothing of it was kept). Run again later; if it "
            "happens again the file on the hub, or something between it and this machine, is damaged.",
            1,
        )
    if isinstance(err, OSError) and err.errno in _DISK_ERRORS:
        return _disk_message(err, repo_id, target), 2
    if isinstance(err, GaveUp):
        return (
            f"{repo_id}: {err.job.name} failed {err.tries} times ({describe(err.cause)}). Finished files are kept "
            f"and the {err.job.on_disk():,} bytes of this one resume on the next run; check the network and run again.",
            1,
        )
    if isinstance(err, GatedRepoError):
        return f"{repo_id} is gated and this session has no access (401/403). {TOKEN_HELP}", 2
    if isinstance(err, RepositoryNotFoundError):
        return f"{repo_id}: not found, or private (401). Check the spelling. {TOKEN_HELP}", 2
    if isinstance(err, RevisionNotFoundError):
        return f"{repo_id}: revision {revision!r} does not exist (see DEMO_REVISION in colab_helpers/weights/hub.py)", 2
    if isinstance(err, RemoteEntryNotFoundError):
        return f"{repo_id}@{revision}: a listed file is missing on the hub ({str(err).splitlines()[-1][:200]})", 1
    if isinstance(err, OSError) and "Consistency check failed" in str(err):
        return (
            f"{repo_id}: a file arrived with the wrong size ({str(err).splitlines()[0][:200]}). Run again: "
            "finished files are kept.",
            1,
        )
    if isinstance(err, OfflineModeIsEnabled):
        return f"{repo_id}: HF_HUB_OFFLINE is set and there is no complete local copy in {target}", 1
    if isinstance(err, HfHubHTTPError):
        status = http_status(err)
        if status in (401, 403):
            return f"{repo_id}: the hub refused access ({status}). {TOKEN_HELP}", 2
        first = str(err).splitlines()[0] if str(err) else describe(err)
        if status is not None and 400 <= status < 500:
            return f"{repo_id}: the hub rejected the request: {first}", 2
        return f"{repo_id}: the hub answered with an error: {first}", 1
    if is_transient(err):
        return (
            f"{repo_id}: could not reach the Hugging Face hub ({describe(err)}). Check the network connection and "
            "run again (finished files are kept, partial ones resume).",
            1,
        )
    return None


_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)
_ELSEWHERE = "download to another folder: set HF_HUB_CACHE=<folder> (or pass download(local_dir=...))"


def _disk_message(err: OSError, repo_id: str, target: Path) -> str:
    """One line for a disk that refuses the download: the path, why, and what to do (the partial is kept)."""
    path = err.filename or target
    kept = "Finished files are kept and the partial one resumes."
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(_existing_parent(Path(path))).free
        return (
            f"ran out of disk space while downloading {repo_id} into {target} ({path}; {free / 1e9:.1f} GB free "
            f"now). Free some space and run again, or {_ELSEWHERE}. {kept}"
        )
    if err.errno == errno.EFBIG:
        return (
            f"{path}: the file system refuses a file this big (EFBIG: FAT/exFAT stop at 4 GB, or a ulimit -f is "
            f"set) while downloading {repo_id}. Lift the limit, or {_ELSEWHERE} on a disk formatted "
            f"ext4/NTFS/APFS. {kept}"
        )
    if err.errno == errno.EROFS:
        return f"{path}: the file system is read-only, so {repo_id} cannot be downloaded there; {_ELSEWHERE}."
    return (
        f"{path}: permission denied while downloading {repo_id} ({errno.errorcode.get(err.errno, err.errno)}). "
        f"Make the folder writable for this user, or {_ELSEWHERE}."
    )


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
