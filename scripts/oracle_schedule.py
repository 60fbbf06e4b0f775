"""How far can any one schedule go?  A greedy search for the best computed/forecast
pattern on the bundled generator, fitted to the very shapes it is scored on (an optimistic
ceiling for every schedule that treats the batch alike, fixed or adaptive; the schedule a
tune ships, searched on other shapes, is `scripts/bench_pattern.py`).

From "every step computed", it removes, one at a time, the computed step whose removal
costs the least mean voxel IoU per network forward saved (a step where classifier-free
guidance runs saves two), and records each pattern's forward ratio and IoU.

    python scripts/oracle_schedule.py --steps 25 --backend hermite

Writes benchmarks/oracle_schedule.json and .md; the JSON is written after every removal and
a re-run continues from it.
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
from hicache3d import schedule as sched  # noqa: E402
from hicache3d._io import atomic_write  # noqa: E402
from hicache3d.bench import held_out, occupancy_scores, pareto, ratio_at, summarize  # noqa: E402

LEVELS = (0.97, 0.975, 0.98, 0.985, 0.99)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--backend", default="hermite")
    ap.add_argument("--shapes", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-computed", type=int, default=5)
    ap.add_argument("--coarse", type=int, default=16,
                    help="above this many computed steps, remove the 3 cheapest at once (saves time where "
                         "IoU stays above 0.995)")
    ap.add_argument("--fresh", action="store_true",
                    help="score the searched patterns, and the fixed intervals 2-8 of the same basis, on "
                         "the next --shapes held-out shapes, which the search never saw")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out_json = ROOT / "benchmarks" / "oracle_schedule.json"
    key = f"{a.backend}/{a.steps}"
    res = json.loads(out_json.read_text()) if out_json.exists() else {"shapes": a.shapes, "runs": {}}
    if res["shapes"] != a.shapes:
        sys.exit(f"{out_json} holds a search on {res['shapes']} shapes; move it away to search on {a.shapes}")
    run = res["runs"].setdefault(key, {"backend": a.backend, "steps": a.steps, "path": []})
    if a.fresh and not run["path"]:
        sys.exit(f"no search for {key} in {out_json} to score on fresh shapes: run it first")

    from hicache3d.bundled import shapes
    from hicache3d.bundled.generator import BundledGenerator
    gen = BundledGenerator.from_pretrained()
    if a.fresh:
        cond = shapes.make_batch("held_out", list(range(a.shapes, 2 * a.shapes)))[1]
    else:
        cond, _, _ = held_out(a.shapes)
    ref = gen(cond, steps=a.steps, seed=0)

    def evaluate(computed):
        pattern = sched.pattern_of([i in computed for i in range(a.steps)])
        with hicache3d.accelerate(gen, "bundled", backend=a.backend, schedule="pattern", pattern=pattern):
            out = gen(cond, steps=a.steps, seed=0)
        sc = summarize(occupancy_scores(out.occupancy, ref.occupancy, out.latent, ref.latent))
        return {"computed": sorted(computed), "network_forwards": out.network_forwards,
                "forward_ratio": ref.network_forwards / max(out.network_forwards, 1),
                "pattern": "".join("C" if i in computed else "." for i in range(a.steps)), **sc}

    if a.fresh:
        fresh = [evaluate(set(r["computed"])) for r in run["path"]]
        plan = lambda iv: {i for i, c in enumerate(sched.Schedule(iv, 3, 0).plan(a.steps)) if c}  # noqa: E731
        fixed = []
        for iv in range(2, 9):
            r = evaluate(plan(iv))
            r["interval"] = iv
            fixed.append(r)
        run["fresh"] = {"shapes": [a.shapes, 2 * a.shapes], "path": fresh, "fixed": fixed}
        for r in fresh + fixed:
            print(f"fresh: {r['pattern']} IoU {r['iou_mean']:.4f} (min {r['iou_min']:.3f}) {r['forward_ratio']:.2f}x")
        atomic_write(out_json, (json.dumps(res, indent=1, default=float) + "\n").encode())
        _write_md(res, out_json.with_suffix(".md"))
        return
    path = run["path"]
    computed = set(path[-1]["computed"]) if path else set(range(a.steps))
    if not path:
        path.append(evaluate(computed))
    t0 = time.perf_counter()
    while len(computed) > a.min_computed:
        last = path[-1]
        scored = []
        for k in sorted(computed - {0}):
            r = evaluate(computed - {k})
            saved = last["network_forwards"] - r["network_forwards"]
            scored.append(((last["iou_mean"] - r["iou_mean"]) / max(saved, 1), k, r))
        scored.sort(key=lambda x: x[0])
        if len(computed) > a.coarse:
            drop = {k for _, k, _ in scored[:3]}
            computed = computed - drop
            r = evaluate(computed)
        else:
            _, k, r = scored[0]
            computed = computed - {k}
        path.append(r)
        print(f"{len(computed):2d} computed: {r['pattern']} IoU {r['iou_mean']:.4f} (min {r['iou_min']:.3f}) "
              f"{r['forward_ratio']:.2f}x  [{time.perf_counter() - t0:.0f} s]", flush=True)
        atomic_write(out_json, (json.dumps(res, indent=1, default=float) + "\n").encode())
    atomic_write(out_json, (json.dumps(res, indent=1, default=float) + "\n").encode())
    _write_md(res, out_json.with_suffix(".md"))


def _write_md(res, path):
    stored = json.loads((ROOT / "benchmarks" / "fidelity.json").read_text())
    lines = [f"# The best single schedule, searched on the shapes it is scored on ({res['shapes']} held-out shapes)", "",
             "A greedy search (scripts/oracle_schedule.py) removes computed steps one at a time, "
             "the one that costs the least mean IoU per forward saved, on the very shapes it is "
             "scored on: an optimistic ceiling for any schedule that treats the batch alike.  "
             "Forward ratio at matched mean IoU against the fixed-interval frontier (any basis) "
             "and the adaptive frontier of benchmarks/fidelity.json.", "",
             "| basis / steps | " + " | ".join(f"IoU {lv}" for lv in LEVELS) + " |",
             "|---|" + "---|" * len(LEVELS)]
    for key, run in res["runs"].items():
        S = run["steps"]
        rows = [r for r in stored["rows"] if r["steps"] == S]
        fixed = pareto([r for r in rows if r.get("schedule", "fixed") == "fixed"])
        adapt = pareto([r for r in rows if r.get("schedule") == "adaptive"])
        orc = pareto(run["path"])
        cells = []
        for lv in LEVELS:
            o, f, ad = ratio_at(orc, lv), ratio_at(fixed, lv), ratio_at(adapt, lv)
            if o is None or f is None:
                cells.append("–")
                continue
            cell = f"{o:.2f}x ({100 * (o / f - 1):+.0f}% vs fixed {f:.2f}x"
            if ad is not None:
                cell += f"; adaptive {ad:.2f}x"
            cells.append(cell + ")")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    for key, run in res["runs"].items():
        fr = run.get("fresh")
        if not fr:
            continue
        lo, hi = fr["shapes"]
        orc, fixed = pareto(fr["path"]), pareto(fr["fixed"])
        lines += ["", f"The same patterns on held-out shapes {lo}–{hi - 1}, which the search never saw, "
                  f"against {run['backend']} at the fixed intervals 2–8 (warm-up 3) on those shapes "
                  "(`--fresh`):", "",
                  "| basis / steps | " + " | ".join(f"IoU {lv}" for lv in LEVELS) + " |",
                  "|---|" + "---|" * len(LEVELS)]
        cells = []
        for lv in LEVELS:
            o, f = ratio_at(orc, lv), ratio_at(fixed, lv)
            cells.append("–" if o is None or f is None else f"{o:.2f}x ({100 * (o / f - 1):+.0f}% vs fixed {f:.2f}x)")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "The patterns on the way (C computed, . forecast):", ""]
    for key, run in res["runs"].items():
        lines += [f"**{key}**", "", "```"]
        fresh = (run.get("fresh") or {}).get("path") or [None] * len(run["path"])
        lines += [f"{r['pattern']}  IoU {r['iou_mean']:.4f} (min {r['iou_min']:.3f})  {r['forward_ratio']:.2f}x"
                  + (f"   fresh shapes: IoU {q['iou_mean']:.4f} (min {q['iou_min']:.3f})" if q else "")
                  for r, q in zip(run["path"], fresh)]
        lines += ["```", ""]
    atomic_write(path, ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
