"""Searching a computed/forecast pattern on a model (``schedule="pattern"``).

No error model is needed: from "every step computed", the search removes one computed step
at a time, the one whose removal costs the least quality per network forward saved (a
step where classifier-free guidance runs saves two), measured closed loop by running the
sampler.  A step that is cheap to forecast on the measured inputs stays cheap on others
of the same model: on the bundled generator, patterns searched on 8 shapes hold on 32
others (``benchmarks/fidelity.md``).

Removal costs are kept between removals and only the cheapest is measured again (a lazy
greedy search): after the first scan, a removal costs about two runs.  When the cheapest
removal misses the target, every other removal is measured against the present pattern
and the cheapest that meets it is taken; the search ends when none does, or at
``min_computed`` computed steps.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional

from .schedule import pattern_of

__all__ = ["search_pattern"]

Row = Mapping[str, Any]


def search_pattern(evaluate: Callable[[str], Row], steps: int, *, quality: Callable[[Row], float],
                   meets: Callable[[Row], bool] = lambda row: True, min_computed: int = 2,
                   say: Optional[Callable[[str], None]] = None) -> List[Row]:
    """The greedy path from every step computed to the fastest pattern found that meets the
    target.

    ``evaluate(pattern)`` runs the sampler with that pattern (``"C.C..C"``) and returns a
    row with its network ``forwards``; ``quality(row)``: higher is better (mean IoU, or the
    negative drift); ``meets(row)``: whether a pattern is good enough to go on from.
    Returns the rows of the accepted patterns in order, starting with every step computed
    (each row is what ``evaluate`` returned, with ``pattern`` and ``computed`` added).
    ``evaluate`` is called at most once per pattern."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    memo: Dict[FrozenSet[int], Dict[str, Any]] = {}

    def run(computed: FrozenSet[int]) -> Dict[str, Any]:
        if computed not in memo:
            pattern = pattern_of([i in computed for i in range(steps)])
            memo[computed] = {**dict(evaluate(pattern)), "pattern": pattern, "computed": sorted(computed)}
        return memo[computed]

    cur = frozenset(range(steps))
    path = [run(cur)]
    stale: Dict[int, float] = {}          # removal -> cost per forward saved (maybe measured earlier)

    def cost(k: int) -> float:
        here, there = path[-1], run(cur - {k})
        saved = here["forwards"] - there["forwards"]
        return math.inf if saved <= 0 else (quality(here) - quality(there)) / saved

    while len(cur) > max(min_computed, 1):
        cands = sorted(cur - {0})
        fresh = set()
        for k in cands:
            if k not in stale:
                stale[k] = cost(k)
                fresh.add(k)
        while True:                              # the cheapest, measured against this pattern
            k = min(cands, key=lambda j: (stale[j], j))
            if k in fresh:
                break
            stale[k] = cost(k)
            fresh.add(k)
        if not meets(run(cur - {k})) or stale[k] == math.inf:
            for j in cands:                      # the cheapest removal misses: measure them all
                if j not in fresh:
                    stale[j] = cost(j)
                    fresh.add(j)
            ok = [j for j in cands if stale[j] < math.inf and meets(run(cur - {j}))]
            if not ok:
                break
            k = min(ok, key=lambda j: (stale[j], j))
        cur = cur - {k}
        del stale[k]
        path.append(run(cur))
        if say is not None:
            r = path[-1]
            say(f"{len(cur):3d} computed: {r['pattern']}  quality {quality(r):.4f}, {r['forwards']} forwards "
                f"({len(memo)} runs)")
    return path
