"""Experiments on the adaptive (error-controlled) schedule: each variant of the policy
swept over tolerances on the bundled generator, its frontier compared at matched mean IoU
with the best fixed-interval frontier of any basis (the fixed rows of
benchmarks/fidelity.json, which are deterministic and not recomputed here).

    python scripts/bench_adaptive.py --variants base,cost --steps 25,50
    python scripts/bench_adaptive.py --list          # the variants and what they change

Writes benchmarks/adaptive_<name>.json and .md (``--name``, default ``variants``); the
report is rewritten after every variant, so an interrupted run keeps what it measured.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hicache3d  # noqa: E402
import hicache3d.cache as cache_mod  # noqa: E402
from hicache3d import schedule as sched  # noqa: E402
from hicache3d._io import atomic_write  # noqa: E402
from hicache3d.bench import frontier_table, held_out, occupancy_scores, pareto, ratio_at, summarize  # noqa: E402

TOLERANCES = [0.25, 0.5, 1.0, 2.0, 4.0]
LEVELS = (0.975, 0.98, 0.985, 0.99)

# the settings of the auto variants: auto, the CFG cost (two forwards for 0.5 <= t <= 1),
# a warm-up of 2
_AUTO_COST_FE2 = {"backend": "auto", "compute_cost": ((0.5, 1.0, 2.0),), "first_enhance": 2}
# the same with hermite, the default basis
_COST_FE2 = {"compute_cost": ((0.5, 1.0, 2.0),), "first_enhance": 2}

# name -> (what it changes, CacheConfig settings, AdaptivePolicy keyword overrides)
VARIANTS = {
    "base": ("hermite, the schedule as it is", {}, {}),
    "q75": ("decide on the 75th-percentile item, not the worst", {}, {"quantile": 0.75}),
    "q90": ("decide on the 90th-percentile item", {}, {"quantile": 0.9}),
    "p1.5": ("error exponent 1.5 instead of 2", {}, {"exponent": 1.5}),
    "p3": ("error exponent 3 instead of 2", {}, {"exponent": 3.0}),
    "relax0": ("c follows every measurement at once", {}, {"relax": 0.0}),
    "relax0.8": ("c relaxes slowly", {}, {"relax": 0.8}),
    "taylor": ("taylor basis", {"backend": "taylor"}, {}),
    "reuse": ("reuse basis", {"backend": "reuse"}, {}),
    "dmd": ("dmd basis", {"backend": "dmd"}, {}),
    "auto": ("auto basis", {"backend": "auto"}, {}),
    "cost": ("window budget scaled by the cost of the computes it replaces (CFG: 2 forwards)",
             {"compute_cost": ((0.5, 1.0, 2.0),)}, {}),
    "cost^2": ("as cost, budget scaled by cost squared", {"compute_cost": ((0.5, 1.0, 2.0),)},
               {"cost_power": 2.0}),
    "cost^0.5": ("as cost, budget scaled by its square root", {"compute_cost": ((0.5, 1.0, 2.0),)},
                 {"cost_power": 0.5}),
    "dt1.5": ("step weights (dt / dt_ref)^1.5", {}, {"dt_power": 1.5}),
    "dt2": ("step weights (dt / dt_ref)^2", {}, {"dt_power": 2.0}),
    "dt0.5": ("step weights (dt / dt_ref)^0.5", {}, {"dt_power": 0.5}),
    "cost+q75": ("cost, and the 75th-percentile item", {"compute_cost": ((0.5, 1.0, 2.0),)},
                 {"quantile": 0.75}),
    "cost+dt1.5": ("cost, and (dt / dt_ref)^1.5", {"compute_cost": ((0.5, 1.0, 2.0),)},
                   {"dt_power": 1.5}),
    "cost+skip12": ("cost, max_skip 12", {"compute_cost": ((0.5, 1.0, 2.0),), "max_skip": 12}, {}),
    "fe2": ("warm-up of 2 computed steps instead of 3", {"first_enhance": 2}, {}),
    "cost+fe2": ("cost, warm-up of 2", {"compute_cost": ((0.5, 1.0, 2.0),), "first_enhance": 2}, {}),
    "dmd+cost+fe2": ("dmd basis (rank chosen by backcast), cost, warm-up of 2",
                     {"backend": "dmd", "compute_cost": ((0.5, 1.0, 2.0),), "first_enhance": 2}, {}),
    "auto+cost+fe2": ("auto basis (backcasts carried to the horizon, candidates blended), cost, warm-up of 2",
                      _AUTO_COST_FE2, {}),
    "auto+cost^2+fe2": ("auto, budget scaled by cost squared, warm-up of 2", _AUTO_COST_FE2,
                        {"cost_power": 2.0}),
    "auto+cost+fe2+q75": ("auto, cost, warm-up of 2, the 75th-percentile item", _AUTO_COST_FE2,
                          {"quantile": 0.75}),
    "auto+cost+fe2+p3": ("auto, cost, warm-up of 2, error exponent 3", _AUTO_COST_FE2,
                         {"exponent": 3.0}),
    "auto+cost+fe2+dt1.5": ("auto, cost, warm-up of 2, step weights (dt / dt_ref)^1.5", _AUTO_COST_FE2,
                            {"dt_power": 1.5}),
    "cost+fe2+s0.5": ("cost, warm-up of 2, step weights times the sensitivity profile, q 0.5",
                      _COST_FE2, {"sensitivity": 0.5}),
    "cost+fe2+s1": ("cost, warm-up of 2, step weights times the sensitivity profile, q 1",
                    _COST_FE2, {"sensitivity": 1.0}),
    "cost+fe2+s2": ("cost, warm-up of 2, step weights times the sensitivity profile, q 2",
                    _COST_FE2, {"sensitivity": 2.0}),
    "cost+fe2+s1+dt0.5": ("cost, warm-up of 2, sensitivity q 1, (dt / dt_ref)^0.5",
                          _COST_FE2,
                          {"sensitivity": 1.0, "dt_power": 0.5}),
    "auto+cost+fe2+s1": ("auto, cost, warm-up of 2, sensitivity q 1", _AUTO_COST_FE2, {"sensitivity": 1.0}),
    "cost^2+fe2": ("budget scaled by cost squared, warm-up of 2",
                   _COST_FE2, {"cost_power": 2.0}),
    "cost^3+fe2": ("budget scaled by cost cubed, warm-up of 2",
                   _COST_FE2, {"cost_power": 3.0}),
    "cost^2+fe2+s1": ("budget scaled by cost squared, warm-up of 2, sensitivity q 1",
                      _COST_FE2,
                      {"cost_power": 2.0, "sensitivity": 1.0}),
    "cost+fe1+w1": ("cost, warm-up of 1, then one step forecast before the first error signal "
                    "(as the searched patterns of benchmarks/oracle_schedule.md begin)",
                    {"compute_cost": ((0.5, 1.0, 2.0),), "first_enhance": 1}, {"first_window": 1}),
    "cost^2+fe1+w1": ("as cost+fe1+w1, budget scaled by cost squared",
                      {"compute_cost": ((0.5, 1.0, 2.0),), "first_enhance": 1},
                      {"first_window": 1, "cost_power": 2.0}),
    "fixed-fe3": ("control: hermite fixed interval (the tolerances are intervals), warm-up of 3",
                  {"schedule": "fixed"}, {}),
    "fixed-fe2": ("control: hermite fixed interval (the tolerances are intervals), warm-up of 2",
                  {"schedule": "fixed", "first_enhance": 2}, {}),
}


def _install(overrides):
    """Build adaptive policies with ``overrides`` (the experiment's knob)."""
    def make(config):
        pol = sched.make_policy(config)
        if isinstance(pol, sched.AdaptivePolicy) and overrides:
            kw = dict(max_skip=config.max_skip, min_skip=config.min_skip,
                      first_enhance=config.first_enhance, last_enhance=config.last_enhance,
                      exponent=sched.error_exponent(config.backend, config.order))
            kw["cost"] = pol.cost
            kw.update(overrides)
            pol = sched.AdaptivePolicy(config.tolerance, **kw)
        return pol
    cache_mod.make_policy = make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="base")
    ap.add_argument("--steps", default="25,50")
    ap.add_argument("--shapes", type=int, default=32)
    ap.add_argument("--tolerances", default=",".join(map(str, TOLERANCES)))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="variants")
    ap.add_argument("--per-shape", action="store_true",
                    help="run each shape in its own call (as `hicache3d generate` runs), with its slice of the "
                         "batch's noise: each shape's schedule decided on that shape alone")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--merge", default="", help="comma list of adaptive_<name>.json to merge into --name "
                    "(then only the report is written)")
    a = ap.parse_args()
    if a.list:
        for k, (doc, _, _) in VARIANTS.items():
            print(f"{k:10s} {doc}")
        return
    out_json = ROOT / "benchmarks" / f"adaptive_{a.name}.json"
    if a.merge:
        res = {"shapes": None, "variants": {}}
        for m in a.merge.split(","):
            r = json.loads((ROOT / "benchmarks" / f"adaptive_{m}.json").read_text())
            res["shapes"] = r["shapes"]
            res["variants"].update(r["variants"])
        atomic_write(out_json, (json.dumps(res, indent=1, default=float) + "\n").encode())
        _write_md(res, out_json.with_suffix(".md"))
        return
    torch.set_num_threads(a.threads)
    names = a.variants.split(",")
    for n in names:
        if n not in VARIANTS:
            sys.exit(f"unknown variant {n!r}; known: {', '.join(VARIANTS)}")
    steps = [int(s) for s in a.steps.split(",")]
    tols = [float(x) for x in a.tolerances.split(",")]
    stored = json.loads((ROOT / "benchmarks" / "fidelity.json").read_text())
    if len(stored["shapes"]) != a.shapes:
        print(f"note: the stored fixed rows are on {len(stored['shapes'])} shapes, this run on {a.shapes}")
    fixed = [r for r in stored["rows"] if r.get("schedule", "fixed") == "fixed" and r["steps"] in steps]

    from hicache3d.bundled.generator import BundledGenerator
    gen = BundledGenerator.from_pretrained()
    cond, _, _ = held_out(a.shapes)
    def generate(S):
        return (gen.per_item if a.per_shape else gen)(cond, steps=S, seed=0)

    refs = {S: generate(S) for S in steps}
    res = json.loads(out_json.read_text()) if out_json.exists() else {"shapes": a.shapes, "variants": {}}
    for name in names:
        doc, settings, overrides = VARIANTS[name]
        _install(overrides)
        rows = []
        for S in steps:
            ref = refs[S]
            for tol in tols:
                st = dict(backend="hermite", first_enhance=3, schedule="adaptive", tolerance=tol)
                if settings.get("schedule") == "fixed":       # a fixed-cadence control: tol = interval
                    st = dict(backend="hermite", first_enhance=3, interval=int(tol))
                st.update(settings)
                with hicache3d.accelerate(gen, "bundled", **st) as run:
                    t0 = time.perf_counter()
                    out = generate(S)
                    dt = time.perf_counter() - t0
                sc = occupancy_scores(out.occupancy, ref.occupancy, out.latent, ref.latent)
                row = {"steps": S, "backend": st["backend"], "schedule": st.get("schedule", "fixed"),
                       "tolerance": tol if st.get("schedule") == "adaptive" else None,
                       "interval": st.get("interval"),
                       "seconds": dt, "network_forwards": out.network_forwards,
                       "forward_ratio": ref.network_forwards / max(out.network_forwards, 1),
                       "pattern": run.stats["runs"][-1]["sites"]["sparse_structure"].get("pattern"),
                       **summarize(sc)}
                rows.append(row)
                print(f"{name:10s} steps {S} tol {tol:g}: IoU {row['iou_mean']:.4f} (min {row['iou_min']:.3f}) "
                      f"{row['forward_ratio']:.2f}x {row['pattern']}", flush=True)
        table = frontier_table(fixed + rows)
        if a.per_shape:
            doc = doc + " (one shape per call)"
        res["variants"][name] = {"doc": doc, "settings": settings, "overrides": overrides,
                                 "rows": rows, "frontier": table}
        atomic_write(out_json, (json.dumps(res, indent=1, default=float) + "\n").encode())
        _write_md(res, ROOT / "benchmarks" / f"adaptive_{a.name}.md")
        cache_mod.make_policy = sched.make_policy


def _gains(table, S):
    g = [r["gain"] for r in table if r["steps"] == S and r["gain"] is not None]
    return (min(g), max(g)) if g else None


def _write_md(res, path):
    lines = [f"# Adaptive schedule variants ({res['shapes']} held-out shapes, bundled generator)", "",
             "Gain = forward ratio of the variant's adaptive frontier / best fixed-interval frontier "
             "of any basis − 1, at matched mean IoU (0.97–0.99, where both reach it); min IoU = "
             "the lowest per-sample minimum on the variant's frontier inside that range, against "
             "the fixed frontier's at the same levels.  The fixed frontier is that of the stored "
             "rows of benchmarks/fidelity.json (32 shapes): on a run with fewer shapes this first table "
             "is indicative only; the tables against a control measured on the same shapes are the "
             "comparison.", "",
             "| variant | what | gain 25 steps | gain 50 steps | gain 12 steps | adaptive min IoU (25/50) | fixed min IoU (25/50) |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda g: "–" if g is None else f"{100 * g[0]:+.0f}..{100 * g[1]:+.0f}%"  # noqa: E731
    for name, v in res["variants"].items():
        t = v["frontier"]
        mins = []
        for S in (25, 50):
            am = [r["adaptive_min"] for r in t if r["steps"] == S and r["gain"] is not None]
            fm = [r["fixed_min"] for r in t if r["steps"] == S and r["gain"] is not None]
            mins.append((min(am) if am else None, min(fm) if fm else None))
        f3 = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
        lines.append(f"| {name} | {v['doc']} | {fmt(_gains(t, 25))} | {fmt(_gains(t, 50))} | "
                     f"{fmt(_gains(t, 12))} | {f3(mins[0][0])} / {f3(mins[1][0])} | "
                     f"{f3(mins[0][1])} / {f3(mins[1][1])} |")
    for control in [n for n in res["variants"] if n.startswith("fixed-")]:
        lines += ["", f"Against the control `{control}` measured on the same shapes "
                  f"({res['variants'][control]['doc']}): forward-ratio gain of each frontier at "
                  "matched mean IoU / per-sample minimum IoU on the variant's frontier there "
                  "(– where a frontier does not reach that IoU).", "",
                  "| variant | " + " | ".join(f"{S} steps @ {lv}" for S in (25, 50) for lv in LEVELS) + " |",
                  "|---|" + "---|" * (2 * len(LEVELS))]
        for name, v in res["variants"].items():
            cells = []
            for S in (25, 50):
                b = pareto([r for r in res["variants"][control]["rows"] if r["steps"] == S])
                f = pareto([r for r in v["rows"] if r["steps"] == S])
                for lv in LEVELS:
                    x, y = ratio_at(f, lv), ratio_at(b, lv)
                    cells.append("–" if x is None or y is None else
                                 f"{100 * (x / y - 1):+.0f}% / {ratio_at(f, lv, 'iou_min'):.3f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Per level:", ""]
    for name, v in res["variants"].items():
        lines.append(f"**{name}**: " + "; ".join(
            f"{r['steps']}@{r['iou']:.3f} {r['adaptive_ratio']:.2f}x vs {r['fixed_ratio']:.2f}x "
            f"(min {r['adaptive_min']:.3f} vs {r['fixed_min']:.3f})"
            for r in v["frontier"] if r["gain"] is not None))
        lines.append("")
    atomic_write(path, ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
