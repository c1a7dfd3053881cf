"""Resumable HTTP file transfers: bounded retries, a timeout on every request, one progress bar, prompt Ctrl-C.

huggingface_hub (1.x on Colab, 2.x here) deletes a failed file's partial bytes and starts it from byte 0
on the next call, so a 17 GB download over a shared link never really resumes. This module does the GET
itself with the library's session and headers: bytes go to a ``.incomplete`` file next to the
destination as they arrive, a retry or a later run asks for ``Range: bytes=<size on disk>-`` (and
checks the 206's Content-Range), and the file is moved into place only once its size matches the hub's
listing and its hash (computed while streaming, ``content_hash``) the hub's id; a mismatch fetches it
once more from byte 0. A lock per file (``filelock``) keeps a second process off a file being fetched:
it waits, then finds the file complete. Transient faults (connection reset or closed, timeouts,
408/429/5xx) are retried with exponential backoff, or after the server's Retry-After, within the same
cap; the count of tries without new bytes is bounded, and so is the total per file. Everything that is
printed goes through the main thread (Colab does not render output or widget updates made by
background threads).
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .content_hash import ContentHash, Stamp, verified

T = TypeVar("T")
_NETWORK_MODULES = {"httpx", "httpx2", "httpcore", "requests", "urllib3", "aiohttp", "h11"}


@dataclass(frozen=True)
class NetConfig:
    """How patient the download is. The defaults suit a 17 GB download over a shared Colab link."""

    timeout_s: float = 30.0  # connect timeout, and the longest silence while reading, of every request
    attempts: int = 5  # tries in a row without a new byte before a file (or the listing) gives up
    first_wait_s: float = 1.0  # backoff between tries: 1, 2, 4, 8 ... s
    max_wait_s: float = 30.0
    max_tries_per_file: int = 20  # a hard cap even when every try brings some bytes
    workers: int = 4  # files fetched at once
    chunk_bytes: int = 1 << 20  # bytes per read when hashing a partial file already on disk

    def wait_s(self, failures: int, asked_s: float | None = None) -> float:
        """The backoff after ``failures`` faults in a row, or the server's Retry-After if longer; capped."""
        backoff = self.first_wait_s * 2 ** max(failures - 1, 0)
        return min(self.max_wait_s, max(backoff, asked_s or 0.0))

    def worst_case_s(self) -> float:
        """The longest one request can take to give up when nothing answers (tries, timeouts, waits)."""
        return self.attempts * self.timeout_s + sum(self.wait_s(i) for i in range(1, self.attempts))


class Stopped(Exception):
    """A worker noticed the stop flag (Ctrl-C, or another file failed) and left its partial file as is."""


class ShortRead(ConnectionError):
    """The server closed the connection cleanly before sending the whole file."""


class WrongRange(ConnectionError):
    """A 206 answered bytes other than the ones asked for; the file starts again from byte 0."""


class Corrupt(Exception):
    """A file's bytes did not match the hub's id twice in a row (its partial file is deleted)."""

    def __init__(self, job: FileJob, what: str) -> None:
        self.job = job
        super().__init__(f"{job.name}: the bytes received twice do not match the hub's {what}")


def retry_after_s(err: BaseException) -> float | None:
    """The seconds a 429/503 answer asked us to wait (``Retry-After``: seconds or an HTTP date), if any."""
    response = getattr(err, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def http_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def is_transient(err: BaseException) -> bool:
    """A fault worth another try: a dropped, reset or silent connection, or a 408/429/5xx answer."""
    status = http_status(err)
    if status is not None:
        return status in (408, 429) or status >= 500
    if isinstance(err, (ConnectionError, TimeoutError, socket.timeout, socket.gaierror)):
        return True
    return any(cls.__module__.split(".")[0] in _NETWORK_MODULES for cls in type(err).__mro__[:-2])


def describe(err: BaseException) -> str:
    """A short, one-line reason: '500 Internal Server Error', 'ReadTimeout', 'connection reset' ..."""
    status = http_status(err)
    if status is not None:
        reason = getattr(getattr(err, "response", None), "reason_phrase", "") or ""
        return f"{status} {reason}".strip()
    text = str(err).splitlines()[0] if str(err) else ""
    if isinstance(err, ConnectionResetError) or "reset" in text.lower():
        return "connection reset"
    name = type(err).__name__
    return f"{name}: {text}" if text and len(text) < 120 else name


def retrying(
    what: str,
    call: Callable[[], T],
    net: NetConfig,
    say: Callable[[str], None],
    give_up: Callable[[BaseException], bool] = lambda err: False,
    sleep: Callable[[float], object] = time.sleep,
) -> T:
    """``call()`` with up to ``net.attempts`` tries on transient faults, one line per retry.

    ``give_up(err)`` is asked after the first transient fault: True re-raises at once (a complete local
    copy makes waiting pointless).
    """
    for attempt in range(1, net.attempts + 1):
        try:
            return call()
        except Exception as err:
            if not is_transient(err) or attempt == net.attempts or (attempt == 1 and give_up(err)):
                raise
            wait = net.wait_s(attempt, retry_after_s(err))
            say(f"{what}: {describe(err)}; try {attempt + 1} of {net.attempts} in {wait:.0f} s")
            sleep(wait)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class FileJob:
    """One file to fetch: bytes accumulate in ``partial`` and move to ``final`` once ``size`` and ``etag`` match.

    ``stamp`` is where the proof of a verified file goes (``content_hash.Stamp``), ``lock`` the file
    lock that keeps other processes off this file, ``commit`` the commit it comes from.
    """

    name: str
    url: str
    size: int | None
    partial: Path
    final: Path
    etag: str | None = None
    stamp: Path | None = None
    lock: Path | None = None
    commit: str = ""

    def is_done(self) -> bool:
        """The final file is there and verified (a fresh stamp, else rehashed)."""
        if self.stamp is None:
            return self.size is not None and self.final.is_file() and self.final.stat().st_size == self.size
        return verified(self.final, self.etag, self.size, self.stamp, self.commit, self.name)

    def on_disk(self) -> int:
        try:
            return self.partial.stat().st_size
        except FileNotFoundError:
            return 0


class GaveUp(Exception):
    """A file failed ``attempts`` times in a row (or too often in all); ``cause`` is the last fault."""

    def __init__(self, job: FileJob, tries: int, cause: BaseException) -> None:
        self.job, self.tries, self.cause = job, tries, cause
        super().__init__(f"{job.name}: {describe(cause)} ({tries} tries)")


class _Shared:
    """State the workers share with the main thread: the stop flag, byte count, messages, open responses."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.bytes = 0
        self.messages: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.responses: set = set()

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n

    def take_bytes(self) -> int:
        with self.lock:
            n, self.bytes = self.bytes, 0
            return n

    def close_responses(self) -> None:
        """Unblock workers stuck in a silent read, so Ctrl-C does not wait for a timeout."""
        with self.lock:
            open_now = list(self.responses)
        for r in open_now:
            try:
                r.close()
            except Exception:
                pass


def fetch_file(job: FileJob, headers: dict[str, str], net: NetConfig, shared: _Shared, session=None) -> None:
    """Fetch one file with resume, retries and its hash checked; raise ``GaveUp``, ``Corrupt``, ``Stopped``
    or a non-transient error (``OSError`` naming the partial file for a disk fault: its bytes are kept).

    Under the file's lock: a file another process completed meanwhile is only checked; bytes that
    do not match the hub's id are deleted and fetched once more from byte 0.
    """
    if session is None:
        from huggingface_hub.utils import get_session

        session = get_session()
    counted = [job.on_disk()]  # the bytes the progress bar already shows for this file

    def add(n: int) -> None:
        counted[0] += n
        shared.add(n)

    with _file_lock(job, shared):
        if job.final.is_file() and job.is_done():
            job.partial.unlink(missing_ok=True)  # a leftover of the same bytes
        else:
            _fetch_verified(job, headers, net, shared, session, add)
    if job.size is not None:
        add(job.size - counted[0])  # what another process fetched, or a restart's undo


def _fetch_verified(job: FileJob, headers: dict[str, str], net: NetConfig, shared: _Shared, session, add) -> None:
    if job.final.is_file():
        job.final.unlink()  # bytes that are not this listing's (another commit, or damaged): never kept
    job.partial.parent.mkdir(parents=True, exist_ok=True)
    digest = ContentHash(job.etag, job.size)
    for round_ in (1, 2):
        _fetch_bytes(job, headers, net, shared, session, add, digest)
        digest.catch_up(job.partial, net.chunk_bytes)
        if digest.matches():
            break
        have = job.on_disk()
        job.partial.unlink(missing_ok=True)
        add(-have)
        digest.reset()
        if round_ == 2:
            raise Corrupt(job, digest.what)
        shared.messages.put(f"{job.name}: the bytes do not match the hub's {digest.what}; fetching it again from 0")
    job.final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(job.partial, job.final)
    if job.stamp is not None and digest.kind is not None:
        Stamp.of(job.final, job.etag, job.commit).write(job.stamp)


def _fetch_bytes(
    job: FileJob, headers: dict[str, str], net: NetConfig, shared: _Shared, session, add, digest: ContentHash
) -> None:
    """Retry GETs until the partial file has ``job.size`` bytes (or the server's whole answer)."""
    failures = tries = 0
    while True:
        have = job.on_disk()
        if job.size is not None and have > job.size:  # a stale partial of some other content
            job.partial.unlink()
            add(-have)
            have = 0
        if job.size is not None and have == job.size:
            return
        tries += 1
        try:
            digest.catch_up(job.partial, net.chunk_bytes)  # a resumed file: hash the bytes on disk first
            _get_once(job, have, headers, net, shared, session, add, digest)
            if job.size is None or job.on_disk() == job.size:
                return
            raise ShortRead(f"the connection closed after {job.on_disk():,} of {job.size:,} bytes")
        except Stopped:
            raise
        except Exception as err:
            if shared.stop.is_set():
                raise Stopped from None
            if not is_transient(err):
                raise
            failures = 1 if job.on_disk() > have else failures + 1
            if failures >= net.attempts or tries >= net.max_tries_per_file:
                raise GaveUp(job, tries, err) from err
            wait = net.wait_s(failures, retry_after_s(err))
            shared.messages.put(
                f"{job.name}: {describe(err)}; retry in {wait:.0f} s from byte {job.on_disk():,}"
                f" (try {tries + 1}, at most {net.attempts} in a row without progress)"
            )
            if shared.stop.wait(wait):
                raise Stopped from None


_HELD: dict[str, list] = {}  # lock path -> [FileLock, the _Shared of the fetch in this process holding it]
_HELD_LOCK = threading.Lock()


def _take_over(key: str, shared: _Shared):
    """The lock of a stopped fetch in this process (Ctrl-C; its worker may sit in a read until its timeout)."""
    with _HELD_LOCK:
        entry = _HELD.get(key)
        if entry is not None and entry[1] is not shared and entry[1].stop.is_set():
            entry[1] = shared  # its worker writes nothing more (it checks the stop flag before every write)
            return entry[0]
    return None


@contextlib.contextmanager
def _file_lock(job: FileJob, shared: _Shared) -> Iterator[None]:
    """Hold ``job.lock`` (another process fetching this file: say so once and wait, Ctrl-C still works)."""
    if job.lock is None:
        yield
        return
    from filelock import FileLock, Timeout

    key = str(job.lock)
    lock = _take_over(key, shared)
    if lock is None:
        job.lock.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(key, thread_local=False)  # released by whichever thread holds it last
        waited = False
        while True:
            try:
                lock.acquire(timeout=0 if not waited else 0.25)
                with _HELD_LOCK:
                    _HELD[key] = [lock, shared]
                break
            except Timeout:
                if not waited:
                    shared.messages.put(f"hub: another download of {job.name} is running; waiting")
                    waited = True
            if shared.stop.is_set():
                raise Stopped from None
            if (taken := _take_over(key, shared)) is not None:
                lock = taken
                break
    try:
        yield
    finally:
        with _HELD_LOCK:
            mine = _HELD.get(key, [None, None])[1] is shared
            if mine:
                del _HELD[key]
        if mine:
            lock.release()


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


def _check_range(job: FileJob, have: int, r) -> None:
    """A 206 must start at ``have`` (and be of a file of ``job.size`` bytes); else start the file again."""
    m = _CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
    ok = m is not None and int(m.group(1)) == have
    if ok and job.size is not None and m.group(3) != "*":
        ok = int(m.group(3)) == job.size
    if not ok:
        raise WrongRange(
            f"asked for bytes from {have:,}, the server answered {r.headers.get('Content-Range')!r}; "
            "starting the file again"
        )


def _get_once(
    job: FileJob, have: int, headers: dict[str, str], net: NetConfig, shared: _Shared, session, add, digest
) -> None:
    """One GET from byte ``have`` to the end (or to the first fault), appending to the partial file as
    bytes arrive (a dropped connection loses nothing that was received)."""
    from huggingface_hub.utils import hf_raise_for_status

    request_headers = {**headers, "Accept-Encoding": "identity"}  # byte ranges of the stored bytes, no gzip
    if have:
        request_headers["Range"] = f"bytes={have}-"
    with session.stream("GET", job.url, headers=request_headers, timeout=net.timeout_s, follow_redirects=True) as r:
        with shared.lock:
            shared.responses.add(r)
        try:
            if r.status_code == 416 and have:  # asked past the end: the partial is of other content
                _restart(job, have, add, digest)
                raise ShortRead("the server refused the resume range; starting the file again")
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            mode = "ab"
            if have and r.status_code == 206:
                try:
                    _check_range(job, have, r)
                except WrongRange:
                    _restart(job, have, add, digest)
                    raise
            elif have:  # the server ignored Range: start over
                add(-have)
                digest.reset()
                mode = "wb"
            try:
                with open(job.partial, mode, buffering=0) as f:
                    for chunk in r.iter_bytes():  # as they arrive: no chunk-sized buffer to lose
                        if shared.stop.is_set():
                            raise Stopped
                        _write_all(f, chunk, add, digest)
            except OSError as err:
                if err.filename is None and err.errno is not None:
                    err.filename = str(job.partial)  # so the message can name it
                raise
        finally:
            with shared.lock:
                shared.responses.discard(r)


def _restart(job: FileJob, have: int, add, digest: ContentHash) -> None:
    job.partial.unlink(missing_ok=True)
    add(-have)
    digest.reset()


def _write_all(f, chunk: bytes, add, digest: ContentHash) -> None:
    """Write ``chunk`` (unbuffered: a short write, as at a file-size limit, is continued or raises)."""
    view = memoryview(chunk)
    while view:
        n = f.write(view)
        if not n:
            raise OSError(errno.EIO, "the file system accepted no bytes", f.name)
        digest.update(view[:n])
        add(n)
        view = view[n:]


def fetch_all(
    jobs: Iterable[FileJob],
    headers: dict[str, str],
    net: NetConfig,
    progress: Callable[[int], None],
    say: Callable[[str], None],
    session=None,
) -> None:
    """Fetch ``jobs`` with ``net.workers`` daemon threads; the main thread reports and reacts to Ctrl-C.

    ``progress(n)`` gets byte deltas (negative when a file restarts) and ``say`` the retry lines, both
    on the calling thread. The first failing file stops the others (their partial files are kept) and
    its error is raised; Ctrl-C stops every worker within a moment and re-raises ``KeyboardInterrupt``.
    """
    todo: queue.SimpleQueue[FileJob] = queue.SimpleQueue()
    for job in jobs:
        todo.put(job)
    shared = _Shared()
    errors: list[BaseException] = []

    def worker() -> None:
        while not shared.stop.is_set():
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            try:
                fetch_file(job, headers, net, shared, session)
            except Stopped:
                return
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                errors.append(err)
                shared.stop.set()
                shared.close_responses()
                return

    threads = [threading.Thread(target=worker, name=f"hub-download-{i}", daemon=True) for i in range(net.workers)]
    for t in threads:
        t.start()

    def pump() -> None:
        progress(shared.take_bytes())
        while True:
            try:
                say(shared.messages.get_nowait())
            except queue.Empty:
                break

    try:
        while alive := [t for t in threads if t.is_alive()]:
            alive[0].join(timeout=0.25)
            pump()
    except KeyboardInterrupt:
        shared.stop.set()
        shared.close_responses()
        deadline = time.monotonic() + 2.0  # workers notice the flag at their next chunk; never wait long
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        pump()
        raise
    finally:
        pump()
    if errors:
        raise errors[0]
