"""Fidelity-vs-speed sweep of the forecast bases on the bundled generator.

For every step count, the uncached run of each shape is the reference; every
(backend, interval) run of the same seed is compared with it: F-score@0.05 and Chamfer
of the surfaces (the grid's fixed unit-cube frame), voxel IoU, and the relative L2 of the
final latent, as means and per-sample minima; plus network forwards and wall time.  The
uncached run is also scored against the true shapes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["run_sweep", "write_reports"]


def _conditions(images: Optional[Path], n: int):
    from .bundled import shapes
    if images is None:
        occ, cond = shapes.make_batch("held_out", list(range(n)))
        return cond, occ, [f"held_out/{i}" for i in range(n)]
    from .generate import list_images
    paths = list_images(Path(images))
    cond = torch.stack([shapes.image_to_condition(str(p)) for p in paths])
    return cond, None, [p.name for p in paths]


def _scores(pred_occ, ref_occ, pred_lat=None, ref_lat=None, tau: float = 0.05) -> Dict[str, np.ndarray]:
    from .bundled.metrics import batch_metrics
    m = batch_metrics(pred_occ.cpu(), ref_occ.cpu(), tau=tau)
    out = {"fscore": m["fscore"], "chamfer": m["chamfer"], "iou": m["iou"]}
    if pred_lat is not None:
        d = (pred_lat - ref_lat).flatten(1).norm(dim=1) / ref_lat.flatten(1).norm(dim=1)
        out["latent_rel_l2"] = d.double().numpy()
    return out


def _summ(scores: Dict[str, np.ndarray]) -> Dict[str, float]:
    out = {}
    for k, v in scores.items():
        out[f"{k}_mean"] = float(np.mean(v))
        out[f"{k}_min" if k in ("fscore", "iou") else f"{k}_max"] = float(
            np.min(v) if k in ("fscore", "iou") else np.max(v))
    return out


def run_sweep(backends: Sequence[str], intervals: Sequence[int], steps: Sequence[int],
              shapes_n: int = 32, images: Optional[Path] = None, seed: int = 0,
              first_enhance: int = 3, tau: float = 0.05,
              progress: Optional[Callable[[str], None]] = None,
              checkpoint: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Run the sweep on the bundled generator; returns a JSON-ready dict."""
    import hicache3d
    from .bundled.generator import BundledGenerator
    gen = BundledGenerator.from_pretrained()
    cond, truth, names = _conditions(images, shapes_n)
    say = progress or (lambda s: None)
    gen(cond[:1], steps=2)                                  # warm-up, untimed
    rows: List[Dict[str, Any]] = []
    baselines: Dict[int, Dict[str, Any]] = {}
    result = {"shapes": names, "seed": seed, "first_enhance": first_enhance, "tau": tau,
              "baselines": baselines, "rows": rows}
    for S in steps:
        t0 = time.perf_counter()
        ref = gen(cond, steps=S, seed=seed)
        t_ref = time.perf_counter() - t0
        base = {"steps": S, "seconds": t_ref, "network_forwards": ref.network_forwards}
        if truth is not None:
            base.update({f"vs_truth_{k}": v for k, v in _summ(_scores(ref.occupancy, truth > 0)).items()})
        baselines[S] = base
        say(f"steps {S}: uncached {t_ref:.1f} s, {ref.network_forwards} forwards")
        for b in backends:
            # re-time the uncached run before each block: the speed ratio compares runs
            # made close together (shared machines drift); forward ratios are exact
            t0 = time.perf_counter()
            gen(cond, steps=S, seed=seed)
            t_ref = time.perf_counter() - t0
            base.setdefault("seconds_remeasured", []).append(t_ref)
            for iv in intervals:
                with hicache3d.accelerate(gen, "bundled", backend=b, interval=iv,
                                          first_enhance=first_enhance) as run:
                    t0 = time.perf_counter()
                    out = gen(cond, steps=S, seed=seed)
                    dt = time.perf_counter() - t0
                site = run.stats["sites"]["sparse_structure"]
                sc = _scores(out.occupancy, ref.occupancy, out.latent, ref.latent, tau)
                row = {"steps": S, "backend": b, "interval": iv, "seconds": dt,
                       "speedup": t_ref / dt, "network_forwards": out.network_forwards,
                       "forward_ratio": ref.network_forwards / max(out.network_forwards, 1),
                       "per_basis": site["per_basis"], "fallbacks": site["fallbacks"],
                       **_summ(sc)}
                rows.append(row)
                say(f"steps {S} {b:8s} interval {iv}: IoU {row['iou_mean']:.3f} (min {row['iou_min']:.3f}), "
                    f"F {row['fscore_mean']:.3f}, latent {row['latent_rel_l2_mean']:.3f}, "
                    f"{row['forward_ratio']:.2f}x fewer forwards, {row['speedup']:.2f}x faster")
            if checkpoint is not None:
                checkpoint(result)
    return result


def write_reports(res: Dict[str, Any], out: Path, stem: str = "fidelity") -> List[Path]:
    """JSON + Markdown + a fidelity-vs-speed Pareto plot (PNG, needs matplotlib)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(res, indent=1, default=float) + "\n")
    rows = res["rows"]
    md = [f"# Fidelity vs speed on the bundled generator ({len(res['shapes'])} shapes, seed {res['seed']})", "",
          "Every cached run is compared with the uncached run of the same seed and step count: "
          f"F-score@{res['tau']} and Chamfer of the voxel surfaces (fixed unit-cube frame), voxel "
          "IoU, relative L2 of the final latent; means and per-sample minima (max for distances). "
          "`fewer fwd` = uncached network forwards / cached (exact); `faster` = wall-clock ratio "
          "against an uncached run re-timed just before each backend's block (indicative only on "
          "a shared machine).", ""]
    for S, base in sorted(res["baselines"].items(), key=lambda kv: int(kv[0])):
        line = f"**{S} steps** — uncached: {base['network_forwards']} forwards, {base['seconds']:.1f} s"
        if "vs_truth_iou_mean" in base:
            line += (f"; vs the true shapes IoU {base['vs_truth_iou_mean']:.3f}, "
                     f"F@{res['tau']} {base['vs_truth_fscore_mean']:.3f}")
        md += [line, "", "| backend | interval | IoU mean | IoU min | F mean | F min | latent rel L2 | fewer fwd | faster |",
               "|---|---|---|---|---|---|---|---|---|"]
        for r in [r for r in rows if int(r["steps"]) == int(S)]:
            md.append(f"| {r['backend']} | {r['interval']} | {r['iou_mean']:.3f} | {r['iou_min']:.3f} | "
                      f"{r['fscore_mean']:.3f} | {r['fscore_min']:.3f} | {r['latent_rel_l2_mean']:.3f} | "
                      f"{r['forward_ratio']:.2f}x | {r['speedup']:.2f}x |")
        md.append("")
    md += _verdict(rows)
    paths[1].write_text("\n".join(md) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    steps = sorted({int(r["steps"]) for r in rows})
    fig, axes = plt.subplots(1, len(steps), figsize=(5 * len(steps), 4), squeeze=False)
    for ax, S in zip(axes[0], steps):
        for b in sorted({r["backend"] for r in rows}):
            rr = sorted([r for r in rows if r["backend"] == b and int(r["steps"]) == S],
                        key=lambda r: r["forward_ratio"])
            ax.plot([r["forward_ratio"] for r in rr], [r["iou_mean"] for r in rr], "o-", label=b, ms=4)
        ax.set_title(f"{S} steps")
        ax.set_xlabel("network forwards saved (uncached / cached)")
        ax.set_ylabel("voxel IoU vs uncached (mean)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    png = out / f"{stem}.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return paths + [png]


def _verdict(rows: List[Dict[str, Any]]) -> List[str]:
    """Which basis wins at each (steps, interval), by mean IoU vs uncached."""
    lines = ["## Winner per setting (mean IoU vs uncached)", "",
             "| steps | interval | best | IoU | runner-up | IoU |", "|---|---|---|---|---|---|"]
    keys = sorted({(int(r["steps"]), int(r["interval"])) for r in rows})
    for S, iv in keys:
        rr = sorted([r for r in rows if int(r["steps"]) == S and int(r["interval"]) == iv],
                    key=lambda r: -r["iou_mean"])
        if len(rr) >= 2:
            lines.append(f"| {S} | {iv} | {rr[0]['backend']} | {rr[0]['iou_mean']:.3f} | "
                         f"{rr[1]['backend']} | {rr[1]['iou_mean']:.3f} |")
    return lines + [""]
