"""Is a downloaded file the hub's file? Its hash, computed while it streams, and a cheap stamp afterwards.

The hub names every file by a hash of its bytes: the sha256 for LFS files (the shards), the git blob
sha1 (``sha1(b"blob <size>\\0" + bytes)``) for small ones. ``ContentHash`` computes the one the listing
gives as bytes are written, so checking costs no extra pass over 17 GB; a resumed file first hashes the
bytes already on disk. A file that matched gets a ``Stamp`` (size, mtime, the hash it matched): later runs
trust a file whose size and mtime still match its stamp, and rehash one whose size or mtime changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

BLOCK = 1 << 20  # bytes per read when hashing a file on disk
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")


def algorithm(etag: str | None) -> str | None:
    """ "sha256" (an LFS file's id), "git-sha1" (a git blob id), or None (nothing to check against)."""
    if etag and _SHA256.match(etag):
        return "sha256"
    if etag and _SHA1.match(etag):
        return "git-sha1"
    return None


class ContentHash:
    """The running hash of a file's bytes, of the kind ``etag`` is; ``matches()`` once all bytes are in."""

    def __init__(self, etag: str | None, size: int | None) -> None:
        self.etag, self.size = etag, size
        kind = algorithm(etag)
        self.kind = None if kind == "git-sha1" and size is None else kind  # a blob id hashes the size first
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self._hash = None
        if self.kind == "sha256":
            self._hash = hashlib.sha256()
        elif self.kind == "git-sha1":
            self._hash = hashlib.sha1(b"blob %d\0" % self.size, usedforsecurity=False)

    def update(self, data) -> None:
        if self._hash is not None:
            self._hash.update(data)
        self.count += len(data)

    def catch_up(self, path: Path, block: int = BLOCK) -> None:
        """Make the hash cover exactly the bytes in ``path`` (rehashed when the count differs)."""
        try:
            on_disk = path.stat().st_size
        except FileNotFoundError:
            on_disk = 0
        if on_disk == self.count:
            return
        self.reset()
        if on_disk:
            with open(path, "rb") as f:
                while data := f.read(block):
                    self.update(data)

    def matches(self) -> bool:
        """True when the bytes hashed are the hub's (or when the listing gave nothing to check against)."""
        return self._hash is None or self._hash.hexdigest() == self.etag

    @property
    def what(self) -> str:
        return f"{self.kind} {self.etag}" if self.kind else "size"


def file_matches(path: Path, etag: str | None, size: int | None, block: int = BLOCK) -> bool:
    """Hash the whole file (one pass) and compare with ``etag``; a wrong size is a mismatch too."""
    try:
        if size is not None and path.stat().st_size != size:
            return False
    except FileNotFoundError:
        return False
    digest = ContentHash(etag, size)
    digest.catch_up(path, block)
    return digest.matches()


def header_ok(path: Path, name: str = "") -> bool:
    """A .safetensors file's header parses (8-byte length, then a JSON object that fits the file).

    ``name`` is the file's name in the repo (a hub-cache blob is named by its hash)."""
    if not (name or path.name).endswith(".safetensors"):
        return True
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= path.stat().st_size - 8:
                return False
            return isinstance(json.loads(f.read(n)), dict)
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class Stamp:
    """What a verified file looked like: while its size and mtime are these, its bytes are ``etag``'s."""

    size: int
    mtime_ns: int
    etag: str
    commit: str = ""  # the commit it landed from (a folder's files may be updated file by file)

    @classmethod
    def of(cls, path: Path, etag: str, commit: str = "") -> Stamp:
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns, etag, commit)

    def fresh(self, path: Path) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns

    def write(self, where: Path) -> None:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = where.with_name(f"{where.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, where)

    @classmethod
    def read(cls, where: Path) -> Stamp | None:
        try:
            return cls(**json.loads(where.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def stamped(path: Path, etag: str | None, stamp: Path) -> bool:
    """A fresh stamp of ``etag`` (or nothing to check): ``verified`` will not need to read the file."""
    known = Stamp.read(stamp) if algorithm(etag) is not None else None
    return algorithm(etag) is None or (known is not None and known.etag == etag and known.fresh(path))


def verified(path: Path, etag: str | None, size: int | None, stamp: Path, commit: str = "", name: str = "") -> bool:
    """``path`` holds the hub's bytes for ``etag``: trusted from a fresh stamp, else rehashed (and stamped).

    A stamp of other content with the file unchanged since is a quick no; a safetensors header that
    does not parse sends even a stamped file back to the hash. Without an id to check, the size decides.
    """
    try:
        if not path.is_file() or (size is not None and path.stat().st_size != size):
            return False
    except OSError:
        return False
    if algorithm(etag) is None:
        return size is not None
    known = Stamp.read(stamp)
    if known is not None and known.fresh(path):
        if known.etag != etag:
            return False
        if header_ok(path, name):
            return True
    if not file_matches(path, etag, size):
        return False
    Stamp.of(path, etag, commit).write(stamp)
    return True
