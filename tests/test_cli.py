"""Every command-line mistake ends in one line on stderr naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from colab_helpers.cli import main, user_message
from colab_helpers.planning.planner import Budget, MemoryPlanError, check_fits, plan_memory, stock_config
from colab_helpers.weights.checkpoint import QuantConfig
from colab_helpers.weights.tiny import tiny_model_path

ROOT = Path(__file__).resolve().parents[1]
TINY = str(tiny_model_path())
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, str]:
    """Things people pass by mistake: a folder that is no checkpoint, a text file, a .npy, an .npz that is no trace."""
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a checkpoint")
    text = tmp_path / "trace.npz"
    text.write_text("not a zip")
    np.save(tmp_path / "one.npy", np.zeros(3))
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    trace = tmp_path / "routing.npz"
    np.savez(trace, seq_decode_experts=np.array([[[0, 1], [2, 3]], [[4, 5], [6, 7]]], dtype=np.int8))
    return {
        "junk": str(junk),
        "text": str(text),
        "npy": str(tmp_path / "one.npy"),
        "other": str(tmp_path / "other.npz"),
        "trace": str(trace),
        "missing": str(tmp_path / "nothing-here"),
    }


def assert_one_line_exit_2(argv: list[str], capsys, expect: str) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert expect in lines[0], lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


MISTAKES = [
    # generate / chat share their options
    (["generate", "hi", "--model", TINY, "--experts-on-device", "0"], "--experts-on-device: must be at least 1"),
    (["generate", "hi", "--model", TINY, "--experts-on-device", "-1"], "must be at least 1, got -1"),
    (["chat", "--model", TINY, "--experts-on-device", "99"], "--experts-on-device 99: "),
    (["generate", "hi", "--model", TINY, "--experts-on-device", "many"], "'many' is not a whole number"),
    (["generate", "hi", "--model", TINY, "--policy", "fifo"], "invalid choice: 'fifo'"),
    (["generate", "hi", "--model", "{missing}"], "no such directory"),
    (["generate", "hi", "--model", "{junk}"], "config.json: file is missing"),
    (["generate", "hi", "--model", "{npy}"], "is a file"),
    (["generate", "hi", "--device", "tpu"], "choose cuda, cuda:N, cpu or auto"),
    (["generate", "hi", "--model", TINY, "--top-p", "2"], "--top-p: must be in (0, 1]"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
    (["generate"], "required: prompt"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: command"),
    # plan
    (["plan", "--vram-gb", "-1", "--ram-gb", "12.7"], "--vram-gb: must be a number above 0, got -1"),
    (["plan", "--vram-gb", "15", "--ram-gb", "0"], "--ram-gb: must be a number above 0, got 0"),
    (["plan", "--vram-gb", "nan", "--ram-gb", "12.7"], "must be a number above 0"),
    (["plan", "--vram-gb", "15", "--ram-gb", "12.7", "--context", "0"], "--context: must be at least 1"),
    (["plan", "--vram-gb", "15", "--ram-gb", "12.7", "--experts-on-device", "9"], "has 8 experts per layer"),
    (["plan", "--vram-gb", "15", "--ram-gb", "12.7", "--model", "{junk}"], "config.json: file is missing"),
    (["plan", "--vram-gb", "15", "--ram-gb", "12.7", "--device", "gpu"], "choose cuda"),
    # replay
    (["replay", "{missing}"], "no such file"),
    (["replay", "{text}"], "not a .npz routing trace"),
    (["replay", "{npy}"], "a single .npy array"),
    (["replay", "{other}"], "no '<name>_decode_experts' arrays"),
    (["replay", "{trace}", "--experts-on-device", "9"], "--experts-on-device 9: routing.npz has 8 experts per layer"),
    (["replay", "{trace}", "--experts-on-device", "0"], "at least 1"),
    (["replay", "{trace}", "--policies", "fifo"], "--policies: unknown fifo"),
    (["replay", "{trace}", "--half-lives", "soon"], "--half-lives"),
]


@pytest.mark.parametrize(("argv", "expect"), MISTAKES, ids=[" ".join(a)[:60] for a, _ in MISTAKES])
def test_mistake_is_one_line_and_exit_2(argv: list[str], expect: str, files, capsys) -> None:
    assert_one_line_exit_2([a.format(**files) for a in argv], capsys, expect)


@no_gpu
def test_device_cuda_without_a_gpu(capsys) -> None:
    line = assert_one_line_exit_2(["generate", "hi", "--model", TINY, "--device", "cuda"], capsys, "--device cuda")
    assert "use --device cpu" in line


@no_gpu
@pytest.mark.parametrize(
    ("argv", "missing"),
    [(["--vram-gb", "15"], "give --ram-gb"), (["--device", "cuda"], "give --vram-gb and --ram-gb")],
)
def test_plan_for_a_gpu_on_a_machine_without_one_needs_the_sizes(argv, missing, capsys) -> None:
    assert_one_line_exit_2(["plan", *argv], capsys, missing)


def test_memory_plan_error_is_one_line_with_the_reasons() -> None:
    plan = plan_memory(stock_config(), QuantConfig(), Budget.given(6, 6), "cuda")
    with pytest.raises(MemoryPlanError) as info:
        check_fits(plan)
    line = user_message(info.value)
    assert "\n" not in line and "does not fit" in line and "host RAM" in line and "what would fit" in line


def test_a_bug_keeps_its_traceback() -> None:
    assert user_message(RuntimeError("a bug")) is None and user_message(KeyError("x")) is None


def _python_m(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "colab_helpers", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def test_hub_id_while_offline_through_python_m(tmp_path: Path) -> None:
    """A real process (the hub reads HF_HUB_OFFLINE at import): one line, exit 2, no traceback."""
    out = _python_m(
        "generate", "hi", "--model", "nobody/no-such-model", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "nobody/no-such-model" in lines[0] and "could not reach the Hugging Face hub" in lines[0]


def test_plan_json_stdout_pipes_into_json_tool() -> None:
    """``plan --json | python -m json.tool``: stdout is exactly one JSON object; the report is on stderr."""
    out = _python_m("plan", "--vram-gb", "15", "--ram-gb", "12.7", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    tool = subprocess.run([sys.executable, "-m", "json.tool"], input=out.stdout, capture_output=True, text=True)
    assert tool.returncode == 0, tool.stderr
    assert json.loads(out.stdout)["fits"] is True and "FITS" in out.stderr


# ---- a converted model's tokenizer: missing, or without a chat template ------------------------------------


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE in the offloading layout with the embedded model's tokenizer files, minus its template."""
    import shutil

    from colab_helpers.sim.random_moe import random_model, small_config
    from colab_helpers.weights.checkpoint import save_checkpoint
    from colab_helpers.weights.tokenizer import load_tokenizer

    vocab = len(load_tokenizer(TINY))
    out = save_checkpoint(
        random_model(small_config("qwen3_moe", vocab_size=vocab)),
        tmp_path_factory.mktemp("qwen3") / "ckpt",
        optimize=False,
        progress=False,
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):  # no chat_template.jinja
        shutil.copy(Path(TINY) / name, out / name)
    return out


def test_a_checkpoint_without_tokenizer_files_is_one_line_naming_the_folder(qwen3_checkpoint, tmp_path, capsys):
    """transformers 5 would build an empty one-token tokenizer there and the model would answer garbage."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(qwen3_checkpoint, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    line = assert_one_line_exit_2(["generate", "hi", "--model", str(bare)], capsys, "no tokenizer files")
    assert str(bare) in line


@pytest.mark.parametrize("argv", [["generate", "hi"], ["chat"]])
def test_a_tokenizer_without_chat_template_is_one_line_before_loading(argv, qwen3_checkpoint, capsys):
    line = assert_one_line_exit_2([*argv, "--model", str(qwen3_checkpoint)], capsys, "no chat template")
    assert "--raw" in line


def test_raw_generation_needs_no_chat_template(qwen3_checkpoint, capsys):
    assert main(["generate", "--raw", "hi", "--model", str(qwen3_checkpoint), "--max-new-tokens", "3"]) == 0
    assert "stats:" in capsys.readouterr().err
