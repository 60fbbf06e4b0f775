"""The searched schedule (`schedule="pattern"`) on the bundled generator, as `hicache3d
tune --schedules pattern` finds it on a user's model: the pattern is searched on a few
tuning shapes (held-out shapes 32.., which the fidelity benchmark does not use) and every
pattern of the search's path is then scored on the 32 held-out shapes of
benchmarks/fidelity.json, beside the fixed and adaptive rows there.

    python scripts/bench_pattern.py                       # 12, 25 and 50 steps, hermite, 8 tuning shapes
    python scripts/bench_pattern.py --steps 25 --tune-shapes 4

The search goes on while the tuning shapes keep a mean IoU >= --floor (0.95), so the
path covers IoU 0.97-0.99.  Writes its rows into benchmarks/fidelity.json (replacing the
stored pattern rows of the same step count, basis and tuning set) and rewrites
benchmarks/fidelity.{md,png}; the search's runs are kept in benchmarks/pattern_search.json
(written after every run: an interrupted search resumes from it).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hicache3d._io import atomic_write  # noqa: E402
from hicache3d.bench import _scores, summarize, write_reports  # noqa: E402
from hicache3d.schedule_search import search_pattern  # noqa: E402


def pattern_rows(pipe, cond, ref, steps, backend, path, tuned_on, say=print):
    """Every pattern of ``path`` run on ``cond`` (batched) and scored against ``ref``."""
    rows = []
    t_ref = pipe.run(cond, steps=steps, seed=0, recipe=None).seconds
    for p in path:
        recipe = pipe.recipe.with_settings({"backend": backend, "schedule": "pattern", "pattern": p["pattern"]})
        out = pipe.run(cond, steps=steps, seed=0, recipe=recipe)
        site = out.stats["sites"]["sparse_structure"]
        row = {"steps": steps, "backend": backend, "schedule": "pattern", "interval": None, "tolerance": None,
               "seconds": out.seconds, "speedup": t_ref / out.seconds, "network_forwards": out.forwards,
               "forward_ratio": ref.forwards / max(out.forwards, 1), "per_basis": site["per_basis"],
               "fallbacks": site["fallbacks"], "pattern": p["pattern"], "tuned_on": tuned_on,
               "tuning_iou_mean": p["iou_mean"], "tuning_iou_min": p["iou_min"],
               **summarize(_scores(pipe, out, ref))}
        rows.append(row)
        say(f"steps {steps} {backend} {p['pattern']}: IoU {row['iou_mean']:.4f} (min {row['iou_min']:.3f}) "
            f"{row['forward_ratio']:.2f}x; on the tuning shapes {p['iou_mean']:.4f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="12,25,50")
    ap.add_argument("--backend", default="hermite")
    ap.add_argument("--tune-shapes", type=int, default=8,
                    help="how many held-out shapes (from index --tune-from on) the search runs on")
    ap.add_argument("--tune-from", type=int, default=32)
    ap.add_argument("--order-by", default="iou", choices=["iou", "drift"],
                    help="what a removal costs: the loss of mean IoU, or the growth of the mean relative L2 "
                         "of the final latent (a finer measure), per forward saved")
    ap.add_argument("--floor", type=float, default=0.95,
                    help="the search goes on while the tuning shapes keep this mean IoU")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None,
                    help="the file of the search's runs (default: OUT/pattern_search.json)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from hicache3d.bundled import shapes
    from hicache3d.tune_pipelines import BundledPipeline

    stored_path = a.out / "fidelity.json"
    stored = json.loads(stored_path.read_text())
    pipe = BundledPipeline()
    lo, hi = a.tune_from, a.tune_from + a.tune_shapes
    n_eval = len(stored["shapes"])
    if lo < n_eval:
        ap.error(f"--tune-from {lo}: the tuning shapes must not overlap the {n_eval} scored shapes")
    tune_cond = shapes.make_batch("held_out", list(range(lo, hi)))[1]
    eval_cond = pipe.held_out(n_eval)[0]
    tuned_on = f"held_out/{lo}-{hi - 1}" + (", by drift" if a.order_by == "drift" else "")
    cache_path = a.cache or a.out / "pattern_search.json"

    def load_cache():
        return json.loads(cache_path.read_text()) if cache_path.exists() else {"runs": {}}
    pipe.warmup(tune_cond, None)
    for S in [int(s) for s in a.steps.split(",")]:
        key = f"{a.backend}/{S}/{tuned_on}"
        runs = load_cache()["runs"].get(key, {})
        ref_t = pipe.run(tune_cond, steps=S, seed=0, recipe=None)

        def evaluate(pattern):
            if pattern in runs:
                return runs[pattern]
            recipe = pipe.recipe.with_settings({"backend": a.backend, "schedule": "pattern", "pattern": pattern})
            out = pipe.run(tune_cond, steps=S, seed=0, recipe=recipe)
            sc = summarize(_scores(pipe, out, ref_t))
            runs[pattern] = {"forwards": out.forwards, "iou_mean": sc["iou_mean"], "iou_min": sc["iou_min"],
                             "drift": sc["latent_rel_l2_mean"]}
            cache = load_cache()              # only this search's entry is written
            cache["runs"][key] = runs
            atomic_write(cache_path, (json.dumps(cache, indent=1) + "\n").encode())
            return runs[pattern]

        t0 = time.perf_counter()
        by_drift = a.order_by == "drift"
        path = search_pattern(evaluate, S, quality=(lambda r: -r["drift"]) if by_drift else (lambda r: r["iou_mean"]),
                              meets=lambda r: r["iou_mean"] >= a.floor,
                              say=lambda s: print(f"[{time.perf_counter() - t0:.0f} s] {s}", flush=True))
        print(f"steps {S}: search took {len(runs)} runs on {a.tune_shapes} shapes", flush=True)
        ref = pipe.run(eval_cond, steps=S, seed=0, recipe=None)
        rows = pattern_rows(pipe, eval_cond, ref, S, a.backend, path, tuned_on)
        stored = json.loads(stored_path.read_text())
        keep = [r for r in stored["rows"] if not (r.get("schedule") == "pattern" and int(r["steps"]) == S
                                                  and r["backend"] == a.backend and r.get("tuned_on") == tuned_on)]
        stored["rows"] = keep + rows
        stored.setdefault("pattern_search", {})[key] = {"tuning_shapes": [lo, hi], "runs": len(runs),
                                                        "floor": a.floor}
        for p in write_reports(stored, a.out, "fidelity"):
            print("wrote", p)


if __name__ == "__main__":
    main()
