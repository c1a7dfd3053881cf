"""``python -m colab_helpers``: generate, chat, plan, replay — the same engine the notebooks use."""

from __future__ import annotations

import argparse
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint folder or hub repo id (default: demo repo on a GPU, else the embedded tiny model)",
    )
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument(
        "--experts-on-device",
        type=int,
        default=None,
        help="experts per layer kept on the device (default: planned from free memory on CUDA, 2 on CPU)",
    )
    p.add_argument("--policy", default="lfu_decay", help="eviction policy: lfu_decay (default), lru, lfu")
    p.add_argument("--no-prefetch", action="store_true", help="disable speculative expert prefetch")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _load(args: argparse.Namespace):
    from .hub import resolve_model
    from .model import load_model, load_tokenizer, resolve_device
    from .moe import PrefetchConfig

    path, what = resolve_model(args.model)
    device = resolve_device(args.device)
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
    return model, load_tokenizer(path)


def _planned_experts(path, device) -> int | list[int]:
    """On CUDA ask the planner; elsewhere a small cache, so offloading is exercised."""
    if device.type != "cuda":
        return 2
    from .planner import plan_for_checkpoint

    plan = plan_for_checkpoint(path, device=device)
    if not plan.fits:
        raise SystemExit(plan.report())
    return plan.experts_on_device


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation import SamplingConfig, chat_prompt_ids, generate_stream

    model, tok = _load(args)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    if args.raw:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    else:
        ids = chat_prompt_ids(tok, args.prompt)
    result = generate_stream(model, tok, ids, sampling, on_text=lambda t: print(t, end="", flush=True))
    print()
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
    print(f"stats: {result.stats.line()}", file=sys.stderr)
    return 1 if result.error else 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .generation import SamplingConfig
    from .session import ChatSession

    model, tok = _load(args)
    session = ChatSession(model, tok, SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed))
    print("chat: empty line or Ctrl-D quits, Ctrl-C stops an answer, /clear forgets the conversation", file=sys.stderr)
    while True:
        try:
            msg = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            return 0
        if not msg:
            return 0
        if msg == "/clear":
            session.clear()
            continue
        try:
            result = session.send(msg, on_text=lambda t: print(t, end="", flush=True))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            continue
        print()
        print(f"[{result.stats.line()}]", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plan":
        from .planner import cli_main

        return cli_main(argv[1:])
    if argv and argv[0] == "replay":
        from .trace import cli_main

        return cli_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m colab_helpers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt, streaming, then print stats")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="no chat template: continue the prompt as plain text")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="multi-turn chat in the terminal")
    _add_model_args(c)
    c.set_defaults(func=cmd_chat)
    sub.add_parser("plan", help="memory plan: experts per layer for given VRAM/RAM (see plan --help)")
    sub.add_parser("replay", help="replay a routing trace through eviction policies (see replay --help)")
    args = parser.parse_args(argv)
    return args.func(args)
