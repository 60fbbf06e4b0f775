"""The runtime of one cached sampling site: ``VelocityCache.step(t, compute)``."""
from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from .config import CacheConfig
from .forecast import make_forecaster
from .schedule import FORCED, NO_HISTORY, PAST, Schedule, make_policy

__all__ = ["VelocityCache", "CacheStats", "StepRecord"]

# a run that computes fewer steps than this while forecasting more is reported
HANDFUL = 4


@dataclass
class StepRecord:
    """One step of a run: computed (and why) or forecast (``reason`` is ``None``).

    ``observed``: on a computed step, the measured relative error (worst batch item) of the
    forecast of that step from the snapshots before it, ``horizon`` steps after the
    previous computed step.  ``predicted``: the schedule's error model at that horizon.
    ``basis``: the basis that served (or, on a computed step, was checked).
    """

    step: int
    computed: bool
    reason: Optional[str] = None
    horizon: int = 0
    observed: Optional[float] = None
    predicted: Optional[float] = None
    basis: Optional[str] = None

    def as_dict(self) -> Dict[str, Any]:
        r = lambda x: None if x is None else float(f"{x:.6g}")  # noqa: E731
        return {"step": self.step, "computed": self.computed, "reason": self.reason,
                "horizon": self.horizon, "observed": r(self.observed),
                "predicted": r(self.predicted), "basis": self.basis}


@dataclass
class CacheStats:
    """What one run of a cached site did.

    ``computed`` / ``forecast``: steps that ran the network / were forecast.
    ``per_basis``: forecasts per basis that served them (counted per batch item; a
    ``~0.5`` suffix marks a damped variant).  ``fallbacks``: why a basis could not serve
    and the next one did (``"dmd:insufficient_history"`` ...).  ``restarts``: why the
    snapshot history was restarted.  ``reasons``: why steps were computed (``warm-up``,
    ``cadence``, ``budget`` ...).  ``skipped``: steps that needed no velocity at all
    (``dt = 0``).  ``trace``: one :class:`StepRecord` per step of this run (not kept by
    :meth:`merge`).  ``schedule``: what decided the steps (``"adaptive, tolerance 2"``,
    ``"pattern of 25 steps"`` ...).  Times are wall-clock seconds: ``compute_time_s`` in the network
    (with the copy of its output into the history), ``forecast_time_s`` everything else
    the cache did: deciding, bringing the history up to date (the Gram products, the
    adaptive schedule's measured error), the fits and the forecasts.
    """

    computed: int = 0
    forecast: int = 0
    per_basis: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)
    restarts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    skipped: int = 0
    clamped_modes: int = 0
    compute_time_s: float = 0.0
    forecast_time_s: float = 0.0
    trace: List[StepRecord] = field(default_factory=list)
    schedule: str = ""

    @property
    def steps(self) -> int:
        return self.computed + self.forecast

    @property
    def pattern(self) -> str:
        """``C`` computed, ``.`` forecast, ``-`` skipped, one character per step."""
        return "".join("C" if r.computed else ("-" if r.reason == "skipped" else ".")
                       for r in self.trace)

    def merge(self, other: "CacheStats") -> "CacheStats":
        out = CacheStats()
        names = [s.schedule for s in (self, other) if s.schedule]
        out.schedule = names[0] if len(set(names)) == 1 else ("mixed" if names else "")
        for s in (self, other):
            out.computed += s.computed
            out.forecast += s.forecast
            out.per_basis.update(s.per_basis)
            out.fallbacks.update(s.fallbacks)
            out.restarts.update(s.restarts)
            out.reasons.update(s.reasons)
            out.skipped += s.skipped
            out.clamped_modes += s.clamped_modes
            out.compute_time_s += s.compute_time_s
            out.forecast_time_s += s.forecast_time_s
        return out

    def as_dict(self) -> Dict[str, Any]:
        out = {
            "computed": self.computed, "forecast": self.forecast, "steps": self.steps,
            "per_basis": dict(self.per_basis), "fallbacks": dict(self.fallbacks),
            "restarts": dict(self.restarts), "clamped_modes": self.clamped_modes,
            "reasons": dict(self.reasons), "skipped": self.skipped,
            "compute_time_s": round(self.compute_time_s, 6),
            "forecast_time_s": round(self.forecast_time_s, 6),
        }
        if self.schedule:
            out["schedule"] = self.schedule
        if self.trace:
            out["pattern"] = self.pattern
            out["trace"] = [r.as_dict() for r in self.trace]
        return out

    def summary(self) -> str:
        """One line: counts, why steps were computed, bases, fallbacks, the step pattern."""
        parts = [f"{self.computed} computed / {self.forecast} forecast"]
        if self.skipped:
            parts[0] += f" / {self.skipped} skipped (dt = 0)"
        if self.reasons:
            parts.append("computed for: " + ", ".join(
                f"{k} {v}" for k, v in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))))
        if self.per_basis:
            parts.append("item-forecasts by basis: "
                         + ", ".join(f"{k} {v}" for k, v in sorted(self.per_basis.items())))
        if self.fallbacks:
            parts.append("fallbacks " + ", ".join(f"{k} {v}" for k, v in sorted(self.fallbacks.items())))
        if self.schedule and not self.schedule.startswith("fixed"):
            parts.append(f"schedule: {self.schedule}")
        if self.trace:
            parts.append(f"pattern {self.pattern}")
        return "; ".join(parts)


def _on_host(t: Any) -> bool:
    """Whether reading ``t`` as a Python float costs no device round-trip."""
    return not isinstance(t, torch.Tensor) or t.device.type in ("cpu", "meta")


def _position(t: Any) -> float:
    if isinstance(t, torch.Tensor):
        return float(t.detach().reshape(-1)[0].item())
    return float(t)


def _positions(ts: List[Any]) -> List[float]:
    """Floats of many step times with at most one device round-trip."""
    dev = [x for x in ts if not _on_host(x)]
    if not dev:
        return [_position(x) for x in ts]
    vals = iter(torch.stack([x.detach().reshape(-1)[0].to(torch.float64) for x in dev]).cpu().tolist())
    return [_position(x) if _on_host(x) else next(vals) for x in ts]


def _label(labels: List[str]) -> Optional[str]:
    if not labels:
        return None
    c = Counter(labels)
    return c.most_common(1)[0][0] if len(c) == 1 else ",".join(f"{k}:{v}" for k, v in sorted(c.items()))


class VelocityCache:
    """Runs the network or forecasts the velocity, step by step, for one sampling site.

    >>> cache = VelocityCache(CacheConfig(backend="dmd", interval=5))
    >>> for t in timesteps:                          # doctest: +SKIP
    ...     v = cache.step(t, lambda: model(x, t))
    >>> cache.stats.summary()                        # doctest: +SKIP

    Call :meth:`reset` (optionally with the run's ``num_steps``) before each new run.
    Every decision goes through :attr:`policy` (``config.schedule``); adapters whose
    sampler decides itself pass ``force_compute`` / ``force_forecast`` to :meth:`step`,
    and a step that needs no velocity at all goes through :meth:`skip`.

    On a GPU, a computed step does not synchronise with the host: what a decision needs
    (the step times of ``schedule="adaptive"`` / ``horizon="time"``, the small Gram
    matrix) is read in one batch at the first step of a window that may be forecast; with
    ``horizon="time"`` a computed step's snapshot (a device copy) is stored then, when its
    time is known.
    """

    def __init__(self, config: Optional[CacheConfig] = None, **overrides: Any):
        config = config or CacheConfig()
        if overrides:
            config = config.replace(**overrides)
        self.config = config
        self.schedule = Schedule(config.interval, config.first_enhance, config.last_enhance)
        self.policy = make_policy(config)
        self.forecaster = make_forecaster(config.backend, config.history, **config.forecast_options())
        self.runs: List[CacheStats] = []
        self._pattern_warned = False
        self._start(config.num_steps)

    def _start(self, num_steps: Optional[int]) -> None:
        self.num_steps = num_steps if num_steps is not None else self.config.num_steps
        self.step_index = 0
        self._since_compute = 0
        self.stats = CacheStats()
        self.forecaster.reset()
        self._restarts_seen = Counter(self.forecaster.stats.restarts)
        self.policy.start(self.num_steps)
        self._times: List[Any] = []          # step times (floats, or tensors not yet read)
        self._computed_at: List[int] = []    # step indices of computed steps
        self._verify_pending = False
        self._deferred: List[tuple] = []      # (time index, velocity copy) not yet pushed
        self._warned = False
        self.stats.schedule = self.policy.describe()
        if self.num_steps is not None:
            try:
                plan = self.policy.plan(self.num_steps)
            except NotImplementedError:          # decided at run time
                plan = None
            if plan is not None:
                self._check_plan(plan.count(True), self.num_steps)

    def reset(self, num_steps: Optional[int] = None) -> None:
        """Start a new run (the previous run's stats move to :attr:`runs`)."""
        if self.stats.steps:
            self._check_plan(self.stats.computed, self.stats.steps + self.stats.skipped)
            self._check_pattern_length(self.stats.steps + self.stats.skipped)
            self.runs.append(self.stats)
            del self.runs[:-64]
        self._start(num_steps)

    def _check_plan(self, computed: int, steps: int) -> None:
        if self._warned or computed >= HANDFUL or steps - computed <= computed:
            return
        self._warned = True
        c = self.config
        fix = "lower the interval / tolerance"
        if c.schedule == "fixed":
            how = f"interval {c.interval}, first_enhance {c.first_enhance}"
        elif getattr(self.policy, "active", None) is not None:
            how, fix = self.policy.describe(), "mark more steps C in the pattern"
        else:
            how = (f"adaptive schedule, tolerance {c.tolerance:g}, max_skip {c.max_skip}, "
                   f"first_enhance {c.first_enhance}")
        warnings.warn(f"hicache3d: only {computed} of {steps} steps run the network ({how}); the "
                      f"result may be far from the uncached one: {fix}", UserWarning, stacklevel=3)

    def _check_pattern_length(self, steps: Optional[int]) -> None:
        """A run of unknown length that followed a pattern of another length (``steps``;
        ``None``: the run has just gone past the pattern's end, and its steps past it are
        computed; a shorter run used only the pattern's start): said once per cache."""
        active = getattr(self.policy, "active", None)
        if self._pattern_warned or active is None or steps == len(active):
            return
        self._pattern_warned = True
        n = len(active)
        what = ("goes on past it: the steps past it are computed" if steps is None
                else f"had {steps}: it used the first {steps} steps of it" if steps < n
                else f"had {steps}: the steps past it were computed")
        warnings.warn(f"hicache3d: the schedule pattern has {n} steps and this run {what}; the "
                      f"pattern was measured for {n} steps (hicache3d tune --steps N finds one "
                      f"for the step count you run)", UserWarning, stacklevel=4)

    @property
    def total_stats(self) -> CacheStats:
        out = CacheStats()
        for s in self.runs + [self.stats]:
            out = out.merge(s)
        return out

    # ---------------------------------------------------------------- decisions
    def _flush(self) -> None:
        """Bring the forecaster and the schedule up to date with the computed steps: store
        deferred snapshots, and (adaptive) measure the error of the forecast the newest
        one replaced and plan the next window.  Called only before a decision that needs
        it (never on a computed step of a fixed cadence): at most one host round-trip."""
        if not self._deferred and not self._verify_pending:
            return
        if self._deferred or any(not isinstance(x, float) for x in self._times):
            self._times = _positions(self._times)
        for k, v in self._deferred:
            self.forecaster.push(self._times[k], v)
        self._deferred = []
        if self._verify_pending:
            self._verify_pending = False
            f, pol = self.forecaster, self.policy
            ca = self._computed_at
            horizon = ca[-1] - ca[-2] if len(ca) >= 2 else 0
            errors = None
            if horizon > 0:
                errors = f.newest_error()
            rec = self.stats.trace[self._record_of_last_compute]
            rec.horizon = horizon
            rec.predicted = pol.predicted(horizon) if horizon else None
            if errors is not None and len(errors):
                rec.observed = float(np.max(errors))
                rec.basis = _label(getattr(f, "last_error_labels", []))
            pol.observe(ca[-1], errors, horizon, self._times)

    def will_compute(self) -> bool:
        """Whether the next :meth:`step` runs the network."""
        out = self._decide() is not None
        self._sync_restarts()
        return out

    def _decide(self) -> Optional[str]:
        args = (self.step_index, self._since_compute, len(self.forecaster) > 0 or bool(self._deferred))
        reason = self.policy.decide_static(*args)
        if reason is None:
            self._flush()
            reason = self.policy.decide(*args)
        return reason

    def _note_time(self, t: Any) -> None:
        if self.policy.needs_errors or self.config.horizon == "time":
            self._times.append(t.detach() if isinstance(t, torch.Tensor) else float(t))

    # ---------------------------------------------------------------- steps
    def step(self, t: Any, compute: Callable[[], Any], *, force_compute: bool = False,
             force_forecast: bool = False) -> Any:
        """Velocity of this step: ``compute()`` on computed steps, a forecast otherwise.

        ``force_compute`` / ``force_forecast``: the caller's sampler has decided (its own
        schedule); the step is still recorded here.  A forecast is impossible with no
        usable snapshot, so ``force_forecast`` then computes."""
        t_start = time.perf_counter()
        self._note_time(t)
        f = self.forecaster
        reason = FORCED if force_compute else (None if force_forecast else self._decide())
        if reason is None:
            self._flush()
            if not f.ready():
                reason = NO_HISTORY
        i = self.step_index
        self.stats.forecast_time_s += time.perf_counter() - t_start     # deciding
        if reason is not None:
            t0 = time.perf_counter()
            v = compute()
            if self.config.horizon == "step":
                f.push(float(i), v)
            elif _on_host(t) and not self._deferred:
                self._times[-1] = _position(t)
                f.push(self._times[-1], v)
            else:                       # stored at the next step, when its time is read
                from .tree import map_leaves
                self._deferred.append((len(self._times) - 1, map_leaves(lambda x: x.detach().clone(), v)))
            if reason == PAST:
                self._check_pattern_length(None)
            self.stats.computed += 1
            self.stats.reasons[reason] += 1
            self._since_compute = 0
            self._computed_at.append(i)
            self.stats.trace.append(StepRecord(i, True, reason))
            self._record_of_last_compute = len(self.stats.trace) - 1
            self._verify_pending = self.policy.needs_errors
            self.stats.compute_time_s += time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            before_b, before_f = Counter(f.stats.per_basis), Counter(f.stats.fallbacks)
            clamped0 = f.stats.clamped_modes
            pos = float(i) if self.config.horizon == "step" else self._host_time(-1)
            v = f.predict(pos)
            self.stats.per_basis.update(f.stats.per_basis - before_b)
            self.stats.fallbacks.update(f.stats.fallbacks - before_f)
            self.stats.clamped_modes += f.stats.clamped_modes - clamped0
            self.stats.forecast += 1
            self._since_compute += 1
            h = i - self._computed_at[-1] if self._computed_at else 0
            self.stats.trace.append(StepRecord(i, False, None, h, None, self.policy.predicted(h),
                                               _label(f.last_labels)))
            self.stats.forecast_time_s += time.perf_counter() - t0
        self.step_index += 1
        self._sync_restarts()
        return v

    def _sync_restarts(self) -> None:
        """History restarts the forecaster counted since the last call go to this run."""
        now = Counter(self.forecaster.stats.restarts)
        self.stats.restarts.update(now - self._restarts_seen)
        self._restarts_seen = now

    def _host_time(self, k: int) -> float:
        x = self._times[k]
        if not isinstance(x, float):
            x = self._times[k] = _position(x)
        return x

    def skip(self, t: Any = None, reason: str = "skipped") -> None:
        """Record a step that needs no velocity (e.g. a ``dt = 0`` step): nothing is
        computed or forecast, and the schedule does not count it."""
        if t is not None:
            self._note_time(t)
        self.stats.skipped += 1
        self.stats.trace.append(StepRecord(self.step_index, False, "skipped"))
        self.step_index += 1

    def __repr__(self) -> str:
        c = self.config
        sched = (f"interval={c.interval}" if c.schedule == "fixed"
                 else f"schedule='adaptive', tolerance={c.tolerance:g}")
        return (f"VelocityCache(backend={c.backend!r}, {sched}, "
                f"first_enhance={c.first_enhance}, history={c.history}; {self.stats.summary()})")
