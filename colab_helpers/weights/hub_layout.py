"""Where a downloaded commit lives on disk, and whether a complete copy is already there.

Two layouts, both keyed by the commit the pinned revision resolved to:

- the hub cache (default; what huggingface_hub itself uses): ``models--owner--name/blobs/<etag>``,
  ``snapshots/<commit>/<file>`` links to the blobs and ``refs/<revision>`` holding the commit, so
  ``try_to_load_from_cache``, ``hf cache`` and a later offline run all find the files; the file locks
  are huggingface_hub's own (``.locks/models--owner--name/<etag>.lock``) and the stamps of verified
  blobs are under ``models--owner--name/.colab_helpers/verified/``;
- a plain folder (``local_dir``): the files themselves, partial ones, locks and each file's stamp (its
  commit and hash, written as it lands) under ``.cache/colab_helpers/``, and
  ``.cache/colab_helpers/download.json`` recording which repo, revision and commit are complete.

A file counts as complete only when its bytes are the listing's (``content_hash.verified``): a
fresh stamp of the same hash, else a rehash; a file of another commit never counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .content_hash import algorithm, stamped, verified

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
OURS = Path(".cache") / "colab_helpers"  # in a folder: partial files, locks, stamps, the record
RECORD = OURS / "download.json"
ORPHAN_AGE_S = 60.0  # a partial file untouched this long belongs to no running download


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None  # None when the hub does not say
    etag: str | None = None  # the LFS sha256 or the git blob id: names the blob in the hub cache


@dataclass(frozen=True)
class RemoteListing:
    """The files we need at one commit, with the sizes the hub reports for them."""

    repo_id: str
    revision: str  # what was asked for (branch, tag or commit)
    commit: str  # the commit hash it resolved to
    files: tuple[RemoteFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)


def is_commit(revision: str) -> bool:
    return bool(_COMMIT.match(revision))


def _blob_name(listing: RemoteListing, f: RemoteFile) -> str:
    if f.etag:
        return f.etag
    no_id = hashlib.sha1(f"{listing.commit}/{f.name}".encode()).hexdigest()  # the hub gave no id: one per commit
    return f"noid-{no_id}"  # not taken for a hash to check


@dataclass(frozen=True)
class Layout:
    """The paths of one repo's files: in the hub cache (``cache=True``) or in a plain folder."""

    root: Path  # the repo's folder in the hub cache, or local_dir
    cache: bool

    @classmethod
    def for_repo(cls, repo_id: str, local_dir: Path | None, hub_cache: Path) -> Layout:
        if local_dir is not None:
            return cls(local_dir, cache=False)
        return cls(hub_cache / ("models--" + repo_id.replace("/", "--")), cache=True)

    def folder(self, commit: str) -> Path:
        """The folder the model loads from."""
        return self.root / "snapshots" / commit if self.cache else self.root

    def final(self, listing: RemoteListing, f: RemoteFile) -> Path:
        """Where the finished bytes go (a blob in the cache, the file itself in a folder)."""
        return self.root / "blobs" / _blob_name(listing, f) if self.cache else self.root / f.name

    def partial(self, listing: RemoteListing, f: RemoteFile) -> Path:
        """Where bytes accumulate until the file is complete; named by content so a new commit never appends."""
        if self.cache:
            return self.root / "blobs" / f"{_blob_name(listing, f)}.incomplete"  # huggingface_hub 0.x's own name
        return self.root / OURS / f"{f.name}.{_blob_name(listing, f)[:16]}.incomplete"

    def stamp(self, listing: RemoteListing, f: RemoteFile) -> Path:
        """Where the proof that ``final`` was verified goes (per blob in the cache, per file in a folder)."""
        if self.cache:
            return self.root / ".colab_helpers" / "verified" / _blob_name(listing, f)
        return self.root / OURS / "verified" / f.name

    def lock(self, listing: RemoteListing, f: RemoteFile) -> Path:
        """The file lock of one file: huggingface_hub's own in the cache; per file name in a folder."""
        if self.cache:
            return self.root.parent / ".locks" / self.root.name / f"{_blob_name(listing, f)}.lock"
        return self.root / OURS / "locks" / f"{f.name}.lock"

    def _lock_of_partial(self, partial: Path) -> Path | None:
        if self.cache:
            return self.root.parent / ".locks" / self.root.name / f"{partial.name.split('.')[0]}.lock"
        try:
            rel = partial.relative_to(self.root / OURS)
        except ValueError:
            return None  # an older version's leftovers: nobody locks them
        name = rel.name.rsplit(".", 2)[0]  # <name>.<blob16>.incomplete
        return self.root / OURS / "locks" / rel.parent / f"{name}.lock"

    @contextmanager
    def record_lock(self):
        """Held while the record (folder) or a ref (cache) is read and rewritten."""
        from filelock import FileLock

        if self.cache:
            path = self.root.parent / ".locks" / self.root.name / "refs.lock"
        else:
            path = self.root / OURS / "download.json.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path)):
            yield

    def complete(self, listing: RemoteListing, f: RemoteFile) -> bool:
        """The file holds this listing's bytes: a fresh stamp of the same hash, else rehashed (and stamped).

        In a folder a file of another commit (other bytes, same name and maybe size) never counts; in the
        cache the blob is named by its hash, so only damage can make it fail.
        """
        if f.size is None:
            return False
        return verified(self.final(listing, f), f.etag, f.size, self.stamp(listing, f), listing.commit, f.name)

    def unchecked(self, listing: RemoteListing) -> list[RemoteFile]:
        """Files on disk that ``complete`` must hash first (no fresh stamp: an earlier version, or changed)."""
        return [
            f
            for f in listing.files
            if self.final(listing, f).is_file() and not stamped(self.final(listing, f), f.etag, self.stamp(listing, f))
        ]

    def link(self, listing: RemoteListing, f: RemoteFile) -> None:
        """Cache only: ``snapshots/<commit>/<name>`` points at the blob (a copy where links are not allowed)."""
        if not self.cache:
            return
        pointer, blob = self.folder(listing.commit) / f.name, self.final(listing, f)
        if pointer.is_file() and pointer.stat().st_size == f.size:
            return
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.unlink(missing_ok=True)
        try:
            pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        except OSError:
            shutil.copyfile(blob, pointer)

    def remember(self, listing: RemoteListing) -> None:
        """Record which commit ``listing.revision`` means (cache: ``refs/<revision>``; folder: after completion)."""
        if self.cache and listing.revision != listing.commit:
            ref = self.root / "refs" / listing.revision
            ref.parent.mkdir(parents=True, exist_ok=True)
            if not ref.is_file() or ref.read_text().strip() != listing.commit:
                with self.record_lock():
                    tmp = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
                    tmp.write_text(listing.commit)
                    os.replace(tmp, ref)

    def write_record(self, listing: RemoteListing) -> None:
        """Folder only, after every file is complete: repo, revisions, commit and each file's size and id."""
        if self.cache:
            return
        with self.record_lock():
            self._write_record(listing)

    def _write_record(self, listing: RemoteListing) -> None:
        old = self.read_record() or {}
        revisions = old.get("revisions", {}) if old.get("commit") == listing.commit else {}
        record = {
            "repo_id": listing.repo_id,
            "commit": listing.commit,
            "revisions": {**revisions, listing.revision: listing.commit},
            "files": {f.name: {"size": f.size, "etag": f.etag} for f in listing.files},
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        path = self.root / RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)

    def read_record(self) -> dict | None:
        try:
            record = json.loads((self.root / RECORD).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def commit_for(self, repo_id: str, revision: str) -> str | None:
        """The commit a complete earlier download of ``revision`` had, from what this layout remembers."""
        if self.cache:
            if is_commit(revision):
                return revision
            try:
                return (self.root / "refs" / revision).read_text().strip() or None
            except OSError:
                return None
        record = self.read_record()
        if record is None or record.get("repo_id") != repo_id:
            return None
        if revision == record.get("commit") or revision in record.get("revisions", {}):
            return record.get("commit")
        return None

    def recorded_files_complete(self) -> bool:
        """Folder only: every file the record lists is there with its recorded bytes (stamp or rehash)."""
        record = self.read_record() or {}
        files = record.get("files", {})
        commit = record.get("commit", "")
        return bool(files) and all(
            verified(
                self.root / name, meta.get("etag"), meta.get("size"), self.root / OURS / "verified" / name, commit, name
            )
            for name, meta in files.items()
        )

    def snapshot_verified(self, commit: str) -> bool:
        """Cache only: every blob ``snapshots/<commit>`` links to holds the bytes its name (a hash) says."""
        folder = self.folder(commit)
        for pointer in (p for p in folder.rglob("*") if not p.is_dir()):
            blob = pointer.resolve()
            etag = blob.name
            if algorithm(etag) is None:
                continue  # named per commit: the hub gave no id to check
            stamp = self.root / ".colab_helpers" / "verified" / etag
            size = blob.stat().st_size if blob.is_file() else None
            if not verified(blob, etag, size, stamp, commit, pointer.name):
                return False
        return True

    def clean_orphans(self, keep: set[Path]) -> list[Path]:
        """Delete partial files no job of this download will resume (other commits, killed runs).

        Files touched in the last minute are left alone: another process may be writing them.
        huggingface_hub's own ``<etag>.<random>.incomplete`` leftovers are renamed to our name when we
        need that blob, so their bytes are not lost; in a folder, its ``.cache/huggingface/download``
        leftovers (earlier versions of this package used ``snapshot_download``) are deleted.
        """
        if self.cache:
            folders = [self.root / "blobs"]
        else:
            folders = [self.root / OURS, self.root / ".cache" / "huggingface" / "download"]
        removed = []
        now = time.time()
        for path in (p for folder in folders if folder.is_dir() for p in folder.rglob("*.incomplete")):
            if path in keep:
                continue
            adopt = next((k for k in keep if path.name.startswith(k.name[: -len(".incomplete")] + ".")), None)
            try:
                with _unless_locked(self._lock_of_partial(path)) as free:
                    if not free:
                        continue  # another process is fetching it
                    if adopt is not None and not adopt.exists():
                        os.replace(path, adopt)
                    elif now - path.stat().st_mtime > ORPHAN_AGE_S:
                        path.unlink()
                        removed.append(path)
            except OSError:
                pass
        return removed


@contextmanager
def _unless_locked(lock: Path | None):
    """Yield True holding ``lock`` when nobody else holds it, else False (no lock file: True)."""
    if lock is None or not lock.exists():
        yield True
        return
    from filelock import FileLock, Timeout

    held = FileLock(str(lock))
    try:
        held.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        held.release()
