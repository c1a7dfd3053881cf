"""Where a downloaded commit lives on disk, and whether a complete copy is already there.

Two layouts, both keyed by the commit the pinned revision resolved to:

- the hub cache (default; what huggingface_hub itself uses): ``models--owner--name/blobs/<etag>``,
  ``snapshots/<commit>/<file>`` links to the blobs and ``refs/<revision>`` holding the commit, so
  ``try_to_load_from_cache``, ``hf cache`` and a later offline run all find the files;
- a plain folder (``local_dir``): the files themselves, partial ones under ``.cache/colab_helpers/``,
  and ``.cache/colab_helpers/download.json`` recording which repo, revision and commit are complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
RECORD = Path(".cache") / "colab_helpers" / "download.json"
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
    return hashlib.sha1(f"{listing.commit}/{f.name}".encode()).hexdigest()  # the hub gave no id: one per commit


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
        return self.root / ".cache" / "colab_helpers" / f"{f.name}.{_blob_name(listing, f)[:16]}.incomplete"

    def complete(self, listing: RemoteListing, f: RemoteFile) -> bool:
        """The file is there with the listed size (at this commit, in the cache; per the record, in a folder)."""
        if f.size is None:
            return False
        if self.cache:
            candidates = [self.folder(listing.commit) / f.name, self.final(listing, f)]
        else:
            record = self.read_record()
            recorded = (record or {}).get("files", {}).get(f.name)
            if record is not None and recorded is not None and recorded.get("etag") not in (None, f.etag):
                return False  # same name and size, other content (another commit)
            candidates = [self.final(listing, f)]
        return any(p.is_file() and p.stat().st_size == f.size for p in candidates)

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
                tmp = ref.with_name(ref.name + ".tmp")
                tmp.write_text(listing.commit)
                os.replace(tmp, ref)

    def write_record(self, listing: RemoteListing) -> None:
        """Folder only, after every file is complete: repo, revisions, commit and each file's size and id."""
        if self.cache:
            return
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
        tmp = path.with_name(path.name + ".tmp")
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
        """Folder only: every file the record lists is there with its recorded size."""
        record = self.read_record() or {}
        files = record.get("files", {})
        return bool(files) and all(
            (self.root / name).is_file() and (self.root / name).stat().st_size == meta.get("size")
            for name, meta in files.items()
        )

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
            folders = [self.root / ".cache" / "colab_helpers", self.root / ".cache" / "huggingface" / "download"]
        removed = []
        now = time.time()
        for path in (p for folder in folders if folder.is_dir() for p in folder.rglob("*.incomplete")):
            if path in keep:
                continue
            adopt = next((k for k in keep if path.name.startswith(k.name[: -len(".incomplete")] + ".")), None)
            try:
                if adopt is not None and not adopt.exists():
                    os.replace(path, adopt)
                elif now - path.stat().st_mtime > ORPHAN_AGE_S:
                    path.unlink()
                    removed.append(path)
            except OSError:
                pass
        return removed
