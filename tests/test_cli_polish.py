"""What a user of the command line touches first (issue 22): convert's refusals and output streams, empty prompts,
``record`` → ``replay`` / ``twin``, ``twin`` without a trace, ``--help`` texts."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from colab_helpers import cli
from colab_helpers.planning import plan_cli
from colab_helpers.sim import trace, twin_cli
from colab_helpers.sim.random_mixtral import random_mixtral, save_hub_format, small_config
from colab_helpers.weights import convert as cv
from colab_helpers.weights.tiny import tiny_model_path

REPO = Path(__file__).resolve().parents[1]


def _run(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "colab_helpers", *argv], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A small bf16 hub-format Mixtral (one layer: converts in seconds)."""
    return save_hub_format(random_mixtral(small_config(layers=1)), tmp_path_factory.mktemp("src") / "bf16", "200KB")


# ---- convert -------------------------------------------------------------------------------------


def test_convert_prints_its_summary_on_stdout_and_refuses_its_own_output(source, tmp_path, capsys) -> None:
    """Jupyter shows stderr in red: a successful conversion's plan and "done" line go to stdout. Converting the
    result again (or the embedded model) is refused up front in one line, --plan-only included, and writes nothing."""
    out = tmp_path / "q"
    cv.convert(source, out, optimize=False, progress=False)
    captured = capsys.readouterr()
    assert "time:" in captured.out and f"done: {out}" in captured.out
    assert captured.err == ""

    for quantized in (out, Path(tiny_model_path())):
        for extra in ([], ["--plan-only"]):
            again = tmp_path / "again"
            assert cv.cli_main([str(quantized), str(again), *extra]) == 2
            captured = capsys.readouterr()
            err = captured.err.strip().splitlines()
            assert len(err) == 1 and "already quantized" in err[0] and "load_model" in err[0], err
            assert "time:" not in captured.out, "no plan is printed for a source that cannot convert"
            assert not again.exists()


@pytest.mark.parametrize("kind", ["missing", "llama"])
def test_a_refused_convert_creates_nothing(tmp_path, capsys, kind) -> None:
    src = tmp_path / "llama"
    if kind == "llama":
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    out = tmp_path / "out"
    assert cv.cli_main([str(src), str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not out.exists(), sorted(str(p) for p in out.rglob("*"))


def test_a_refused_hub_source_leaves_nothing_behind(tmp_path, capsys, monkeypatch) -> None:
    """A hub source's config is fetched into OUT/.convert/source before it can be judged: when it is refused
    (here: already quantized), that folder goes again."""
    folder = Path(tiny_model_path())
    fetched: list[Path] = []

    def download(repo_id, name, revision, local_dir, token):
        target = local_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((folder / name).read_bytes())
        fetched.append(target)
        return target

    listing = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    monkeypatch.setattr(cv, "_hub_listing", lambda repo_id, revision, token: ("c0ffee", listing))
    monkeypatch.setattr(cv, "_hub_download", download)
    out = tmp_path / "out"
    assert cv.cli_main(["owner/tiny", str(out)]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert fetched and fetched[0].is_relative_to(out), "the config really went into the output folder first"
    assert not out.exists()


def test_a_refused_convert_keeps_an_existing_output_folder(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cv.cli_main([str(tmp_path / "missing"), str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ---- generate --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   "])
def test_generate_refuses_an_empty_prompt_in_one_line(prompt) -> None:
    run = _run("generate", prompt, "--device", "cpu")
    assert run.returncode == 2, run.stderr
    assert (
        run.stderr.strip()
        == 'error: empty prompt: give the text to answer, e.g. generate "What is the capital of France?"'
    )
    assert run.stdout == "" and "model:" not in run.stderr, "refused before anything loads"


# ---- record -> replay / twin -------------------------------------------------------------------------


def test_record_saves_a_trace_that_replay_and_twin_read(tmp_path) -> None:
    path = tmp_path / "tiny.npz"
    run = _run("record", "What is 2 + 3?", "Recite the Zen of Python.", "--out", str(path), "--max-new-tokens", "12")
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"saved {path}: 2 sequence(s)" in run.stderr and "replay" in run.stderr

    arrays = trace.load_trace_arrays(path)
    assert trace.sequence_names(arrays) == ["prompt1", "prompt2"]
    decode = arrays["prompt1_decode_experts"]
    assert decode.ndim == 3 and decode.shape[1:] == (4, 2) and len(decode) >= 1  # tiny model: 4 layers, top-2
    assert int(arrays["num_experts"]) == 8 and ((decode >= 0) & (decode < 8)).all()
    assert arrays["prompt1_prefill_experts"].shape[0] > 1 and "prompt1_decode_guesses" in arrays

    model = str(tiny_model_path())
    replayed = _run("replay", str(path), "--experts-on-device", "3", "--json", "--model", model)
    assert replayed.returncode == 0, replayed.stderr
    rates = json.loads(replayed.stdout)
    assert set(rates) >= {"lru", "lfu_decay", "belady"} and all(0 <= r <= 1 for r in rates.values())
    assert rates["belady"] >= max(rates["lru"], rates["lfu_decay"])

    twin = _run("twin", "--trace", str(path), "--model", model, "--json", "--tokens", "4", "--warmup", "2")
    assert twin.returncode == 0, twin.stderr
    got = json.loads(twin.stdout.strip().splitlines()[-1])
    assert got["routing"] == f"the recorded routing trace {path.name}" and got["tok_s"] > 0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["record", "hi", "--out", "trace.txt"], "a routing trace is a .npz file"),
        (["record", "hi", "--out", "/no/such/folder/t.npz"], "does not exist"),
        (["record", "hi", ""], "empty prompt"),
    ],
)
def test_record_mistakes_are_one_line_before_loading(argv, needle) -> None:
    run = _run(*argv)
    assert run.returncode == 2 and needle in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "model:" not in run.stderr


# ---- twin ------------------------------------------------------------------------------------------


def test_twin_without_a_trace_runs_on_routing_labelled_synthetic(capsys, monkeypatch) -> None:
    monkeypatch.delenv("COLAB_HELPERS_TRACE", raising=False)
    assert twin_cli.cli_main(["--json", "--tokens", "2", "--warmup", "0"]) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out.strip().splitlines()[-1])
    assert got["routing"].startswith("SYNTHETIC routing") and got["tok_s"] > 0
    assert any(line.startswith("routing: SYNTHETIC") for line in captured.out.splitlines())
    assert "SYNTHETIC" in captured.err and "record" in captured.err
    assert "shared/" not in captured.out and "PERFORMANCE.md" not in captured.out
    cited = {word.strip("().,;'") for word in captured.out.split() if word.startswith(("docs/", "(docs/"))}
    assert cited and all((REPO / c.lstrip("(")).is_file() for c in cited), cited  # it cites docs of this repo


def test_twin_routing_trace_still_refuses_without_one(capsys, monkeypatch) -> None:
    monkeypatch.delenv("COLAB_HELPERS_TRACE", raising=False)
    assert twin_cli.cli_main(["--routing", "trace"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trace" in err[0] and "record" in err[0]


# ---- --help ----------------------------------------------------------------------------------------


def _parsers():
    top = cli.build_parser()
    yield "python -m colab_helpers", top
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("generate", "chat", "record"):
        yield name, sub.choices[name]
    from colab_helpers.weights import convert

    yield "plan", plan_cli._parser()
    yield "convert", convert._parser()
    yield "replay", trace._parser()
    yield "twin", twin_cli._parser()


@pytest.mark.parametrize("name, parser", list(_parsers()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_option_says_what_it_does_and_its_default(name, parser) -> None:
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        text = action.help or ""
        assert text, f"{name} {action.option_strings or action.dest}: no help"
        is_flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if action.option_strings and not is_flag:
            assert "default" in text, f"{name} {action.option_strings}: help names no default: {text!r}"
    assert "``" not in parser.format_help(), "reST markup shown literally"


def test_top_level_help_is_plain_text() -> None:
    run = _run("--help")
    assert run.returncode == 0 and "``" not in run.stdout and "python -m colab_helpers: generate" in run.stdout
    assert "record" in run.stdout


# ---- running the tests -------------------------------------------------------------------------------


def test_the_test_docs_say_how_long_and_every_skip_says_why() -> None:
    import ast
    import re

    addopts = re.search(r'^addopts = "([^"]*)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert addopts and "-rs" in addopts.group(1).split(), "skipped tests must list their reasons"
    testing = (REPO / "docs" / "testing.md").read_text()
    assert "## Running the tests" in testing and "9 minutes on 2 CPU cores" in testing and "-rs" in testing
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("pytest.mark.skipif", "pytest.mark.skip"):
                where = f"{path.name}:{node.lineno}"
                assert any(k.arg == "reason" for k in node.keywords), f"{where}: a skip without a reason"
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "pytest.skip":
                assert node.args or node.keywords, f"{path.name}:{node.lineno}: pytest.skip() without a reason"
