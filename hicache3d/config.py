"""Typed, validated configuration of one cached sampling site."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from .schedule import parse_pattern
from .forecast.registry import (DEFAULT_BACKEND, DEFAULT_BLEND, DEFAULT_CANDIDATES, DEFAULT_FALLBACK,
                                _check, _is_int, _is_num, default, min_history,
                                validate_forecast_options)

__all__ = ["CacheConfig", "validate_forecast_options", "min_history", "SCHEDULES"]

SCHEDULES = ("fixed", "adaptive", "pattern")


@dataclass(frozen=True)
class CacheConfig:
    """Settings of one cached sampling site.

    Schedule (TaylorSeer/HiCache cadence): the first ``first_enhance`` steps are computed,
    then one step in every ``interval`` is computed and the others are forecast; the last
    ``last_enhance`` steps are computed when the run length is known (``num_steps``, or
    given per run).  ``interval=1`` computes every step (no caching).

    ``schedule="adaptive"`` replaces the cadence by error control (see
    :mod:`hicache3d.schedule`): after the warm-up, every computed step also measures the
    error of the forecast it replaces, and the next window forecasts as many steps as keep
    the sum of their predicted errors, each weighted by the step's share of the sample
    (``dt``), within ``tolerance`` (a relative velocity error; 0 computes every step);
    at least ``min_skip`` and at most ``max_skip`` steps in a row are forecast.
    ``interval`` is not used by the adaptive schedule.  ``compute_cost``: intervals
    ``[lo, hi, cost]`` of sampler time where a compute costs ``cost`` times the others
    (e.g. ``[[0.5, 1.0, 2.0]]`` where two-forward guidance applies); the adaptive schedule
    then gives a window a budget in proportion to the cost of the computes it replaces.

    ``schedule="pattern"`` computes exactly the steps marked ``C`` in ``pattern`` (``.``
    forecast; one string per run length, e.g. ``"C.C.C...C.....C....C..C.C"``), the
    schedule ``hicache3d tune --schedules pattern`` searches on the user's model; a run of
    a length no pattern has uses the adaptive schedule (``tolerance`` ...) instead.
    ``first_enhance`` / ``last_enhance`` / ``interval`` do not apply to a pattern.

    Forecast: ``backend`` is the basis (``reuse`` | ``taylor`` | ``hermite`` | ``dmd``, or
    any other in :mod:`hicache3d.forecast.registry`; ``auto`` ranks the ``candidates``),
    fitted on the newest ``history`` computed velocities.  ``horizon`` measures
    forecast distance in step index (``"step"``) or in the sampler's own time (``"time"``).
    ``damping`` shrinks the extrapolated part of every forecast toward the last computed
    velocity (0: none, 1: plain reuse).  ``batch_dim`` is the axis of independent batch items
    (each is fitted on its own); ``None`` fits the whole velocity as one item.
    ``holdouts``: how many of the newest snapshots ``auto`` backcasts to rank its
    candidates (1: measured on the bundled generator, 32 shapes, 21 settings, within
    0.001 mean IoU of 2 in every setting, with a fifth less forecasting time).
    ``blend``: ``auto`` serves every candidate that fits, each weighted by its backcast
    error (carried to the forecast's horizon by its error model) to the power ``-blend``;
    0 serves the best-ranked alone.  2 measured on the bundled generator (32 shapes, 21
    settings): within 0.001 mean IoU of the best single basis in every setting, and a
    smaller open-loop error than serving the best alone (see ``benchmarks/openloop.md``).
    """

    backend: str = DEFAULT_BACKEND
    interval: int = 5
    first_enhance: int = 3
    last_enhance: int = 0
    history: int = 6
    num_steps: Optional[int] = None
    horizon: str = "step"
    order: int = default("order")
    sigma: float = default("sigma")
    damping: float = default("damping")
    taylor_form: str = default("taylor_form")
    rank: int = default("rank")
    rank_tol: float = default("rank_tol")
    clamp: bool = default("clamp")
    fallback: str = DEFAULT_FALLBACK
    batch_dim: Optional[int] = 0
    candidates: Tuple[str, ...] = DEFAULT_CANDIDATES
    candidate_damping: Tuple[float, ...] = (0.0, 0.5)
    holdouts: int = 1       # auto: newest snapshots held out to rank the candidates
    blend: float = DEFAULT_BLEND  # auto: blend the candidates by backcast error^-blend (0: the best alone)
    schedule: str = "fixed"
    tolerance: float = 0.1
    max_skip: int = 8
    min_skip: int = 0
    compute_cost: Tuple[Tuple[float, float, float], ...] = ()
    pattern: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("candidates", "candidate_damping", "pattern"):
            v = getattr(self, name)
            if isinstance(v, (list, str)):
                object.__setattr__(self, name, tuple([v] if isinstance(v, str) else v))
        _check(_is_int(self.interval) and 1 <= self.interval <= 1000, "interval",
               "an integer in [1, 1000]", self.interval)
        _check(_is_int(self.first_enhance) and self.first_enhance >= 0, "first_enhance",
               "an integer >= 0", self.first_enhance)
        _check(_is_int(self.last_enhance) and self.last_enhance >= 0, "last_enhance",
               "an integer >= 0", self.last_enhance)
        _check(self.num_steps is None or (_is_int(self.num_steps) and self.num_steps >= 1),
               "num_steps", "None or an integer >= 1", self.num_steps)
        _check(self.horizon in ("step", "time"), "horizon", "'step' or 'time'", self.horizon)
        _check(self.batch_dim is None or _is_int(self.batch_dim), "batch_dim",
               "None or an integer axis", self.batch_dim)
        _check(isinstance(self.clamp, bool), "clamp", "True or False", self.clamp)
        _check(self.schedule in SCHEDULES, "schedule", "'fixed', 'adaptive' or 'pattern'", self.schedule)
        pats = self.pattern
        ok = isinstance(pats, tuple) and all(isinstance(p, str) for p in pats)
        try:
            lengths = [len(parse_pattern(p)) for p in pats] if ok else []
        except ValueError:
            ok = False
        _check(ok, "pattern", "strings of C (computed) and . (forecast), one character per step, "
               "each starting with C", pats)
        _check(len(set(lengths)) == len(lengths), "pattern", "at most one pattern per run length "
               f"(lengths {lengths})", pats)
        _check(self.schedule != "pattern" or len(pats) > 0, "pattern",
               "at least one pattern with schedule='pattern'", pats)
        _check(_is_num(self.tolerance) and self.tolerance >= 0, "tolerance",
               "a finite number >= 0", self.tolerance)
        _check(_is_int(self.max_skip) and 1 <= self.max_skip <= 1000, "max_skip",
               "an integer in [1, 1000]", self.max_skip)
        _check(_is_int(self.min_skip) and self.min_skip >= 0, "min_skip", "an integer >= 0",
               self.min_skip)
        _check(self.max_skip >= self.min_skip, "max_skip", f"an integer >= min_skip ({self.min_skip})",
               self.max_skip)
        cc = self.compute_cost
        ok = isinstance(cc, (list, tuple)) and all(
            isinstance(iv, (list, tuple)) and len(iv) == 3 and all(_is_num(x) for x in iv)
            and iv[0] <= iv[1] and iv[2] > 0 for iv in cc)
        _check(ok, "compute_cost", "a list of [lo, hi, cost] (lo <= hi, cost > 0)", cc)
        object.__setattr__(self, "compute_cost", tuple(tuple(float(x) for x in iv) for iv in cc))
        validate_forecast_options(**self.forecast_options(), backend=self.backend,
                                  history=self.history)

    def forecast_options(self) -> Dict[str, Any]:
        """Keyword options of :func:`hicache3d.forecast.make_forecaster`."""
        return dict(order=self.order, sigma=self.sigma, damping=self.damping,
                    taylor_form=self.taylor_form, rank=self.rank, rank_tol=self.rank_tol,
                    clamp=self.clamp, fallback=self.fallback, batch_dim=self.batch_dim,
                    candidates=self.candidates, candidate_damping=self.candidate_damping,
                    holdouts=self.holdouts, blend=self.blend)

    def replace(self, **changes: Any) -> "CacheConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "CacheConfig":
        """Build from a plain mapping (e.g. a TOML table); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown cache setting(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**dict(values))

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)
