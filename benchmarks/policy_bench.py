"""Bookkeeping cost of each eviction policy per decoded token (32 layers x 2 accesses + 1 victim + 1 step).

A token takes ~100 ms on a T4; the goal is that the policy costs well under 2 ms of it. This prints the
measured cost and its ratio to that goal; it asserts nothing (speed depends on the machine).

Usage: ``python benchmarks/policy_bench.py [--tokens 200] [--layers 32]``
"""

from __future__ import annotations

import argparse
import time

from colab_helpers.runtime.policies import POLICIES, make_policy

GOAL_MS_PER_TOKEN = 2.0
EXPERTS = 8


def ms_per_token(name: str, tokens: int, layers: int) -> float:
    """Mean wall time per token of one policy driven by a fixed, varied access pattern."""
    p = make_policy(name, layers, EXPERTS)
    start = time.perf_counter()
    for t in range(tokens):
        for layer in range(layers):
            a, b = (t * 7 + layer) % EXPERTS, (t * 3 + layer + 1) % EXPERTS
            p.on_access(layer, a)
            p.on_access(layer, b)
            p.victim(layer, [e for e in range(EXPERTS) if e not in (a, b)][:4])
            p.on_step(layer)
    return (time.perf_counter() - start) / tokens * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args(argv)
    for name in sorted(POLICIES):
        ms = ms_per_token(name, args.tokens, args.layers)
        print(f"{name:>10}: {ms:.3f} ms per token ({ms / GOAL_MS_PER_TOKEN:.2f} of the {GOAL_MS_PER_TOKEN} ms goal)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
