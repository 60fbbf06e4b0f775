#!/usr/bin/env python
"""Evaluate the bundled generator on held-out procedural shapes.

Uncached generation (every step calls the network) from the rendered
held-out image of each shape, compared with the true occupancy:

* voxel IoU on the 32^3 grid;
* F-score@0.1 and Chamfer distance between exposed-face centres of both
  grids, in the fixed unit-cube frame of the grid (see
  ``hicache3d.bundled.metrics``; at most 4096 points per shape).

Also reported: the same with the depth channel removed (silhouette only,
as for user images), with the images shuffled among the shapes (how much
the image matters), and timings of one network forward and of one 25-step
generation at batch size 1.

    python scripts/eval_bundled.py --n 64 --update-json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hicache3d.bundled.evaluation import evaluate, load_split, summary, without_depth  # noqa: E402
from hicache3d.bundled.generator import DEFAULT_WEIGHTS, BundledGenerator, sidecar_path  # noqa: E402


def timings(gen: BundledGenerator, cond: torch.Tensor, repeats: int = 20) -> dict:
    model = gen.model
    x = gen.noise(1, 0)
    t = torch.full((1,), 0.5)
    c = cond[:1]
    with torch.no_grad():
        for _ in range(3):
            model(x, t, c)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x, t, c)
        fwd = (time.perf_counter() - t0) / repeats
        gen(c, seed=0)
        t0 = time.perf_counter()
        n = 3
        for i in range(n):
            out = gen(c, seed=i)
        g = (time.perf_counter() - t0) / n
    return {"forward_ms_b1": round(fwd * 1000, 2), "generate_s_b1": round(g, 3),
            "network_forwards_per_generation": int(out.network_forwards)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--split", default="held_out")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg-strength", type=float, default=None)
    ap.add_argument("--cfg-interval", type=float, nargs=2, default=None)
    ap.add_argument("--rescale-t", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-extra", action="store_true", help="skip silhouette-only / shuffled / timing runs")
    ap.add_argument("--update-json", action="store_true", help="store the results in the weights' JSON sidecar")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    gen = BundledGenerator.from_pretrained(args.weights)
    occ, cond = load_split(args.split, args.n)
    kw = dict(steps=args.steps, cfg_strength=args.cfg_strength, cfg_interval=args.cfg_interval, rescale_t=args.rescale_t)
    kw = {k: v for k, v in kw.items() if v is not None}
    sampling = dict(gen.sampling, **kw)
    print(f"{args.split}: {args.n} shapes, sampling {sampling}", flush=True)

    res = evaluate(gen, occ, cond, seed=args.seed, **kw)
    report = {"split": args.split, "n": args.n, "seed": args.seed, "sampling": sampling,
              "uncached": summary(res), "generation_seconds_total": float(res["seconds"]),
              "network_forwards_per_generation": int(res["network_forwards"])}
    print("uncached          F@0.1 mean {fscore_mean:.3f} min {fscore_min:.3f} | IoU mean {iou_mean:.3f} "
          "min {iou_min:.3f} | CD mean {chamfer_mean:.4f}".format(**report["uncached"]), flush=True)
    if not args.no_extra:
        r = evaluate(gen, occ, without_depth(cond), seed=args.seed, **kw)
        report["silhouette_only"] = summary(r)
        print("silhouette only   F@0.1 mean {fscore_mean:.3f} min {fscore_min:.3f} | IoU mean {iou_mean:.3f} "
              "min {iou_min:.3f}".format(**report["silhouette_only"]), flush=True)
        r = evaluate(gen, occ, torch.roll(cond, 1, dims=0), seed=args.seed, **kw)
        report["shuffled_images"] = summary(r)
        print("shuffled images   F@0.1 mean {fscore_mean:.3f} | IoU mean {iou_mean:.3f}".format(**report["shuffled_images"]), flush=True)
        report["timing"] = timings(gen, cond)
        print(f"timing (batch 1, {torch.get_num_threads()} threads): {report['timing']}", flush=True)
    if args.update_json:
        side = sidecar_path(args.weights)
        meta = json.loads(side.read_text())
        meta["held_out_metrics"] = report
        side.write_text(json.dumps(meta, indent=2) + "\n")
        print(f"updated {side}")
    return report


if __name__ == "__main__":
    main()
