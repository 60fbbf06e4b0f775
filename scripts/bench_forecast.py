#!/usr/bin/env python
"""Forecast benchmark of hicache3d, side by side with the seed package and other caches.

Writes ``benchmarks/forecast.json`` and ``benchmarks/forecast.md``.  Three sections, all
measured in one run of this script:

1. **accuracy** -- every reference scenario of ``shared/MICROBENCH.md`` (generators written
   here from that description), 8 anchors, horizons 1..8 (and the sub-step cadence),
   mean / median relative L2 over seeds, for hicache3d's bases, the seed package
   ``hicache_pp`` 1.3.0, cache-dit's DMD and TaylorSeer calibrators and diffusers'
   TaylorSeer state, each driven through its own public update / forecast calls;
2. **cost** -- one ``predict()`` / ``push()`` at d = 2^16 .. 2^22 (history 6, fp32 and
   bf16, one batch item) against one weighted sum over the stacked history
   (``torch.tensordot``), the seed's DMD fit+forecast, and the peak extra allocation;
3. **coverage** -- on 12/25/50-step schedules, the share of skipped steps a ``backend="dmd"``
   ``VelocityCache`` serves with the exponential basis, and the error of those forecasts,
   next to the seed's ``dmd_forecast_state`` on the same schedules.

The comparison packages are imported from ``.bench-deps`` (see ``--deps``); install them with::

    pip install --no-deps --target .bench-deps cache-dit==1.5.3 diffusers==0.42.1 \\
        requests urllib3 certifi charset-normalizer pillow regex importlib_metadata zipp

Usage: ``python scripts/bench_forecast.py [--quick] [--sections accuracy,cost,coverage]``.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import tracemalloc
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import hicache3d  # noqa: E402
from hicache3d import CacheConfig, VelocityCache, make_forecaster  # noqa: E402

# --------------------------------------------------------------------------- constants
HORIZONS = (1, 2, 3, 4, 6, 8)
N_ANCHORS = 8
SUBSTEP_N = (3, 5, 6)
SCENARIOS = ("clean", "noise", "drift", "switch", "drift_noise", "osc_trend")
SCENARIO_TITLE = {
    "clean": "clean", "noise": "+1% noise", "drift": "drift", "switch": "regime switch",
    "drift_noise": "drift + noise", "osc_trend": "oscillation + trend",
}
SUBSTEP_TRAJ = ("clean", "drift_noise")

# the seed's published table (shared/MICROBENCH.md): (scenario, H) -> {arm: value}
SEED_PUBLISHED = {
    ("clean", 1): {"cubic": 1.5e-2, "pade": 4.9e-2, "dmd": 4.7e-9},
    ("clean", 4): {"cubic": 0.62, "pade": 0.24, "hermite": 0.63, "dmd": 5.3e-8},
    ("clean", 8): {"cubic": 6.5, "pade": 1.2, "dmd": 2.2e-7},
    ("noise", 8): {"cubic": 15.3, "pade": 3.25, "hermite": 1.81, "dmd": 0.30, "auto_1step": 0.30},
    ("switch", 8): {"cubic": 106, "pade": 2.63, "hermite": 1.56, "dmd": 9.40, "auto_1step": 1.56},
    ("osc_trend", 4): {"cubic": 0.93, "pade": 0.52, "hermite": 0.58, "dmd": 1.09,
                       "auto_1step": 0.88, "auto_horizon": 0.58},
}
# TaylorSeer's backward-difference formula on "clean", as published: order -> {H: value}
SEED_PUBLISHED_TAYLORSEER = {1: {1: 9.7e-2, 4: 1.08, 8: 3.95}, 2: {1: 5.2e-2, 4: 0.69, 8: 4.68}}


# =========================================================================== scenarios
def _poles(rng: np.random.Generator, k: int = 2) -> np.ndarray:
    r = rng.uniform(0.85, 0.99, k)
    w = rng.uniform(-0.5, 0.5, k)
    return r * np.exp(1j * w)


def _camp(rng: np.random.Generator, d: int, k: int = 2) -> np.ndarray:
    return (rng.standard_normal((d, k)) + 1j * rng.standard_normal((d, k))) / math.sqrt(2.0)


def _add_noise(F: np.ndarray, rng: np.random.Generator, level: float = 0.01) -> np.ndarray:
    d = F.shape[1]
    scale = level * np.linalg.norm(F, axis=1, keepdims=True) / math.sqrt(d)
    return F + scale * rng.standard_normal(F.shape)


def make_trajectory(kind: str, T: int, d: int, seed: int) -> np.ndarray:
    """One synthetic velocity trajectory ``[T, d]`` (float64) of a reference scenario.

    * clean: ``F_t = Re(sum_j a_j z_j^t)``, 2 complex poles ``z = r e^{i w}``,
      ``r ~ U[0.85, 0.99]``, ``w ~ U[-0.5, 0.5]``, complex Gaussian amplitudes per channel;
    * noise: clean plus ``0.01 * ||F_t|| / sqrt(d) * N(0, I)`` on every snapshot (truth too);
    * drift: the one-step pole drifts, ``w_t = w_0 (1 + 0.6 t/T)``,
      ``log r_t = log r_0 (1 + 0.1 t/T)``; the state is the product of the one-step poles
      (a non-autonomous linear system);
    * switch: the poles change to a fresh draw at ``t = 5`` (the state is continuous);
    * drift_noise: drift plus the 1% noise;
    * osc_trend: ``2 tanh(2.5 (t/T - 0.45)) A + 1.5 (t/T)^2 C + 0.8 * 0.85^t cos(phi_t) B``,
      ``phi_t = phi_{t-1} + 2.2 (1 + 0.5 t/T)``, A, B, C ~ N(0, I), plus the 1% noise.
    """
    rng = np.random.default_rng([seed, 7919, len(kind)] + [ord(c) for c in kind])
    t = np.arange(T, dtype=np.float64)
    if kind == "osc_trend":
        A, B, C = (rng.standard_normal(d) for _ in range(3))
        phi, rows = 0.0, []
        for ti in range(T):
            frac = ti / T
            phi += 2.2 * (1.0 + 0.5 * frac)
            rows.append(2.0 * math.tanh(2.5 * (frac - 0.45)) * A + 1.5 * frac * frac * C
                        + 0.8 * (0.85 ** ti) * math.cos(phi) * B)
        return _add_noise(np.asarray(rows), rng)
    z = _poles(rng)
    a = _camp(rng, d)
    if kind in ("clean", "noise"):
        F = (a[None, :, :] * (z[None, None, :] ** t[:, None, None])).sum(-1).real
    elif kind in ("drift", "drift_noise"):
        r0, w0 = np.abs(z), np.angle(z)
        state = np.ones(2, dtype=np.complex128)
        rows = []
        for ti in range(T):
            rows.append((a * state[None, :]).sum(-1).real)
            frac = (ti + 1) / T
            step = np.exp(np.log(r0) * (1 + 0.1 * frac) + 1j * w0 * (1 + 0.6 * frac))
            state = state * step
        F = np.asarray(rows)
    elif kind == "switch":
        z2 = _poles(rng)
        state = np.ones(2, dtype=np.complex128)
        rows = []
        for ti in range(T):
            rows.append((a * state[None, :]).sum(-1).real)
            state = state * (z if ti + 1 < 5 else z2)
        F = np.asarray(rows)
    else:
        raise ValueError(kind)
    if kind in ("noise", "drift_noise"):
        F = _add_noise(F, rng)
    return F


# =========================================================================== arms
# An arm forecasts from anchors (times, velocities [1, d] float64) at query times.  Every
# arm gets a fresh state per (scenario, seed), is driven through its own public API, and
# receives the queries in increasing order.
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


def rel_l2(pred: Any, truth: torch.Tensor) -> float:
    p = torch.as_tensor(pred).to(torch.float64).reshape(-1)
    t = truth.to(torch.float64).reshape(-1)
    return float(torch.linalg.vector_norm(p - t) / torch.linalg.vector_norm(t))


def _cases(quick: bool) -> List[Dict[str, Any]]:
    """(name, trajectory kind, anchor spacing, horizons) of every accuracy case."""
    cases = [dict(name=s, kind=s, spacing=1, horizons=HORIZONS, geometry="unit") for s in SCENARIOS]
    for kind in SUBSTEP_TRAJ:
        for n in SUBSTEP_N:
            cases.append(dict(name=f"substep{n}_{kind}", kind=kind, spacing=n,
                              horizons=tuple(range(1, n)), geometry="substep"))
    return cases


def section_accuracy(seeds: int, d: int, available: Dict[str, bool], log) -> Dict[str, Any]:
    arms = [a for a in ARMS if available.get(a[1], True)]
    results: Dict[str, Any] = {}
    arm_time = Counter()
    errors: Dict[str, Counter] = {}
    for case in _cases(False):
        N, hs = case["spacing"], case["horizons"]
        times = [N * i for i in range(N_ANCHORS)]
        T = times[-1] + max(hs) + 1
        per_arm = {a[0]: {h: [] for h in hs} for a in arms}
        for seed in range(seeds):
            F = torch.from_numpy(make_trajectory(case["kind"], T, d, seed))
            anchors = [F[t].reshape(1, d).clone() for t in times]
            queries = [times[-1] + h for h in hs]
            ctx = Ctx(times, anchors, queries, N, case["geometry"])
            for label, _, _, fn in arms:
                t0 = time.perf_counter()
                try:
                    preds = fn(ctx)
                    errs = [rel_l2(p, F[q]) for p, q in zip(preds, queries)]
                except Exception as e:  # noqa: BLE001 -- counted and reported
                    errors.setdefault(label, Counter())[f"{type(e).__name__}: {e}"[:160]] += 1
                    errs = [float("nan")] * len(hs)
                arm_time[label] += time.perf_counter() - t0
                for h, e in zip(hs, errs):
                    per_arm[label][h].append(e)
        table = {}
        for label in per_arm:
            table[label] = {}
            for h in hs:
                v = np.asarray(per_arm[label][h], dtype=np.float64)
                ok = v[np.isfinite(v)]
                table[label][str(h)] = {
                    "mean": float(ok.mean()) if ok.size else None,
                    "median": float(np.median(ok)) if ok.size else None,
                    "n": int(ok.size),
                }
        results[case["name"]] = {"kind": case["kind"], "spacing": N, "horizons": list(hs),
                                  "anchor_times": times, "table": table}
        log(f"  accuracy {case['name']:<22s} done")
    return {
        "setup": {"seeds": seeds, "d": d, "anchors": N_ANCHORS, "history": N_ANCHORS,
                  "dtype": "float64", "metric": "relative L2 of the forecast, mean and median over seeds"},
        "arms": [{"label": a[0], "group": a[1], "what": a[2]} for a in arms],
        "cases": results,
        "arm_seconds": {k: round(v, 3) for k, v in arm_time.items()},
        "arm_errors": {k: dict(v) for k, v in errors.items()},
    }


# =========================================================================== cost
COST_HISTORY = 6
TARGETS = {"predict": 1.5, "push": 3.0, "seed_speedup": 10.0, "extra_memory": 0.05}


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    del out
    return dt


def _nbytes(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (list, tuple)):
        return sum(_nbytes(o) for o in out)
    if isinstance(out, dict):
        return sum(_nbytes(o) for o in out.values())
    return 0


def measure_memory(fn: Callable[[], Any]) -> Dict[str, int]:
    """Peak extra allocation of one call.

    torch side: the CPU allocator's allocation / free events recorded by
    ``torch.profiler`` (``profile_memory=True``), replayed in time order; the peak of the
    running sum is the most memory the call held at once beyond what existed before it.
    The returned forecast is still alive at the end, so ``workspace = peak - output``.
    numpy side (weights, Gram, fits): ``tracemalloc`` peak of a second call.
    """
    from torch.profiler import ProfilerActivity, profile
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    evs = [(e.start_ns(), int(e.nbytes())) for e in prof.profiler.kineto_results.events()
           if e.name() == "[memory]"]
    evs.sort()
    run = peak = 0
    for _, b in evs:
        run += b
        peak = max(peak, run)
    out_b = _nbytes(out)
    del out
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    out = fn()
    np_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del out
    return {"torch_peak": peak, "torch_net": run, "output": out_b,
            "workspace": max(0, peak - out_b), "python_numpy_peak": int(np_peak)}


class _Feeder:
    """Pushes snapshots into a forecaster at positions following ``gaps`` (cyclic)."""

    def __init__(self, f, pool: List[torch.Tensor], gaps: Sequence[float]):
        self.f, self.pool, self.gaps = f, pool, list(gaps)
        self.k, self.pos = 0, 0.0

    def push(self):
        v = self.pool[self.k % len(self.pool)]
        res = self.f.push(self.pos, v)
        self.last = self.pos
        self.pos += self.gaps[self.k % len(self.gaps)]
        self.k += 1
        return res

    def fill(self, n: int):
        for _ in range(n):
            self.push()


def section_cost(sizes: Sequence[int], reps: int, seed_reps: int, log) -> Dict[str, Any]:
    import hicache_pp as hp
    cells = []
    bases = {
        "dmd": (dict(), (1.0,)),
        "dmd irregular": (dict(), (1.0, 5.0, 5.0)),    # the window never becomes uniform
        "hermite": (dict(order=2), (1.0,)),
        "auto": (dict(), (1.0,)),
    }
    for d in sizes:
        for dt in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(d)
            pool = [torch.randn(1, d, generator=g).to(dt) for _ in range(COST_HISTORY + 2)]
            H = torch.stack([p.reshape(-1) for p in pool[:COST_HISTORY]])      # [6, d]
            w = torch.linspace(-0.5, 1.5, COST_HISTORY).to(dt)
            ref = lambda: torch.tensordot(w, H, dims=1)                         # noqa: E731
            feeders = {}
            for name, (opts, gaps) in bases.items():
                backend = "dmd" if name.startswith("dmd") else name
                fd = _Feeder(make_forecaster(backend, COST_HISTORY, **opts), pool, gaps)
                fd.fill(COST_HISTORY)
                fd.f.predict(fd.last + 0.5)
                feeders[name] = fd
            t = {"ref": []}
            for name in bases:
                for k in ("push", "first", "predict"):
                    t[f"{name}:{k}"] = []
            labels = Counter()
            for _ in range(reps):            # one round = every measurement once, interleaved
                t["ref"].append(_timed(ref))
                for name, fd in feeders.items():
                    t[f"{name}:push"].append(_timed(fd.push))
                    t[f"{name}:first"].append(_timed(lambda: fd.f.predict(fd.last + 0.5)))
                    labels[(name, fd.f.last_labels[0])] += 1
                    t[f"{name}:predict"].append(_timed(lambda: fd.f.predict(fd.last + 0.75)))
            med = {k: statistics.median(v) for k, v in t.items()}
            # hicache_pp: stateless fit + forecast, and its cached-fit evaluation
            snaps = [p.clone() for p in pool[:COST_HISTORY]]
            hp_t = {"ref": [], "dmd_forecast": [], "dmd_eval": []}
            fit = hp.dmd.dmd_fit(snaps)
            for _ in range(seed_reps):
                hp_t["ref"].append(_timed(ref))
                hp_t["dmd_forecast"].append(_timed(lambda: hp.dmd_forecast(snaps, 1)))
                hp_t["dmd_eval"].append(_timed(lambda: hp.dmd.dmd_eval(fit, 0.5)))
            hp_med = {k: statistics.median(v) for k, v in hp_t.items()}
            del fit
            # memory (separate calls, after the timings)
            fdm = feeders["dmd"]
            mem = {
                "ref": measure_memory(ref),
                "push": measure_memory(fdm.push),
                "first_dmd": measure_memory(lambda: fdm.f.predict(fdm.last + 0.5)),
                "predict_dmd": measure_memory(lambda: fdm.f.predict(fdm.last + 0.75)),
            }
            for name in ("dmd irregular", "hermite", "auto"):
                fd = feeders[name]
                fd.push()
                mem[f"first_{name}"] = measure_memory(lambda: fd.f.predict(fd.last + 0.5))
            mem["seed_dmd_forecast"] = measure_memory(lambda: hp.dmd_forecast(snaps, 1))
            hist_bytes = COST_HISTORY * d * torch.tensor([], dtype=dt).element_size()
            r = med["ref"]
            cell = {
                "d": d, "dtype": str(dt).replace("torch.", ""), "reps": reps, "seed_reps": seed_reps,
                "history_bytes": hist_bytes,
                "median_s": {k: v for k, v in med.items()},
                "min_s": {k: min(v) for k, v in t.items()},
                # side by side: the ratio to the reference call of the same round, median over rounds
                "ratio_to_ref": {k: statistics.median([a / b for a, b in zip(v, t["ref"])])
                                 for k, v in t.items() if k != "ref"},
                "ratio_of_medians": {k: v / r for k, v in med.items() if k != "ref"},
                "ratio_of_minima": {k: min(v) / min(t["ref"]) for k, v in t.items() if k != "ref"},
                "seed_median_s": hp_med,
                "seed_ratio_to_ref": {k: v / hp_med["ref"] for k, v in hp_med.items() if k != "ref"},
                "served_by": {f"{a}:{b}": n for (a, b), n in labels.items()},
                "memory": mem,
                "memory_ratio_to_history": {k: v["workspace"] / hist_bytes for k, v in mem.items()},
            }
            ours_fit_forecast = med["dmd:push"] + med["dmd:first"]
            cell["seed_speedup"] = {
                "fit+forecast (ours push + first predict)": hp_med["dmd_forecast"] / ours_fit_forecast,
                "fit+forecast (ours first predict)": hp_med["dmd_forecast"] / med["dmd:first"],
                "cached fit (seed dmd_eval vs ours predict)": hp_med["dmd_eval"] / med["dmd:predict"],
            }
            cells.append(cell)
            rr = cell["ratio_to_ref"]
            log(f"  cost d=2^{int(math.log2(d))} {cell['dtype']:<8s} ref {r*1e3:8.3f} ms  "
                f"predict x{rr['dmd:predict']:5.2f}  push x{rr['dmd:push']:5.2f}  "
                f"first x{rr['dmd:first']:5.2f}  seed dmd {hp_med['dmd_forecast']*1e3:9.1f} ms")
            del feeders, pool, H, snaps
            gc.collect()
    return {"setup": {"history": COST_HISTORY, "batch_items": 1, "threads": torch.get_num_threads(),
                      "reference": "torch.tensordot(w, H, dims=1), H = stacked [6, d] history in the working dtype",
                      "targets": TARGETS},
            "cells": cells, "verdict": cost_verdict(cells)}


def cost_verdict(cells: List[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for c in cells:
        key = f"2^{int(math.log2(c['d']))} {c['dtype']}"
        rr = c["ratio_to_ref"]
        mem = c["memory_ratio_to_history"]
        out[key] = {
            "predict": {b: (rr[f"{b}:predict"], rr[f"{b}:predict"] <= TARGETS["predict"])
                        for b in ("dmd", "hermite", "auto")},
            "first_predict": {b: rr[f"{b}:first"] for b in ("dmd", "dmd irregular", "hermite", "auto")},
            "push": (rr["dmd:push"], rr["dmd:push"] <= TARGETS["push"]),
            "seed_speedup": (c["seed_speedup"]["fit+forecast (ours push + first predict)"],
                             c["seed_speedup"]["fit+forecast (ours push + first predict)"]
                             >= TARGETS["seed_speedup"]),
            "extra_memory": {k: (mem[k], mem[k] <= TARGETS["extra_memory"])
                             for k in ("push", "predict_dmd", "first_dmd", "first_dmd irregular",
                                       "first_hermite", "first_auto")},
        }
    return out


# =========================================================================== coverage
def _coverage_ours(F: torch.Tensor, steps: int, interval: int) -> Dict[str, Any]:
    cache = VelocityCache(CacheConfig(backend="dmd", interval=interval, first_enhance=3,
                                      history=6, num_steps=steps))
    served, computed = [], []
    for i in range(steps):
        will = cache.will_compute()
        v = cache.step(i, lambda: F[i:i + 1].clone())
        if will:
            computed.append(i)
        else:
            served.append((i, cache.forecaster.last_labels[0], rel_l2(v, F[i])))
    return {"computed": computed, "served": served, "fallbacks": dict(cache.stats.fallbacks),
            "per_basis": dict(cache.stats.per_basis)}


def _coverage_seed(F: torch.Tensor, steps: int, interval: int) -> Dict[str, Any]:
    import hicache_pp as hp
    st = hp.hicache_init(num_steps=steps, interval=interval, max_order=1, first_enhance=3,
                         sigma=0.5, backend="dmd", history=6)
    served, computed = [], []
    for i in range(steps):
        st["step"] = i
        if hp.hicache_decide(st) == "full":
            v = F[i:i + 1].clone()
            hp.hicache_update_derivatives(st, v)
            hp.dmd_update_snapshots(st, v, history=6)
            computed.append(i)
        else:
            before = dict(st["telemetry"]["method_counts"])
            v = hp.dmd_forecast_state(st)
            after = st["telemetry"]["method_counts"]
            label = next((k for k in after if after[k] != before.get(k, 0)), "?")
            served.append((i, label, rel_l2(v, F[i])))
    return {"computed": computed, "served": served,
            "fallbacks": dict(st["telemetry"]["fallbacks"])}


def section_coverage(seeds: int, d: int, log) -> Dict[str, Any]:
    rows = []
    for traj, kind in (("exponential", "clean"), ("osc_trend", "osc_trend")):
        for steps in (12, 25, 50):
            for interval in (3, 5, 6):
                acc = {"ours": dict(skipped=0, dmd=0, err_dmd=[], err_all=[], fallbacks=Counter(),
                                    per_basis=Counter()),
                       "seed": dict(skipped=0, dmd=0, err_dmd=[], err_all=[], fallbacks=Counter(),
                                    per_basis=Counter())}
                same_plan = True
                common = {"ours": [], "seed": []}     # steps the seed serves with DMD
                for seed in range(seeds):
                    F = torch.from_numpy(make_trajectory(kind, steps, d, seed))
                    ro, rs = _coverage_ours(F, steps, interval), _coverage_seed(F, steps, interval)
                    same_plan &= ro["computed"] == rs["computed"]
                    seed_dmd = {i: e for i, lab, e in rs["served"] if lab == "dmd"}
                    for i, _, e in ro["served"]:
                        if i in seed_dmd:
                            common["ours"].append(e)
                            common["seed"].append(seed_dmd[i])
                    for who, r in (("ours", ro), ("seed", rs)):
                        a = acc[who]
                        for _, lab, e in r["served"]:
                            a["skipped"] += 1
                            a["per_basis"][lab] += 1
                            a["err_all"].append(e)
                            if lab == "dmd":
                                a["dmd"] += 1
                                a["err_dmd"].append(e)
                        a["fallbacks"].update(r["fallbacks"])
                row = {"trajectory": traj, "steps": steps, "interval": interval,
                       "same_schedule": bool(same_plan),
                       "computed_steps": ro["computed"]}
                for who, a in acc.items():
                    row[who] = {
                        "skipped": a["skipped"], "dmd_served": a["dmd"],
                        "dmd_share": a["dmd"] / a["skipped"] if a["skipped"] else None,
                        "mean_err_dmd": float(np.mean(a["err_dmd"])) if a["err_dmd"] else None,
                        "median_err_dmd": float(np.median(a["err_dmd"])) if a["err_dmd"] else None,
                        "mean_err_all_skipped": float(np.mean(a["err_all"])) if a["err_all"] else None,
                        "median_err_all_skipped": float(np.median(a["err_all"])) if a["err_all"] else None,
                        "mean_err_on_seed_dmd_steps": float(np.mean(common[who])) if common[who] else None,
                        "per_basis": dict(a["per_basis"]), "fallbacks": dict(a["fallbacks"]),
                    }
                rows.append(row)
                log(f"  coverage {traj:<11s} {steps:2d} steps / interval {interval}: "
                    f"ours {row['ours']['dmd_share']:.0%}  seed {row['seed']['dmd_share']:.0%}")
    return {"setup": {"seeds": seeds, "d": d, "first_enhance": 3, "history": 6, "fallback": "hermite",
                      "ours": "VelocityCache(CacheConfig(backend='dmd', interval=I, first_enhance=3, history=6))",
                      "seed": "hicache_init(backend='dmd', interval=I, first_enhance=3, history=6, max_order=1) + "
                              "hicache_decide / dmd_update_snapshots / dmd_forecast_state"},
            "rows": rows}


# =========================================================================== report
def _f(x: Optional[float], digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 1e4 or ax < 1e-3:
        return f"{x:.{digits - 1}e}"
    if ax >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}" if ax < 1 else f"{x:.{digits + 1}g}"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _ok(flag: bool) -> str:
    return "pass" if flag else "**FAIL**"


def _mean(tab: Dict[str, Any], arm: str, h: int) -> Optional[float]:
    row = tab.get(arm)
    return None if row is None else row[str(h)]["mean"]


def md_accuracy(acc: Dict[str, Any]) -> List[str]:
    L: List[str] = []
    s = acc["setup"]
    L += ["## 1. Accuracy on the reference scenarios", "",
          f"{s['seeds']} seeds, d = {s['d']}, {s['anchors']} anchors (t = 0..7, or 0, N, .., 7N for the "
          f"sub-step cadence), every arm fed the same float64 anchors (batch of one item, history "
          f"{s['history']} so that every arm sees all 8 anchors). Cells: mean relative L2 over seeds "
          "(medians are in `forecast.json`); the best mean of each column in bold.", "",
          "Generators (written from `MICROBENCH.md`): T = last anchor + largest horizon + 1 (16 for the "
          "unit-spacing cases); the 1% noise is added to every point of the trajectory, truth included; "
          "drift multiplies one-step poles that drift with t/T; the regime switch keeps the state "
          "continuous at t = 5 and changes the poles; the sub-step cadence uses the clean and the "
          "drift + noise trajectories with anchors N apart.", ""]
    cases = acc["cases"]
    # --- the seed's published table next to our measurement
    L += ["### Next to the seed's published table", "",
          "Published = the seed's own numbers (`MICROBENCH.md`, other random draws); measured = this run. "
          "DMD uses rank 4 on noisy / drifting / switching data and the automatic rank on clean data, "
          "as in the published table; 'cubic' is `taylor` order 3 (Newton form).", "",
          "| scenario | H | cubic pub. | ours taylor3 | Hermite pub. | seed hermite2 | ours hermite2 | "
          "DMD pub. | seed dmd | ours dmd | cache-dit dmd | auto pub. | seed auto 1step | seed auto horizon | ours auto |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (sc, h), pub in SEED_PUBLISHED.items():
        tab = cases[sc]["table"]
        r4 = "" if sc == "clean" else " r4"
        auto_pub = " / ".join(x for x in (
            f"{_f(pub['auto_1step'])} (1step)" if "auto_1step" in pub else "",
            f"{_f(pub['auto_horizon'])} (horizon)" if "auto_horizon" in pub else "") if x) or "—"
        L.append(f"| {SCENARIO_TITLE[sc]} | {h} | {_f(pub.get('cubic'))} | {_f(_mean(tab, 'ours taylor3', h))} | "
                 f"{_f(pub.get('hermite')) if 'hermite' in pub else '—'} | {_f(_mean(tab, 'seed hermite2', h))} | "
                 f"{_f(_mean(tab, 'ours hermite2', h))} | {_f(pub.get('dmd'))} | "
                 f"{_f(_mean(tab, 'seed dmd' + r4, h))} | {_f(_mean(tab, 'ours dmd' + r4, h))} | "
                 f"{_f(_mean(tab, 'cache-dit dmd', h))} | {auto_pub} | "
                 f"{_f(_mean(tab, 'seed auto 1step', h))} | {_f(_mean(tab, 'seed auto horizon', h))} | "
                 f"{_f(_mean(tab, 'ours auto', h))} |")
    L += ["", "TaylorSeer's backward-difference formula on *clean* (published by the seed) next to the "
          "three implementations measured here:", "",
          "| order | H | published | ours taylorseer | cache-dit TaylorSeerCalibrator | diffusers TaylorSeerState |",
          "|---|---|---|---|---|---|"]
    tab = cases["clean"]["table"]
    for order, pub in SEED_PUBLISHED_TAYLORSEER.items():
        for h, v in pub.items():
            L.append(f"| {order} | {h} | {_f(v)} | {_f(_mean(tab, f'ours taylorseer{order}', h))} | "
                     f"{_f(_mean(tab, f'cache-dit taylorseer{order}', h))} | "
                     f"{_f(_mean(tab, f'diffusers taylorseer{order}', h))} |")
    # --- full tables
    L += ["", "### All arms, every scenario", ""]
    for name, c in cases.items():
        hs = c["horizons"]
        title = SCENARIO_TITLE.get(name) or (
            f"sub-step cadence N = {c['spacing']} on {SCENARIO_TITLE[c['kind']]}")
        L += [f"**{title}**" + (f" (anchors {c['spacing']} apart, H in steps)" if c["spacing"] > 1 else ""), "",
              "| arm | " + " | ".join(f"H={h}" for h in hs) + " |",
              "|---|" + "---|" * len(hs)]
        best = {}
        for h in hs:
            vals = [v[str(h)]["mean"] for v in c["table"].values() if v[str(h)]["mean"] is not None]
            best[h] = min(vals) if vals else None
        for arm, row in c["table"].items():
            cells = []
            for h in hs:
                m = row[str(h)]["mean"]
                txt = _f(m)
                if m is not None and best[h] is not None and m <= best[h] * (1 + 1e-9):
                    txt = f"**{txt}**"
                cells.append(txt)
            L.append(f"| {arm} | " + " | ".join(cells) + " |")
        L.append("")
    if acc["arm_errors"]:
        L += ["Arms that raised (counted as n/a):", ""]
        for arm, errs in acc["arm_errors"].items():
            for msg, n in errs.items():
                L.append(f"- {arm}: {n}x `{msg}`")
        L.append("")
    L += ["Arms: " + "; ".join(f"*{a['label']}* = {a['what']}" for a in acc["arms"]) + ".", ""]
    return L


def md_cost(cost: Dict[str, Any]) -> List[str]:
    s = cost["setup"]
    L = ["## 2. Cost of predict / push", "",
         f"History {s['history']}, one batch item, `torch.set_num_threads({s['threads']})`. Reference = "
         f"{s['reference']}. Every round runs each measurement once, interleaved (reference, then for each "
         "basis: push of a new snapshot, the first predict of that window (includes the fit), a second "
         "predict of the same window (fit cached)); a ratio is the median over the rounds of (time / the "
         "reference's time in the same round), so both sides of a ratio ran back to back under the same load "
         "(the JSON also has the ratio of medians and of minima); times in ms are medians. The seed's DMD (`dmd_forecast(snapshots, 1)`: float64 "
         "stack + SVD + eig + lstsq on every call) and its cached-fit evaluation `dmd_eval` are timed in "
         "their own interleaved rounds with the reference.", "",
         "| d | dtype | ref ms | predict dmd | predict hermite | predict auto | first dmd | first dmd irregular | "
         "first hermite | first auto | push | seed dmd_forecast ms | seed / (ours push + first) | seed dmd_eval / ours predict |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cost["cells"]:
        rr, m = c["ratio_to_ref"], c["median_s"]
        L.append(f"| 2^{int(math.log2(c['d']))} | {c['dtype']} | {m['ref'] * 1e3:.3f} | "
                 f"{rr['dmd:predict']:.2f}x | {rr['hermite:predict']:.2f}x | {rr['auto:predict']:.2f}x | "
                 f"{rr['dmd:first']:.2f}x | {rr['dmd irregular:first']:.2f}x | {rr['hermite:first']:.2f}x | "
                 f"{rr['auto:first']:.2f}x | {rr['dmd:push']:.2f}x | {c['seed_median_s']['dmd_forecast'] * 1e3:.1f} | "
                 f"{c['seed_speedup']['fit+forecast (ours push + first predict)']:.0f}x | "
                 f"{c['seed_speedup']['cached fit (seed dmd_eval vs ours predict)']:.1f}x |")
    L += ["", "Peak extra allocation (workspace beyond the stored history and the returned forecast), "
          "as a share of the history's bytes:", "",
          "| d | dtype | history MiB | ref | push | predict (fit cached) | first dmd | first dmd irregular | "
          "first hermite | first auto | seed dmd_forecast |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cost["cells"]:
        mr = c["memory_ratio_to_history"]
        L.append(f"| 2^{int(math.log2(c['d']))} | {c['dtype']} | {c['history_bytes'] / 2 ** 20:.2f} | "
                 + " | ".join(_pct(mr[k]) for k in ("ref", "push", "predict_dmd", "first_dmd",
                                                    "first_dmd irregular", "first_hermite", "first_auto",
                                                    "seed_dmd_forecast")) + " |")
    L += ["", "Memory method: `torch.profiler.profile(profile_memory=True)` records every CPU allocation and "
          "free made by torch during one call; replaying them in time order gives the peak of memory held "
          "at once beyond what existed before the call; the returned forecast (which any forecaster and the "
          "reference must allocate) is subtracted. numpy-side allocations (weights, Gram matrices, fits) are "
          "measured separately with `tracemalloc` (`python_numpy_peak` in the JSON; a few KiB).", "",
          "### Targets", "",
          f"predict <= {TARGETS['predict']}x the reference, push <= {TARGETS['push']}x, >= "
          f"{TARGETS['seed_speedup']:.0f}x faster than the seed's DMD fit+forecast at 2^22 (ours counted as "
          f"push + first predict), extra memory <= {TARGETS['extra_memory']:.0%} of the history.", "",
          "| cell | predict (dmd / hermite / auto) | push | vs seed DMD | extra memory (push / predict / first dmd / first auto) |",
          "|---|---|---|---|---|"]
    for key, v in cost["verdict"].items():
        p = v["predict"]
        pv = " / ".join(f"{p[b][0]:.2f}x" for b in ("dmd", "hermite", "auto"))
        pok = all(p[b][1] for b in p)
        sp = v["seed_speedup"]
        sp_txt = f"{sp[0]:.0f}x {_ok(sp[1])}" if key.startswith("2^22") else f"{sp[0]:.0f}x (target at 2^22)"
        em = v["extra_memory"]
        ev = " / ".join(_pct(em[k][0]) for k in ("push", "predict_dmd", "first_dmd", "first_auto"))
        eok = all(em[k][1] for k in em)
        L.append(f"| {key} | {pv} {_ok(pok)} | {v['push'][0]:.2f}x {_ok(v['push'][1])} | {sp_txt} | {ev} {_ok(eok)} |")
    L.append("")
    return L


def md_coverage(cov: Dict[str, Any]) -> List[str]:
    s = cov["setup"]
    L = ["## 3. Exponential-basis coverage in the cache geometry", "",
         f"{s['seeds']} seeds, d = {s['d']}, first_enhance {s['first_enhance']}, history {s['history']}. Ours: "
         f"`{s['ours']}` (positions = step index, so the window mixes the warm-up spacing 1 with the cadence and "
         "the exponential fit runs by variable projection until the warm-up leaves the window). Seed: "
         f"`{s['seed']}` (DMD only on >= 4 equally spaced snapshots, Hermite otherwise). Both run the same "
         "schedule (checked). Share = skipped steps served by DMD; errors are mean relative L2 of the forecasts "
         "(median in brackets); 'common' = the steps both serve with DMD.", "",
         "| trajectory | steps | interval | ours DMD share | ours err (DMD steps) | seed DMD share | "
         "seed err (DMD steps) | common: ours / seed | all skipped: ours / seed | ours fallbacks |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in cov["rows"]:
        o, sd = r["ours"], r["seed"]
        fb = ", ".join(f"{k} {v}" for k, v in o["fallbacks"].items()) or "—"
        L.append(f"| {r['trajectory']} | {r['steps']} | {r['interval']} | {_pct(o['dmd_share'])} | "
                 f"{_f(o['mean_err_dmd'])} ({_f(o['median_err_dmd'])}) | {_pct(sd['dmd_share'])} | "
                 f"{_f(sd['mean_err_dmd'])} ({_f(sd['median_err_dmd'])}) | "
                 f"{_f(o['mean_err_on_seed_dmd_steps'])} / {_f(sd['mean_err_on_seed_dmd_steps'])} | "
                 f"{_f(o['mean_err_all_skipped'])} / {_f(sd['mean_err_all_skipped'])} | {fb} |")
    L.append("")
    return L


def losses(res: Dict[str, Any]) -> List[str]:
    """Where hicache3d does worse than a comparison in this run (data-driven)."""
    out: List[str] = []
    acc = res.get("accuracy")
    if acc:
        pairs = (("ours dmd", "seed dmd"), ("ours dmd", "cache-dit dmd"), ("ours auto", "seed auto 1step"),
                 ("ours auto", "seed auto horizon"), ("ours hermite2", "seed hermite2"))
        for name, c in acc["cases"].items():
            for a, b in pairs:
                worse = [(h, _mean(c["table"], a, h), _mean(c["table"], b, h)) for h in c["horizons"]]
                worse = [(h, x, y) for h, x, y in worse if x is not None and y is not None and x > 1.1 * y
                         and x > 1e-6]
                if worse:
                    out.append(f"accuracy, {name}: {a} worse than {b} at " + ", ".join(
                        f"H={h} ({_f(x)} vs {_f(y)})" for h, x, y in worse))
    cost = res.get("cost")
    if cost:
        for key, v in cost["verdict"].items():
            bad = [f"predict {b} {v['predict'][b][0]:.2f}x" for b in v["predict"] if not v["predict"][b][1]]
            if not v["push"][1]:
                bad.append(f"push {v['push'][0]:.2f}x")
            if key.startswith("2^22") and not v["seed_speedup"][1]:
                bad.append(f"only {v['seed_speedup'][0]:.1f}x faster than the seed's DMD")
            bad += [f"extra memory {k} {_pct(x)}" for k, (x, ok) in v["extra_memory"].items() if not ok]
            if bad:
                out.append(f"cost, {key}: " + "; ".join(bad))
    cov = res.get("coverage")
    if cov:
        for r in cov["rows"]:
            o, sd = r["ours"], r["seed"]
            if (o["mean_err_all_skipped"] or 0) > 1.1 * (sd["mean_err_all_skipped"] or float("inf")):
                out.append(f"coverage, {r['trajectory']} {r['steps']} steps / interval {r['interval']}: mean error "
                           f"over the skipped steps {_f(o['mean_err_all_skipped'])} vs the seed's "
                           f"{_f(sd['mean_err_all_skipped'])} (medians {_f(o['median_err_all_skipped'])} vs "
                           f"{_f(sd['median_err_all_skipped'])})")
    return out


def write_markdown(res: Dict[str, Any], path: str) -> None:
    m = res["meta"]
    L = ["# Forecast benchmark", "",
         f"Generated by `scripts/bench_forecast.py{' --quick' if m['quick'] else ''}` on {m['date']} "
         f"({m['wall_s']:.0f} s). Machine: {m['machine']}. torch {m['torch']}, numpy {m['numpy']}, "
         f"hicache3d {m['hicache3d']}.", "",
         "**Timing conditions:** 2 CPU cores shared with other jobs. Every timing is a median over "
         "interleaved repetitions, and only ratios measured side by side in the same run and cell should be "
         "compared; absolute milliseconds are not representative of an idle machine or a GPU.", "",
         "Packages compared (imported from `.bench-deps`, installed with `pip install --no-deps` plus the "
         "few modules their imports need):", ""]
    for name, p in m["imports"].items():
        if p["ok"]:
            L.append(f"- {name} {p['version']}: imported")
        else:
            L.append(f"- {name}: **not imported** -- `{p['error']}`")
    L += ["", "Minimal extra modules for the imports: " + m["deps_note"], ""]
    if "accuracy" in res:
        L += md_accuracy(res["accuracy"])
    if "cost" in res:
        L += md_cost(res["cost"])
    if "coverage" in res:
        L += md_coverage(res["coverage"])
    lost = losses(res)
    L += ["## Where hicache3d loses in this run", "",
          "Listed from the numbers above (accuracy: >10% worse than the named comparison; cost: a missed "
          "target; coverage: a higher mean error over all skipped steps than the seed's).",
          ""] + ([f"- {x}" for x in lost] or ["- nothing"]) + [""]
    with open(path, "w") as fh:
        fh.write("\n".join(L).rstrip() + "\n")


DEPS_NOTE = ("diffusers' import-time version check needs `requests` (with `urllib3`, `certifi`, "
             "`charset-normalizer`), `diffusers.utils` imports `PIL` (`pillow`) and `regex`, and "
             "`importlib_metadata` (with `zipp`); cache-dit's calibrators import cache_dit, which imports "
             "diffusers; transformers is not needed for these classes.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few seeds, small sizes: a smoke run")
    ap.add_argument("--sections", default="accuracy,cost,coverage")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "benchmarks"))
    ap.add_argument("--deps", default=os.path.join(REPO, ".bench-deps"),
                    help="folder with cache-dit / diffusers (pip install --no-deps --target)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: the cores are shared, one thread times steadily)")
    ap.add_argument("--seeds", type=int, default=None)
    args = ap.parse_args(argv)
    if os.path.isdir(args.deps) and args.deps not in sys.path:
        sys.path.append(args.deps)
    torch.set_num_threads(args.threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    quick = args.quick
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    imports = probe_imports()
    for k, v in imports.items():
        log(f"{k}: " + (f"ok {v['version']}" if v["ok"] else f"NOT IMPORTED ({v['error']})"))
    available = {"ours": True, "hicache_pp": imports["hicache_pp"]["ok"],
                 "cache-dit": imports["cache-dit"]["ok"], "diffusers": imports["diffusers"]["ok"]}
    res: Dict[str, Any] = {}
    if "accuracy" in sections:
        log("accuracy")
        res["accuracy"] = section_accuracy(args.seeds or (3 if quick else 20), 64, available, log)
    if "cost" in sections:
        log("cost")
        sizes = [1 << 16, 1 << 18] if quick else [1 << 16, 1 << 20, 1 << 22]
        res["cost"] = section_cost(sizes, reps=5 if quick else 21, seed_reps=2 if quick else 3, log=log)
    if "coverage" in sections:
        log("coverage")
        res["coverage"] = section_coverage(args.seeds or (2 if quick else 20), 64, log)
    res["meta"] = {
        "quick": quick, "sections": sections, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_s": time.perf_counter() - t_start,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPU cores visible, {platform.processor() or platform.machine()}",
        "torch": torch.__version__, "numpy": np.__version__, "hicache3d": hicache3d.__version__,
        "threads": args.threads, "imports": imports, "deps_note": DEPS_NOTE,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    stem = "forecast_quick" if quick else "forecast"
    jpath, mpath = os.path.join(args.out_dir, stem + ".json"), os.path.join(args.out_dir, stem + ".md")
    with open(jpath, "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    write_markdown(res, mpath)
    log(f"wrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
