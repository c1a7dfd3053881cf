"""Static checks of the committed notebooks: what breaks "Open in Colab → Run all" without running anything.

Valid nbformat, the T4 preselected, a badge that opens this very file, one Colab-guarded install cell
before anything imports the package or torch, no saved widget state, no outputs (except the expected
text of ``# NBVAL_CHECK_OUTPUT`` cells, which nbval compares against), markers nbval understands.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
REQUIRED = {"quickstart", "how_mixtral_fits", "hqq_quantization", "expert_cache_and_prefetch"}
BADGE = re.compile(
    r"\[!\[Open In Colab\]\(https://colab\.research\.google\.com/assets/colab-badge\.svg\)\]"
    r"\(https://colab\.research\.google\.com/github/(?P<repo>[\w.-]+/[\w.-]+)/blob/(?P<ref>[\w.-]+)/(?P<path>[\w./-]+\.ipynb)\)"
)
NBVAL_MARKERS = {"# NBVAL_CHECK_OUTPUT", "# NBVAL_SKIP", "# NBVAL_IGNORE_OUTPUT", "# NBVAL_RAISES_EXCEPTION"}
MAX_CODE_LINES = 25  # thin cells: logic belongs in colab_helpers


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _code_cells(nb) -> list[tuple[int, str]]:
    return [(i, c.source) for i, c in enumerate(nb.cells) if c.cell_type == "code"]


def _imports(source: str) -> set[str]:
    """Top-level package names a cell imports (cells are plain Python: no magics in these notebooks)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _install_cell(nb) -> tuple[int, str]:
    cells = [(i, s) for i, s in _code_cells(nb) if "pip" in s and "install" in s]
    assert len(cells) == 1, "exactly one install cell"
    return cells[0]


def _string_constant(source: str, name: str) -> str:
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
            assert isinstance(node.value, ast.Constant), f"{name} must be a plain string"
            return node.value.value
    raise AssertionError(f"{name} is not defined in the install cell")


def test_the_required_notebooks_exist() -> None:
    assert REQUIRED <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_valid_nbformat_with_t4_metadata_and_no_widget_state(path: Path) -> None:
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.nbformat_minor >= 4
    meta = nb.metadata
    assert meta.get("accelerator") == "GPU"
    assert meta.get("colab", {}).get("gpuType") == "T4"
    assert meta.get("kernelspec", {}).get("name") == "python3"
    assert "widgets" not in meta, "saved widget state must be stripped"
    for cell in nb.cells:
        assert "widgets" not in cell.get("metadata", {})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_title_and_badge_that_opens_this_notebook(path: Path) -> None:
    first = _read(path).cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    match = BADGE.search(first.source)
    assert match, "the first cell needs the Open in Colab badge"
    assert match["path"] == f"notebooks/{path.name}"
    _, install = _install_cell(_read(path))
    assert _string_constant(install, "REPO_URL") == f"https://github.com/{match['repo']}"


def test_one_repository_and_one_ref_everywhere() -> None:
    repos, refs = set(), set()
    for path in NOTEBOOKS:
        nb = _read(path)
        repos |= {m["repo"] for c in nb.cells if c.cell_type == "markdown" for m in BADGE.finditer(c.source)}
        _, install = _install_cell(nb)
        refs.add(_string_constant(install, "REF"))
    assert len(repos) == 1, f"one OWNER/REPO placeholder for all badges, found {repos}"
    assert len(refs) == 1, f"one pinned REF for all install cells, found {refs}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_guarded_install_cell_comes_before_any_import_of_the_package_or_torch(path: Path) -> None:
    nb = _read(path)
    index, source = _install_cell(nb)
    tree = ast.parse(source)
    # on Colab; a notebook with an Open-in-Kaggle badge installs on Kaggle too
    kaggle = "kaggle.com/kernels/welcome?src=" in nb.cells[0].source
    guard = "'google.colab' in sys.modules" + (" or 'KAGGLE_KERNEL_RUN_TYPE' in os.environ" if kaggle else "")
    guards = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == guard]
    assert len(guards) == 1, f"the install must run only on Colab{' or Kaggle' if kaggle else ''}: if {guard}:"
    guarded_calls = {ast.unparse(n) for g in guards for n in ast.walk(g) if isinstance(n, ast.Call)}
    all_calls = {ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert all_calls == guarded_calls, "nothing but the guarded install may run in the install cell"
    assert _imports(source) <= {"sys", "os", "subprocess"}
    pip_args = " ".join(ast.unparse(n) for n in ast.walk(guards[0]) if isinstance(n, ast.List))
    assert "-q" in pip_args, "a quiet install"
    assert not re.search(r"\btorch\b|\bnumpy\b|--upgrade|-U\b|--force", pip_args), "never touch torch or numpy"
    assert "{REPO_URL}@{REF}" in source, "install from the pinned ref"
    for i, cell in _code_cells(nb):
        if i < index:
            early = _imports(cell) & {"colab_helpers", "torch", "transformers", "numpy"}
            assert not early, f"cell {i} imports {early} before the install cell"
    later = [i for i, cell in _code_cells(nb) if _imports(cell) & {"colab_helpers", "torch"}]
    assert later and min(later) > index, "the package is imported after the install cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_cleared_except_expected_text(path: Path) -> None:
    for i, cell in enumerate(_read(path).cells):
        if cell.cell_type != "code":
            continue
        if "# NBVAL_CHECK_OUTPUT" in cell.source.splitlines():
            assert cell.outputs, f"cell {i}: a checked cell stores the output nbval compares against"
            assert all(o.output_type == "stream" for o in cell.outputs), f"cell {i}: only text is compared"
        else:
            assert cell.outputs == [] and cell.execution_count is None, f"cell {i} has committed output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_cells_are_thin_plain_python_with_valid_nbval_markers(path: Path) -> None:
    for i, source in _code_cells(_read(path)):
        ast.parse(source)  # no magics or shell escapes: the same cell runs anywhere
        assert len(source.splitlines()) <= MAX_CODE_LINES, f"cell {i}: move the logic into colab_helpers"
        for line in source.splitlines():
            if "NBVAL" in line:
                assert line.strip() in NBVAL_MARKERS, f"cell {i}: {line!r} is not a marker nbval recognises"
        assert "userdata" not in source, "never read Colab secrets in a notebook cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_setting_is_commented(path: Path) -> None:
    settings = 0
    for _, source in _code_cells(_read(path)):
        tree = ast.parse(source)
        if not tree.body or not all(
            isinstance(n, ast.Assign) and all(getattr(t, "id", "").isupper() for t in n.targets) for n in tree.body
        ):
            continue  # not a settings cell
        commented = {
            t.start[0] for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT
        }
        for node in tree.body:
            assert node.lineno in commented, (
                f"setting {ast.unparse(node.targets[0])} needs a comment saying what it does"
            )
        settings += len(tree.body)
    if path.stem == "quickstart":
        assert settings >= 8, "the quickstart has one settings cell with every knob"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_links_to_other_notebooks_resolve(path: Path) -> None:
    for cell in _read(path).cells:
        if cell.cell_type == "markdown":
            for target in re.findall(r"\]\(([\w.-]+\.ipynb)\)", cell.source):
                assert (NOTEBOOKS_DIR / target).is_file(), f"broken link to {target}"
