"""Fidelity-vs-speed sweep of the forecast bases on the bundled generator.

For every step count, the uncached run of each shape is the reference; every
(backend, interval) run of the same seed is compared with it: F-score@0.05 and Chamfer
of the surfaces (the grid's fixed unit-cube frame), voxel IoU, and the relative L2 of the
final latent, as means and per-sample minima; plus network forwards and wall time.  The
uncached run is also scored against the true shapes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ._io import atomic_write
__all__ = ["run_sweep", "write_reports", "pareto", "ratio_at", "frontier_table", "tune_choices", "held_out",
           "occupancy_scores", "summarize"]


def held_out(n: int):
    """The first ``n`` held-out shapes of the bundled generator: (conditions, true
    occupancies, names)."""
    from .bundled import shapes
    occ, cond = shapes.make_batch("held_out", list(range(n)))
    return cond, occ, [f"held_out/{i}" for i in range(n)]


def record_velocities(gen, cond, steps: int, seed: int = 0):
    """The guided velocity of every step of an uncached run of the bundled generator
    ``gen`` (its trained dynamics): ``[steps, batch, ...]``."""
    import torch
    seen = []
    sampler = gen.sampler
    orig = sampler.velocity

    def velocity(*args, **kwargs):
        v = orig(*args, **kwargs)
        seen.append(v.detach().clone())
        return v

    sampler.velocity = velocity
    try:
        gen(cond, steps=steps, seed=seed)
    finally:
        del sampler.velocity                       # back to the class's method
    return torch.stack(seen)


def occupancy_scores(pred_occ, ref_occ, pred_lat=None, ref_lat=None,
                     tau: float = 0.05) -> Dict[str, np.ndarray]:
    """Per shape: F-score@tau, Chamfer and voxel IoU of two occupancy batches, and the
    relative L2 of the final latents when given (what the sweep tabulates)."""
    from .bundled.metrics import batch_metrics
    m = batch_metrics(pred_occ.cpu(), ref_occ.cpu(), tau=tau)
    out = {"fscore": m["fscore"], "chamfer": m["chamfer"], "iou": m["iou"]}
    if pred_lat is not None:
        d = (pred_lat - ref_lat).double().flatten(1).norm(dim=1) / ref_lat.double().flatten(1).norm(dim=1)
        out["latent_rel_l2"] = d.cpu().numpy()
    return out


def _conditions(pipe, images: Optional[Path], n: int):
    if images is None:
        return pipe.held_out(n)
    from .generate import list_images
    paths = list_images(Path(images))
    return pipe.prepare(paths), None, [p.name for p in paths]


def _scores(pipe, out, ref, tau: float = 0.05, latents: bool = True) -> Dict[str, np.ndarray]:
    """Per shape: the mesh metrics of the tune pipeline, and the relative L2 of the final
    latent (the same measures ``hicache3d tune`` tabulates)."""
    from .tune_pipelines import relative_l2
    m = pipe.mesh_scores(out.meshes, ref.meshes, tau)
    res = {"fscore": m["fscore"], "chamfer": m["chamfer"], "iou": m["iou"]}
    if latents:
        site = pipe.sites[0]
        res["latent_rel_l2"] = np.array([relative_l2(a, b) for a, b in
                                         zip(out.latents[site], ref.latents[site])], dtype=np.float64)
    return res


def summarize(scores: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Means and per-sample minima (maxima for distances) of per-shape scores."""
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
              checkpoint: Optional[Callable[[Dict[str, Any]], None]] = None,
              adaptive: Optional[Mapping[str, Sequence[float]]] = None,
              adaptive_options: Optional[Mapping[str, Any]] = None,
              per_item: Optional[Mapping[str, Sequence[float]]] = None) -> Dict[str, Any]:
    """Run the sweep on the bundled generator; returns a JSON-ready dict.

    ``backends`` x ``intervals``: fixed-cadence rows.  ``adaptive``: ``{backend:
    [tolerance, ...]}``, rows of the error-controlled schedule (``adaptive_options``:
    further settings of those rows, e.g. ``max_skip``).  ``per_item``: ``{backend:
    [tolerance, ...]}``, adaptive rows run one shape per call, as ``hicache3d generate``
    runs (each shape's schedule decided on that shape alone; same noise, so the same samples
    as the batched rows).  Every run goes through the
    bundled pipeline of ``hicache3d tune`` (:class:`hicache3d.tune_pipelines.BundledPipeline`):
    the reference really uncached, the same counting, timing and scores."""
    from .tune_pipelines import BundledPipeline
    pipe = BundledPipeline()
    cond, truth, names = _conditions(pipe, images, shapes_n)
    say = progress or (lambda s: None)
    pipe.warmup(cond, None)                                 # untimed
    rows: List[Dict[str, Any]] = []
    baselines: Dict[int, Dict[str, Any]] = {}
    result = {"shapes": names, "seed": seed, "first_enhance": first_enhance, "tau": tau,
              "baselines": baselines, "rows": rows}
    for S in steps:
        ref = pipe.run(cond, steps=S, seed=seed, recipe=None)
        base = {"steps": S, "seconds": ref.seconds, "network_forwards": ref.forwards}
        if truth is not None:
            truth_out = type(ref)({}, truth > 0)
            base.update({f"vs_truth_{k}": v for k, v in
                         summarize(_scores(pipe, ref, truth_out, latents=False)).items()})
        baselines[S] = base
        say(f"steps {S}: uncached {ref.seconds:.1f} s, {ref.forwards} forwards")
        for b in backends:
            # re-time the uncached run before each block: the speed ratio compares runs
            # made close together (shared machines drift); forward ratios are exact
            t_ref = pipe.run(cond, steps=S, seed=seed, recipe=None).seconds
            base.setdefault("seconds_remeasured", []).append(t_ref)
            settings = [dict(schedule="fixed", interval=iv) for iv in intervals]
            settings = [(st, False) for st in settings]
            settings += [(dict(schedule="adaptive", tolerance=float(tol), **dict(adaptive_options or {})), False)
                         for tol in (adaptive or {}).get(b, [])]
            items = (per_item or {}).get(b, [])
            if items:
                # one call per shape: timed against the uncached run made the same way
                ref_item = pipe.run(cond, steps=S, seed=seed, recipe=None, per_item=True)
                t_item = ref_item.seconds
                base.setdefault("seconds_per_item", []).append(t_item)
                base["network_forwards_per_item"] = ref_item.forwards
            settings += [(dict(schedule="adaptive", tolerance=float(tol), **dict(adaptive_options or {})), True)
                         for tol in items]
            for st, one in settings:
                kw = dict(backend=b, first_enhance=first_enhance)
                kw.update(st)                # adaptive_options may set their own warm-up
                recipe = pipe.recipe.with_settings(kw)
                out = (pipe.run(cond, steps=S, seed=seed, recipe=recipe, per_item=True) if one
                       else pipe.run(cond, steps=S, seed=seed, recipe=recipe))
                site = out.stats["sites"]["sparse_structure"]
                sc = _scores(pipe, out, ref, tau)
                runs = out.stats["runs"]
                row = {"steps": S, "backend": b, "schedule": st.get("schedule", "fixed"),
                       "interval": st.get("interval"), "tolerance": st.get("tolerance"),
                       "seconds": out.seconds, "speedup": (t_item if one else t_ref) / out.seconds,
                       "network_forwards": out.forwards,
                       "forward_ratio": (ref_item if one else ref).forwards / max(out.forwards, 1),
                       "per_basis": site["per_basis"], "fallbacks": site["fallbacks"],
                       "pattern": runs[-1]["sites"]["sparse_structure"].get("pattern"),
                       **summarize(sc)}
                if one:
                    row["per_item"] = True
                    row["patterns"] = [r["sites"]["sparse_structure"].get("pattern") for r in runs]
                if st.get("schedule") == "adaptive" and adaptive_options:
                    row["options"] = dict(adaptive_options)
                rows.append(row)
                say(f"steps {S} {b:8s} {_setting(row):16s}: IoU {row['iou_mean']:.3f} (min {row['iou_min']:.3f}), "
                    f"F {row['fscore_mean']:.3f}, latent {row['latent_rel_l2_mean']:.3f}, "
                    f"{row['forward_ratio']:.2f}x fewer forwards, {row['speedup']:.2f}x faster")
            if checkpoint is not None:
                checkpoint(result)
    return result


def _setting(r: Mapping[str, Any]) -> str:
    if r.get("schedule") == "pattern":
        return "searched pattern"
    if r.get("schedule", "fixed") == "adaptive":
        return f"adaptive tol {r['tolerance']:g}" + (" per shape" if r.get("per_item") else "")
    return f"interval {r['interval']}"


def pareto(rows: Sequence[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    """The rows no other row beats on both forward ratio and mean IoU, by forward ratio."""
    out = []
    for r in sorted(rows, key=lambda r: (-r["forward_ratio"], -r["iou_mean"])):
        if not out or r["iou_mean"] > out[-1]["iou_mean"]:
            out.append(r)
    return out[::-1]


def ratio_at(front: Sequence[Mapping[str, Any]], iou: float, key: str = "forward_ratio") -> Optional[float]:
    """``key`` of a frontier (by forward ratio, IoU falling) at mean IoU ``iou``, linear
    between its points; ``None`` outside its IoU range."""
    pts = sorted(((r["iou_mean"], r[key]) for r in front))
    if not pts or iou < pts[0][0] or iou > pts[-1][0]:
        return None
    return float(np.interp(iou, [p[0] for p in pts], [p[1] for p in pts]))


def frontier_table(rows: Sequence[Mapping[str, Any]],
                   levels: Sequence[float] = (0.97, 0.975, 0.98, 0.985, 0.99)) -> List[Dict[str, Any]]:
    """Per step count and IoU level: forward ratio (and interpolated per-sample minimum
    IoU) of the adaptive frontier and of the best fixed-interval frontier (any basis), and
    of the searched patterns (``schedule="pattern"`` rows) where there are any."""
    out = []
    for S in sorted({int(r["steps"]) for r in rows}):
        rs = [r for r in rows if int(r["steps"]) == S]
        fixed = pareto([r for r in rs if r.get("schedule", "fixed") == "fixed"])
        adapt = pareto([r for r in rs if r.get("schedule") == "adaptive" and not r.get("per_item")])
        items = pareto([r for r in rs if r.get("schedule") == "adaptive" and r.get("per_item")])
        pats = pareto([r for r in rs if r.get("schedule") == "pattern"])
        for lv in levels:
            f, a = ratio_at(fixed, lv), ratio_at(adapt, lv)
            row = {"steps": S, "iou": lv, "fixed_ratio": f, "adaptive_ratio": a,
                   "fixed_min": ratio_at(fixed, lv, "iou_min"),
                   "adaptive_min": ratio_at(adapt, lv, "iou_min"),
                   "gain": (a / f - 1.0) if (a and f) else None}
            if items:
                p = ratio_at(items, lv)
                row.update({"per_item_ratio": p, "per_item_min": ratio_at(items, lv, "iou_min"),
                            "per_item_gain": (p / f - 1.0) if (p and f) else None})
            if pats:
                p = ratio_at(pats, lv)
                row.update({"pattern_ratio": p, "pattern_min": ratio_at(pats, lv, "iou_min"),
                            "pattern_gain": (p / f - 1.0) if (p and f) else None})
            out.append(row)
    return out


def write_reports(res: Dict[str, Any], out: Path, stem: str = "fidelity") -> List[Path]:
    """JSON + Markdown + a fidelity-vs-speed plot with the fixed-interval and the adaptive
    frontiers (PNG, needs matplotlib).  Files are replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    rows = res["rows"]
    res["frontier"] = (frontier_table(rows) if any(r.get("schedule") in ("adaptive", "pattern") for r in rows)
                       else [])
    _atomic_write(paths[0], json.dumps(res, indent=1, default=float) + "\n")
    md = [f"# Fidelity vs speed on the bundled generator ({len(res['shapes'])} shapes, seed {res['seed']})", "",
          "Every cached run is compared with the uncached run of the same seed and step count: "
          f"F-score@{res['tau']} and Chamfer of the voxel surfaces (fixed unit-cube frame), voxel "
          "IoU, relative L2 of the final latent; means and per-sample minima (max for distances). "
          "`fewer fwd` = uncached network forwards / cached (exact); `faster` = wall-clock ratio "
          "against an uncached run re-timed just before each backend's block (indicative only on "
          "a shared machine).  `setting`: a fixed `interval`, the adaptive schedule at a "
          "`tol`erance, or a searched pattern (`schedule=\"pattern\"`, its pattern in the last "
          "column).", ""]
    if res.get("fixed_rows_check"):
        md += ["The fixed-interval rows come from the full sweep; this run re-ran one of them per "
               "step count and found it identical: " + ", ".join(
                   f"{c['backend']} interval {c['interval']} at {c['steps']} steps "
                   f"(IoU {c['iou_mean_now']:.4f} now, {c['iou_mean_stored']:.4f} stored)"
                   for c in res["fixed_rows_check"]) + ".", ""]
    if res.get("rerun_bases"):
        md += ["The fixed-interval rows of " + ", ".join(res["rerun_bases"]) + " were re-run after a "
               "change to those bases (`scripts/bench_fidelity.py --bases`); the other rows are "
               "kept from the stored sweep.  Each block's `faster` column is timed against its own "
               "uncached re-run, so blocks measured at different times compare less well than "
               "rows within one block.", ""]
    md += _frontier_md(res)
    for note in res.get("notes", []):
        md += [note, ""]
    for S, base in sorted(res["baselines"].items(), key=lambda kv: int(kv[0])):
        line = f"**{S} steps** — uncached: {base['network_forwards']} forwards, {base['seconds']:.1f} s"
        if "vs_truth_iou_mean" in base:
            line += (f"; vs the true shapes IoU {base['vs_truth_iou_mean']:.3f}, "
                     f"F@{res['tau']} {base['vs_truth_fscore_mean']:.3f}")
        md += [line, "", "| backend | setting | IoU mean | IoU min | F mean | F min | latent rel L2 | fewer fwd | faster | pattern |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for r in [r for r in rows if int(r["steps"]) == int(S)]:
            pat = r.get("pattern") if r.get("schedule") in ("adaptive", "pattern") else ""
            md.append(f"| {r['backend']} | {_setting(r)} | {r['iou_mean']:.3f} | {r['iou_min']:.3f} | "
                      f"{r['fscore_mean']:.3f} | {r['fscore_min']:.3f} | {r['latent_rel_l2_mean']:.3f} | "
                      f"{r['forward_ratio']:.2f}x | {r['speedup']:.2f}x | {('`' + pat + '`') if pat else ''} |")
        md.append("")
    md += _verdict([r for r in rows if r.get("schedule", "fixed") == "fixed"])
    _atomic_write(paths[1], "\n".join(md) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    steps = sorted({int(r["steps"]) for r in rows})
    fig, axes = plt.subplots(1, len(steps), figsize=(5 * len(steps), 4), squeeze=False)
    for ax, S in zip(axes[0], steps):
        rs = [r for r in rows if int(r["steps"]) == S]
        for b in sorted({r["backend"] for r in rs}):
            rr = sorted([r for r in rs if r["backend"] == b and r.get("schedule", "fixed") == "fixed"],
                        key=lambda r: r["forward_ratio"])
            if rr:
                ax.plot([r["forward_ratio"] for r in rr], [r["iou_mean"] for r in rr], "o-", label=b,
                        ms=3, lw=0.8, alpha=0.6)
        for name, sel, one, style in (("fixed-interval frontier", "fixed", False, "k--"),
                                      ("adaptive frontier (batch)", "adaptive", False, "r-"),
                                      ("adaptive frontier (per shape)", "adaptive", True, "b-"),
                                      ("searched-pattern frontier", "pattern", False, "g-")):
            fr = pareto([r for r in rs if r.get("schedule", "fixed") == sel and bool(r.get("per_item")) == one])
            if fr:
                ax.plot([r["forward_ratio"] for r in fr], [r["iou_mean"] for r in fr], style,
                        marker={"adaptive": "s", "pattern": "^"}.get(sel), ms=5, lw=2, label=name)
        ax.set_title(f"{S} steps")
        ax.set_xlabel("network forwards saved (uncached / cached)")
        ax.set_ylabel("voxel IoU vs uncached (mean)")
        ax.set_ylim(max(0.9, min(r["iou_mean"] for r in rs) - 0.005), 1.0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    png = out / f"{stem}.png"
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
    return paths + [png]


def _atomic_write(path: Path, text: str) -> None:
    atomic_write(Path(path), text.encode("utf-8"))


def _frontier_md(res: Dict[str, Any]) -> List[str]:
    fr = res.get("frontier") or []
    if not fr:
        return []
    f = lambda x, fmt: "–" if x is None else format(x, fmt)  # noqa: E731
    per = any("per_item_ratio" in r for r in fr)
    pat = any("pattern_ratio" in r for r in fr)
    lines = ["## Adaptive vs fixed interval at matched mean IoU", "",
             "Forward ratio (uncached / cached network forwards) of the adaptive frontier and of "
             "the best fixed-interval frontier of any basis, linearly interpolated between their "
             "Pareto points at each mean IoU; per-sample minimum IoU interpolated the same way. "
             "`gain` = adaptive / fixed − 1 (– where a frontier does not reach that IoU).", "",
             "| steps | mean IoU | fixed fwd ratio | adaptive fwd ratio | gain | fixed min IoU | adaptive min IoU |"
             + (" per shape fwd ratio | gain | per shape min IoU |" if per else "")
             + (" searched pattern fwd ratio | gain | searched pattern min IoU |" if pat else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|---|" if per else "") + ("---|---|---|" if pat else "")]
    g = lambda x: "–" if x is None else format(100 * x, "+.0f") + "%"  # noqa: E731
    for r in fr:
        line = (f"| {r['steps']} | {r['iou']:.3f} | {f(r['fixed_ratio'], '.2f')} | "
                f"{f(r['adaptive_ratio'], '.2f')} | {g(r['gain'])} | "
                f"{f(r['fixed_min'], '.3f')} | {f(r['adaptive_min'], '.3f')} |")
        if per:
            line += (f" {f(r.get('per_item_ratio'), '.2f')} | {g(r.get('per_item_gain'))} | "
                     f"{f(r.get('per_item_min'), '.3f')} |")
        if pat:
            line += (f" {f(r.get('pattern_ratio'), '.2f')} | {g(r.get('pattern_gain'))} | "
                     f"{f(r.get('pattern_min'), '.3f')} |")
        lines.append(line)
    if per:
        lines += ["", "`per shape`: the adaptive rows run one shape per call, as `hicache3d generate` "
                  "runs, so each shape's schedule is decided on that shape alone (the batched rows "
                  "decide one schedule for the batch, on its worst item); same noise, so the same "
                  "samples and the same uncached reference."]
    if pat:
        tuned = sorted({r["tuned_on"] for r in res["rows"] if r.get("schedule") == "pattern" and r.get("tuned_on")})
        lines += ["", "`searched pattern`: `schedule=\"pattern\"`, the computed/forecast patterns of a "
                  "greedy search (`hicache3d.schedule_search`, as `hicache3d tune --schedules pattern` "
                  "runs it) made on other shapes (" + ", ".join(tuned) + "; "
                  "`scripts/bench_pattern.py`) and scored here on shapes the search never saw; every "
                  "pattern on the search's path is a point, and the frontier runs through them."]
        lines += [""] + _tune_choice_md(res["rows"])
    return lines + [""]


def tune_choices(rows: Sequence[Mapping[str, Any]],
                 levels: Sequence[float] = (0.97, 0.975, 0.98, 0.985, 0.99)) -> List[Dict[str, Any]]:
    """What a tune at each target would pick, with no look at the scored shapes: per step
    count and target, the searched pattern with the most forwards saved whose mean IoU on
    the tuning shapes meets the target; its scores here, and the best fixed-interval
    frontier's forward ratio at the mean IoU it reaches here (``gain``)."""
    out = []
    for S in sorted({int(r["steps"]) for r in rows}):
        rs = [r for r in rows if int(r["steps"]) == S]
        pats = [r for r in rs if r.get("schedule") == "pattern" and r.get("tuning_iou_mean") is not None]
        fixed = pareto([r for r in rs if r.get("schedule", "fixed") == "fixed"])
        for lv in levels:
            ok = [r for r in pats if r["tuning_iou_mean"] >= lv]
            if not ok:
                continue
            c = max(ok, key=lambda r: (r["forward_ratio"], r["tuning_iou_mean"]))
            f = ratio_at(fixed, c["iou_mean"])
            out.append({"steps": S, "target": lv, "pattern": c["pattern"], "tuning_iou": c["tuning_iou_mean"],
                        "iou_mean": c["iou_mean"], "iou_min": c["iou_min"], "ratio": c["forward_ratio"],
                        "fixed_ratio": f, "fixed_min": ratio_at(fixed, c["iou_mean"], "iou_min"),
                        "gain": (c["forward_ratio"] / f - 1.0) if f else None})
    return out


def _tune_choice_md(rows: Sequence[Mapping[str, Any]]) -> List[str]:
    ch = tune_choices(rows)
    if not ch:
        return []
    f = lambda x, fmt: "–" if x is None else format(x, fmt)  # noqa: E731
    lines = ["What `tune` would choose, decided on the tuning shapes alone: at each target, the "
             "searched pattern with the most forwards saved whose mean IoU on the tuning shapes meets "
             "it, scored here; `fixed` is the best fixed-interval frontier at the mean IoU it reaches "
             "here.", "",
             "| steps | target | pattern | IoU (tuning shapes) | IoU here | min here | fwd ratio | fixed fwd ratio | gain | fixed min IoU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in ch:
        g = "–" if c["gain"] is None else format(100 * c["gain"], "+.0f") + "%"
        lines.append(f"| {c['steps']} | {c['target']:.3f} | `{c['pattern']}` | {c['tuning_iou']:.4f} | "
                     f"{c['iou_mean']:.4f} | {c['iou_min']:.3f} | {c['ratio']:.2f} | {f(c['fixed_ratio'], '.2f')} | "
                     f"{g} | {f(c['fixed_min'], '.3f')} |")
    return lines


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
