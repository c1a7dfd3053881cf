"""One set of figures: ``colab_helpers.sim.figures`` is the single source, and the README, docs and notebooks agree with
it.

The checkpoint size is re-derived from the format; the twin rows are checked for internal consistency (tok/s is
1 / ms per token, never above the PCIe bound of their own loads); every checkpoint size that a README, doc or
notebook line quotes must be one of the canonical spellings; the README and docs/benchmarks.md quote the headline
projection; notebooks never type a speed into a cell (they print ``figures``).
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from colab_helpers.sim import figures
from colab_helpers.sim.timing import TimingModel

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SIZE = re.compile(r"(?<![\d.,])(\d{1,2}(?:\.\d+)?|\d{1,3}(?:,\d{3}){3})\s?(GB|GiB|bytes|B)\b")
CHECKPOINT_CONTEXT = re.compile(r"checkpoint|shards|pre-quantized|quantized\)|in all|the total|whole model", re.I)
SPEED_IN_CELL = re.compile(r"\d+(?:\.\d+)?\s*(?:tok/s|tokens/s|tokens per second)")


def _texts() -> list[tuple[str, str]]:
    """(where, text) for the README, every doc and every notebook cell."""
    out = [("README.md", (ROOT / "README.md").read_text())]
    out += [(f"docs/{p.name}", p.read_text()) for p in sorted((ROOT / "docs").glob("*.md"))]
    for path in NOTEBOOKS:
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            out.append((f"{path.name} cell {i}", cell.source))
    return out


def _checkpoint_quotes(text: str) -> list[str]:
    """Sizes between 16 and 19.5 GB/GiB (or 1.6e10-1.95e10 bytes) on lines that speak of the checkpoint."""
    quotes = []
    for line in text.splitlines():
        if not CHECKPOINT_CONTEXT.search(line):
            continue
        for number, unit in SIZE.findall(line):
            value = float(number.replace(",", ""))
            if unit in ("GB", "GiB") and 16 <= value <= 19.5 or unit in ("bytes", "B") and 1.6e10 <= value <= 1.95e10:
                quotes.append(f"{number} {unit}")
    return quotes


def _canonical(quote: str) -> bool:
    number, unit = quote.split(" ")
    return quote in figures.checkpoint_size_spellings() or (
        unit in ("bytes", "B") and number == f"{figures.CHECKPOINT_BYTES:,}"
    )


def _quotes_number(text: str, spellings: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![\d.]){re.escape(s)}(?![\d])", text) for s in spellings)


def test_the_checkpoint_size_is_the_formats_own() -> None:
    from colab_helpers.walkthroughs.fits import mixtral_components

    components = mixtral_components()
    assert sum(c.stored_bytes for c in components) == figures.CHECKPOINT_BYTES == 18_239_794_688
    assert components[0].stored_bytes == 256 * figures.EXPERT_BYTES
    assert figures.checkpoint_size() == "18,239,794,688 B = 18.24 GB = 16.99 GiB"


def test_one_expert_copy_and_the_pcie_bound_match_the_timing_model() -> None:
    timing = TimingModel()
    assert figures.EXPERT_BYTES == timing.expert_bytes and figures.H2D_BYTES_PER_S == timing.h2d_bytes_per_s
    assert round(figures.expert_copy_ms(), 2) == 5.40
    assert figures.pcie_bound_tok_s(10) == pytest.approx(1e3 / (10 * figures.expert_copy_ms()))


@pytest.mark.parametrize("run", figures.twin_rows(), ids=lambda r: r.configuration)
def test_every_twin_row_is_consistent_and_says_how_it_was_made(run: figures.TwinRun) -> None:
    assert run.command.startswith("python -m colab_helpers twin") and figures.TWIN_DATE
    assert run.tok_s == pytest.approx(1e3 / run.total_ms, rel=5e-3)  # tok/s is 1 / time per token
    assert run.tok_s <= figures.pcie_bound_tok_s(run.loads_per_token)  # nothing beats the bus
    assert run.h2d_busy_ms <= run.total_ms and 0 < run.hit_rate <= 1
    # demand misses + speculative copies, less those served by a freed slot still holding the expert
    assert run.loads_per_token <= run.demand_misses_per_token + run.speculative_per_token + 0.01


def test_the_replay_table_backs_what_the_notebook_says_about_lfu_decay() -> None:
    rates = figures.REPLAY_HIT_RATES
    for policy, row in rates.items():
        assert len(row) == len(figures.REPLAY_KS)
        assert all(b >= h for b, h in zip(rates["belady"], row, strict=True)), policy
    beats = [d > r for d, r, k in zip(rates["lfu_decay"], rates["lru"], figures.REPLAY_KS, strict=True) if k >= 3]
    assert all(beats), "lfu_decay is the default because it beats lru on the real trace at every K >= 3"


def test_readme_docs_and_notebooks_quote_one_checkpoint_size() -> None:
    wrong = [f"{where}: {q}" for where, text in _texts() for q in _checkpoint_quotes(text) if not _canonical(q)]
    assert not wrong, f"checkpoint size must be one of {figures.checkpoint_size_spellings()}: {wrong}"
    assert "18,239,794,688" in (ROOT / "docs" / "checkpoint_format.md").read_text()
    for name in ("quickstart.ipynb", "how_mixtral_fits.ipynb"):
        cells = nbformat.read(ROOT / "notebooks" / name, as_version=4).cells
        assert any("checkpoint_size()" in c.source for c in cells if c.cell_type == "code"), name


def test_the_checkpoint_size_check_catches_the_old_spellings() -> None:
    assert _checkpoint_quotes("downloads the pre-quantized shards (≈17 GB)") == ["17 GB"]
    assert not _canonical("17 GB") and not _canonical("18 GB") and _canonical("18.24 GB")
    assert _canonical("16.99 GiB") and _canonical("18,239,794,688 bytes")
    assert _checkpoint_quotes("a GPU with 17.5 GB free") == []  # not about the checkpoint


@pytest.mark.parametrize("doc", ["README.md", "docs/benchmarks.md"])
def test_readme_and_benchmarks_quote_the_projected_speed(doc: str) -> None:
    text = (ROOT / doc).read_text()
    for run in (figures.PROJECTED, figures.TWIN_NO_PREFETCH):
        assert _quotes_number(text, figures.tok_s_spellings(run)), (
            f"{doc} does not quote the projection {run.configuration!r} = {figures.tok_s_spellings(run)} "
            f"of colab_helpers/sim/figures.py: update one or the other (with the command and date)"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_print_speeds_from_figures_instead_of_typing_them(path: Path) -> None:
    for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
        typed = SPEED_IN_CELL.findall(cell.source)
        assert not typed, f"{path.name} cell {i} types {typed}: print colab_helpers.sim.figures instead"


def test_remeasure_reruns_each_rows_command_on_the_trace_and_flags_what_moved() -> None:
    import json

    seen = []

    def fake_twin(argv: list[str]) -> str:
        seen.append(argv)
        command = " ".join("TRACE.npz" if a == "/data/trace.npz" else a for a in argv)
        row = next(r for r in figures.twin_rows() if r.command == command)
        tok_s = 12.0 if "--no-prefetch" in argv else row.tok_s
        return "report\n" + json.dumps(
            {"tok_s": tok_s, "loads_per_token": row.loads_per_token, "hit_rate": row.hit_rate}
        )

    report = figures.remeasure("/data/trace.npz", fake_twin).splitlines()
    assert len(seen) == len(figures.twin_rows()) and all("/data/trace.npz" in argv for argv in seen)
    assert all(argv[:3] == ["python", "-m", "colab_helpers"] and argv[3] == "twin" for argv in seen)
    off = report[[r.configuration for r in figures.twin_rows()].index("prefetch off")]
    assert off == f"prefetch off: changed: tok/s {figures.TWIN_NO_PREFETCH.tok_s} -> 12"
    moved = sum("--no-prefetch" in r.command for r in figures.twin_rows())  # the fake moved each of those rows
    assert sum(line.endswith("unchanged") for line in report) == len(report) - moved
