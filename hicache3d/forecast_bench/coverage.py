"""Section 3 of the forecast benchmark: how many skipped steps a ``backend="dmd"`` cache
serves with the exponential basis on real cache schedules, next to the seed package's
``dmd_forecast_state`` on the same schedules."""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict

import numpy as np
import torch

from ..cache import VelocityCache
from ..config import CacheConfig
from .scenarios import make_trajectory, rel_l2

__all__ = ["section_coverage"]


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
