"""The fidelity benchmark of the README: every basis, 12/25/50 steps, intervals 2-8, and the
adaptive (error-controlled) schedule over a sweep of tolerances, on 32 held-out shapes of
the bundled generator.  The adaptive rows are run twice: on the batch of 32 (one schedule
for the batch, decided on its worst item) and one shape per call, as `hicache3d generate`
runs (`--per-shape`).  Writes benchmarks/fidelity.{json,md,png}.

    python scripts/bench_fidelity.py            # the full sweep (about 30-60 min on 2 cores)
    python scripts/bench_fidelity.py --adaptive-only
        # only the adaptive rows (plus one fixed row per step count, checked against the
        # stored one), merged with the fixed rows of benchmarks/fidelity.json
    python scripts/bench_fidelity.py --adaptive-only --steps 12
        # the same for 12 steps only, the stored adaptive rows of 25 and 50 kept
    python scripts/bench_fidelity.py --bases dmd,auto
        # only the fixed rows of these bases (every step count and interval), merged with
        # the other bases' rows and the adaptive rows of benchmarks/fidelity.json
    python scripts/bench_fidelity.py --quick    # 8 shapes, 12 steps, intervals 3 and 6

The searched-pattern rows (`schedule="pattern"`) come from scripts/bench_pattern.py: the
partial re-runs above keep them; a full sweep starts the file afresh, so run
bench_pattern.py after it.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hicache3d.bench import run_sweep, write_reports  # noqa: E402

BASES = ["reuse", "taylor", "hermite", "dmd", "auto"]
TOLERANCES = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
ADAPTIVE_BASES = ["hermite", "auto"]
# settings of the adaptive rows (as in recipes/bundled.toml): a warm-up of 2 computed steps,
# and the budget of a window scaled by the cost of the computes it replaces (the bundled
# sampler runs two forwards where CFG applies, 0.5 <= t <= 1)
ADAPTIVE_OPTIONS = {"first_enhance": 2, "compute_cost": [[0.5, 1.0, 2.0]]}


def merge_rows(old: dict, new: dict, bases: list) -> dict:
    """``old`` with its fixed rows of ``bases`` replaced by those of ``new`` (same step
    counts and intervals), in the stored order; every other row, the baselines and the
    shapes are kept.  The uncached baselines must agree (same generator and shapes)."""
    if list(old["shapes"]) != list(new["shapes"]):
        raise SystemExit("the stored sweep used other shapes; re-run it in full")
    fresh = {(r["backend"], int(r["steps"]), int(r["interval"])): r for r in new["rows"]}
    rows = []
    for r in old["rows"]:
        key = (r["backend"], int(r["steps"]), int(r.get("interval") or 0))
        if r.get("schedule", "fixed") == "fixed" and r["backend"] in bases:
            rows.append(fresh.pop(key))
        else:
            rows.append(r)
    rows += list(fresh.values())            # bases the stored sweep did not have
    out = dict(old)
    out["rows"] = rows
    out["rerun_bases"] = list(bases)
    return out


def with_stored(old: dict, res: dict, steps: Optional[list] = None) -> dict:
    """``res`` (a run of the adaptive rows) with the fixed rows of the stored sweep ``old``
    in their place, and the stored notes, the record of re-run bases and the searched-
    pattern rows (``scripts/bench_pattern.py``) kept (this run does not change them).
    ``steps``: the step counts ``res`` re-ran; the stored adaptive rows, baselines and
    checks of the others are kept."""
    if list(old["shapes"]) != list(res["shapes"]):
        raise SystemExit("the stored sweep used other shapes; re-run it in full")
    fixed = [dict(r, schedule=r.get("schedule", "fixed"), tolerance=r.get("tolerance"))
             for r in old["rows"] if r.get("schedule", "fixed") == "fixed"]
    kept = [] if steps is None else [r for r in old["rows"]
                                     if r.get("schedule") == "adaptive" and int(r["steps"]) not in steps]
    out = dict(res)
    out["rows"] = (fixed + sorted(kept + [r for r in res["rows"] if r["schedule"] == "adaptive"],
                                  key=lambda r: int(r["steps"]))
                   + [r for r in old["rows"] if r.get("schedule") == "pattern"])
    if steps is not None:
        base = {int(k): v for k, v in old["baselines"].items() if int(k) not in steps}
        base.update({int(k): v for k, v in res["baselines"].items()})
        out["baselines"] = {k: base[k] for k in sorted(base)}
    for key in ("notes", "rerun_bases", "pattern_search", "pattern_search_variants"):
        if old.get(key):
            out[key] = old[key]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 shapes, 12 steps, a few settings")
    ap.add_argument("--adaptive-only", action="store_true",
                    help="run the adaptive rows; keep the fixed rows of the stored JSON (checked on one row per step count)")
    ap.add_argument("--bases", default=None,
                    help="comma-separated bases whose fixed rows are re-run; every other row is kept "
                         "from the stored JSON (with --quick: the quick settings, merged into "
                         "fidelity_quick.json)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the Markdown and PNG from the stored benchmarks/fidelity.json")
    ap.add_argument("--shapes", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tolerances", default=",".join(map(str, TOLERANCES)))
    ap.add_argument("--adaptive-bases", default=",".join(ADAPTIVE_BASES))
    ap.add_argument("--per-shape", default=",".join(ADAPTIVE_BASES),
                    help="bases whose adaptive rows are also run one shape per call, as `hicache3d "
                         "generate` runs (each shape's schedule decided on that shape alone); '' for none")
    ap.add_argument("--steps", default=None,
                    help="with --adaptive-only: re-run only these step counts (comma separated), "
                         "keeping the stored adaptive rows of the others (e.g. a block timed while "
                         "the machine was busy)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tols = [float(x) for x in a.tolerances.split(",")]
    adaptive = {b: tols for b in a.adaptive_bases.split(",")}
    per_shape = {b.strip(): tols for b in a.per_shape.split(",") if b.strip()}
    bad = [b for b in per_shape if b not in adaptive]
    if bad:
        ap.error(f"--per-shape: {', '.join(bad)} not among --adaptive-bases ({a.adaptive_bases})")
    say = lambda s: print(s, flush=True)  # noqa: E731
    if a.bases:
        bases = [b.strip() for b in a.bases.split(",") if b.strip()]
        bad = [b for b in bases if b not in BASES]
        if not bases or bad:
            ap.error(f"--bases: unknown basis {', '.join(bad) or '(none given)'}; choose from {', '.join(BASES)}")
        stem = "fidelity_quick" if a.quick else "fidelity"
        stored = a.out / f"{stem}.json"
        if not stored.exists():
            ap.error(f"--bases merges into {stored}, which does not exist: run the sweep first")
        old = json.loads(stored.read_text())
        fixed = [r for r in old["rows"] if r.get("schedule", "fixed") == "fixed"]
        steps = sorted({int(r["steps"]) for r in fixed})
        intervals = sorted({int(r["interval"]) for r in fixed})
        res = run_sweep(bases, intervals, steps, shapes_n=len(old["shapes"]), progress=say)
        res = merge_rows(old, res, bases)
    elif a.report_only:
        res = json.loads((a.out / "fidelity.json").read_text())
        stem = "fidelity"
    elif a.quick:
        res = run_sweep(BASES, [3, 6], [12], shapes_n=8, progress=print,
                        adaptive={"hermite": [0.5, 2.0]})
        stem = "fidelity_quick"
    elif a.adaptive_only:
        old = json.loads((a.out / "fidelity.json").read_text())
        fixed = [r for r in old["rows"] if r.get("schedule", "fixed") == "fixed"]
        steps = sorted({int(x) for x in a.steps.split(",")}) if a.steps else None
        stored_steps = sorted({int(r["steps"]) for r in fixed})
        if steps and not set(steps) <= set(stored_steps):
            ap.error(f"--steps: the stored sweep has step counts {stored_steps}")
        res = run_sweep(list(adaptive), [4], steps or [12, 25, 50], shapes_n=a.shapes, progress=say,
                        adaptive=adaptive, adaptive_options=ADAPTIVE_OPTIONS, per_item=per_shape)
        checks = [] if steps is None else [c for c in old.get("fixed_rows_check", [])
                                           if int(c["steps"]) not in steps]
        for r in [r for r in res["rows"] if r["schedule"] == "fixed"]:
            o = next(o for o in fixed if o["steps"] == r["steps"] and o["backend"] == r["backend"]
                     and o["interval"] == r["interval"])
            checks.append({"steps": r["steps"], "backend": r["backend"], "interval": r["interval"],
                           "iou_mean_now": r["iou_mean"], "iou_mean_stored": o["iou_mean"],
                           "identical": abs(r["iou_mean"] - o["iou_mean"]) < 1e-12})
            say(f"check steps {r['steps']} {r['backend']} interval {r['interval']}: IoU now "
                f"{r['iou_mean']:.6f}, stored {o['iou_mean']:.6f}")
        res = with_stored(old, res, steps)
        res["fixed_rows_check"] = sorted(checks, key=lambda c: int(c["steps"]))
        stem = "fidelity"
    else:
        # reports are rewritten after every block, so an interrupted sweep keeps what it did
        res = run_sweep(BASES, list(range(2, 9)), [12, 25, 50], shapes_n=a.shapes, progress=say,
                        adaptive=adaptive, adaptive_options=ADAPTIVE_OPTIONS, per_item=per_shape,
                        checkpoint=lambda r: write_reports(r, a.out, "fidelity"))
        stem = "fidelity"
    for p in write_reports(res, a.out, stem):
        print("wrote", p)


if __name__ == "__main__":
    main()
