"""hub.py without a network: the hub, the disk and the connection are faked with monkeypatch."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import errors as hf_errors
from safetensors.torch import save_file
from transformers import MixtralConfig

from colab_helpers import hub
from colab_helpers.checkpoint import (
    CONFIG_FILE,
    INDEX_FILE,
    QuantConfig,
    expected_expert_tensors,
    expected_trunk_tensors,
    expert_prefix,
    shard_name,
)
from colab_helpers.hub import DEMO_REPO, DownloadError, download, resolve_model

TOKEN = "hf_abcdefghijklmnopqrstuvwxyz0123456789"
SHA = "0123456789abcdef0123456789abcdef01234567"
FILES = {
    "config.json": 773,
    "model.safetensors.index.json": 100,
    "model-00001-of-00003.safetensors": 300,
    "model-00002-of-00003.safetensors": 200,
    "model-00003-of-00003.safetensors": 200,
    "tokenizer.model": 50,
    "tokenizer.json": 80,
    "README.md": 10,  # not needed
    ".gitattributes": 5,  # not needed
    "plot.png": 1000,  # not needed
}
NEEDED = {k: v for k, v in FILES.items() if not k.endswith((".md", ".gitattributes", ".png"))}


def _http_error(cls: type, status: int, message: str = "Client Error") -> Exception:
    """An ``HfHubHTTPError`` subclass carrying a real response object of the installed HTTP library."""
    lib = sys.modules[hf_errors.Response.__module__.split(".")[0]]
    request = lib.Request("GET", f"https://huggingface.co/api/models/{DEMO_REPO}")
    return cls(f"{status} {message}", response=lib.Response(status, request=request))


class FakeHub:
    """Stands in for ``HfApi``, ``snapshot_download`` and ``hf_hub_download``; records what was asked."""

    def __init__(self, files: dict[str, int] = FILES, wrong: dict[str, int] | None = None) -> None:
        self.files, self.wrong = files, dict(wrong or {})
        self.info_error: Exception | None = None
        self.snapshot_error: Exception | None = None
        self.snapshot_calls: list[dict] = []
        self.refetched: list[str] = []
        self.refetch_fixes = True

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
        fake = self

        class Api:
            def model_info(self, repo_id, revision=None, files_metadata=False, token=None):
                if fake.info_error is not None:
                    raise fake.info_error
                siblings = [SimpleNamespace(rfilename=n, size=s) for n, s in fake.files.items()]
                return SimpleNamespace(sha=SHA, siblings=siblings)

        monkeypatch.setattr(huggingface_hub, "HfApi", Api)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
        return self

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, local_dir=None, token=None, **kw):
        if self.snapshot_error is not None:
            raise self.snapshot_error
        self.snapshot_calls.append(dict(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns, **kw))
        folder = Path(local_dir)
        for name in allow_patterns:
            (folder / name).write_bytes(b"x" * self.wrong.get(name, self.files[name]))
        return str(folder)

    def hf_hub_download(self, repo_id, filename, revision=None, local_dir=None, token=None, force_download=False):
        assert force_download and revision == SHA
        self.refetched.append(filename)
        size = self.files[filename] if self.refetch_fixes else self.wrong[filename]
        (Path(local_dir) / filename).write_bytes(b"x" * size)
        return str(Path(local_dir) / filename)


@pytest.fixture
def fake(monkeypatch) -> FakeHub:
    return FakeHub().install(monkeypatch)


def test_downloads_only_needed_files_at_the_listed_commit(tmp_path, fake):
    path = download(local_dir=tmp_path, token=TOKEN)
    assert path == tmp_path
    (call,) = fake.snapshot_calls
    assert sorted(call["allow_patterns"]) == sorted(NEEDED)
    assert call["revision"] == SHA  # the branch or tag is resolved once; every file comes from that commit
    assert not (tmp_path / "README.md").exists()


def test_revision_is_one_constant(monkeypatch, tmp_path, fake):
    asked = []
    real = hub.list_remote
    monkeypatch.setattr(hub, "list_remote", lambda repo, rev, token=None: asked.append(rev) or real(repo, rev, token))
    monkeypatch.setattr(hub, "DEMO_REVISION", "v-pinned")
    download(local_dir=tmp_path)
    download("someone/other-model", local_dir=tmp_path)
    assert asked == ["v-pinned", "main"]


def test_wrong_size_file_is_fetched_again(tmp_path, monkeypatch, capsys):
    fake = FakeHub(wrong={"model-00002-of-00003.safetensors": 123}).install(monkeypatch)
    download(local_dir=tmp_path)
    assert fake.refetched == ["model-00002-of-00003.safetensors"]
    assert (tmp_path / "model-00002-of-00003.safetensors").stat().st_size == 200
    assert "fetching it again" in capsys.readouterr().err


def test_files_without_a_listed_size_are_not_refetched(tmp_path, monkeypatch):
    files = {**FILES, "tokenizer.json": None}
    fake = FakeHub(files=files).install(monkeypatch)
    fake.snapshot_download = lambda repo_id, allow_patterns=None, local_dir=None, **kw: _write(
        local_dir, allow_patterns
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    assert download(local_dir=tmp_path) == tmp_path
    assert fake.refetched == []


def _write(folder, names) -> str:
    for name in names:
        (Path(folder) / name).write_bytes(b"x" * (FILES[name] + (name == "tokenizer.json")))
    return str(folder)


def test_file_that_stays_wrong_is_named(tmp_path, monkeypatch):
    fake = FakeHub(wrong={"model-00003-of-00003.safetensors": 7}).install(monkeypatch)
    fake.refetch_fixes = False
    with pytest.raises(DownloadError, match=r"model-00003-of-00003.safetensors: expected 200 B, found 7 B"):
        download(local_dir=tmp_path)


def test_disk_space_is_checked_before_downloading(tmp_path, monkeypatch, fake):
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**12, used=0, free=1000))
    with pytest.raises(DownloadError, match="not enough disk space"):
        download(local_dir=tmp_path)
    assert fake.snapshot_calls == []


def test_files_already_complete_do_not_count_against_disk_space(tmp_path, monkeypatch, fake):
    for name, size in NEEDED.items():
        if name != "tokenizer.json":
            (tmp_path / name).write_bytes(b"x" * size)
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**12, used=0, free=100))
    download(local_dir=tmp_path)  # only tokenizer.json (80 B) is missing


def test_disk_full_while_downloading(tmp_path, fake):
    fake.snapshot_error = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DownloadError, match="ran out of disk space.*resumes"):
        download(local_dir=tmp_path)


@pytest.mark.parametrize(
    "error",
    [
        lambda: _http_error(hf_errors.GatedRepoError, 401, "Cannot access gated repo"),
        lambda: _http_error(hf_errors.RepositoryNotFoundError, 401, "Repository Not Found"),
        lambda: _http_error(hf_errors.HfHubHTTPError, 403, f"Forbidden for token {TOKEN}"),
    ],
)
def test_gated_or_unauthorized_explains_the_token(tmp_path, fake, error, capsys):
    fake.snapshot_error = error()
    with pytest.raises(DownloadError) as info:
        download(local_dir=tmp_path, token=TOKEN)
    message = str(info.value)
    assert "HF_TOKEN" in message and "Colab" in message
    assert TOKEN not in message and TOKEN not in capsys.readouterr().err
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_other_hub_errors_are_relayed_without_the_token(tmp_path, fake):
    fake.snapshot_error = _http_error(hf_errors.HfHubHTTPError, 500, f"Server Error for Bearer {TOKEN}")
    with pytest.raises(DownloadError, match="the hub answered with an error: 500 Server Error") as info:
        download(local_dir=tmp_path, token=TOKEN)
    assert TOKEN not in str(info.value) and "***" in str(info.value)


def test_gated_listing_is_explained_too(tmp_path, fake):
    fake.info_error = _http_error(hf_errors.GatedRepoError, 403)
    with pytest.raises(DownloadError, match="gated"):
        download(local_dir=tmp_path)


def test_missing_revision_names_the_constant(tmp_path, fake):
    fake.info_error = _http_error(hf_errors.RevisionNotFoundError, 404)
    with pytest.raises(DownloadError, match="DEMO_REVISION"):
        download(local_dir=tmp_path)


@pytest.mark.parametrize(
    "error",
    [
        lambda: ConnectionError("Name or service not known"),
        lambda: TimeoutError("timed out"),
        lambda: hf_errors.OfflineModeIsEnabled("HF_HUB_OFFLINE=1"),
        lambda: _library_connect_error(),
    ],
)
def test_no_network_and_no_local_copy(tmp_path, fake, error):
    fake.info_error = error()
    with pytest.raises(DownloadError, match="could not reach the Hugging Face hub"):
        download(local_dir=tmp_path / "empty")


def _library_connect_error() -> Exception:
    """The HTTP library's own connect error (not an OSError in httpx-based huggingface_hub)."""
    lib = sys.modules[hf_errors.Response.__module__.split(".")[0]]
    return lib.ConnectError("[Errno -2] Name or service not known")


def test_network_lost_during_snapshot(tmp_path, fake):
    fake.snapshot_error = hf_errors.LocalEntryNotFoundError("cannot find the appropriate snapshot folder")
    with pytest.raises(DownloadError, match="could not reach"):
        download(local_dir=tmp_path)


def test_offline_uses_a_complete_earlier_download(tmp_path, fake, capsys):
    write_tiny_checkpoint(tmp_path)
    fake.info_error = ConnectionError("offline")
    assert download(local_dir=tmp_path) == tmp_path
    assert "unreachable" in capsys.readouterr().err


def test_offline_refuses_an_incomplete_earlier_download(tmp_path, fake):
    write_tiny_checkpoint(tmp_path)
    next(tmp_path.glob("model-00003-*.safetensors")).write_bytes(b"short")
    fake.info_error = ConnectionError("offline")
    with pytest.raises(DownloadError, match="no complete local copy"):
        download(local_dir=tmp_path)


def test_unknown_errors_are_not_hidden(tmp_path, fake):
    fake.snapshot_error = KeyError("bug")
    with pytest.raises(KeyError):
        download(local_dir=tmp_path)


def write_tiny_checkpoint(root: Path) -> None:
    """A tiny valid checkpoint (shapes right, bytes random) that ``Checkpoint.open(verify=True)`` accepts."""
    cfg = dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=2,
        vocab_size=64,
    )
    config, quant = MixtralConfig(**cfg), QuantConfig()
    n = 1 + config.num_local_experts

    def tensors(specs):
        return {k: torch.zeros(s, dtype=d) for k, (d, s) in specs.items()}

    trunk = tensors(expected_trunk_tensors(config, quant))
    save_file(trunk, root / shard_name(1, n))
    weight_map = dict.fromkeys(trunk, shard_name(1, n))
    for e in range(config.num_local_experts):
        expert = tensors(expected_expert_tensors(config, quant))
        save_file(expert, root / shard_name(2 + e, n))
        weight_map |= {expert_prefix(0, e) + k: shard_name(2 + e, n) for k in expert}
    (root / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    (root / CONFIG_FILE).write_text(json.dumps({"model_type": "mixtral", **cfg}))


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
    import colab_helpers.tiny as tiny

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
    import colab_helpers.tiny as tiny

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
