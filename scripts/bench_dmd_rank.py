"""How the exponential (dmd) basis compares on the bundled generator, closed loop.

For each (steps, interval) cell, every shape's uncached run is the reference and each
variant's cached run of the same seed is scored by voxel IoU against it (mean and
per-sample minimum over the held-out shapes):

* ``ours dmd``       hicache3d's dmd with its default (data-chosen) rank;
* ``ours dmd r2``    the same with ``rank=2``;
* ``hicache-pp dmd`` the seed package hicache-pp 1.3's loop API (``hicache_init`` /
  ``hicache_decide`` / ``dmd_forecast_state``, backend ``"dmd"``), one state per batch
  item, same cadence, warm-up (3) and history (6), Hermite order 1 as its fallback;
* ``ours hermite``   hicache3d's hermite (order 1), for reference.

    python scripts/bench_dmd_rank.py                 # the cells of the default table
    python scripts/bench_dmd_rank.py --cells 50x3,50x6,25x6 --shapes 16
    python scripts/bench_dmd_rank.py --variants "ours dmd,ours hermite" --extra rank_tol=1e-2

Writes ``benchmarks/dmd_rank.{json,md}`` (``--out`` to change; ``--stem`` the names).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "ours dmd": dict(backend="dmd"),
    "ours dmd r2": dict(backend="dmd", rank=2),
    "hicache-pp dmd": None,
    "ours hermite": dict(backend="hermite"),
}
FIRST, HISTORY = 3, 6


def _seed_run(gen, cond, steps, interval, seed):
    """The bundled generator with hicache-pp's loop API serving the sampler's velocity."""
    import hicache_pp as hp
    sampler = gen.sampler
    orig = sampler.velocity
    B = cond.shape[0]
    states = [hp.hermite.hicache_init(num_steps=steps, interval=interval, max_order=1,
                                      first_enhance=FIRST, sigma=0.5, backend="dmd",
                                      history=HISTORY) for _ in range(B)]
    step = [0]

    def velocity(model, x_t, t, *args, **kw):
        s = step[0]
        step[0] += 1
        for st in states:
            st["step"] = s
        kinds = {hp.hermite.hicache_decide(st) for st in states}
        if kinds == {"full"}:
            v = orig(model, x_t, t, *args, **kw)
            for b, st in enumerate(states):
                vb = v[b].clone()
                hp.hermite.hicache_update_derivatives(st, vb)
                hp.dmd.dmd_update_snapshots(st, vb, HISTORY)
            return v
        return torch.stack([hp.dmd.dmd_forecast_state(st) for st in states])

    sampler.velocity = velocity
    try:
        f0 = sampler.network_forwards
        out = gen(cond, steps=steps, seed=seed)
        return out, sampler.network_forwards - f0
    finally:
        del sampler.velocity
        assert sampler.velocity == orig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="50x3,50x6,25x6", help="steps x interval, comma separated")
    ap.add_argument("--shapes", type=int, default=16, help="held-out shapes (default 16)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--extra", default="", help="extra settings for the 'ours' variants, k=v,k=v")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    ap.add_argument("--stem", default="dmd_rank")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import hicache3d
    from hicache3d.bench import _atomic_write, held_out, occupancy_scores
    from hicache3d.bundled.generator import BundledGenerator
    extra = {}
    for kv in filter(None, a.extra.split(",")):
        k, v = kv.split("=")
        extra[k] = type(hicache3d.CacheConfig().as_dict()[k])(float(v) if "." in v or "e" in v else int(v))
    names = [v.strip() for v in a.variants.split(",")]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    gen = BundledGenerator.from_pretrained()
    cond, _, shape_names = held_out(a.shapes)
    cells = [tuple(int(x) for x in c.split("x")) for c in a.cells.split(",")]
    rows = []
    for S, iv in cells:
        ref = gen(cond, steps=S, seed=0)
        for name in names:
            t0 = time.perf_counter()
            if VARIANTS[name] is None:
                out, fwd = _seed_run(gen, cond, S, iv, 0)
            else:
                st = dict(VARIANTS[name], **extra)
                with hicache3d.accelerate(gen, "bundled", schedule="fixed", interval=iv,
                                          first_enhance=FIRST, history=HISTORY, **st):
                    out = gen(cond, steps=S, seed=0)
                fwd = out.network_forwards
            dt = time.perf_counter() - t0
            iou = occupancy_scores(out.occupancy, ref.occupancy)["iou"]
            rows.append({"steps": S, "interval": iv, "variant": name, "iou_mean": float(np.mean(iou)),
                         "iou_min": float(np.min(iou)), "network_forwards": int(fwd), "seconds": dt})
            print(f"{S} steps interval {iv} {name:15s}: IoU {np.mean(iou):.4f} (min {np.min(iou):.4f}), "
                  f"{fwd} forwards, {dt:.1f} s", flush=True)
    res = {"shapes": shape_names, "first_enhance": FIRST, "history": HISTORY, "extra": extra,
           "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    _atomic_write(a.out / f"{a.stem}.json", json.dumps(res, indent=1) + "\n")
    md = [f"# dmd on the bundled generator, closed loop ({len(shape_names)} held-out shapes)", "",
          "Voxel IoU of each cached run against the uncached run of the same seed, mean "
          "(per-sample minimum in brackets); first_enhance 3, history 6, fixed cadence. "
          "Written by `scripts/bench_dmd_rank.py`" + (f" with {extra}" if extra else "") + ".", "",
          "| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for S, iv in cells:
        cell = {r["variant"]: r for r in rows if r["steps"] == S and r["interval"] == iv}
        md.append(f"| {S} steps, interval {iv} | " + " | ".join(
            f"{cell[n]['iou_mean']:.3f} ({cell[n]['iou_min']:.3f})" for n in names) + " |")
    _atomic_write(a.out / f"{a.stem}.md", "\n".join(md) + "\n")
    print("wrote", a.out / f"{a.stem}.md")


if __name__ == "__main__":
    main()
