"""Typed, validated configuration of one cached sampling site."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

__all__ = ["CacheConfig", "validate_forecast_options", "min_history"]

_BACKENDS = ("reuse", "taylor", "hermite", "dmd", "auto")
_BASES = ("reuse", "taylor", "hermite", "dmd")


def _check(cond: bool, name: str, allowed: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_forecast_options(*, backend: str, history: int, order: int, sigma: float,
                              damping: float, taylor_form: str, rank: int, rank_tol: float,
                              fallback: str, candidates: Sequence[str],
                              candidate_damping: Sequence[float], holdouts: int,
                              **_other: Any) -> None:
    _check(backend in _BACKENDS, "backend", f"one of {', '.join(_BACKENDS)}", backend)
    _check(_is_int(history) and 1 <= history <= 64, "history", "an integer in [1, 64]", history)
    _check(_is_int(order) and 0 <= order <= 8, "order", "an integer in [0, 8]", order)
    _check(_is_num(sigma) and 0 < sigma <= 1, "sigma", "a number in (0, 1]", sigma)
    _check(_is_num(damping) and 0 <= damping <= 1, "damping", "a number in [0, 1]", damping)
    _check(taylor_form in ("newton", "taylorseer"), "taylor_form", "'newton' or 'taylorseer'", taylor_form)
    _check(_is_int(rank) and 0 <= rank <= 64, "rank", "an integer in [0, 64] (0 = automatic)", rank)
    _check(_is_num(rank_tol) and 0 < rank_tol < 1, "rank_tol", "a number in (0, 1)", rank_tol)
    _check(fallback in ("reuse", "taylor", "hermite"), "fallback", "one of reuse, taylor, hermite", fallback)
    _check(len(candidates) > 0 and all(c in _BASES for c in candidates), "candidates",
           f"a non-empty list drawn from {', '.join(_BASES)}", candidates)
    _check(len(candidate_damping) > 0 and all(_is_num(d) and 0 <= d <= 1 for d in candidate_damping),
           "candidate_damping", "a non-empty list of numbers in [0, 1]", candidate_damping)
    _check(_is_int(holdouts) and 1 <= holdouts <= 8, "holdouts", "an integer in [1, 8]", holdouts)
    # a history too short for the basis would silently serve a fallback on every step
    bases = list(candidates) if backend == "auto" else [backend]
    for b in bases:
        need, why = min_history(b, order)
        if history < need:
            what = f"backend {backend!r}" + (f" (candidate {b!r})" if backend == "auto" else "")
            raise ValueError(f"history must be >= {need} for {what}: {why}; got history={history}")


def min_history(basis: str, order: int = 1) -> Tuple[int, str]:
    """Fewest snapshots ``basis`` needs to serve a forecast at all, and why."""
    if basis == "dmd":
        return 3, "an exponential fit needs at least 3 snapshots"
    if basis in ("taylor", "hermite"):
        return order + 1, f"order {order} needs {order + 1} snapshots"
    return 1, ""


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

    Forecast: ``backend`` is the basis (``reuse`` | ``taylor`` | ``hermite`` | ``dmd`` |
    ``auto``), fitted on the newest ``history`` computed velocities.  ``horizon`` measures
    forecast distance in step index (``"step"``) or in the sampler's own time (``"time"``).
    ``damping`` shrinks the extrapolated part of every forecast toward the last computed
    velocity (0: none, 1: plain reuse).  ``batch_dim`` is the axis of independent batch items
    (each is fitted on its own); ``None`` fits the whole velocity as one item.
    """

    backend: str = "dmd"
    interval: int = 5
    first_enhance: int = 3
    last_enhance: int = 0
    history: int = 6
    num_steps: Optional[int] = None
    horizon: str = "step"
    order: int = 1
    sigma: float = 0.5
    damping: float = 0.0
    taylor_form: str = "newton"
    rank: int = 0
    rank_tol: float = 1e-4
    clamp: bool = True
    fallback: str = "hermite"
    batch_dim: Optional[int] = 0
    candidates: Tuple[str, ...] = _BASES
    candidate_damping: Tuple[float, ...] = (0.0, 0.5)
    holdouts: int = 2
    schedule: str = "fixed"
    tolerance: float = 0.1
    max_skip: int = 8
    min_skip: int = 0
    compute_cost: Tuple[Tuple[float, float, float], ...] = ()

    def __post_init__(self) -> None:
        for name in ("candidates", "candidate_damping"):
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
        _check(self.schedule in ("fixed", "adaptive"), "schedule", "'fixed' or 'adaptive'", self.schedule)
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
                    holdouts=self.holdouts)

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
