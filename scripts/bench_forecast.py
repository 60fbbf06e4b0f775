#!/usr/bin/env python
"""Forecast benchmark of hicache3d, side by side with the seed package and other caches.

Writes ``benchmarks/forecast.json`` and ``benchmarks/forecast.md``.  Three sections, all
measured in one run of this script (the scenarios and each section are described in
``benchmarks/README.md``; the code is the package ``hicache3d.forecast_bench``):

1. **accuracy** -- every reference scenario, 8 anchors, horizons 1..8 (and the sub-step
   cadence), mean / median relative L2 over seeds, for hicache3d's bases, the seed package
   ``hicache_pp`` 1.3.0, cache-dit's DMD and TaylorSeer calibrators and diffusers'
   TaylorSeer state, each driven through its own public update / forecast calls;
2. **cost** -- one ``predict()`` / ``push()`` at d = 2^16 .. 2^22 (history 6, fp32 and
   bf16, one batch item) against one weighted sum over the stacked history
   (``torch.tensordot``), the seed's DMD fit+forecast, and the peak extra allocation;
3. **coverage** -- on 12/25/50-step schedules, the share of skipped steps a ``backend="dmd"``
   ``VelocityCache`` serves with the exponential basis, and the error of those forecasts,
   next to the seed's ``dmd_forecast_state`` on the same schedules.

The comparison packages are imported from ``.bench-deps`` (see ``--deps``); install them with::

    pip install --no-deps --target .bench-deps cache-dit==1.5.3 diffusers==0.42.1 \\
        requests urllib3 certifi charset-normalizer pillow regex importlib_metadata zipp

Usage::

    python scripts/bench_forecast.py                 # the full run (several minutes)
    python scripts/bench_forecast.py --quick         # few seeds, small sizes: a smoke run
    python scripts/bench_forecast.py --sections accuracy,coverage
    python scripts/bench_forecast.py --report-only   # rewrite forecast.md from forecast.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import hicache3d  # noqa: E402
from hicache3d._io import atomic_write  # noqa: E402
from hicache3d.forecast_bench.accuracy import section_accuracy  # noqa: E402
from hicache3d.forecast_bench.arms import DEPS_NOTE, probe_imports  # noqa: E402
from hicache3d.forecast_bench.cost import section_cost  # noqa: E402
from hicache3d.forecast_bench.coverage import section_coverage  # noqa: E402
from hicache3d.forecast_bench.report import rewrite_report  # noqa: E402


SECTIONS = ("accuracy", "cost", "coverage")


def merge_rerun(res: Dict[str, Any], meta: Dict[str, Any], jpath: Path, reason: Optional[str]) -> Dict[str, Any]:
    """The results to store: a run of every section stands alone; a run of some of them
    replaces those in the stored JSON and keeps the others, noting the re-run (its
    sections, date, versions and ``reason``) in ``meta["reruns"]``."""
    if set(meta["sections"]) >= set(SECTIONS) or not jpath.is_file():
        return dict(res, meta=meta)
    stored = json.loads(jpath.read_text())
    if stored.get("meta", {}).get("quick") != meta["quick"]:
        return dict(res, meta=meta)
    rerun = {k: meta[k] for k in ("sections", "date", "wall_s", "hicache3d", "torch", "numpy", "threads")}
    if reason:
        rerun["reason"] = reason
    stored["meta"].setdefault("reruns", []).append(rerun)
    stored.update(res)
    return stored


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few seeds, small sizes: a smoke run "
                    "(writes forecast_quick.json/md)")
    ap.add_argument("--sections", default="accuracy,cost,coverage",
                    help="comma-separated subset of accuracy, cost, coverage")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: rewrite the Markdown from the stored JSON of --out-dir")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "benchmarks"))
    ap.add_argument("--deps", default=os.path.join(REPO, ".bench-deps"),
                    help="folder with cache-dit / diffusers (pip install --no-deps --target)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: the cores are shared, one thread times steadily)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per scenario (default 20, 3 with --quick)")
    ap.add_argument("--reason", default=None,
                    help="with a subset of --sections: why they are re-run (kept in the JSON and the report)")
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from accuracy, cost, coverage")
    stem = "forecast_quick" if args.quick else "forecast"
    jpath, mpath = Path(args.out_dir) / (stem + ".json"), Path(args.out_dir) / (stem + ".md")
    if args.report_only:
        if not jpath.is_file():
            ap.error(f"--report-only needs {jpath}; run the benchmark first")
        print(f"wrote {rewrite_report(Path(args.out_dir), stem)}")
        return 0
    if os.path.isdir(args.deps) and args.deps not in sys.path:
        sys.path.append(args.deps)
    torch.set_num_threads(args.threads)
    quick = args.quick
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    imports = probe_imports()
    for k, v in imports.items():
        log(f"{k}: " + (f"ok {v['version']}" if v["ok"] else f"NOT IMPORTED ({v['error']})"))
    available = {"ours": True, "hicache_pp": imports["hicache_pp"]["ok"],
                 "cache-dit": imports["cache-dit"]["ok"], "diffusers": imports["diffusers"]["ok"]}
    res: Dict[str, Any] = {}
    if "accuracy" in sections:
        log("accuracy")
        res["accuracy"] = section_accuracy(args.seeds or (3 if quick else 20), 64, available, log)
    if "cost" in sections:
        log("cost")
        sizes = [1 << 16, 1 << 18] if quick else [1 << 16, 1 << 20, 1 << 22]
        res["cost"] = section_cost(sizes, reps=5 if quick else 21, seed_reps=2 if quick else 3, log=log)
    if "coverage" in sections:
        log("coverage")
        res["coverage"] = section_coverage(args.seeds or (2 if quick else 20), 64, log)
    meta = {
        "quick": quick, "sections": sections, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_s": time.perf_counter() - t_start,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPU cores visible, {platform.processor() or platform.machine()}",
        "torch": torch.__version__, "numpy": np.__version__, "hicache3d": hicache3d.__version__,
        "threads": args.threads, "imports": imports, "deps_note": DEPS_NOTE,
    }
    res = merge_rerun(res, meta, jpath, args.reason)
    os.makedirs(args.out_dir, exist_ok=True)
    atomic_write(jpath, json.dumps(res, indent=1, default=str).encode())
    rewrite_report(Path(args.out_dir), stem)
    log(f"wrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
