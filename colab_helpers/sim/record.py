"""``python -m colab_helpers record PROMPT... --out TRACE.npz``: save the routing trace of any model.

``replay`` and ``twin`` need which experts every layer chose at every decode step. The real Mixtral trace
cannot be shipped (no license), so this records one from whatever model loads: the embedded tiny model on a
CPU in seconds, the real one on a GPU. Each prompt becomes one sequence (``prompt1``, ``prompt2``, …: replay
gives each a cold cache), written by ``trace.RoutingRecorder`` in the format ``trace.load_trace_arrays``
reads (``docs/cache_policies.md``).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..conversation.generation import GenerationResult, SamplingConfig
from ..usage import UsageError


def record_trace(
    model,
    tokenizer,
    prompts: Sequence[str],
    out: str | Path,
    sampling: SamplingConfig | None = None,
    raw: bool = False,
    on_text: Callable[[str], None] | None = None,
) -> tuple[Path, list[GenerationResult]]:
    """Answer every prompt with the routing recorder attached and save the trace to ``out`` (.npz)."""
    from ..conversation.generation import chat_prompt_ids, check_prompt_fits, generate_stream, planned_context
    from .trace import RoutingRecorder

    recorder = RoutingRecorder(model, name="prompt1")
    sampling = sampling or SamplingConfig()
    results = []
    with recorder:
        for i, prompt in enumerate(prompts, start=1):
            if i > 1:
                recorder.new_sequence(f"prompt{i}")
            ids = tokenizer(prompt, return_tensors="pt").input_ids if raw else chat_prompt_ids(tokenizer, prompt)
            check_prompt_fits(int(ids.shape[-1]), sampling.max_new_tokens, planned_context(model))
            results.append(generate_stream(model, tokenizer, ids, sampling, on_text=on_text))
    return recorder.save(out), results


def _check_out(out: Path) -> None:
    """Before the model loads: a name numpy keeps as given, in a folder that exists."""
    if out.suffix != ".npz":
        raise UsageError(f"--out {out}: a routing trace is a .npz file (e.g. {out.with_suffix('.npz').name})")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder")


def cmd_record(args: argparse.Namespace, load: Callable) -> int:
    """``record``: ``load(args, chat=...)`` is the CLI's model loader (passed in: this module never imports cli)."""
    from ..conversation.generation import PromptTooLongError
    from .trace import DECODE_SUFFIX, load_trace_arrays, sequence_names

    prompts = [p for p in args.prompts if p.strip()]
    if len(prompts) != len(args.prompts):
        raise UsageError("empty prompt: every prompt needs some text")
    out = Path(args.out).expanduser()
    _check_out(out)
    model, tok = load(args, chat=not args.raw)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    echo = (lambda t: print(t, end="", flush=True)) if args.show else None
    try:
        path, results = record_trace(model, tok, prompts, out, sampling, args.raw, echo)
    except PromptTooLongError as err:
        raise UsageError(str(err)) from None
    if echo is not None:
        print()
    arrays = load_trace_arrays(path)  # read back as replay and twin will
    names = sequence_names(arrays)
    shape = arrays[f"{names[0]}{DECODE_SUFFIX}"].shape
    steps = sum(len(arrays[f"{n}{DECODE_SUFFIX}"]) for n in names)
    model_arg = f" --model {args.model}" if args.model else ""
    print(
        f"saved {path}: {len(names)} sequence(s), {steps} decode steps, {shape[1]} MoE layers, top-{shape[2]} "
        f"({sum(r.stats.new_tokens for r in results)} tokens generated)\n"
        f"use it: python -m colab_helpers replay {path}{model_arg}\n"
        f"        python -m colab_helpers twin --trace {path}{model_arg or ' --model MODEL'}",
        file=sys.stderr,
    )
    return 0


def add_record_parser(sub, add_model_args: Callable[[argparse.ArgumentParser], None], load: Callable) -> None:
    """``record``'s arguments: prompts, --out, --raw, --show, then the model and sampling options of ``generate``."""
    r = sub.add_parser(
        "record",
        help="save a routing trace (which experts each layer chose) for replay and twin",
        description="Answer prompts with any model and save its routing trace (.npz) for `replay` and `twin`.",
    )
    r.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more messages; each is one sequence")
    r.add_argument(
        "--out", default="routing_trace.npz", help="where to write the trace, a .npz (default routing_trace.npz)"
    )
    r.add_argument("--raw", action="store_true", help="no chat template: continue each prompt as plain text")
    r.add_argument("--show", action="store_true", help="also print the answers as they stream (default: quiet)")
    add_model_args(r)
    r.set_defaults(func=functools.partial(cmd_record, load=load))
