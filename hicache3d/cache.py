"""The runtime of one cached sampling site: ``VelocityCache.step(t, compute)``."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from .config import CacheConfig
from .forecast import make_forecaster
from .schedule import Schedule

__all__ = ["VelocityCache", "CacheStats"]


@dataclass
class CacheStats:
    """What one run of a cached site did.

    ``computed`` / ``forecast``: steps that ran the network / were forecast.
    ``per_basis``: forecasts per basis that served them (counted per batch item; a
    ``~0.5`` suffix marks a damped variant).  ``fallbacks``: why a basis could not serve
    and the next one did (``"dmd:insufficient_history"`` ...).  ``restarts``: why the
    snapshot history was restarted.  Times are wall-clock seconds.
    """

    computed: int = 0
    forecast: int = 0
    per_basis: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)
    restarts: Counter = field(default_factory=Counter)
    clamped_modes: int = 0
    compute_time_s: float = 0.0
    forecast_time_s: float = 0.0

    @property
    def steps(self) -> int:
        return self.computed + self.forecast

    def merge(self, other: "CacheStats") -> "CacheStats":
        out = CacheStats()
        for s in (self, other):
            out.computed += s.computed
            out.forecast += s.forecast
            out.per_basis.update(s.per_basis)
            out.fallbacks.update(s.fallbacks)
            out.restarts.update(s.restarts)
            out.clamped_modes += s.clamped_modes
            out.compute_time_s += s.compute_time_s
            out.forecast_time_s += s.forecast_time_s
        return out

    def as_dict(self) -> Dict[str, Any]:
        return {
            "computed": self.computed, "forecast": self.forecast, "steps": self.steps,
            "per_basis": dict(self.per_basis), "fallbacks": dict(self.fallbacks),
            "restarts": dict(self.restarts), "clamped_modes": self.clamped_modes,
            "compute_time_s": round(self.compute_time_s, 6),
            "forecast_time_s": round(self.forecast_time_s, 6),
        }

    def summary(self) -> str:
        parts = [f"{self.computed} computed / {self.forecast} forecast"]
        if self.per_basis:
            parts.append("item-forecasts by basis: "
                         + ", ".join(f"{k} {v}" for k, v in sorted(self.per_basis.items())))
        if self.fallbacks:
            parts.append("fallbacks " + ", ".join(f"{k} {v}" for k, v in sorted(self.fallbacks.items())))
        return "; ".join(parts)


def _position(t: Any) -> float:
    if isinstance(t, torch.Tensor):
        return float(t.detach().reshape(-1)[0].item())
    return float(t)


class VelocityCache:
    """Runs the network or forecasts the velocity, step by step, for one sampling site.

    >>> cache = VelocityCache(CacheConfig(backend="dmd", interval=5))
    >>> for t in timesteps:                          # doctest: +SKIP
    ...     v = cache.step(t, lambda: model(x, t))
    >>> cache.stats.summary()                        # doctest: +SKIP

    Call :meth:`reset` (optionally with the run's ``num_steps``) before each new run.
    """

    def __init__(self, config: Optional[CacheConfig] = None, **overrides: Any):
        config = config or CacheConfig()
        if overrides:
            config = config.replace(**overrides)
        self.config = config
        self.schedule = Schedule(config.interval, config.first_enhance, config.last_enhance)
        self.forecaster = make_forecaster(config.backend, config.history, **config.forecast_options())
        self.runs: List[CacheStats] = []
        self._start(config.num_steps)

    def _start(self, num_steps: Optional[int]) -> None:
        self.num_steps = num_steps if num_steps is not None else self.config.num_steps
        self.step_index = 0
        self._since_compute = 0
        self.stats = CacheStats()
        self.forecaster.reset()

    def reset(self, num_steps: Optional[int] = None) -> None:
        """Start a new run (the previous run's stats move to :attr:`runs`)."""
        if self.stats.steps:
            self.runs.append(self.stats)
            del self.runs[:-64]
        self._start(num_steps)

    start_run = reset

    @property
    def total_stats(self) -> CacheStats:
        out = CacheStats()
        for s in self.runs + [self.stats]:
            out = out.merge(s)
        return out

    def will_compute(self) -> bool:
        """Whether the next :meth:`step` runs the network."""
        return self.schedule.should_compute(self.step_index, self._since_compute,
                                            len(self.forecaster) > 0, self.num_steps)

    def step(self, t: Any, compute: Callable[[], Any], *, force_compute: bool = False) -> Any:
        """Velocity of this step: ``compute()`` on computed steps, a forecast otherwise."""
        pos = float(self.step_index) if self.config.horizon == "step" else _position(t)
        f = self.forecaster
        restarts0 = Counter(f.stats.restarts)
        if force_compute or self.will_compute() or not f.ready():
            t0 = time.perf_counter()
            v = compute()
            f.push(pos, v)
            self.stats.computed += 1
            self._since_compute = 0
            self.stats.compute_time_s += time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            before_b, before_f = Counter(f.stats.per_basis), Counter(f.stats.fallbacks)
            clamped0 = f.stats.clamped_modes
            v = f.predict(pos)
            self.stats.per_basis.update(f.stats.per_basis - before_b)
            self.stats.fallbacks.update(f.stats.fallbacks - before_f)
            self.stats.clamped_modes += f.stats.clamped_modes - clamped0
            self.stats.forecast += 1
            self._since_compute += 1
            self.stats.forecast_time_s += time.perf_counter() - t0
        self.stats.restarts.update(f.stats.restarts - restarts0)
        self.step_index += 1
        return v

    def __repr__(self) -> str:
        c = self.config
        return (f"VelocityCache(backend={c.backend!r}, interval={c.interval}, "
                f"first_enhance={c.first_enhance}, history={c.history}; {self.stats.summary()})")
