"""The arms of the accuracy section: one forecaster each, hicache3d's or an outside library's.

An arm forecasts from anchors (times, velocities ``[1, d]`` float64) at query times.  Every
arm gets a fresh state per (scenario, seed), is driven through its own public API, and
receives the queries in increasing order.  The outside libraries (the seed package
``hicache_pp``, cache-dit's calibrators, diffusers' TaylorSeer state) are imported only when
an arm of theirs runs; :func:`probe_imports` says which of them import here.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable, Dict, List, Tuple

import torch

from ..forecast import make_forecaster
from .scenarios import N_ANCHORS

__all__ = ["Ctx", "ARMS", "probe_imports", "DEPS_NOTE"]


class Ctx:
    def __init__(self, times: List[int], anchors: List[torch.Tensor], queries: List[int],
                 spacing: int, geometry: str):
        self.times, self.anchors, self.queries = times, anchors, queries
        self.spacing, self.geometry = spacing, geometry

    def interval_for(self, q: int) -> int:
        """The cache interval whose skip window contains query ``q`` (``horizon`` holdout)."""
        if self.geometry == "substep":
            return self.spacing
        return (q - self.times[-1]) + 1


def arm_ours(backend: str, **opts: Any) -> Callable[[Ctx], List[torch.Tensor]]:
    def run(c: Ctx) -> List[torch.Tensor]:
        f = make_forecaster(backend, N_ANCHORS, **opts)
        for t, v in zip(c.times, c.anchors):
            f.push(float(t), v)
        return [f.predict(float(q)) for q in c.queries]
    return run


def _seed():
    import hicache_pp
    return hicache_pp


def arm_seed_dmd(rank: int = 0) -> Callable[[Ctx], List[torch.Tensor]]:
    def run(c: Ctx) -> List[torch.Tensor]:
        hp = _seed()
        return [hp.dmd_forecast(list(c.anchors), (q - c.times[-1]) / c.spacing, rank=rank)
                for q in c.queries]
    return run


def arm_seed_hermite(order: int = 2, sigma: float = 0.5) -> Callable[[Ctx], List[torch.Tensor]]:
    def run(c: Ctx) -> List[torch.Tensor]:
        hp = _seed()
        st = hp.hicache_init(num_steps=10 ** 6, interval=10 ** 5, max_order=order,
                             first_enhance=0, sigma=sigma)
        for t, v in zip(c.times, c.anchors):
            st["step"] = t
            st["activated_steps"].append(t)
            hp.hicache_update_derivatives(st, v)
        out = []
        for q in c.queries:
            st["step"] = q
            out.append(hp.hicache_forecast(st))
        return out
    return run


def arm_seed_auto(holdout: str) -> Callable[[Ctx], List[torch.Tensor]]:
    def run(c: Ctx) -> List[torch.Tensor]:
        hp = _seed()
        out = []
        for q in c.queries:           # the horizon holdout depends on the cache interval
            st = hp.hicache_init(num_steps=10 ** 6, interval=c.interval_for(q), max_order=2,
                                 first_enhance=0, sigma=0.5, backend="auto",
                                 history=N_ANCHORS, holdout=holdout)
            for t, v in zip(c.times, c.anchors):
                st["step"] = t
                st["activated_steps"].append(t)
                hp.hicache_update_derivatives(st, v)
                hp.dmd_update_snapshots(st, v, history=N_ANCHORS)
            st["step"] = q
            out.append(hp.auto_forecast_state(st))
        return out
    return run


def _cachedit():
    from cache_dit.caching.cache_contexts.calibrators import DMDCalibrator, TaylorSeerCalibrator
    return DMDCalibrator, TaylorSeerCalibrator


def arm_cachedit(kind: str, **kw: Any) -> Callable[[Ctx], List[torch.Tensor]]:
    """cache-dit calibrator: ``mark_step_begin()`` every step, ``update(Y)`` on computed
    steps, ``approximate()`` on skipped steps (as its cache context does)."""
    def run(c: Ctx) -> List[torch.Tensor]:
        DMD, TS = _cachedit()
        cal = DMD(history=N_ANCHORS, **kw) if kind == "dmd" else TS(**kw)
        anchors = dict(zip(c.times, c.anchors))
        want, out = set(c.queries), {}
        for step in range(0, max(c.queries) + 1):
            cal.mark_step_begin()
            if step in anchors:
                cal.update(anchors[step])
            elif step in want:
                out[step] = cal.approximate()
        return [out[q] for q in c.queries]
    return run


def _diffusers_state():
    from diffusers.hooks.taylorseer_cache import TaylorSeerState
    return TaylorSeerState


def arm_diffusers(order: int, factors_dtype: torch.dtype) -> Callable[[Ctx], List[torch.Tensor]]:
    """diffusers' TaylorSeer hook state: ``current_step`` set by the hook, ``update(outputs)``
    on computed steps, ``predict()`` on skipped ones."""
    def run(c: Ctx) -> List[torch.Tensor]:
        State = _diffusers_state()
        st = State(taylor_factors_dtype=factors_dtype, max_order=order)
        for t, v in zip(c.times, c.anchors):
            st.current_step = t
            st.update((v,))
        out = []
        for q in c.queries:
            st.current_step = q
            out.append(st.predict()[0])
        return out
    return run


# (label, group, description, factory)
ARMS: List[Tuple[str, str, str, Callable]] = [
    ("ours reuse", "ours", "newest snapshot", arm_ours("reuse")),
    ("ours taylor1", "ours", "polynomial through the newest 2 (Newton)", arm_ours("taylor", order=1)),
    ("ours taylor2", "ours", "polynomial through the newest 3 (Newton)", arm_ours("taylor", order=2)),
    ("ours taylor3", "ours", "cubic through the newest 4 (the seed's 'cubic' column)",
     arm_ours("taylor", order=3)),
    ("ours taylorseer1", "ours", "TaylorSeer backward differences, order 1",
     arm_ours("taylor", order=1, taylor_form="taylorseer")),
    ("ours taylorseer2", "ours", "TaylorSeer backward differences, order 2",
     arm_ours("taylor", order=2, taylor_form="taylorseer")),
    ("ours hermite2", "ours", "HiCache Hermite, order 2, sigma 0.5", arm_ours("hermite", order=2, sigma=0.5)),
    ("ours dmd", "ours", "exponential basis, automatic rank", arm_ours("dmd")),
    ("ours dmd r4", "ours", "exponential basis, rank 4", arm_ours("dmd", rank=4)),
    ("ours auto", "ours", "holdout-ranked selection (default candidates)", arm_ours("auto")),
    ("ours taylor2~0.5", "ours", "taylor2, damping 0.5", arm_ours("taylor", order=2, damping=0.5)),
    ("ours hermite2~0.5", "ours", "hermite2, damping 0.5",
     arm_ours("hermite", order=2, sigma=0.5, damping=0.5)),
    ("ours dmd~0.5", "ours", "dmd, damping 0.5", arm_ours("dmd", damping=0.5)),
    ("seed dmd", "hicache_pp", "dmd_forecast, automatic rank", arm_seed_dmd(0)),
    ("seed dmd r4", "hicache_pp", "dmd_forecast, rank 4", arm_seed_dmd(4)),
    ("seed hermite2", "hicache_pp", "hicache_init/update/forecast, order 2, sigma 0.5",
     arm_seed_hermite(2, 0.5)),
    ("seed auto 1step", "hicache_pp", "auto_forecast_state, holdout='1step'", arm_seed_auto("1step")),
    ("seed auto horizon", "hicache_pp", "auto_forecast_state, holdout='horizon'",
     arm_seed_auto("horizon")),
    ("cache-dit dmd", "cache-dit", "DMDCalibrator(history=8), automatic rank", arm_cachedit("dmd")),
    ("cache-dit taylorseer1", "cache-dit", "TaylorSeerCalibrator(n_derivatives=1)",
     arm_cachedit("ts", n_derivatives=1)),
    ("cache-dit taylorseer2", "cache-dit", "TaylorSeerCalibrator(n_derivatives=2)",
     arm_cachedit("ts", n_derivatives=2)),
    ("diffusers taylorseer1", "diffusers", "TaylorSeerState(max_order=1), float64 factors",
     arm_diffusers(1, torch.float64)),
    ("diffusers taylorseer2", "diffusers", "TaylorSeerState(max_order=2), float64 factors",
     arm_diffusers(2, torch.float64)),
    ("diffusers taylorseer2 bf16", "diffusers",
     "TaylorSeerState(max_order=2), default bfloat16 factors", arm_diffusers(2, torch.bfloat16)),
]


def probe_imports() -> Dict[str, Dict[str, Any]]:
    """Which comparison packages import here, their versions, or exactly why not."""
    out: Dict[str, Dict[str, Any]] = {}
    probes = {
        "hicache_pp": lambda: _seed(),
        "cache-dit": lambda: _cachedit(),
        "diffusers": lambda: _diffusers_state(),
    }
    modules = {"hicache_pp": "hicache_pp", "cache-dit": "cache_dit", "diffusers": "diffusers"}
    for name, fn in probes.items():
        try:
            fn()
            mod = sys.modules.get(modules[name])
            out[name] = {"ok": True, "version": getattr(mod, "__version__", "?"),
                         "path": os.path.dirname(getattr(mod, "__file__", "") or "")}
        except Exception as e:  # noqa: BLE001 -- reported, not hidden
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                         "trace": traceback.format_exc(limit=3)}
    return out


DEPS_NOTE = ("diffusers' import-time version check needs `requests` (with `urllib3`, `certifi`, "
             "`charset-normalizer`), `diffusers.utils` imports `PIL` (`pillow`) and `regex`, and "
             "`importlib_metadata` (with `zipp`); cache-dit's calibrators import cache_dit, which imports "
             "diffusers; transformers is not needed for these classes.")
