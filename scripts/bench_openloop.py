"""Open-loop forecast error of every basis on velocities recorded from the bundled generator.

The bundled generator runs uncached on held-out shapes while the CFG-combined velocity
of every step is recorded.  Then, for each step count and fixed cadence (``first_enhance``
computed steps, then one every ``interval``), every basis is fed the *true* velocities of
the computed steps (history 6, positions = step index, as the cache does) and forecasts
each skipped step; the error is ``|forecast - truth| / |truth|`` per shape and step.  No
error feeds back into the trajectory (that is the closed loop of ``bench_fidelity.py``),
so this measures the forecasts alone.

The report gives the median error per basis and cell, and ``auto`` against the best
single basis of the cell (target: within 2%).

    python scripts/bench_openloop.py                         # 32 shapes, 12/25/50 steps
    python scripts/bench_openloop.py --shapes 8 --steps 25   # a quick look

Writes ``benchmarks/openloop.{json,md}`` (``--out`` to change).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASES = ["reuse", "taylor", "hermite", "dmd", "auto"]


def errors(V, backend, interval, first_enhance, history):
    """Relative error of each forecast step, per item: ``[forecast steps, batch]``."""
    from hicache3d import CacheConfig
    from hicache3d.forecast import make_forecaster
    from hicache3d.schedule import Schedule
    cfg = CacheConfig(backend=backend, schedule="fixed", interval=interval,
                      first_enhance=first_enhance, history=history)
    fc = make_forecaster(cfg.backend, cfg.history, **cfg.forecast_options())
    plan = Schedule(interval=interval, first_enhance=first_enhance).plan(len(V))
    out = []
    for i, computed in enumerate(plan):
        if computed:
            fc.push(float(i), V[i])
            continue
        f = fc.predict(float(i))
        d = (f - V[i]).flatten(1).norm(dim=1) / V[i].flatten(1).norm(dim=1).clamp_min(1e-30)
        out.append(d.double().numpy())
    return np.stack(out) if out else np.zeros((0, V.shape[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bases", default=",".join(BASES))
    ap.add_argument("--shapes", type=int, default=32, help="held-out shapes (one batch)")
    ap.add_argument("--steps", default="12,25,50")
    ap.add_argument("--intervals", default="2,3,4,5,6,7,8")
    ap.add_argument("--first-enhance", type=int, default=3)
    ap.add_argument("--history", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "openloop"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from hicache3d.bench import held_out, record_velocities
    from hicache3d.bundled.generator import BundledGenerator
    try:
        bases = [b.strip() for b in a.bases.split(",") if b.strip()]
        steps = [int(s) for s in a.steps.split(",")]
        intervals = [int(s) for s in a.intervals.split(",")]
    except ValueError as e:
        sys.exit(f"bench_openloop: bad list: {e}")
    if a.shapes < 1 or any(s < 2 for s in steps) or any(i < 1 for i in intervals):
        sys.exit("bench_openloop: --shapes >= 1, --steps >= 2 and --intervals >= 1")
    gen = BundledGenerator.from_pretrained()
    cond, _, names = held_out(a.shapes)
    t_start = time.time()
    rows = []
    for S in steps:
        V = record_velocities(gen, cond, S)
        for iv in intervals:
            cell = {}
            for b in bases:
                e = errors(V, b, iv, a.first_enhance, a.history)
                if e.size == 0:
                    continue
                cell[b] = e
                rows.append({"steps": S, "interval": iv, "backend": b, "forecast_steps": int(e.shape[0]),
                             "median": float(np.median(e)), "mean": float(np.mean(e)),
                             "p90": float(np.quantile(e, 0.9))})
            if cell:
                print(f"steps {S:2d} interval {iv}: " + ", ".join(
                    f"{b} {np.median(e):.4f}" for b, e in cell.items()), flush=True)
    res = {"shapes": names, "first_enhance": a.first_enhance, "history": a.history,
           "threads": a.threads, "seconds": time.time() - t_start, "rows": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(report(res, bases))
    print(f"wrote {out.with_suffix('.md')}")


def report(res, bases):
    singles = [b for b in bases if b != "auto"]
    cells = {}
    for r in res["rows"]:
        cells.setdefault((r["steps"], r["interval"]), {})[r["backend"]] = r
    lines = ["# Open-loop forecast error on recorded trajectories", "",
             f"Written by `scripts/bench_openloop.py`: {len(res['shapes'])} held-out shapes, "
             f"first_enhance {res['first_enhance']}, history {res['history']}. The bundled generator runs "
             "uncached; every basis forecasts each skipped step of a fixed cadence from the true "
             "velocities of the computed steps. Cells: median relative error over shapes and "
             "forecast steps (mean and 90th percentile in `openloop.json`); the best single basis "
             "of each row in bold. `auto / best`: auto's median over the best single basis's "
             "(target <= 1.02).", "",
             "| steps | interval | " + " | ".join(bases) + (" | auto / best |" if "auto" in bases and singles else " |"),
             "|---|---|" + "---|" * len(bases) + ("---|" if "auto" in bases and singles else "")]
    ratios = []
    for (S, iv), c in sorted(cells.items()):
        best = min((c[b]["median"] for b in singles if b in c), default=None)
        cols = []
        for b in bases:
            if b not in c:
                cols.append("")
                continue
            m = c[b]["median"]
            cols.append(f"**{m:.4f}**" if b != "auto" and m == best else f"{m:.4f}")
        line = f"| {S} | {iv} | " + " | ".join(cols) + " |"
        if "auto" in c and best:
            q = c["auto"]["median"] / best
            ratios.append(q)
            line += f" {q:.3f} |"
        lines.append(line)
    if ratios:
        lines += ["", f"auto / best: median {statistics.median(ratios):.3f}, worst {max(ratios):.3f}, "
                  f"within 2% in {sum(q <= 1.02 for q in ratios)} of {len(ratios)} cells."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
