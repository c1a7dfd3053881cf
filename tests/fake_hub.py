"""A local stand-in for huggingface.co that the real huggingface_hub client talks to, with fault injection.

It serves repos made of in-memory files on 127.0.0.1 only, speaking the part of the hub API a
download uses: ``/api/models/<repo>[/revision/<rev>]`` (model info with ``blobs=true`` sizes, blob ids
and LFS sha256), ``/api/models/<repo>/tree/<rev>`` and ``/<repo>/resolve/<rev>/<file>`` (GET and HEAD,
with ETag, X-Repo-Commit, Content-Length, Accept-Ranges and ``Range``). ``move()`` gives a repo's
branch a new commit (old commits stay reachable by hash, as on the hub). Faults are queued per path
pattern (reset, clean close mid-file, an honest short answer, corrupt bytes, a 206 from the wrong
offset, a slow body, an error status with headers, silence past the client's timeout, a stall for
Ctrl-C tests, a callback before serving) and each is used up after ``times`` hits. Every request is
recorded with its time. Silences are bounded and the server thread is a daemon that ``stop()`` ends.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".model")


@dataclass
class Fault:
    """What to do to the next ``times`` requests whose path (after resolve/<rev>/ or /api/) matches ``pattern``.

    kind: "reset" (TCP RST after ``at`` body bytes), "close" (clean FIN after ``at`` bytes), "short"
    (headers that honestly announce only ``at`` bytes, those bytes, a clean close), "corrupt" (the whole
    answer, honest headers, 16 bytes flipped at file offset ``at``), "offset" (a 206 whose honest
    Content-Range starts ``at`` bytes away from the range asked for), "slow" (the answer in pieces of
    ``at`` bytes, ``seconds`` apart), "status" (answer ``status`` with ``headers``), "hang" (say nothing
    for ``seconds``), "stall" (send ``at`` bytes, then nothing for ``seconds``), "call" (run ``action()``,
    then answer normally).
    """

    kind: str
    pattern: str
    times: int = 1
    at: int = 0
    status: int = 500
    seconds: float = 5.0
    message: str = ""
    headers: dict = field(default_factory=dict)
    action: Callable[[], object] | None = None
    done: threading.Event = field(default_factory=threading.Event)  # set when a hang or stall ran its course


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    time: float = 0.0  # time.monotonic() when it arrived


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def etag_of(name: str, data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else git_blob_id(data)


@dataclass
class Repo:
    files: dict[str, bytes]  # at the head of ``branch``
    commit: str
    branch: str = "main"
    gated: bool = False
    history: dict[str, dict[str, bytes]] = field(default_factory=dict)  # every commit's files, by hash

    def etag(self, name: str) -> str:
        return etag_of(name, self.files[name])

    def at(self, rev: str) -> Repo | None:
        """The repo as of ``rev`` (the branch, or any commit it ever had); None for an unknown revision."""
        if rev in (self.branch, self.commit):
            return self
        if rev in self.history:
            return Repo(self.history[rev], rev, self.branch, self.gated, self.history)
        return None


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    server: ThreadingHTTPServer | None = None
    connections: set = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo_id: str, folder: Path | None = None, files: dict[str, bytes] | None = None) -> Repo:
        files = dict(files or {})
        if folder is not None:
            files |= {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        commit = hashlib.sha1(repo_id.encode() + b"".join(files[n] for n in sorted(files))).hexdigest()
        self.repos[repo_id] = Repo(files, commit, history={commit: files})
        return self.repos[repo_id]

    def move(self, repo_id: str, changes: dict[str, bytes]) -> str:
        """A new commit on the repo's branch with ``changes`` (other files as before); returns its hash."""
        repo = self.repos[repo_id]
        files = repo.files | changes
        commit = hashlib.sha1(repo.commit.encode() + b"".join(files[n] for n in sorted(files))).hexdigest()
        with self.lock:
            repo.history[commit] = files
            repo.files, repo.commit = files, commit
        return commit

    def fault(self, kind: str, pattern: str, **kw) -> Fault:
        f = Fault(kind, pattern, **kw)
        with self.lock:
            self.faults.append(f)
        return f

    def take_fault(self, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.times > 0 and fnmatch.fnmatch(path, f.pattern):
                    f.times -= 1
                    return f
        return None

    def gets(self, name: str) -> list[Request]:
        """The file GETs of ``name`` (any repo, any revision)."""
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path and r.path.endswith("/" + name)]

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop answering: open connections drop and the port refuses new ones (the hub is down)."""
        self.stopping.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        with self.lock:
            live = list(self.connections)
        for conn in live:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # clients hanging up mid-answer is the point
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # a client that stops reading cannot pin a server thread for long
    fake: FakeHub

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.fake.lock:
            self.fake.connections.add(self.connection)

    def finish(self) -> None:
        with self.fake.lock:
            self.fake.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    # ---- routing ---------------------------------------------------------------------------------

    def _serve(self, body: bool) -> None:
        if self.fake.stopping.is_set():
            self.close_connection = True
            return
        url = urlparse(self.path)
        path = unquote(url.path)
        self.fake.requests.append(Request(self.command, path, self.headers.get("Range"), time.monotonic()))
        if path.startswith("/api/models/"):
            self._api(path[len("/api/models/") :], parse_qs(url.query), body)
        elif "/resolve/" in path:
            repo_id, rest = path.lstrip("/").split("/resolve/", 1)
            rev, _, name = rest.partition("/")
            self._resolve(repo_id, rev, name, body)
        else:
            self._error(404, "RepoNotFound", "no such route")

    def _repo(self, repo_id: str, rev: str | None) -> Repo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}")
            return None
        if repo.gated:
            self._error(403, "GatedRepo", "Access to this repo is restricted")
            return None
        if rev is not None and repo.at(rev) is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo if rev is None else repo.at(rev)

    def _api(self, rest: str, query: dict, body: bool) -> None:
        if self._injected(f"api/{rest}", b""):
            return
        parts = rest.split("/")
        repo_id, tail = "/".join(parts[:2]), parts[2:]
        if tail[:1] == ["tree"]:
            repo = self._repo(repo_id, tail[1] if len(tail) > 1 else None)
            if repo is not None:
                self._json([self._entry(repo, n, tree=True) for n in sorted(repo.files)], body)
            return
        rev = tail[1] if tail[:1] == ["revision"] and len(tail) > 1 else None
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [self._entry(repo, n) if blobs else {"rfilename": n} for n in sorted(repo.files)]
        info = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False, "siblings": siblings}
        self._json(info, body)

    def _entry(self, repo: Repo, name: str, tree: bool = False) -> dict:
        data = repo.files[name]
        lfs = None
        blob_id = git_blob_id(data)  # as on the hub: the git object id of the file (of its pointer, for LFS)
        if name.endswith(LFS_SUFFIXES):
            lfs = {"sha256": repo.etag(name), "size": len(data), "pointerSize": 134}
            blob_id = git_blob_id(f"version https://git-lfs.github.com/spec/v1\noid sha256:{lfs['sha256']}\n".encode())
        if tree:
            out = {"type": "file", "path": name, "size": len(data), "oid": blob_id}
            return out | ({"lfs": {"oid": lfs["sha256"], "size": len(data), "pointerSize": 134}} if lfs else {})
        out = {"rfilename": name, "size": len(data), "blobId": blob_id}
        return out | ({"lfs": lfs} if lfs else {})

    def _resolve(self, repo_id: str, rev: str, name: str, body: bool) -> None:
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        if name not in repo.files:
            self._error(404, "EntryNotFound", f"{name} does not exist")
            return
        data = repo.files[name]
        start = 0
        status = 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes=") : -1])
            if start >= len(data):
                self._error(416, None, "Range Not Satisfiable")
                return
            status = 206
        payload = data[start:]
        if body and self._injected(f"resolve/{rev}/{name}", payload, status, repo, name, start):
            return
        self.send_response(status)
        self._file_headers(repo, name, len(payload), start)
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _file_headers(self, repo: Repo, name: str, length: int, start: int, force_range: bool = False) -> None:
        total = len(repo.files[name])
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{repo.etag(name)}"')
        self.send_header("X-Repo-Commit", repo.commit)
        if name.endswith(LFS_SUFFIXES):
            self.send_header("X-Linked-Etag", f'"{repo.etag(name)}"')
            self.send_header("X-Linked-Size", str(total))
        if start or force_range:
            self.send_header("Content-Range", f"bytes {start}-{start + length - 1}/{total}")

    # ---- faults ----------------------------------------------------------------------------------

    def _injected(self, path: str, payload: bytes, status: int = 200, repo=None, name=None, start=0) -> bool:
        """Apply the first matching fault; True when the request was handled (badly) by it."""
        f = self.fake.take_fault(path)
        if f is None:
            return False
        if f.kind == "call":
            f.action()
            return False
        if f.kind == "status":
            self._error(f.status, None, f.message or f"injected {f.status}", f.headers)
            return True
        if repo is not None and f.kind in ("short", "corrupt", "offset", "slow"):
            self._answer_badly(f, payload, status, repo, name, start)
            return True
        if f.kind == "hang":
            if not self.fake.stopping.wait(f.seconds):
                f.done.set()
            self.close_connection = True
            return True
        self.close_connection = True
        self.send_response(status)
        if repo is not None:
            self._file_headers(repo, name, len(payload), start)
        else:
            self.send_header("Content-Length", str(len(payload) + 1))
        self.end_headers()
        self.wfile.write(payload[: f.at])
        self.wfile.flush()
        if f.kind == "stall":
            if not self.fake.stopping.wait(f.seconds):
                f.done.set()
        elif f.kind == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        elif f.kind == "close":
            self.connection.shutdown(socket.SHUT_RDWR)
        return True

    def _answer_badly(self, f: Fault, payload: bytes, status: int, repo: Repo, name: str, start: int) -> None:
        """An answer whose headers are honest about what it sends, and what it sends is wrong or short."""
        data, total = repo.files[name], len(repo.files[name])
        if f.kind == "short":
            payload = payload[: f.at]
        elif f.kind == "corrupt":
            flipped = bytearray(data)
            flipped[f.at : f.at + 16] = bytes(b ^ 0xFF for b in flipped[f.at : f.at + 16])
            payload = bytes(flipped[start:])
        elif f.kind == "offset":
            start = min(max(start + f.at, 0), total - 1)
            payload, status = data[start:], 206
        self.close_connection = True
        self.send_response(status)
        self._file_headers(repo, name, len(payload), start, force_range=status == 206)
        self.end_headers()
        step = f.at if f.kind == "slow" else len(payload)
        for i in range(0, len(payload), max(step, 1)):
            self.wfile.write(payload[i : i + step])
            self.wfile.flush()
            if f.kind == "slow" and self.fake.stopping.wait(f.seconds):
                return
        self.connection.shutdown(socket.SHUT_RDWR)

    def _error(self, status: int, code: str | None, message: str, headers: dict | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, body: bool) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
