"""Section 1 of the forecast benchmark: accuracy of every arm on every reference scenario."""
from __future__ import annotations

import time
from collections import Counter
from typing import Any, Dict

import numpy as np
import torch

from .arms import ARMS, Ctx
from .scenarios import N_ANCHORS, accuracy_cases, make_trajectory, rel_l2

__all__ = ["section_accuracy"]


def section_accuracy(seeds: int, d: int, available: Dict[str, bool], log) -> Dict[str, Any]:
    arms = [a for a in ARMS if available.get(a[1], True)]
    results: Dict[str, Any] = {}
    arm_time = Counter()
    errors: Dict[str, Counter] = {}
    for case in accuracy_cases():
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
