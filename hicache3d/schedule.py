"""Which steps run the network and which are forecast: the schedule policies.

Every decision of a cached site goes through one policy (``VelocityCache.step`` asks it):

``FixedPolicy`` (``schedule="fixed"``, :class:`Schedule`)
    The TaylorSeer/HiCache cadence: the first ``first_enhance`` steps are computed
    (warm-up), then one step in every ``interval`` is computed and the ``interval - 1``
    steps after it are forecast; optionally the last ``last_enhance`` steps of a run of
    known length are computed too.

``AdaptivePolicy`` (``schedule="adaptive"``)
    Error-controlled.  On every computed step after the first one the cache forecasts that
    step from the snapshots before it and compares with the real velocity, per batch item
    (in Gram space, no pass over the data): that is the true relative error ``e`` of the
    basis at the horizon ``H`` (in steps) just used.  An error model ``e(h) = c h^p``
    (``p`` = the basis order + 1: reuse 1, order-1 Taylor / Hermite 2, DMD / auto 2) turns
    it into a coefficient ``c`` (the worst batch item decides).  The next window forecasts
    the largest number ``m`` of steps whose predicted errors, each weighted by its share of
    the sample (the step's ``dt`` relative to the mean ``dt`` of the steps seen when the
    first window was planned), sum to at most ``tolerance``::

        sum_{j=1..m} (dt_j / dt_ref) * c * j^p  <=  tolerance,   min_skip <= m <= max_skip

    A budget per window, not a cap per step.  With ``compute_cost`` (``[lo, hi, cost]``
    intervals of sampler time, e.g. where classifier-free guidance runs two forwards) the
    budget of a window is ``tolerance`` times the mean cost of the computes it replaces
    relative to the dearest one (:class:`IntervalCost`): the cost-optimal trade of forwards
    against error for this error model (the Lagrangian of "fewest forwards for a total
    error" makes a window's budget proportional to what its steps cost).  ``dt_power``
    (policy option, 1 by default) raises the ``dt`` weights to a power; ``sensitivity``
    (policy option, off) multiplies them by a profile that weights early steps more (an
    early error is carried through every later step; no gain measured on the bundled
    generator, ``benchmarks/adaptive_sens25.md``); ``first_window`` (policy option, 0)
    forecasts that many steps after the warm-up before the first error is measured (with a
    warm-up of 1, as the best searched patterns of ``benchmarks/oracle_schedule.md`` begin:
    higher mean IoU per forward at 12-50 steps, lower per-sample minima; not a default).
    An error that jumps (observed more than twice
    the prediction) shrinks the next window at once, since ``c`` is re-estimated on every
    computed step; ``c`` only relaxes gradually (geometric mean with the previous one).
    ``tolerance = 0`` computes every step.  ``interval`` does not apply.

``PatternPolicy`` (``schedule="pattern"``, ``pattern``)
    Computes exactly the steps marked ``C`` in a computed/forecast pattern of the run's
    length (``.`` forecast), e.g. ``"C.C.C...C.....C....C..C.C"`` for 25 steps: the
    schedule ``hicache3d tune --schedules pattern`` searches on the user's own model and
    images (:mod:`hicache3d.schedule_search`).  Several patterns may be given, one per run
    length; a run of a length none has (known from the adapter or ``num_steps``) runs the
    adaptive schedule with the site's ``tolerance`` instead; a run of unknown length
    follows a single pattern, and computes every step past its end.

A step is always computed while there is nothing to forecast from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Schedule", "SchedulePolicy", "FixedPolicy", "AdaptivePolicy", "PatternPolicy", "make_policy",
           "error_exponent", "IntervalCost", "parse_pattern", "pattern_of"]

# why a step was computed (trace / summary vocabulary)
WARMUP, NO_HISTORY, FORCED, CADENCE, LAST, BUDGET, MAX_SKIP, EXACT, JUMP, NO_SIGNAL, PATTERN, PAST = (
    "warm-up", "no history", "forced", "cadence", "last steps", "budget", "max_skip",
    "tolerance 0", "error jump", "no error signal", "pattern", "past the pattern")


@dataclass(frozen=True)
class Schedule:
    """The fixed cadence (kept as the plain description of the fixed policy)."""

    interval: int = 5
    first_enhance: int = 3
    last_enhance: int = 0

    def should_compute(self, step: int, since_compute: int, has_anchor: bool,
                       num_steps: Optional[int] = None) -> bool:
        """``since_compute``: steps forecast since the last computed step."""
        return self.reason(step, since_compute, has_anchor, num_steps) is not None

    def reason(self, step: int, since_compute: int, has_anchor: bool,
               num_steps: Optional[int] = None) -> Optional[str]:
        """Why ``step`` is computed, or ``None`` if it is forecast."""
        if not has_anchor:
            return NO_HISTORY
        if step < self.first_enhance:
            return WARMUP
        if num_steps is not None and self.last_enhance and step >= num_steps - self.last_enhance:
            return LAST
        return CADENCE if since_compute >= self.interval - 1 else None

    def plan(self, num_steps: int) -> List[bool]:
        """``True`` for every computed step of a run of ``num_steps`` steps."""
        out, since, anchor = [], 0, False
        for i in range(num_steps):
            c = self.should_compute(i, since, anchor, num_steps)
            out.append(c)
            since = 0 if c else since + 1
            anchor = anchor or c
        return out


class SchedulePolicy:
    """Decides, step by step, whether the network runs.

    ``decide`` returns the reason a step is computed, or ``None`` for a forecast step.
    ``observe`` receives, after a computed step, the per-item relative error of the
    forecast of that step made from the snapshots before it (``None`` when none could be
    made), the horizon in steps, and the sampler times of the steps seen so far.
    """

    name = "policy"
    needs_errors = False

    def start(self, num_steps: Optional[int]) -> None:
        self.num_steps = num_steps

    def describe(self) -> str:
        """What decides this run's steps (for the run's statistics)."""
        return self.name

    def decide(self, step: int, since_compute: int, has_anchor: bool) -> Optional[str]:
        raise NotImplementedError

    def decide_static(self, step: int, since_compute: int, has_anchor: bool) -> Optional[str]:
        """The part of :meth:`decide` that needs no new measurement: a reason to compute,
        or ``None`` when :meth:`decide` must be asked (after :meth:`observe`)."""
        return None

    def observe(self, step: int, errors: Optional[np.ndarray], horizon: int,
                times: Sequence[float]) -> None:
        pass

    def predicted(self, horizon: int) -> Optional[float]:
        """The model's predicted relative error of a forecast ``horizon`` steps out."""
        return None

    def plan(self, num_steps: int) -> List[bool]:
        raise NotImplementedError(f"the {self.name} schedule is decided at run time")


class FixedPolicy(SchedulePolicy):
    name = "fixed"

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.num_steps = None

    def decide(self, step: int, since_compute: int, has_anchor: bool) -> Optional[str]:
        return self.schedule.reason(step, since_compute, has_anchor, self.num_steps)

    decide_static = decide

    def describe(self) -> str:
        return f"fixed interval {self.schedule.interval}"

    def plan(self, num_steps: int) -> List[bool]:
        return self.schedule.plan(num_steps)


def error_exponent(backend: str, order: int = 1) -> float:
    """``p`` of the error model ``e(h) = c h^p`` of a basis (its registry entry's
    ``error_order``; 2 for ``auto``, whose candidates differ)."""
    from .forecast import BasisSpec, registry
    if backend not in registry.basis_names():
        return 2.0
    return float(registry.get(backend).error_order(BasisSpec(backend, order=order)))


class AdaptivePolicy(SchedulePolicy):
    """The error-controlled schedule (see the module doc)."""

    name = "adaptive"
    needs_errors = True

    def __init__(self, tolerance: float, *, max_skip: int = 8, min_skip: int = 0,
                 first_enhance: int = 3, last_enhance: int = 0, exponent: float = 2.0,
                 quantile: float = 1.0, relax: float = 0.5, jump: float = 2.0,
                 cost: Optional[Callable[[float], float]] = None, cost_power: float = 1.0,
                 dt_power: float = 1.0, sensitivity: float = 0.0, sensitivity_offset: float = 0.1,
                 first_window: int = 0):
        self.tolerance = float(tolerance)
        self.first_window = int(first_window)
        self.sensitivity = float(sensitivity)
        self.sensitivity_offset = float(sensitivity_offset)
        self.cost = cost
        self.cost_power = float(cost_power)
        self.dt_power = float(dt_power)
        self.max_skip, self.min_skip = int(max_skip), int(min_skip)
        self.first_enhance, self.last_enhance = int(first_enhance), int(last_enhance)
        self.p = float(exponent)
        self.quantile = float(quantile)
        self.relax = float(relax)
        self.jump = float(jump)
        self.start(None)

    def start(self, num_steps: Optional[int]) -> None:
        self.num_steps = num_steps
        self.c: Optional[float] = None        # error coefficient of the model
        self.window = 0                       # forecast steps granted after the last compute
        self.window_reason = NO_SIGNAL        # why the window ends where it does
        self.dt_ref: Optional[float] = None
        self.last_observed: Optional[float] = None
        self.last_jump = False

    def describe(self) -> str:
        return f"adaptive, tolerance {self.tolerance:g}"

    # ---------------------------------------------------------------- decisions
    def decide_static(self, step: int, since_compute: int, has_anchor: bool) -> Optional[str]:
        if not has_anchor:
            return NO_HISTORY
        if step < self.first_enhance:
            return WARMUP
        n = self.num_steps
        if n is not None and self.last_enhance and step >= n - self.last_enhance:
            return LAST
        if self.tolerance == 0:
            return EXACT
        return None

    def decide(self, step: int, since_compute: int, has_anchor: bool) -> Optional[str]:
        r = self.decide_static(step, since_compute, has_anchor)
        if r is not None:
            return r
        if since_compute >= self.window:
            return JUMP if self.last_jump and self.window_reason == BUDGET else self.window_reason
        return None

    def predicted(self, horizon: int) -> Optional[float]:
        if self.c is None:
            return None
        return self.c * float(horizon) ** self.p

    # ---------------------------------------------------------------- the signal
    def _ahead(self, times: Sequence[float], m: int) -> Tuple[np.ndarray, np.ndarray]:
        """``dt_j / dt_ref`` and the sampler times of the next ``m`` steps (the newest dt,
        continued with the recent growth of the step size)."""
        ts = np.asarray(times, dtype=np.float64)
        d = np.diff(ts)
        dts = np.abs(d)
        if len(dts) == 0 or not np.all(np.isfinite(dts)):
            return np.ones(m), np.full(m, ts[-1] if len(ts) else 0.0)
        if self.dt_ref is None:
            self.dt_ref = float(np.mean(dts))
        last = dts[-1]
        g = 1.0
        if len(dts) >= 2 and dts[-2] > 0:
            g = float(np.clip(last / dts[-2], 0.8, 1.25))
        grow = g ** np.arange(1, m + 1)
        future = ts[-1] + d[-1] * np.cumsum(grow)
        if not self.dt_ref > 0:
            return np.ones(m), future
        w = (last / self.dt_ref * grow) ** self.dt_power
        if self.sensitivity:
            w = w * self._profile(ts[0], future)
        return w, future

    def _profile(self, t0: float, future: np.ndarray) -> np.ndarray:
        """How much an error made at sampler time ``t`` moves the sample, relative to one
        made halfway: ``((1/2 + c) / (f + c))^q`` with ``f`` the fraction of the way from
        the first time ``t0`` to 0 (q = ``sensitivity``, c = ``sensitivity_offset``).
        Early errors are carried, and amplified, through every later step.  Only for
        samplers that run toward t = 0; 1 elsewhere."""
        if not (t0 > 0 and np.all(future <= t0)):
            return np.ones_like(future)
        f = np.clip(1.0 - future / t0, 0.0, 1.0)
        c = self.sensitivity_offset
        return ((0.5 + c) / (f + c)) ** self.sensitivity

    def _weights(self, times: Sequence[float], m: int) -> np.ndarray:
        return self._ahead(times, m)[0]

    def observe(self, step: int, errors: Optional[np.ndarray], horizon: int,
                times: Sequence[float]) -> None:
        self.last_jump = False
        if errors is None or len(errors) == 0 or horizon < 1:
            if self.c is None:
                # before any error signal: ``first_window`` steps forecast (0 by default)
                self.window = self.first_window if self.tolerance else 0
                self.window_reason = NO_SIGNAL
                return
        else:
            e = np.asarray(errors, dtype=np.float64)
            e = np.where(np.isfinite(e), e, np.inf)
            obs = float(np.quantile(e, self.quantile)) if self.quantile < 1 else float(np.max(e))
            self.last_observed = obs
            pred = self.predicted(horizon)
            c_new = obs / float(horizon) ** self.p
            if pred is not None and obs > self.jump * pred:
                self.last_jump = True
            if (self.c is None or c_new >= self.c or not math.isfinite(c_new)
                    or step < self.first_enhance):
                self.c = c_new
            else:                                    # relax gradually toward a smaller error
                self.c = self.c ** self.relax * c_new ** (1.0 - self.relax)
        self._plan(times)

    def _plan(self, times: Sequence[float]) -> None:
        lo, hi = self.min_skip, self.max_skip
        if self.tolerance == 0 or self.c is None or not math.isfinite(self.c):
            self.window, self.window_reason = (lo if self.tolerance else 0), BUDGET
            return
        r, future = self._ahead(times, hi)
        h = np.arange(1, hi + 1, dtype=np.float64)
        spent = np.cumsum(r * self.c * h ** self.p)
        allowed = np.full(hi, self.tolerance)
        if self.cost is not None:
            # a window may spend in proportion to what it saves: the mean cost of the
            # computes it replaces, relative to the dearest step
            cj = np.array([float(self.cost(float(x))) for x in future])
            allowed = allowed * (np.cumsum(cj) / h / self.cost_ref) ** self.cost_power
        ok = spent <= allowed
        m = hi if ok.all() else int(np.argmin(ok))          # the first step over budget
        if m >= hi:
            self.window, self.window_reason = hi, MAX_SKIP
        elif m < lo:
            self.window, self.window_reason = lo, BUDGET
        else:
            self.window, self.window_reason = m, BUDGET

    @property
    def cost_ref(self) -> float:
        return float(getattr(self.cost, "ref", 1.0))


def parse_pattern(pattern: str) -> List[bool]:
    """``"C..C."`` -> ``[True, False, False, True, False]`` (``ValueError`` for anything
    but a non-empty string of ``C`` and ``.`` starting with ``C``)."""
    if not isinstance(pattern, str) or not pattern or set(pattern) - {"C", "."} or pattern[0] != "C":
        raise ValueError(f"a schedule pattern is a string of C (computed) and . (forecast), one "
                         f"character per step, starting with C; got {pattern!r}")
    return [c == "C" for c in pattern]


def pattern_of(computed: Sequence[bool]) -> str:
    """``[True, False, True]`` -> ``"C.C"``."""
    return "".join("C" if c else "." for c in computed)


class PatternPolicy(SchedulePolicy):
    """Computes the steps a pattern of the run's length marks ``C`` (see the module doc);
    a run of a length no pattern has is decided by ``otherwise`` (the adaptive policy)."""

    name = "pattern"

    def __init__(self, patterns: Sequence[str], otherwise: SchedulePolicy):
        self.patterns = {len(p): parse_pattern(p) for p in patterns}
        if not self.patterns:
            raise ValueError("the pattern schedule needs at least one pattern")
        self.otherwise = otherwise
        self.start(None)

    def start(self, num_steps: Optional[int]) -> None:
        self.num_steps = num_steps
        if num_steps is None and len(self.patterns) == 1:
            self.active: Optional[List[bool]] = next(iter(self.patterns.values()))
        else:
            self.active = self.patterns.get(num_steps) if num_steps is not None else None
        self.otherwise.start(num_steps)

    @property
    def needs_errors(self) -> bool:  # type: ignore[override]
        return self.active is None and self.otherwise.needs_errors

    def describe(self) -> str:
        if self.active is not None:
            return f"pattern of {len(self.active)} steps"
        n = "unknown length" if self.num_steps is None else f"{self.num_steps} steps"
        have = ", ".join(str(k) for k in sorted(self.patterns))
        return f"{self.otherwise.describe()} (no pattern for {n}; patterns for {have} steps)"

    def decide_static(self, step: int, since_compute: int, has_anchor: bool) -> Optional[str]:
        if self.active is None:
            return self.otherwise.decide_static(step, since_compute, has_anchor)
        if not has_anchor:
            return NO_HISTORY
        if step >= len(self.active):
            return PAST
        return PATTERN if self.active[step] else None

    def decide(self, step: int, since_compute: int, has_anchor: bool) -> Optional[str]:
        if self.active is None:
            return self.otherwise.decide(step, since_compute, has_anchor)
        return self.decide_static(step, since_compute, has_anchor)

    def observe(self, step: int, errors: Optional[np.ndarray], horizon: int,
                times: Sequence[float]) -> None:
        if self.active is None:
            self.otherwise.observe(step, errors, horizon, times)

    def predicted(self, horizon: int) -> Optional[float]:
        return self.otherwise.predicted(horizon) if self.active is None else None

    def plan(self, num_steps: int) -> List[bool]:
        if num_steps in self.patterns:
            return list(self.patterns[num_steps])
        return self.otherwise.plan(num_steps)


class IntervalCost:
    """Relative cost of computing a step at sampler time ``t``: ``cost`` inside each
    interval ``lo <= t <= hi`` of ``intervals`` (``[lo, hi, cost]``; e.g. where
    classifier-free guidance runs two forwards), 1 elsewhere.  ``ref``: the dearest cost."""

    def __init__(self, intervals: Sequence[Sequence[float]]):
        self.intervals = [tuple(float(x) for x in iv) for iv in intervals]
        self.ref = max([1.0] + [iv[2] for iv in self.intervals])

    def __call__(self, t: float) -> float:
        for lo, hi, f in self.intervals:
            if lo <= t <= hi:
                return f
        return 1.0


def make_policy(config) -> SchedulePolicy:
    """The policy of a :class:`hicache3d.CacheConfig`."""
    if config.schedule == "pattern":
        return PatternPolicy(config.pattern, make_policy(config.replace(schedule="adaptive")))
    if config.schedule == "adaptive":
        return AdaptivePolicy(config.tolerance, max_skip=config.max_skip, min_skip=config.min_skip,
                              first_enhance=config.first_enhance, last_enhance=config.last_enhance,
                              exponent=error_exponent(config.backend, config.order),
                              cost=IntervalCost(config.compute_cost) if config.compute_cost else None)
    return FixedPolicy(Schedule(config.interval, config.first_enhance, config.last_enhance))
