"""``python -m colab_helpers``: generate, chat, plan, convert, replay, twin, record — the engine the notebooks use.

A mistake on the command line, or a library error whose message already says what to do (a broken
checkpoint folder, a failed download, a model that does not fit), ends in one line on stderr and exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from .usage import (
    ArgumentParser,
    UsageError,
    check_experts_on_device,
    device_name,
    non_negative_float,
    positive_int,
    probability,
    require_device,
)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .runtime.policies import POLICIES

    p.add_argument(
        "--model",
        default=None,
        help="checkpoint folder or hub repo id (default: demo repo on a GPU, else the embedded tiny model)",
    )
    p.add_argument("--device", type=device_name, default="auto", help="cuda, cuda:N, cpu or auto (default)")
    p.add_argument(
        "--experts-on-device",
        type=positive_int,
        default=None,
        help="experts per layer kept on the device (default: planned from free memory on CUDA, 2 on CPU)",
    )
    p.add_argument(
        "--policy", default="lfu_decay", choices=sorted(POLICIES), help="eviction policy (default lfu_decay)"
    )
    p.add_argument("--no-prefetch", action="store_true", help="disable speculative expert prefetch")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="longest answer, in tokens (default 128)")
    p.add_argument(
        "--temperature", type=non_negative_float, default=0.0, help="sampling temperature; 0 = greedy (default 0)"
    )
    p.add_argument(
        "--top-p",
        type=probability,
        default=1.0,
        help="nucleus sampling: keep the likeliest tokens up to this probability mass (default 1.0 = all)",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="random seed for sampling (default: none, a new draw each run)"
    )


def _load(args: argparse.Namespace, chat: bool):
    """The model and tokenizer the arguments name; with ``chat`` the tokenizer must format a chat (checked
    before the experts load, so a base model's missing template costs nothing)."""
    from .model import load_model, load_tokenizer
    from .runtime.moe import PrefetchConfig
    from .weights.checkpoint import Checkpoint
    from .weights.hub import resolve_model
    from .weights.tokenizer import NoChatTemplateError, require_chat_template

    device = require_device(args.device)  # before any download: a wrong --device costs nothing
    path, what = resolve_model(args.model)
    arch = Checkpoint.open(path, verify=False).arch  # a junk folder fails here, naming the missing file
    check_experts_on_device(args.experts_on_device, arch.num_experts, what)
    tokenizer = load_tokenizer(path)
    if chat:
        try:
            require_chat_template(tokenizer)
        except NoChatTemplateError as err:
            raise UsageError(f"{what}: {err}") from None
    k = args.experts_on_device
    if k is None:
        k = _planned_experts(path, device)
    print(f"model: {what} on {device}, {k} experts per layer on the device", file=sys.stderr)
    model = load_model(
        path,
        device=device,
        experts_on_device=k,
        policy=args.policy,
        prefetch=PrefetchConfig(enabled=not args.no_prefetch),
    )
    return model, tokenizer


def _planned_experts(path, device) -> int | list[int]:
    """On CUDA ask the planner (``MemoryPlanError`` when nothing fits); elsewhere a small cache (offloading runs)."""
    if device.type != "cuda":
        return 2
    from .planning.planner import check_fits, plan_for_checkpoint

    return check_fits(plan_for_checkpoint(path, device=device)).experts_on_device


def cmd_generate(args: argparse.Namespace) -> int:
    from .conversation.generation import (
        PromptTooLongError,
        SamplingConfig,
        chat_prompt_ids,
        check_prompt_fits,
        generate_stream,
        planned_context,
    )

    if not args.prompt.strip():  # as the widget and chat() refuse it, before anything loads
        raise UsageError('empty prompt: give the text to answer, e.g. generate "What is the capital of France?"')
    model, tok = _load(args, chat=not args.raw)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    with _quiet_transformers():  # our own length check below says it better than the tokenizer's warning
        ids = tok(args.prompt, return_tensors="pt").input_ids if args.raw else chat_prompt_ids(tok, args.prompt)
    try:
        check_prompt_fits(int(ids.shape[-1]), sampling.max_new_tokens, planned_context(model))
    except PromptTooLongError as err:
        raise UsageError(str(err)) from None
    result = generate_stream(model, tok, ids, sampling, on_text=lambda t: print(t, end="", flush=True))
    print()
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
    print(f"stats: {result.stats.line()}", file=sys.stderr)
    return 1 if result.error else 0


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def cmd_chat(args: argparse.Namespace) -> int:
    """Terminal chat. Leaving always says so: Ctrl-C at the prompt asks before quitting, and the goodbye line
    says how many turns are forgotten (nothing is saved); ``/clear`` confirms what it forgot."""
    from .conversation.generation import SamplingConfig
    from .conversation.session import ChatSession

    model, tok = _load(args, chat=True)
    session = ChatSession(model, tok, SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed))
    print(
        "chat: /quit, Ctrl-D or an empty line quits; Ctrl-C stops an answer; /clear forgets the conversation",
        file=sys.stderr,
    )
    interrupted = False  # the last prompt ended with Ctrl-C
    while True:
        try:
            msg = input("> ").strip()
        except KeyboardInterrupt:
            if interrupted or not session.turns:
                return _bye(session)
            interrupted = True
            print(
                f"\n(Ctrl-C again to quit and forget {len(session.turns)} turn(s); or type a message)", file=sys.stderr
            )
            continue
        except EOFError:
            return _bye(session)
        interrupted = False
        if not msg or msg == "/quit":
            return _bye(session)
        if msg == "/clear":
            n = len(session.turns)
            session.clear()
            print(f"(conversation cleared: {n} turn(s) forgotten)", file=sys.stderr)
            continue
        try:
            result = session.send(msg, on_text=lambda t: print(t, end="", flush=True))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            continue
        print()
        print(f"[{result.stats.line()}]", file=sys.stderr)


def _bye(session) -> int:
    n = len(session.turns)
    print(f"\nbye ({n} turn(s) forgotten: the conversation is not saved)" if n else "\nbye", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; mistakes and self-explaining library errors end in one line on stderr and exit 2."""
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = user_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return getattr(err, "exit_code", 2)  # DownloadError: 1 when the network, the hub or the disk failed


def user_message(err: BaseException) -> str | None:
    """The one line to show for an error a person can act on, or None for a bug (keep the traceback).

    These errors are raised with messages written for the reader: ``UsageError`` (the command line),
    ``CheckpointError`` (names the file and key), ``DownloadError`` (says what to do, never the token),
    ``MemoryPlanError`` (the plan's reasons) and ``FileNotFoundError`` (a path given that is not there).
    """
    from .planning.planner import MemoryPlanError
    from .weights.checkpoint import CheckpointError
    from .weights.hub import DownloadError

    if isinstance(err, MemoryPlanError):
        plan = getattr(err, "plan", None)
        reasons = "; ".join(plan.reasons) if plan is not None else str(err).splitlines()[0]
        return " ".join(
            f"the model does not fit this machine: {reasons}. `python -m colab_helpers plan` "
            "(with --model and --experts-on-device as given here) shows the whole table and what would fit".split()
        )
    if isinstance(err, CheckpointError):
        return f"{_one_line(err)} (not a checkpoint in the offloading layout: see docs/checkpoint_format.md)"
    if isinstance(err, (UsageError, DownloadError, FileNotFoundError)):
        return _one_line(err)
    return None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())  # whatever the message held


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "plan":
        from .planning.plan_cli import cli_main

        return cli_main(argv[1:])
    if argv and argv[0] == "convert":
        from .weights.convert import cli_main as convert_main

        return convert_main(argv[1:])
    if argv and argv[0] == "replay":
        from .sim.trace import cli_main

        return cli_main(argv[1:])
    if argv and argv[0] == "twin":
        from .sim.twin_cli import cli_main

        return cli_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


def build_parser() -> ArgumentParser:
    """The top-level parser (plan, convert, replay and twin have their own; their entries here are for --help)."""
    parser = ArgumentParser(prog="python -m colab_helpers", description=__doc__.split("\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt, streaming, then print stats")
    g.add_argument("prompt", help="the message to answer (with the chat template unless --raw)")
    g.add_argument("--raw", action="store_true", help="no chat template: continue the prompt as plain text")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="multi-turn chat in the terminal")
    _add_model_args(c)
    c.set_defaults(func=cmd_chat)
    sub.add_parser("plan", help="memory plan: experts per layer for given VRAM/RAM (see plan --help)")
    sub.add_parser(
        "convert", help="quantize a Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE or Phi-3.5-MoE model (hub repo or folder)"
    )
    sub.add_parser("replay", help="replay a routing trace through eviction policies (see replay --help)")
    sub.add_parser("twin", help="T4 twin: calibrate on the paper (--paper) or project ours, any family (--model)")
    from .sim.record import add_record_parser

    add_record_parser(sub, _add_model_args, _load)
    return parser
