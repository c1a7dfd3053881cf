"""hub.py against a local fake hub (tests/fake_hub.py) with the real huggingface_hub client and injected faults.

The fake hub serves the embedded checkpoint on 127.0.0.1; timeouts and backoff are shortened so a fault
costs milliseconds. Every download is compared byte for byte with the source files.
"""

from __future__ import annotations

import errno
import filecmp
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from fake_hub import FakeHub

import colab_helpers
from colab_helpers import cli
from colab_helpers.weights import hub
from colab_helpers.weights.hub import DEMO_REPO, DownloadError, download, resolve_model
from colab_helpers.weights.hub_layout import RECORD
from colab_helpers.weights.tiny import TINY_MODEL_DIR
from colab_helpers.weights.transfer import NetConfig, retrying

REPO = "fake/tiny-mixtral"
TOKEN = "hf_abcdefghijklmnopqrstuvwxyz0123456789"
FAST = NetConfig(timeout_s=0.5, attempts=3, first_wait_s=0.01, max_wait_s=0.05, chunk_bytes=4096)
SHARD = "model-00002-of-00033.safetensors"  # ~150 KB: big enough to fail in the middle
EXTRA = {"README.md": b"# not needed\n", "plot.png": b"\x89PNG not needed"}


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeHub:
    """The fake hub with the embedded checkpoint as REPO; HF_ENDPOINT and the hub cache point at it and tmp."""
    server = FakeHub()
    server.add_repo(REPO, TINY_MODEL_DIR, files=EXTRA)
    server.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a developer's offline setting must not leak in
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.stop()


def fetch(**kw) -> Path:
    return download(REPO, net=kw.pop("net", FAST), **kw)


def assert_identical(path: Path) -> None:
    for src in TINY_MODEL_DIR.iterdir():
        assert filecmp.cmp(src, path / src.name, shallow=False), src.name
    assert not (path / "README.md").exists() and not (path / "plot.png").exists()


def shard_partial(fake: FakeHub, tmp_path: Path) -> Path:
    """Where the bytes of SHARD wait in the hub cache until it is complete (other files may be partial too)."""
    blobs = tmp_path / "hub-cache" / "models--fake--tiny-mixtral" / "blobs"
    return blobs / f"{fake.repos[REPO].etag(SHARD)}.incomplete"


def file_gets(fake: FakeHub) -> list[str]:
    return [r.path.rsplit("/", 1)[-1] for r in fake.requests if r.method == "GET" and "/resolve/" in r.path]


# ---- the happy path, in both layouts ---------------------------------------------------------------


def test_default_mode_fills_the_hub_cache_at_the_resolved_commit(fake, tmp_path):
    path = fetch()
    commit = fake.repos[REPO].commit
    storage = tmp_path / "hub-cache" / "models--fake--tiny-mixtral"
    assert path == storage / "snapshots" / commit
    assert_identical(path)
    assert (storage / "refs" / "main").read_text() == commit  # so an offline run can find "main" again
    assert (path / SHARD).is_symlink() and (path / SHARD).resolve().parent == storage / "blobs"
    found = huggingface_hub.try_to_load_from_cache(REPO, "config.json", cache_dir=tmp_path / "hub-cache")
    assert found == str(path / "config.json")
    assert not list(storage.rglob("*.incomplete"))


def test_local_dir_mode_gets_the_files_and_a_record(fake, tmp_path):
    path = fetch(local_dir=tmp_path / "ckpt")
    assert path == tmp_path / "ckpt"
    assert_identical(path)
    assert f'"{fake.repos[REPO].commit}"' in (path / RECORD).read_text()


@pytest.mark.parametrize("local", [False, True])
def test_finished_files_are_never_fetched_again(fake, tmp_path, local):
    kw = {"local_dir": tmp_path / "ckpt"} if local else {}
    fetch(**kw)
    before = len(file_gets(fake))
    assert before == len(list(TINY_MODEL_DIR.iterdir()))
    fetch(**kw)
    assert len(file_gets(fake)) == before  # the second call only asks for the listing


def test_files_with_the_same_content_share_one_blob_fetched_once(fake):
    same = b'{"same": true}'
    fake.add_repo("fake/twins", TINY_MODEL_DIR, files={"a.json": same, "b.json": same})
    path = download("fake/twins", net=FAST)
    assert (path / "a.json").read_bytes() == (path / "b.json").read_bytes() == same
    assert len([n for n in file_gets(fake) if n in ("a.json", "b.json")]) == 1


def test_the_chat_template_file_is_fetched_and_loads(fake):
    from colab_helpers.model import load_tokenizer

    path = fetch()
    assert (path / "chat_template.jinja").is_file()
    assert load_tokenizer(path).chat_template


def test_a_mixtral_repo_without_a_chat_template_gets_mixtral_instructs(fake):
    from colab_helpers.weights.tokenizer import load_tokenizer

    files = {p.name: p.read_bytes() for p in TINY_MODEL_DIR.iterdir() if p.name != "chat_template.jinja"}
    fake.add_repo("fake/no-template", files=files)
    path = download("fake/no-template", net=FAST)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert load_tokenizer(path).apply_chat_template(messages) == load_tokenizer(TINY_MODEL_DIR).apply_chat_template(
        messages
    )


def test_a_repo_without_a_chat_template_is_a_clear_error(fake, monkeypatch):
    from colab_helpers.weights import tokenizer

    monkeypatch.setattr(tokenizer, "_model_type", lambda path: "not-mixtral")  # no fallback template for it
    files = {p.name: p.read_bytes() for p in TINY_MODEL_DIR.iterdir() if p.name != "chat_template.jinja"}
    fake.add_repo("fake/no-template", files=files)
    with pytest.raises(DownloadError, match=r"no chat template.*chat_template\.jinja"):
        download("fake/no-template", net=FAST)


# ---- transient faults: the same call completes, byte-identical --------------------------------------


@pytest.mark.parametrize(
    "kind, pattern, kw",
    [
        ("reset", f"resolve/*/{SHARD}", {"at": 50_000}),
        ("close", f"resolve/*/{SHARD}", {"at": 50_000}),
        ("status", f"resolve/*/{SHARD}", {"status": 500}),
        ("status", f"resolve/*/{SHARD}", {"status": 503}),
        ("status", "api/*", {"status": 500}),
        ("hang", "api/*", {"seconds": 5}),
        ("stall", f"resolve/*/{SHARD}", {"at": 50_000, "seconds": 5}),
    ],
)
def test_one_transient_fault_is_retried(fake, capsys, kind, pattern, kw):
    fault = fake.fault(kind, pattern, **kw)
    assert_identical(fetch())
    assert fault.times == 0  # the fault did happen
    err = capsys.readouterr().err
    assert ("try 2 of" if pattern.startswith("api") else "retry in") in err  # one line says so


@pytest.mark.parametrize("kind", ["close", "stall"])
def test_a_retry_resumes_from_the_bytes_received(fake, kind):
    fake.fault(kind, f"resolve/*/{SHARD}", at=50_000, seconds=5)
    assert_identical(fetch())
    first, second = fake.gets(SHARD)
    assert first.range is None
    assert second.range is not None and int(second.range[len("bytes=") : -1]) >= 40_000  # not from byte 0


def test_a_partial_file_resumes_in_the_next_call(fake, tmp_path):
    fake.fault("close", f"resolve/*/{SHARD}", at=60_000)  # progress, then no progress until it gives up
    fake.fault("status", f"resolve/*/{SHARD}", status=502, times=FAST.attempts - 1)
    with pytest.raises(DownloadError, match=rf"{SHARD} failed .* resume on the next run") as info:
        fetch()
    assert info.value.exit_code == 1
    partial = shard_partial(fake, tmp_path)
    kept = partial.stat().st_size
    assert kept > 0
    assert_identical(fetch())
    assert fake.gets(SHARD)[-1].range == f"bytes={kept}-"


def test_abandoned_partial_files_are_cleaned_or_adopted(fake, tmp_path):
    fetch()
    storage = tmp_path / "hub-cache" / "models--fake--tiny-mixtral"
    blob = (storage / "snapshots" / fake.repos[REPO].commit / SHARD).resolve()
    data = blob.read_bytes()
    blob.unlink()
    # huggingface_hub's own leftover of this blob (a killed run) and a stale one of some other blob
    adopted = storage / "blobs" / f"{blob.name}.1a2b3c4d.incomplete"
    adopted.write_bytes(data[:30_000])
    stale = storage / "blobs" / "0123abcd.incomplete"
    stale.write_bytes(b"old")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert_identical(fetch())
    assert not adopted.exists() and not stale.exists()
    assert fake.gets(SHARD)[-1].range == "bytes=30000-"


def test_leftovers_of_an_older_local_dir_download_are_cleaned(fake, tmp_path):
    old = tmp_path / "ckpt" / ".cache" / "huggingface" / "download" / "abc.deadbeef.incomplete"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"half a shard")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert_identical(fetch(local_dir=tmp_path / "ckpt"))
    assert not old.exists()


def test_a_folder_without_a_record_is_used_offline_and_says_so(fake, tmp_path, capsys):
    path = fetch(local_dir=tmp_path / "ckpt")
    (path / RECORD).unlink()  # as a hand-copied folder, or one from an earlier version of this package
    fake.stop()
    capsys.readouterr()
    assert fetch(local_dir=tmp_path / "ckpt") == path
    assert "revision could not be checked" in capsys.readouterr().err


def test_backoff_is_bounded():
    net = NetConfig(timeout_s=10, attempts=5, first_wait_s=1, max_wait_s=4)
    assert [net.wait_s(i) for i in range(1, 6)] == [1, 2, 4, 4, 4]
    assert net.worst_case_s() == 5 * 10 + 1 + 2 + 4 + 4
    calls, waits = [], []

    def flaky():
        calls.append(1)
        raise ConnectionResetError("reset")

    with pytest.raises(ConnectionResetError):
        retrying("x", flaky, net, say=lambda m: None, sleep=waits.append)
    assert len(calls) == 5 and waits == [1, 2, 4, 4]


# ---- the hub unreachable -----------------------------------------------------------------------------


@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize("outage", ["down", "500"])
def test_a_complete_download_is_used_when_the_hub_is_unreachable(fake, tmp_path, capsys, local, outage):
    kw = {"local_dir": tmp_path / "ckpt"} if local else {}
    first = fetch(**kw)
    if outage == "down":
        fake.stop()
    else:
        fake.fault("status", "api/*", status=500, times=99)
    capsys.readouterr()
    assert fetch(**kw) == first
    assert "using the complete local copy" in capsys.readouterr().err


def test_an_incomplete_download_is_not_used_offline(fake, tmp_path):
    path = fetch(local_dir=tmp_path / "ckpt")
    (path / "model-00033-of-00033.safetensors").write_bytes(b"short")
    fake.stop()
    with pytest.raises(DownloadError, match="could not reach the Hugging Face hub.*no complete local copy"):
        fetch(local_dir=tmp_path / "ckpt")


def test_another_revision_is_not_used_offline(fake, tmp_path):
    fetch(local_dir=tmp_path / "ckpt")
    fake.stop()
    with pytest.raises(DownloadError, match="no complete local copy"):
        download(REPO, revision="v2", local_dir=tmp_path / "ckpt", net=FAST)


def test_hf_hub_offline_uses_the_copy_without_asking(fake, monkeypatch):
    first = fetch()
    asked = len(fake.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch() == first and len(fake.requests) == asked
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        download("fake/never-downloaded", net=FAST)


def test_a_listing_that_never_answers_ends_with_a_clear_message(fake):
    fault = fake.fault("hang", "api/*", seconds=120, times=99)
    with pytest.raises(DownloadError, match=r"could not reach the Hugging Face hub \(ReadTimeout.*3 tries") as info:
        fetch()
    assert not fault.done.is_set()  # it gave up by its own timeouts while the hub still said nothing
    assert info.value.exit_code == 1
    assert [r.path for r in fake.requests].count(f"/api/models/{REPO}/revision/main") == FAST.attempts


def test_hub_down_and_no_copy(fake):
    fake.stop()
    with pytest.raises(DownloadError, match="could not reach the Hugging Face hub.*no complete local copy"):
        fetch()


# ---- Ctrl-C --------------------------------------------------------------------------------------------


def test_ctrl_c_mid_file_stops_promptly_and_the_partial_resumes(fake, tmp_path):
    fault = fake.fault("stall", f"resolve/*/{SHARD}", at=40_000, seconds=120)

    sent = threading.Event()

    def interrupt_when_bytes_arrive():
        deadline = time.monotonic() + 55  # bounded, below the read timeout; generous for a loaded machine
        while time.monotonic() < deadline:
            partial = shard_partial(fake, tmp_path)
            if partial.is_file() and partial.stat().st_size >= 4096:
                sent.set()
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl+C: it interrupts the stalled read itself
                return
            time.sleep(0.05)

    threading.Thread(target=interrupt_when_bytes_arrive, daemon=True).start()
    slow = NetConfig(timeout_s=60, first_wait_s=0.01, chunk_bytes=4096)  # the stall would hold a read a minute
    with pytest.raises(KeyboardInterrupt):
        try:
            download(REPO, net=slow)
        finally:
            assert sent.is_set(), "no partial of 4096 bytes appeared within 55 s, so no Ctrl+C was sent"
    assert not fault.done.is_set()  # it stopped while the shard's connection was still stalled
    kept = shard_partial(fake, tmp_path).stat().st_size
    assert kept >= 4096
    assert_identical(fetch())
    assert fake.gets(SHARD)[-1].range == f"bytes={kept}-"


# ---- errors: one message each, the right exit code, never the token -------------------------------


def test_gated_repo_explains_the_token(fake):
    fake.repos[REPO].gated = True
    with pytest.raises(DownloadError, match="gated.*HF_TOKEN.*Colab") as info:
        fetch(token=TOKEN)
    assert info.value.exit_code == 2 and info.value.__cause__ is None


def test_unknown_repo_and_revision(fake):
    with pytest.raises(DownloadError, match="not found, or private") as info:
        download("fake/no-such-model", net=FAST)
    assert info.value.exit_code == 2
    with pytest.raises(DownloadError, match="revision 'v9' does not exist.*DEMO_REVISION"):
        download(REPO, revision="v9", net=FAST)


def test_a_400_is_a_rejected_request_not_an_unreachable_hub(fake):
    fake.fault("status", "api/*", status=400, message=f"bad request for token {TOKEN}")
    with pytest.raises(DownloadError, match="rejected the request") as info:
        fetch(token=TOKEN)
    assert "reach" not in str(info.value) and TOKEN not in str(info.value)
    assert info.value.exit_code == 2


def test_a_file_missing_on_the_hub_is_named(fake, monkeypatch):
    real = hub.list_remote

    def with_ghost(*a, **kw):
        listing = real(*a, **kw)
        ghost = hub.RemoteFile("ghost.json", 10, "f" * 40)
        return hub.RemoteListing(listing.repo_id, listing.revision, listing.commit, (*listing.files, ghost))

    monkeypatch.setattr(hub, "list_remote", with_ghost)
    with pytest.raises(DownloadError, match="missing on the hub"):
        fetch()


def test_disk_space_is_checked_before_downloading(fake, monkeypatch):
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**12, used=0, free=1000))
    with pytest.raises(DownloadError, match="not enough disk space"):
        fetch()
    assert file_gets(fake) == []


@pytest.mark.parametrize(
    "error, match, code",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/x/blob.incomplete"), "ran out of disk space.*resumes", 2),
        (OSError(errno.EFBIG, "File too large", "/x/blob.incomplete"), "^/x/blob.incomplete: .*EFBIG.*HF_HUB_CACHE", 2),
        (OSError(errno.EROFS, "Read-only file system", "/x/.locks"), "^/x/.locks: .*read-only.*HF_HUB_CACHE", 2),
        (PermissionError(errno.EACCES, "Permission denied", "/x/blobs"), "^/x/blobs: permission denied.*writable", 2),
        (OSError("Consistency check failed: file should be of size 5 but has size 3"), "wrong size", 1),
    ],
)
def test_disk_errors_are_explained(fake, monkeypatch, capsys, error, match, code):
    def fail(*a, **kw):
        raise error

    monkeypatch.setattr(hub, "fetch_all", fail)
    with pytest.raises(DownloadError, match=match) as info:
        fetch()
    assert info.value.exit_code == code
    capsys.readouterr()
    assert cli.main(["generate", "hi", "--model", REPO, "--device", "cpu"]) == code
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1 and "Traceback" not in err


def test_unknown_errors_are_not_hidden(fake, monkeypatch):
    monkeypatch.setattr(hub, "fetch_all", lambda *a, **kw: {}["bug"])
    with pytest.raises(KeyError):
        fetch()


def test_revision_is_one_constant(fake, monkeypatch):
    monkeypatch.setattr(hub, "DEMO_REPO", REPO)
    monkeypatch.setattr(hub, "DEMO_REVISION", fake.repos[REPO].commit)
    download(net=FAST)
    assert any(f"/revision/{fake.repos[REPO].commit}" in r.path for r in fake.requests)


# ---- the CLI ------------------------------------------------------------------------------------------


def test_cli_generates_from_a_hub_repo_then_offline_from_the_cache(fake, capsys):
    argv = ["generate", "Hello", "--model", REPO, "--device", "cpu", "--max-new-tokens", "4"]
    assert cli.main(argv) == 0
    assert "stats:" in capsys.readouterr().err
    fake.stop()
    assert cli.main(argv) == 0
    assert "using the complete local copy" in capsys.readouterr().err


def test_cli_download_error_is_one_line_and_exit_code(fake, capsys):
    code = cli.main(["generate", "hi", "--model", "fake/no-such-model", "--device", "cpu"])
    assert code == 2  # a repo that does not exist is the user's to fix
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not found, or private" in errors[0]
    fake.stop()
    assert cli.main(["generate", "hi", "--model", "fake/never-downloaded", "--device", "cpu"]) == 1  # the network's


# ---- resolve_model -------------------------------------------------------------------------------


@pytest.fixture
def calls(monkeypatch) -> list:
    seen: list = []
    monkeypatch.setattr(hub, "download", lambda repo=DEMO_REPO, **kw: seen.append(repo) or Path("/downloaded"))
    return seen


def test_resolve_local_folder(tmp_path, calls):
    assert resolve_model(tmp_path) == (tmp_path, str(tmp_path))
    assert calls == []


def test_resolve_none_without_gpu_is_the_tiny_model(monkeypatch, tmp_path, calls):
    import colab_helpers.weights.tiny as tiny

    monkeypatch.setattr(tiny, "tiny_model_path", lambda: tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path, what = resolve_model(None)
    assert path == tmp_path and "tiny" in what and calls == []


def test_resolve_none_with_gpu_downloads_the_demo(monkeypatch, calls):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("COLAB_HELPERS_TINY", raising=False)
    assert resolve_model(None) == (Path("/downloaded"), DEMO_REPO)
    assert calls == [DEMO_REPO]


def test_resolve_tiny_forced_even_with_gpu(monkeypatch, tmp_path, calls):
    import colab_helpers.weights.tiny as tiny

    monkeypatch.setattr(tiny, "tiny_model_path", lambda: tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("COLAB_HELPERS_TINY", "1")
    assert resolve_model(None)[0] == tmp_path and calls == []


def test_resolve_repo_id_downloads(calls):
    assert resolve_model("someone/some-model")[0] == Path("/downloaded")
    assert calls == ["someone/some-model"]


@pytest.mark.parametrize("bad", ["./no-such-folder", "~/no/such/folder", "not-a-repo", "a/b/c"])
def test_resolve_missing_path_is_an_error_not_a_download(bad, calls):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_model(bad)
    assert calls == []


def test_resolve_a_file_is_an_error(tmp_path, calls):
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(FileNotFoundError, match="is a file"):
        resolve_model(f)


# ---- verified bytes: the hub's hash checked while streaming, damage on disk repaired ---------------------

OURS = Path(".cache") / "colab_helpers"  # a folder's partial files (docs/download.md)
LAYOUTS = pytest.mark.parametrize("local", [False, True], ids=["hub-cache", "local-dir"])
BIG = "model-00001-of-00033.safetensors"  # ~2.5 MB: more than a 1 MiB chunk


def source(name: str) -> bytes:
    return (TINY_MODEL_DIR / name).read_bytes()


def folder_kw(tmp_path: Path, local: bool) -> dict:
    return {"local_dir": tmp_path / "ckpt"} if local else {}


def stored(fake: FakeHub, tmp_path: Path, local: bool, name: str) -> Path:
    """The file that holds ``name``'s bytes on disk: the blob in the hub cache, the file in a folder."""
    if local:
        return tmp_path / "ckpt" / name
    return tmp_path / "hub-cache" / "models--fake--tiny-mixtral" / "blobs" / fake.repos[REPO].etag(name)


def partial_of(fake: FakeHub, tmp_path: Path, local: bool, name: str) -> Path:
    etag = fake.repos[REPO].etag(name)
    if local:
        return tmp_path / "ckpt" / OURS / f"{name}.{etag[:16]}.incomplete"
    return stored(fake, tmp_path, False, name).with_name(f"{etag}.incomplete")


def assert_served(path: Path, files: dict[str, bytes]) -> None:
    """Every needed file of the served commit is in ``path`` byte for byte."""
    for name, data in files.items():
        if hub.is_needed(name):
            assert (path / name).read_bytes() == data, name


def damage(path: Path, at: int = 100_000, keep_mtime: bool = False) -> None:
    """Flip 16 bytes in place (same size), as a bad disk or a stray write would."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])
    path.unlink()  # a blob may be a hard link elsewhere; and a new inode like any rewrite
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def no_partials(tmp_path: Path) -> bool:
    return not list(tmp_path.rglob("*.incomplete"))


@LAYOUTS
def test_a_corrupt_body_with_the_right_etag_is_fetched_again(fake, tmp_path, capsys, local):
    fake.fault("corrupt", f"resolve/*/{SHARD}", at=70_000)  # headers, size and ETag all correct
    path = fetch(**folder_kw(tmp_path, local))
    assert_identical(path)
    assert [r.range for r in fake.gets(SHARD)] == [None, None]  # fetched once more, from byte 0
    assert f"{SHARD}: the bytes do not match the hub's sha256" in capsys.readouterr().err


@LAYOUTS
def test_a_body_corrupt_every_time_is_one_clear_error_and_nothing_is_kept(fake, tmp_path, local):
    fake.fault("corrupt", f"resolve/*/{SHARD}", at=70_000, times=99)
    with pytest.raises(DownloadError, match=rf"^{REPO}: {SHARD}: the bytes received twice do not match") as info:
        fetch(**folder_kw(tmp_path, local))
    assert info.value.exit_code == 1 and "\n" not in str(info.value)
    assert not stored(fake, tmp_path, local, SHARD).exists() and not partial_of(fake, tmp_path, local, SHARD).exists()
    fake.faults.clear()  # the hub healthy again: a rerun repairs
    assert_identical(fetch(**folder_kw(tmp_path, local)))


@LAYOUTS
def test_a_file_damaged_on_disk_after_completion_is_fetched_again(fake, tmp_path, local):
    fetch(**folder_kw(tmp_path, local))
    damage(stored(fake, tmp_path, local, SHARD))
    assert_identical(fetch(**folder_kw(tmp_path, local)))
    assert len(fake.gets(SHARD)) == 2 and len(fake.gets(BIG)) == 1  # only the damaged file again


@LAYOUTS
def test_a_damaged_header_is_repaired_even_with_size_and_mtime_unchanged(fake, tmp_path, local):
    fetch(**folder_kw(tmp_path, local))
    damage(stored(fake, tmp_path, local, SHARD), at=20, keep_mtime=True)  # the stamp still looks fresh
    assert_identical(fetch(**folder_kw(tmp_path, local)))
    assert len(fake.gets(SHARD)) == 2


@LAYOUTS
def test_files_without_stamps_are_hashed_once_then_trusted(fake, tmp_path, capsys, local):
    path = fetch(**folder_kw(tmp_path, local))
    stamps = tmp_path / "ckpt" / OURS / "verified" if local else path.parents[1] / ".colab_helpers" / "verified"
    assert len(list(stamps.rglob("*"))) == len(list(TINY_MODEL_DIR.iterdir()))  # one per verified file
    for stamp in stamps.iterdir():
        stamp.unlink()  # as a folder from an earlier version of this package
    capsys.readouterr()
    assert_identical(fetch(**folder_kw(tmp_path, local)))
    assert f"checking {len(list(TINY_MODEL_DIR.iterdir()))} files already on disk" in capsys.readouterr().err
    assert_identical(fetch(**folder_kw(tmp_path, local)))
    assert "checking" not in capsys.readouterr().err  # stamped now: not read again
    assert len(file_gets(fake)) == len(list(TINY_MODEL_DIR.iterdir()))  # nothing fetched twice


@LAYOUTS
def test_a_damaged_file_is_not_used_offline(fake, tmp_path, local):
    fetch(**folder_kw(tmp_path, local))
    damage(stored(fake, tmp_path, local, SHARD))
    fake.stop()
    with pytest.raises(DownloadError, match="no complete local copy"):
        fetch(**folder_kw(tmp_path, local))


def test_a_clean_short_answer_resumes_from_the_bytes_on_disk(fake, capsys):
    fake.fault("short", f"resolve/*/{SHARD}", at=50_000)  # 200, Content-Length 50000, 50000 bytes, clean close
    assert_identical(fetch())
    assert [r.range for r in fake.gets(SHARD)] == [None, "bytes=50000-"]
    assert "closed after 50,000 of" in capsys.readouterr().err


def test_a_resumed_file_is_hashed_from_its_first_byte(fake, tmp_path):
    """A clean short answer, then the run gives up: the partial is kept; if its bytes are not the hub's,
    the resumed file must not be moved into place (its hash covers the bytes on disk too)."""
    fake.fault("short", f"resolve/*/{SHARD}", at=50_000)
    fake.fault("status", f"resolve/*/{SHARD}", status=502, times=FAST.attempts - 1)
    with pytest.raises(DownloadError, match="resume on the next run"):
        fetch()
    partial = shard_partial(fake, tmp_path)
    assert partial.stat().st_size == 50_000
    damage(partial, at=1000)
    assert_identical(fetch())
    assert [r.range for r in fake.gets(SHARD)][-2:] == ["bytes=50000-", None]  # resumed, then from byte 0


def test_bytes_are_kept_as_they_arrive_not_per_chunk(fake):
    fake.fault("close", f"resolve/*/{BIG}", at=50_000)  # well under one 1 MiB chunk
    assert_identical(download(REPO, net=NetConfig(timeout_s=0.5, attempts=3, first_wait_s=0.01, max_wait_s=0.05)))
    assert [r.range for r in fake.gets(BIG)] == [None, "bytes=50000-"]


@pytest.mark.parametrize("shift", [10_000, -10_000])
def test_a_206_from_the_wrong_offset_restarts_the_file(fake, capsys, shift):
    fake.fault("close", f"resolve/*/{SHARD}", at=50_000)
    fake.fault("offset", f"resolve/*/{SHARD}", at=shift)  # honest Content-Range, of the wrong bytes
    assert_identical(fetch())
    assert [r.range for r in fake.gets(SHARD)] == [None, "bytes=50000-", None]
    assert "starting the file again" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["file", "listing"])
def test_retry_after_is_honoured(fake, capsys, where):
    pattern = f"resolve/*/{SHARD}" if where == "file" else "api/*"
    fake.fault("status", pattern, status=429, headers={"Retry-After": "1"})
    net = NetConfig(timeout_s=0.5, attempts=3, first_wait_s=0.01, max_wait_s=5)
    assert_identical(download(REPO, net=net))
    asked = fake.gets(SHARD) if where == "file" else [r for r in fake.requests if r.path.startswith("/api/")]
    assert asked[1].time - asked[0].time >= 0.9  # waited as asked, not the 0.01 s backoff
    assert ("retry in 1 s" if where == "file" else "try 2 of 3 in 1 s") in capsys.readouterr().err


def test_retry_after_is_capped_and_read_as_seconds_or_a_date():
    from email.utils import formatdate

    from colab_helpers.weights.transfer import retry_after_s

    net = NetConfig(first_wait_s=1, max_wait_s=30)
    assert net.wait_s(1, 10) == 10 and net.wait_s(1, 600) == 30 and net.wait_s(3, None) == 4

    def answer(value: str) -> SimpleNamespace:
        return SimpleNamespace(response=SimpleNamespace(headers={"Retry-After": value}))

    assert retry_after_s(answer("7")) == 7
    assert 8 <= retry_after_s(answer(formatdate(time.time() + 10, usegmt=True))) <= 10
    assert retry_after_s(answer("soon")) is None and retry_after_s(ConnectionResetError()) is None


# ---- one commit per folder: the repo's main moves ----------------------------------------------------------


def moved(data: bytes) -> bytes:
    """New bytes of the same size (the tensor data near the end flipped; the header still parses)."""
    return data[:-64] + bytes(b ^ 0x55 for b in data[-64:])


def served(fake: FakeHub) -> dict[str, bytes]:
    return dict(fake.repos[REPO].files)


@LAYOUTS
def test_updating_a_downloaded_folder_to_a_new_commit(fake, tmp_path, local):
    first = fetch(**folder_kw(tmp_path, local))
    commit = fake.move(REPO, {SHARD: moved(source(SHARD))})
    path = fetch(**folder_kw(tmp_path, local))
    assert_served(path, served(fake))
    assert len(fake.gets(SHARD)) == 2 and len(fake.gets(BIG)) == 1  # the new file only
    if local:
        assert path == first and json.loads((path / RECORD).read_text())["commit"] == commit
    else:
        assert path.name == commit and (first / SHARD).read_bytes() == source(SHARD)  # the old commit intact


@LAYOUTS
def test_main_moving_between_the_listing_and_the_files_gives_one_commit(fake, tmp_path, local):
    old = served(fake)
    fake.fault("call", "resolve/*", action=lambda: fake.move(REPO, {SHARD: moved(source(SHARD))}))
    path = fetch(**folder_kw(tmp_path, local))
    assert_served(path, old)  # every file from the commit the listing named
    path = fetch(**folder_kw(tmp_path, local))  # the next run moves to the new commit
    assert_served(path, served(fake))


@LAYOUTS
def test_interrupted_at_one_commit_and_resumed_after_main_moved(fake, tmp_path, local):
    one_by_one = NetConfig(timeout_s=0.5, attempts=3, first_wait_s=0.01, max_wait_s=0.05, workers=1)
    fake.fault("status", f"resolve/*/{SHARD}", status=502, times=99)  # BIG (fetched before it) completes
    with pytest.raises(DownloadError, match=SHARD):
        download(REPO, net=one_by_one, **folder_kw(tmp_path, local))
    assert (tmp_path / "ckpt" / BIG).is_file() if local else True
    fake.faults.clear()
    fake.move(REPO, {BIG: moved(source(BIG)), SHARD: moved(source(SHARD))})
    path = download(REPO, net=one_by_one, **folder_kw(tmp_path, local))
    assert_served(path, served(fake))  # nothing of the old commit counted complete


# ---- two processes, one cache or folder ------------------------------------------------------------------

CHILD = """
import sys
from colab_helpers.weights import hub
from colab_helpers.weights.transfer import NetConfig
hub.check_chat_template = lambda path, what: None  # a transformers import (seconds); not what is tested here
net = NetConfig(timeout_s=10, attempts=3, first_wait_s=0.01, max_wait_s=0.05)
print(hub.download("{repo}", local_dir=sys.argv[1] or None, net=net))
"""


def child_env() -> dict[str, str]:
    root = str(Path(colab_helpers.__file__).resolve().parents[1])  # this checkout's package, in the child too
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


class Child:
    """``download()`` in another process; its stderr lines are collected as they come."""

    def __init__(self, local_dir: Path | None, **kw) -> None:
        code = CHILD.format(repo=REPO)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(local_dir or "")],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kw,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def wait(self, timeout: float = 120) -> tuple[int, str, str]:
        try:
            out = self.proc.stdout.read()
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.reader.join(timeout=5)
        return code, out, "".join(self.lines)


def wait_for(check, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("local, start", [(False, "mid-file"), (True, "mid-file"), (False, "together")])
def test_two_processes_on_one_cache_fetch_every_file_once(fake, tmp_path, local, start):
    slow = fake.fault("slow", f"resolve/*/{SHARD}", at=2048, seconds=0.2)  # ~15 s unless released below
    local_dir = tmp_path / "ckpt" if local else None
    first = Child(local_dir)
    if start == "mid-file":
        partial = partial_of(fake, tmp_path, local, SHARD)
        assert wait_for(partial.is_file), "the first one never started the file"
    second = Child(local_dir)
    waiting = "another download of model-"
    said = lambda: any(waiting in line for c in (first, second) for line in c.lines)  # noqa: E731
    wait_for(lambda: said() or second.proc.poll() is not None)  # one waits for the other (or fails to)
    slow.seconds = 0  # now let the first one finish
    results = [first.wait(), second.wait()]
    for code, out, err in results:
        assert code == 0, err[-2000:]
        assert_identical(Path(out.strip()))
    gets = file_gets(fake)
    assert sorted(gets) == sorted(set(gets))  # every file fetched once, by one of them
    assert said(), "neither process said it waited for the other"
    if start == "mid-file":
        assert f"another download of {SHARD} is running; waiting" in results[1][2]
    assert no_partials(tmp_path)


# ---- a file-size limit (EFBIG: FAT/exFAT, ulimit -f) -------------------------------------------------


def test_a_file_size_limit_is_one_line_exit_2_and_the_partial_resumes(fake, tmp_path):
    limit = 1_000_000  # BIG is ~2.5 MB, every other file smaller

    def limited() -> None:  # in the child: write() past the limit fails with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    argv = [sys.executable, "-m", "colab_helpers", "generate", "hi", "--model", REPO, "--device", "cpu"]
    done = subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=180, preexec_fn=limited)
    partial = (
        tmp_path / "hub-cache" / "models--fake--tiny-mixtral" / "blobs" / f"{fake.repos[REPO].etag(BIG)}.incomplete"
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert str(partial) in errors[0] and "EFBIG" in errors[0]
    assert partial.stat().st_size == limit  # every byte that fit is kept
    assert_identical(fetch())
    assert fake.gets(BIG)[-1].range == f"bytes={limit}-"
