"""Each eviction policy, on a sequence chosen for it, makes its documented choice and no other policy does.

A policy replaced by its simpler neighbour (``lfu_decay`` with the decay never applied is plain LFU; LFU
without counts is LRU) must fail here. A new policy gets one row in ``ROWS``: a short access sequence,
the candidates, the victim its docstring promises, and why; the row must make every other registered
policy choose differently, so the row proves the new policy is really a new choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from colab_helpers.runtime.policies import POLICIES, EvictionPolicy, make_policy

EXPERTS = 8


@dataclass(frozen=True)
class Row:
    policy: str
    steps: tuple[tuple[int, ...], ...]  # one routing step per tuple (accesses, then ``on_step``), layer 0
    candidates: tuple[int, ...]
    victim: int
    why: str
    params: dict = field(default_factory=dict)


# Expert 0: used in steps 1, 3, 4 (three uses, last at step 4); 1: steps 2 and 5 (two uses, last at 5);
# 2: step 6 only (one use, the latest). Half-life 2 steps (decay 2 ** -0.5 per step), scores after step 6:
# 0: d^6 + d^4 + d^3 = 0.729, 1: d^5 + d^2 = 0.677, 2: d = 0.707.
THREE_WAY = ((0,), (1,), (0,), (0,), (1,), (2,))

# Expert 0: three uses, then 100 steps of other experts; expert 1: two uses at the end. Plain counts keep 0;
# any decay with a half-life well under 100 steps (the default is 32) or recency keeps 1.
LONG_AGO = ((0,),) * 3 + ((5,),) * 100 + ((1,),) * 2

ROWS = [
    Row("lru", THREE_WAY, (0, 1, 2), 0, "0's last use (step 4) is the oldest, although it is the most used"),
    Row("lfu", LONG_AGO, (0, 1), 1, "1 has two uses, 0 three (long ago: a decayed count or recency would keep 1)"),
    Row(
        "lfu_decay",
        THREE_WAY,
        (0, 1, 2),
        1,
        "1's decayed score (0.677) is the lowest: neither the fewest uses nor the oldest",
        {"half_life_tokens": 2},
    ),
    Row(
        "transition",
        ((0,), (1,), (2,), (0,)),
        (0, 1),
        0,
        "after 0 came 1 last time, and 0 was just used: 0 goes although it is the most used and most recent",
    ),
]


def run_steps(policy: EvictionPolicy, steps, layer: int = 0) -> None:
    for step in steps:
        for e in step:
            policy.on_access(layer, e)
        policy.on_step(layer)


def victim(name: str, steps, candidates, **params) -> int:
    policy = make_policy(name, 2, EXPERTS, **params)
    run_steps(policy, steps)
    return policy.victim(0, list(candidates))


def test_every_registered_policy_has_a_row() -> None:
    missing = sorted(set(POLICIES) - {r.policy for r in ROWS})
    assert not missing, f"add a row to ROWS in tests/test_policy_choices.py for {missing}"


@pytest.mark.parametrize("row", ROWS, ids=[r.policy for r in ROWS])
def test_the_policy_makes_its_documented_choice_and_only_it_does(row: Row) -> None:
    assert victim(row.policy, row.steps, row.candidates, **row.params) == row.victim, row.why
    for other in sorted(set(POLICIES) - {row.policy}):
        assert victim(other, row.steps, row.candidates) != row.victim, f"{other} cannot be told from {row.policy}"


def test_decay_without_decay_is_plain_lfu_and_loses_the_decayed_choice() -> None:
    """The neighbour slip itself: ``lfu_decay`` whose decay is never applied (an infinite half-life)."""
    assert victim("lfu_decay", THREE_WAY, (0, 1, 2), half_life_tokens=math.inf) == 2
    assert victim("lfu_decay", THREE_WAY, (0, 1, 2), half_life_tokens=2) == 1


def decayed_scores(steps, half_life: float) -> dict[int, float]:
    """Independent reference: a use ``age`` steps before the end (``on_step`` of its own step included)
    weighs ``0.5 ** (age / half_life)``."""
    scores: dict[int, float] = {}
    n = len(steps)
    for i, step in enumerate(steps):
        for e in step:
            scores[e] = scores.get(e, 0.0) + 0.5 ** ((n - i) / half_life)
    return scores


@pytest.mark.parametrize("half_life", [2, 3, 4, 8, 32])
@pytest.mark.parametrize("old, new", [(0, 1), (EXPERTS - 1, 3)], ids=["low_ids", "last_expert"])
def test_decay_rate_flips_the_choice_exactly_where_the_half_life_says(half_life: float, old: int, new: int) -> None:
    """Expert ``old`` used in steps 1 and 2, ``new`` once at the last step N: ``old`` survives while its two
    aged uses outweigh one fresh use, and the step at which that flips is fixed by the half-life alone
    (every expert's score decays, the last one's too)."""
    flips = []
    for n in range(3, 6 * half_life + 4):
        steps = [(old,), (old,)] + [(5,)] * (n - 3) + [(new,)]
        ref = decayed_scores(steps, half_life)
        expected = old if ref[old] < ref[new] else new
        assert abs(ref[old] - ref[new]) > 1e-9  # no tie: the tie-break is not what is tested
        got = victim("lfu_decay", steps, (old, new), half_life_tokens=half_life)
        assert got == expected, f"N={n}: scores {ref}"
        flips.append(got)
    assert flips[0] == new and flips[-1] == old  # both outcomes occur: the flip point is inside the range


def test_decay_flip_point_by_hand() -> None:
    """Half-life 4 (decay 2 ** -0.25 = 0.841): two uses at steps 1-2 outweigh one at step N while
    d^(N-2) (1 + d) > 1, i.e. N <= 5; the default half-life for 8 experts top-2 is 32 steps."""
    for n, expected in [(5, 1), (6, 0)]:
        steps = [(0,), (0,)] + [(5,)] * (n - 3) + [(1,)]
        assert victim("lfu_decay", steps, (0, 1), half_life_tokens=4) == expected
    # the default (principled) half-life, 32 steps for 8 experts top-2
    d = 0.5 ** (1 / 32)
    last_kept = max(n for n in range(3, 200) if d ** (n - 2) * (1 + d) > 1)
    for n, expected in [(last_kept, 1), (last_kept + 1, 0)]:
        steps = [(0,), (0,)] + [(5,)] * (n - 3) + [(1,)]
        assert victim("lfu_decay", steps, (0, 1)) == expected


def test_steps_on_one_layer_do_not_age_another() -> None:
    """Decay (and recency) are per layer: a busy layer 1 leaves layer 0's old counts where they were."""
    for name in ("lfu_decay", "lru", "lfu"):
        p = make_policy(name, 2, EXPERTS, **({"half_life_tokens": 1} if name == "lfu_decay" else {}))
        run_steps(p, [(0,), (0,), (1,)], layer=0)
        before = p.victim(0, [0, 1])
        run_steps(p, [(3,)] * 20, layer=1)
        assert p.victim(0, [0, 1]) == before, name


def test_frequency_ties_go_to_the_least_recent_then_the_lower_index() -> None:
    for name in ("lfu", "lfu_decay"):
        assert victim(name, [(4,), (2,)], (2, 4)) == 4  # one use each: 4's is older
        assert victim(name, [(4, 2)], (2, 4)) == 4  # same step: 4 was accessed first
        assert victim(name, [], (6, 3, 5)) == 3  # never used: lowest index
    assert victim("lru", [], (6, 3, 5)) == 3
