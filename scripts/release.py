"""Stamp the public repository and release ref everywhere a user meets them, in one step.

    python scripts/release.py OWNER/NAME REF [--demo-revision COMMIT]

rewrites every notebook's Open-in-Colab badge (``.../github/OWNER/NAME/blob/REF/notebooks/X.ipynb``), the
Open-in-Kaggle badges of the notebooks that suit Kaggle's two T4s (``KAGGLE_NOTEBOOKS``; Kaggle opens
``https://kaggle.com/kernels/welcome?src=<the notebook's GitHub URL>``), every install cell (``REPO_URL``,
``REF``), the README's badges and its sentence naming them, and with ``--demo-revision`` the pinned hub
commit ``colab_helpers.weights.hub.DEMO_REVISION``. Files are edited as text (notebooks keep their exact JSON
layout), and running it twice changes nothing the second time.
``stamps(root)`` lists what is stamped where; ``tests/test_release.py`` checks that they all agree.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPO_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+"
REF_RE = r"[A-Za-z0-9][A-Za-z0-9_./-]*"
BADGE = re.compile(
    rf"(https://colab\.research\.google\.com/github/)(?P<repo>{REPO_RE})/blob/(?P<ref>{REF_RE}?)/(?P<path>notebooks/[\w.-]+\.ipynb)"
)
KAGGLE_BADGE = re.compile(
    rf"(https://kaggle\.com/kernels/welcome\?src=https://github\.com/)(?P<repo>{REPO_RE})/blob/(?P<ref>{REF_RE}?)/"
    r"(?P<path>notebooks/[\w.-]+\.ipynb)"
)
KAGGLE_NOTEBOOKS = ("quantize_your_own.ipynb",)  # more RAM and disk than Colab for a conversion
# inside a notebook's JSON the quotes of the install cell are escaped (\"), in Python source they are not
REPO_URL = re.compile(rf'(REPO_URL = \\?"https://github\.com/)(?P<repo>{REPO_RE})(\\?")')
REF = re.compile(rf'(REF = \\?")(?P<ref>{REF_RE})(\\?")')
README_NAMES = re.compile(
    rf"(name the repository `)(?P<repo>{REPO_RE})(` \(a placeholder\) and\s+the release `)(?P<ref>{REF_RE})(`)"
)
DEMO_REVISION = re.compile(r'^(DEMO_REVISION = ")(?P<rev>[^"]*)(")', re.M)
COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Stamp:
    """One place that names the repository or the ref: ``kind`` is badge, kaggle_badge, install, readme or
    demo_revision."""

    file: str
    kind: str
    repo: str | None
    ref: str | None


def _files(root: Path) -> list[Path]:
    return sorted((root / "notebooks").glob("*.ipynb")) + [root / "README.md"]


def stamps(root: Path = ROOT) -> Iterator[Stamp]:
    """Every badge, install cell, README mention and the hub pin, as found now."""
    for path in _files(root):
        text = path.read_text()
        name = str(path.relative_to(root))
        for m in BADGE.finditer(text):
            yield Stamp(name, "badge", m["repo"], m["ref"])
        for m in KAGGLE_BADGE.finditer(text):
            yield Stamp(name, "kaggle_badge", m["repo"], m["ref"])
        repos, refs = [m["repo"] for m in REPO_URL.finditer(text)], [m["ref"] for m in REF.finditer(text)]
        for repo, ref in zip(repos, refs, strict=True):
            yield Stamp(name, "install", repo, ref)
        for m in README_NAMES.finditer(text):
            yield Stamp(name, "readme", m["repo"], m["ref"])
    hub = root / "colab_helpers" / "weights" / "hub.py"
    m = DEMO_REVISION.search(hub.read_text())
    yield Stamp(str(hub.relative_to(root)), "demo_revision", None, m["rev"] if m else None)


def stamp(root: Path, repo: str, ref: str, demo_revision: str | None = None) -> list[str]:
    """Rewrite every stamp to ``repo``/``ref`` (and the hub pin); returns the files that changed."""
    changed = []
    for path in _files(root):
        text = path.read_text()
        new = BADGE.sub(lambda m: f"{m[1]}{repo}/blob/{ref}/{m['path']}", text)
        new = KAGGLE_BADGE.sub(lambda m: f"{m[1]}{repo}/blob/{ref}/{m['path']}", new)
        new = REPO_URL.sub(lambda m: f"{m[1]}{repo}{m[3]}", new)
        new = REF.sub(lambda m: f"{m[1]}{ref}{m[3]}", new)
        new = README_NAMES.sub(lambda m: f"{m[1]}{repo}{m[3]}{ref}{m[5]}", new)
        if new != text:
            path.write_text(new)
            changed.append(str(path.relative_to(root)))
    if demo_revision is not None:
        hub = root / "colab_helpers" / "weights" / "hub.py"
        text = hub.read_text()
        new = DEMO_REVISION.sub(lambda m: f"{m[1]}{demo_revision}{m[3]}", text, count=1)
        if new != text:
            hub.write_text(new)
            changed.append(str(hub.relative_to(root)))
    return changed


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/release.py", description=__doc__.split("\n\n")[0])
    p.add_argument("repo", help="the public GitHub repository, OWNER/NAME")
    p.add_argument("ref", help="the release tag or commit the notebooks install and open (e.g. v0.2.0)")
    p.add_argument("--demo-revision", help="the hub commit (40 hex digits) of the pre-quantized demo checkpoint")
    p.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    problems = []
    if not re.fullmatch(REPO_RE, args.repo):
        problems.append(f"repository must be OWNER/NAME, got {args.repo!r}")
    if not re.fullmatch(REF_RE, args.ref) or args.ref.endswith("/"):
        problems.append(f"ref must be a tag, branch or commit, got {args.ref!r}")
    if args.demo_revision is not None and not COMMIT.fullmatch(args.demo_revision):
        problems.append(f"--demo-revision must be a full 40-hex commit, got {args.demo_revision!r}")
    if problems:
        print(f"release.py: {problems[0]}", file=sys.stderr)
        return 2
    changed = stamp(args.root, args.repo, args.ref, args.demo_revision)
    print(f"stamped {args.repo} @ {args.ref}: " + (", ".join(changed) if changed else "nothing to change"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
