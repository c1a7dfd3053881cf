"""``scripts/release.py``: every badge, install cell, README mention and the hub pin agree; one run restamps them."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "release.py"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _load():
    spec = importlib.util.spec_from_file_location("release", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["release"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


release = _load()


def _check_agreement(root: Path) -> tuple[str, str, str | None]:
    found = list(release.stamps(root))
    repos = {s.repo for s in found if s.repo is not None}
    refs = {s.ref for s in found if s.kind != "demo_revision"}
    assert len(repos) == 1, f"several repositories named: {sorted(repos)}"
    assert len(refs) == 1, f"several refs named: {sorted(refs)}"
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        kinds = {s.kind for s in found if s.file == f"notebooks/{path.name}"}
        want = {"badge", "install"} | ({"kaggle_badge"} if path.name in release.KAGGLE_NOTEBOOKS else set())
        assert kinds == want, f"{path.name} has {kinds}"
    readme_badges = [s for s in found if s.kind == "badge" and s.file == "README.md"]
    assert len(readme_badges) == len(list((root / "notebooks").glob("*.ipynb"))), readme_badges
    readme_kaggle = [s for s in found if s.kind == "kaggle_badge" and s.file == "README.md"]
    assert len(readme_kaggle) == len(release.KAGGLE_NOTEBOOKS), readme_kaggle
    assert any(s.kind == "readme" for s in found), "the README sentence naming repository and release"
    (demo,) = [s.ref for s in found if s.kind == "demo_revision"]
    assert demo == "main" or release.COMMIT.fullmatch(demo), f"DEMO_REVISION must be 'main' or a commit: {demo!r}"
    return repos.pop(), refs.pop(), demo


def test_every_badge_install_cell_and_readme_link_agree() -> None:
    _check_agreement(ROOT)


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "notebooks", root / "notebooks")
    (root / "colab_helpers" / "weights").mkdir(parents=True)
    shutil.copy(ROOT / "colab_helpers" / "weights" / "hub.py", root / "colab_helpers" / "weights" / "hub.py")
    shutil.copy(ROOT / "README.md", root / "README.md")
    return root


def test_release_restamps_everything_once_and_is_idempotent(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    old_repo, old_ref, _ = _check_agreement(root)
    commit = "0123456789abcdef0123456789abcdef01234567"
    args = ["someone/mixtral-on-t4", "v9.8.7", "--demo-revision", commit, "--root", str(root)]
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert _check_agreement(root) == ("someone/mixtral-on-t4", "v9.8.7", commit)
    for path in [*root.glob("notebooks/*.ipynb"), root / "README.md"]:
        assert old_repo not in path.read_text(), f"{path.name} still names {old_repo}"
    for path in root.glob("notebooks/*.ipynb"):
        nbformat.validate(nbformat.read(path, as_version=4))
        badge = next(s for s in release.stamps(root) if s.kind == "badge" and s.file.endswith(path.name))
        assert badge.ref == "v9.8.7" and badge.repo == "someone/mixtral-on-t4"
    assert f'DEMO_REVISION = "{commit}"' in (root / "colab_helpers" / "weights" / "hub.py").read_text()
    again = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing to change" in again.stdout


def test_kaggle_badges_open_the_same_github_notebook_as_the_colab_badges() -> None:
    """Kaggle's form: kaggle.com/kernels/welcome?src=<the notebook's GitHub blob URL> (same repo, ref and path)."""
    for path in [*NOTEBOOKS, ROOT / "README.md"]:
        text = path.read_text()
        colab = {m["path"]: (m["repo"], m["ref"]) for m in release.BADGE.finditer(text)}
        kaggle = list(release.KAGGLE_BADGE.finditer(text))
        for m in kaggle:
            assert Path(m["path"]).name in release.KAGGLE_NOTEBOOKS, f"{path.name}: Kaggle badge for {m['path']}"
            assert colab[m["path"]] == (m["repo"], m["ref"]), f"{path.name}: Kaggle and Colab badges disagree"
            assert "https://kaggle.com/static/images/open-in-kaggle.svg" in text
        if path.name in release.KAGGLE_NOTEBOOKS:
            assert len(kaggle) == 1, f"{path.name}: one Open-in-Kaggle badge"


def test_release_restamps_the_kaggle_badges(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    assert release.main(["me/moe-on-t4", "v2.0.0", "--root", str(root)]) == 0
    badges = [s for s in release.stamps(root) if s.kind == "kaggle_badge"]
    assert len(badges) == 2 * len(release.KAGGLE_NOTEBOOKS)  # the notebook's own and the README's
    assert {(s.repo, s.ref) for s in badges} == {("me/moe-on-t4", "v2.0.0")}
    text = (root / "notebooks" / release.KAGGLE_NOTEBOOKS[0]).read_text()
    want = f"https://kaggle.com/kernels/welcome?src=https://github.com/me/moe-on-t4/blob/v2.0.0/notebooks/{release.KAGGLE_NOTEBOOKS[0]}"
    assert want in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["not-a-repo", "v1"], "OWNER/NAME"),
        (["a/b", "v1", "--demo-revision", "main"], "40-hex"),
        (["a/b", "bad ref!"], "ref must be"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(tmp_path: Path, args, message) -> None:
    root = _copy(tmp_path)
    before = {p: p.read_text() for p in root.rglob("*") if p.is_file()}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--root", str(root)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert {p: p.read_text() for p in root.rglob("*") if p.is_file()} == before, "nothing changed"


def test_readme_two_commands_section_shows_exactly_two_commands_and_links_inside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Fresh machine: the two commands", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("\n", 1)[1] for b in section.split("```")[1::2]]
    install, commands = blocks[0], blocks[-1]
    lines = [ln for ln in commands.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(blocks) == 2 and len(lines) == 2, f"two commands, got {lines}"
    assert "download.pytorch.org/whl/cpu" in install and "CPU build of torch first" in section
    for target in re.findall(r"\]\(([^)]+)\)", readme):
        if target.startswith(("https://colab.research.google.com/", "https://kaggle.com/")):
            continue  # the Colab and Kaggle badges: checked above, they open this repository's notebooks
        assert "://" not in target and not target.startswith(".."), f"README links outside the repository: {target}"
        assert (ROOT / target.split("#")[0]).exists(), f"README links to a missing file: {target}"
