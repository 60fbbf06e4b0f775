"""``hicache3d tune``: measure, on the user's own model and images, which cache settings
each site can take, and write the fastest that meet a fidelity target.

For every site of the recipe, every setting of the grid (bases x fixed intervals, bases x
adaptive tolerances) is run with that site cached and the others uncached (fixed interval
1: every step computed, bit-identical to uncached), then the chosen settings of all sites
together.

With ``"pattern"`` among the schedules, each site also gets a searched schedule
(:mod:`hicache3d.schedule_search`): from every step computed, the computed step whose
removal costs the least quality per network forward saved is removed, one at a time,
while the target is met; each pattern on the way is a row like the grid's (``schedule =
"pattern"``), so the fastest may be chosen.  Its basis: ``pattern_backend``, or that of
the site's fastest grid row meeting the target (else the first basis).  The search costs
about ``steps + 2 x (removals)`` runs per site (about 80 at 25 steps); every run is kept,
so it resumes like the grid.  A chosen pattern holds for the tuned step count; runs of
another length fall back to the adaptive schedule (with the tolerance of the site's
fastest adaptive row of the same basis meeting the target, where there is one).

Each run is compared with the uncached run of the same seed and images:

- the final latent of every site, relative L2 (every model);
- where the pipeline makes a mesh: Chamfer, F-score@tau and voxel IoU of the mesh;
- the network forwards (counted on the network) and the wall time of the whole pipeline,
  decoders included, so the speed-up is end to end.  Where a pipeline's mesh decoder
  cannot run on this device (``pipeline.no_mesh_reason``: TRELLIS on CPU), the time is
  that of the run up to the decoder (``pipeline.timing``, "sampler-only"); tune.json,
  tune.md and settings.toml carry the reason and the label.

Target: with a mesh, mean voxel IoU >= ``target_iou`` (0.98); without, the largest mean
latent drift over the sites <= ``target_drift`` (0.05: on the bundled generator at 25
steps, the settings at mean IoU 0.98 have a mean latent drift of 0.04-0.05,
benchmarks/fidelity.json).  "Fastest": fewest network forwards (exact, what a GPU pays
for), ties broken by wall time; ``rank_by="seconds"`` ranks by measured wall time.

Every run is kept as one JSON record in ``OUT/runs/`` (written atomically), the uncached
reference as one torch file; a rerun of the same tune reuses them, so an interrupted tune
resumes where it stopped, and a tune with another target re-decides without running.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ._io import atomic_write
from .config import SCHEDULES
from .tune_pipelines import Output, Pipeline, TuneError, relative_l2

__all__ = ["tune", "plan_runs", "choose", "meets", "Target", "DEFAULT_BACKENDS", "DEFAULT_SCHEDULES",
           "DEFAULT_INTERVALS", "DEFAULT_TOLERANCES", "TARGET_IOU", "TARGET_DRIFT"]

DEFAULT_BACKENDS = ("hermite", "dmd", "auto")
DEFAULT_SCHEDULES = ("fixed", "adaptive")
DEFAULT_INTERVALS = (2, 3, 4, 5, 6)
DEFAULT_TOLERANCES = (0.25, 0.5, 1.0, 2.0, 4.0)
TARGET_IOU = 0.98
TARGET_DRIFT = 0.05
UNCACHED_SITE = {"schedule": "fixed", "interval": 1}      # every step computed
RECORD_FORMAT = 1


@dataclass(frozen=True)
class Target:
    """``kind`` "iou": mean voxel IoU vs uncached >= value; "drift": the largest mean
    relative L2 of a site's final latent <= value."""

    kind: str
    value: float

    def describe(self) -> str:
        return (f"mean mesh IoU >= {self.value:g}" if self.kind == "iou"
                else f"final-latent drift (relative L2, mean, worst site) <= {self.value:g}")


def meets(row: Mapping[str, Any], target: Target) -> bool:
    if target.kind == "iou":
        return row.get("iou_mean") is not None and row["iou_mean"] >= target.value
    return row.get("drift") is not None and row["drift"] <= target.value


def _rank(rank_by: str) -> Callable[[Mapping[str, Any]], Tuple[float, float]]:
    if rank_by == "forwards":
        return lambda r: (r["forwards"], r["seconds"])
    if rank_by == "seconds":
        return lambda r: (r["seconds"], r["forwards"])
    raise ValueError(f"rank_by must be 'forwards' or 'seconds', got {rank_by!r}")


def choose(rows: Sequence[Mapping[str, Any]], target: Target, rank_by: str = "forwards"
           ) -> Optional[Mapping[str, Any]]:
    """The fastest row that meets ``target`` (``None``: none does)."""
    ok = [r for r in rows if meets(r, target)]
    return min(ok, key=_rank(rank_by)) if ok else None


def setting_label(s: Mapping[str, Any]) -> str:
    if s.get("schedule") == "adaptive":
        return f"{s['backend']} adaptive tol {s['tolerance']:g}"
    if s.get("schedule") == "pattern":
        pat = s["pattern"][0] if isinstance(s["pattern"], (list, tuple)) else s["pattern"]
        return f"{s['backend']} pattern {pat}"
    return f"{s['backend']} interval {s['interval']}"


def plan_runs(sites: Sequence[str], backends: Sequence[str], schedules: Sequence[str],
              intervals: Sequence[int], tolerances: Sequence[float]) -> List[Dict[str, Any]]:
    """One entry per (site, setting): the grid, one site varied at a time."""
    out = []
    for site in sites:
        for b in backends:
            if "fixed" in schedules:
                out += [{"site": site, "settings": {"backend": b, "schedule": "fixed", "interval": int(i)}}
                        for i in intervals]
            if "adaptive" in schedules:
                out += [{"site": site, "settings": {"backend": b, "schedule": "adaptive",
                                                    "tolerance": float(t)}} for t in tolerances]
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(p: Path) -> str:
    h = hashlib.sha1()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _site_recipe(pipeline: Pipeline, per_site: Mapping[str, Mapping[str, Any]], others: str = "uncached"):
    """The recipe with ``per_site`` settings; every other site uncached (``others=
    "uncached"``: a sweep run) or at the recipe's defaults (``"defaults"``: the combined
    run of a tune of some sites only, as ``patch --settings`` will apply it)."""
    rest = UNCACHED_SITE if others == "uncached" else None
    return pipeline.recipe.with_settings({}, {s: dict(per_site.get(s, rest) or {}) for s in pipeline.sites})


def _score(pipeline: Pipeline, out: Output, ref: Output, tau: float) -> Dict[str, Any]:
    row: Dict[str, Any] = {"forwards": out.forwards, "seconds": out.seconds,
                           "forward_ratio": ref.forwards / max(out.forwards, 1),
                           "speedup": ref.seconds / max(out.seconds, 1e-12)}
    drift: Dict[str, Any] = {}
    for site in pipeline.sites:
        items = [relative_l2(a, b) for a, b in zip(out.latents.get(site, []), ref.latents.get(site, []))]
        if not items:
            continue
        ok = None not in items
        drift[site] = {"mean": float(np.mean(items)) if ok else None,
                       "max": float(np.max(items)) if ok else None, "items": items}
    row["latent_drift"] = drift
    means = [d["mean"] for d in drift.values()]
    row["drift"] = None if (not means or None in means) else max(means)
    if pipeline.has_mesh and out.meshes is not None:
        sc = pipeline.mesh_scores(out.meshes, ref.meshes, tau)
        row.update({"iou_mean": float(np.mean(sc["iou"])), "iou_min": float(np.min(sc["iou"])),
                    "fscore_mean": float(np.mean(sc["fscore"])), "fscore_min": float(np.min(sc["fscore"])),
                    "chamfer_mean": float(np.mean(sc["chamfer"])), "chamfer_max": float(np.max(sc["chamfer"])),
                    "mesh_items": {k: [float(x) for x in v] for k, v in sc.items()}})
    patterns: Dict[str, str] = {}
    for r in out.stats.get("runs") or []:          # the last run of each site (of the last input)
        for s, d in r.get("sites", {}).items():
            if d.get("pattern"):
                patterns[s] = d["pattern"]
    row["patterns"] = patterns
    return row


def _save_torch(path: Path, obj: Any) -> None:
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def _load_torch(path: Path) -> Any:
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)     # tensors only, no pickled code


class _Records:
    """One JSON file per measured run under ``OUT/runs`` (atomic), keyed by run id."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, rid: str) -> Path:
        return self.folder / f"{rid}.json"

    def get(self, rid: str) -> Optional[Dict[str, Any]]:
        p = self.path(rid)
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text())
        except (ValueError, OSError):
            return None                                 # unreadable: measured again
        return rec if rec.get("format") == RECORD_FORMAT and rec.get("id") == rid else None

    def put(self, rec: Dict[str, Any]) -> None:
        atomic_write(self.path(rec["id"]), (json.dumps(rec, indent=1) + "\n").encode())


def tune(pipeline: Pipeline, images: Sequence[Path], out: Path, *, steps: Optional[int] = None,
         seed: int = 0, backends: Sequence[str] = DEFAULT_BACKENDS,
         schedules: Sequence[str] = DEFAULT_SCHEDULES, intervals: Sequence[int] = DEFAULT_INTERVALS,
         tolerances: Sequence[float] = DEFAULT_TOLERANCES, target_iou: float = TARGET_IOU,
         target_drift: float = TARGET_DRIFT, rank_by: str = "forwards", tau: float = 0.05,
         sites: Optional[Sequence[str]] = None, pattern_backend: Optional[str] = None, progress: bool = True,
         say: Callable[[str], None] = lambda s: None,
         on_run: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Run (or resume) the sweep of ``pipeline`` on ``images``; writes ``OUT/tune.json``,
    ``OUT/tune.md``, ``OUT/pareto-SITE.png`` and ``OUT/settings.toml``; returns the
    ``tune.json`` content.  ``on_run(record)`` is called after each run measured now."""
    from tqdm import tqdm

    from .settings_file import write_settings
    from .tune_report import write_report
    images = [Path(p) for p in images]
    if not images:
        raise TuneError("no images to tune on")
    _rank(rank_by)
    bad = sorted(set(schedules) - set(SCHEDULES))
    if bad or not schedules:
        raise TuneError(f"unknown schedule(s) {', '.join(bad) or '(none)'}; use {', '.join(SCHEDULES)}")
    if pattern_backend is not None:
        from .forecast import registry
        if pattern_backend not in registry.backend_names():
            raise TuneError(f"unknown pattern basis {pattern_backend!r}; use one of "
                            f"{', '.join(registry.backend_names())}")
    if not backends:
        raise TuneError("no backend to sweep")
    if "fixed" in schedules and (not intervals or min(intervals) < 1):
        raise TuneError("intervals must be integers >= 1")
    if "adaptive" in schedules and (not tolerances or min(tolerances) < 0):
        raise TuneError("tolerances must be numbers >= 0")
    all_sites = pipeline.sites
    sites = list(sites) if sites else list(all_sites)
    unknown = sorted(set(sites) - set(all_sites))
    if unknown:
        raise TuneError(f"model {pipeline.model!r} has no site {', '.join(unknown)}; sites: {', '.join(all_sites)}")
    grid = plan_runs(sites, backends, schedules, intervals, tolerances)
    for g in grid:                                      # every setting valid before anything runs
        try:
            _site_recipe(pipeline, {g["site"]: g["settings"]})
        except ValueError as e:
            raise TuneError(str(e)) from None
    target = Target("iou", float(target_iou)) if pipeline.has_mesh else Target("drift", float(target_drift))
    # where a decoder cannot run here (no mesh): why, and what the measured time covers
    no_mesh = getattr(pipeline, "no_mesh_reason", None)
    timing = getattr(pipeline, "timing", None) or "end to end"
    steps = steps if steps is not None else pipeline.default_steps
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = _Records(out / "runs")
    payload = pipeline.prepare(images)
    context = {"model": pipeline.model, "steps": steps, "seed": seed, "tau": tau,
               "images": [[p.name, _file_digest(p)] for p in images], "pipeline": pipeline.identity()}
    ctx = _digest(context)

    ref_path = out / "runs" / f"reference-{ctx}.pt"
    total = len(grid) + 2
    measured_now, resumed = 0, 0
    bar = tqdm(total=total, desc=f"tune {pipeline.model}", unit="run", disable=not progress, leave=False)
    try:
        warm = False
        if ref_path.is_file():
            try:
                st = _load_torch(ref_path)
                ref = Output(st["latents"], pipeline.mesh_from_state(st["meshes"]) if st["meshes"] is not None
                             else None, st["forwards"], st["seconds"])
                resumed += 1
            except Exception:
                ref = None
        else:
            ref = None
        if ref is None:
            pipeline.warmup(payload, steps)
            warm = True
            ref = pipeline.run(payload, steps=steps, seed=seed, recipe=None)
            _save_torch(ref_path, {"latents": ref.latents, "forwards": ref.forwards, "seconds": ref.seconds,
                                   "meshes": pipeline.mesh_state(ref.meshes) if ref.meshes is not None else None})
            measured_now += 1
            say(f"uncached: {ref.forwards} network forwards, {ref.seconds:.2f} s")
        bar.update(1)
        reached = [s for s in all_sites if ref.latents.get(s)]
        unreached = [s for s in sites if not ref.latents.get(s)]
        if ref.latents and unreached:
            raise TuneError(f"site(s) {', '.join(unreached)} of {pipeline.model} made no latent in the uncached "
                            f"run: it stops before reaching them here" + (f" ({no_mesh})" if no_mesh else "") +
                            f"; tune the sites it reaches with --sites {','.join(reached)} (the uncached run "
                            f"is kept and reused)")

        def measure(kind: str, site: Optional[str], per_site: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
            nonlocal measured_now, resumed, warm
            others = "uncached" if kind == "site" else "defaults"
            key = {"ctx": ctx, "kind": kind, "sites": per_site}
            if others != "uncached":
                key["others"] = others
            rid = _digest(key)
            rec = records.get(rid)
            if rec is not None:
                resumed += 1
                return rec
            if not warm:
                pipeline.warmup(payload, steps)
                warm = True
            bar.set_postfix_str(f"{site or 'all'}: {setting_label(per_site[site]) if site else 'chosen'}")
            res = pipeline.run(payload, steps=steps, seed=seed, recipe=_site_recipe(pipeline, per_site, others))
            rec = {"format": RECORD_FORMAT, "id": rid, "kind": kind, "site": site, "sites": per_site,
                   "settings": per_site[site] if site else None, **_score(pipeline, res, ref, tau)}
            records.put(rec)
            measured_now += 1
            if on_run is not None:
                on_run(rec)
            return rec

        rows: List[Dict[str, Any]] = []
        for g in grid:
            rows.append(measure("site", g["site"], {g["site"]: g["settings"]}))
            bar.update(1)
        searches: Dict[str, Dict[str, Any]] = {}
        if "pattern" in schedules:
            bar.total += len(sites) * _search_estimate(steps)       # corrected as each search ends
            bar.refresh()
            for site in sites:
                best = choose([r for r in rows if r["site"] == site], target, rank_by)
                basis = pattern_backend or (best["settings"]["backend"] if best else backends[0])
                searches[site] = _search_site(site, basis, steps, target, measure, bar)
                rows += searches[site].pop("rows")
        chosen: Dict[str, Optional[Mapping[str, Any]]] = {
            s: choose([r for r in rows if r["site"] == s], target, rank_by) for s in sites}
        combo = {s: dict(c["settings"]) if c else dict(UNCACHED_SITE) for s, c in chosen.items()}
        for s, c in chosen.items():
            if c is not None and c["settings"].get("schedule") == "pattern":
                fb = choose([r for r in rows if r["site"] == s and r["settings"].get("schedule") == "adaptive"
                             and r["settings"]["backend"] == c["settings"]["backend"]], target, rank_by)
                if fb is not None:              # runs of another length: a measured adaptive setting
                    combo[s]["tolerance"] = fb["settings"]["tolerance"]
        combined = measure("combined", None, combo)
        bar.update(1)
    finally:
        bar.close()

    result = {"format": RECORD_FORMAT, "model": pipeline.model, "steps": steps, "seed": seed, "tau": tau,
              "images": [p.name for p in images], "sites": sites, "has_mesh": pipeline.has_mesh,
              "target": {"kind": target.kind, "value": target.value, "describe": target.describe()},
              "rank_by": rank_by, "timing": timing, "no_mesh_reason": no_mesh,
              "grid": {"backends": list(backends), "schedules": list(schedules),
                       "intervals": [int(i) for i in intervals], "tolerances": [float(t) for t in tolerances]},
              "reference": {"forwards": ref.forwards, "seconds": ref.seconds},
              "rows": rows, "chosen": {s: (c["id"] if c else None) for s, c in chosen.items()},
              "searches": searches,
              "combined": combined, "combined_meets_target": meets(combined, target),
              "runs_measured_now": measured_now, "runs_resumed": resumed}
    atomic_write(out / "tune.json", (json.dumps(result, indent=1) + "\n").encode())
    comments = {}
    for s, c in chosen.items():
        if c is None:
            comments[s] = f"no setting of the grid met the target ({target.describe()}): left uncached"
        else:
            extra = (f", mesh IoU {c['iou_mean']:.4f}" if c.get("iou_mean") is not None else "")
            comments[s] = (f"{c['forwards']} of {ref.forwards} network forwards ({c['forward_ratio']:.2f}x fewer), "
                           f"{c['speedup']:.2f}x {timing}, latent drift {c['drift']:.4f}{extra}")
    tune_info = {"target": target.describe(), "steps": steps, "seed": seed, "images": len(images),
                 "rank_by": rank_by, "combined": _combined_phrase(combined, target, ref, timing)}
    if no_mesh:
        tune_info["note"] = no_mesh
    write_settings(out / "settings.toml", pipeline.model, combo, tune=tune_info, comments=comments,
                   header=f"Written by `hicache3d tune --model {pipeline.model}` ({len(images)} images, "
                          f"{steps} steps): the fastest settings per site meeting the target.\n"
                          f"Apply: hicache3d patch --model {pipeline.model} --settings {out / 'settings.toml'}\n"
                          f"   or: hicache3d.accelerate(pipe, settings=\"{out / 'settings.toml'}\")")
    write_report(result, out)
    return result


def _search_estimate(steps: int) -> int:
    """About how many runs the pattern search of one site makes (for the progress bar):
    the first scan, then about two runs per removal (measured: 72 at 25 steps, 147 at 50,
    32 at 12, on the bundled generator)."""
    return 3 * steps


def _search_site(site: str, basis: str, steps: int, target: Target, measure, bar) -> Dict[str, Any]:
    """The pattern search of one site (:func:`hicache3d.schedule_search.search_pattern`),
    every run through ``measure`` (so kept and resumed); returns the path's rows (the
    patterns that forecast at least one step) and a summary."""
    from .schedule_search import search_pattern
    from .tune_report import _quality
    n = 0

    def evaluate(pattern: str) -> Dict[str, Any]:
        nonlocal n
        n += 1
        if bar.n + 1 >= bar.total:                   # longer than estimated: keep the bar open
            bar.total = bar.n + 2
        rec = measure("site", site, {site: {"backend": basis, "schedule": "pattern", "pattern": pattern}})
        bar.update(1)
        return rec

    def quality(row: Mapping[str, Any]) -> float:
        q = _quality(row, target.kind)
        return -np.inf if q is None else float(q)

    total = bar.total
    path = search_pattern(evaluate, steps, quality=quality, meets=lambda r: meets(r, target))
    bar.total = max(bar.n + 1, total - max(_search_estimate(steps) - n, 0))
    bar.refresh()
    rows = [{k: v for k, v in r.items() if k not in ("pattern", "computed")} for r in path[1:]]
    return {"backend": basis, "runs": n, "path": [r["pattern"] for r in path], "rows": rows}


def _combined_phrase(row: Mapping[str, Any], target: Target, ref: Output, timing: str = "end to end") -> str:
    m = f"IoU {row['iou_mean']:.4f}, " if row.get("iou_mean") is not None else ""
    d = "n/a" if row["drift"] is None else f"{row['drift']:.4f}"
    return (f"all sites together: {m}latent drift {d}, {row['forwards']}/{ref.forwards} forwards, "
            f"{row['speedup']:.2f}x {timing} ({'meets' if meets(row, target) else 'MISSES'} the target)")
