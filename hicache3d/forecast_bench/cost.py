"""Section 2 of the forecast benchmark: the time and memory of one ``predict()`` / ``push()``.

Every round runs each measurement once, interleaved with a reference weighted sum over the
stacked history, so a ratio compares two calls made back to back under the same load.
:func:`measure_memory` is the profiler of the peak extra allocation of one call.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
import tracemalloc
from collections import Counter
from typing import Any, Callable, Dict, List, Sequence

import torch

from ..forecast import make_forecaster

__all__ = ["COST_HISTORY", "TARGETS", "measure_memory", "section_cost", "cost_verdict"]

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
