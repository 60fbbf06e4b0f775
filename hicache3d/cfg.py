"""Adaptive classifier-free guidance (Adaptive Guidance, arXiv:2312.12487).

Two-forward CFG runs the network on the condition and on the null condition.  Late in
sampling the two velocities align; from then on the unconditional forward adds little.
:class:`AdaptiveCFG` runs both while they disagree (cosine < ``gamma``); once they align
it runs only the conditional forward and forecasts the guidance term
``g = combine(cond, uncond) - cond`` from the guidance terms of the full steps.  Unlike a
one-way switch it re-checks alignment with a full step every ``recheck`` steps, and goes
back to full CFG if the two have drifted apart.

Any linear or non-linear CFG combination works (``(1+s) c - s u``, ``g c + (1-g) u``,
with or without rescaling): only the guidance term it produces is forecast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from .forecast import make_forecaster
from .tree import item_cosines, map_pairs

__all__ = ["AdaptiveCFG", "AdaptiveCFGStats"]


@dataclass
class AdaptiveCFGStats:
    full: int = 0          # steps with both forwards
    cond_only: int = 0     # steps whose unconditional forward was skipped
    rechecks: int = 0      # full steps taken only to re-check alignment
    realigned: int = 0     # re-checks that found the velocities no longer aligned
    last_cosine: Optional[float] = None

    def as_dict(self):
        return dict(full=self.full, cond_only=self.cond_only, rechecks=self.rechecks,
                    realigned=self.realigned, last_cosine=self.last_cosine)


class AdaptiveCFG:
    """Drop the unconditional forward while cond/uncond velocities stay aligned."""

    def __init__(self, gamma: float = 0.94, warmup: int = 2, recheck: int = 3,
                 backend: str = "taylor", history: int = 3, order: int = 1,
                 batch_dim: Optional[int] = 0):
        for name, v, ok, allowed in (
                ("gamma", gamma, isinstance(gamma, (int, float)) and 0.0 <= gamma <= 1.0, "a number in [0, 1]"),
                ("warmup", warmup, isinstance(warmup, int) and warmup >= 0, "an integer >= 0"),
                ("recheck", recheck, isinstance(recheck, int) and recheck >= 1, "an integer >= 1")):
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {v!r}")
        self.gamma, self.warmup, self.recheck = float(gamma), warmup, recheck
        self.batch_dim = batch_dim
        self._forecaster = make_forecaster(backend, history, order=order, batch_dim=batch_dim,
                                           fallback="reuse" if backend == "reuse" else "taylor")
        self.reset()

    def reset(self) -> None:
        self.step_index = 0
        self.aligned = False
        self._since_full = 0
        self._forecaster.reset()
        self.stats = AdaptiveCFGStats()

    def step(self, t: Any, cond: Callable[[], Any], uncond: Callable[[], Any],
             combine: Callable[[Any, Any], Any]) -> Any:
        """The guided velocity of this step.  ``cond()`` / ``uncond()`` run the network
        on the condition / null condition; ``combine(c, u)`` is the sampler's CFG rule."""
        pos = float(self.step_index)
        full = (self.step_index < self.warmup or not self.aligned
                or len(self._forecaster) == 0 or self._since_full >= self.recheck)
        c = cond()
        if full:
            if self.aligned:
                self.stats.rechecks += 1
            u = uncond()
            v = combine(c, u)
            self._forecaster.push(pos, map_pairs(lambda a, b: a - b, v, c))
            cos = float(item_cosines(c, u, self.batch_dim).min())
            self.stats.last_cosine = cos
            was_aligned = self.aligned
            self.aligned = cos >= self.gamma
            if was_aligned and not self.aligned:
                self.stats.realigned += 1
            self._since_full = 0
            self.stats.full += 1
        else:
            g = self._forecaster.predict(pos)
            v = map_pairs(lambda a, b: a + b.to(a.dtype), c, g)
            self._since_full += 1
            self.stats.cond_only += 1
        self.step_index += 1
        return v
