"""``tune.md`` and the Pareto plot per site (PNG drawn with Pillow) of a tune result."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

from ._io import atomic_write

__all__ = ["write_report", "pareto_rows"]


def _quality(row: Mapping[str, Any], kind: str) -> Optional[float]:
    """Higher is better: mean IoU, or minus the latent drift."""
    if kind == "iou":
        return row.get("iou_mean")
    return None if row.get("drift") is None else -row["drift"]


def pareto_rows(rows: Sequence[Mapping[str, Any]], kind: str) -> List[Mapping[str, Any]]:
    """The rows no other row beats on both forward ratio and quality, by forward ratio."""
    rs = [r for r in rows if _quality(r, kind) is not None]
    out: List[Mapping[str, Any]] = []
    for r in sorted(rs, key=lambda r: (-r["forward_ratio"], -_quality(r, kind))):
        if not out or _quality(r, kind) > _quality(out[-1], kind):
            out.append(r)
    return out[::-1]


def _fmt(x: Optional[float], f: str = ".4f") -> str:
    return "–" if x is None else format(x, f)


def write_report(res: Mapping[str, Any], out: Path) -> List[Path]:
    from .tune import meets, setting_label, Target
    target = Target(res["target"]["kind"], res["target"]["value"])
    chosen = res["chosen"]
    ref = res["reference"]
    mesh = res["has_mesh"]
    md = [f"# hicache3d tune: {res['model']} ({len(res['images'])} images, {res['steps']} steps, seed {res['seed']})", "",
          f"Every run is compared with the uncached run of the same seed and images "
          f"({ref['forwards']} network forwards, {ref['seconds']:.2f} s for all images). One site is "
          f"varied at a time, the others uncached. `drift`: relative L2 of each site's final latent "
          f"(mean over images; the worst site)" + (f"; IoU / F@{res['tau']} / Chamfer of the mesh vs "
                                                   "the uncached one" if mesh else "; this pipeline makes no "
                                                   "mesh here, so the target is on the latent drift") +
          ". `fewer fwd`: network forwards uncached / cached (exact); `speed-up`: " + (
              "wall time of the whole pipeline, decoders included" if not res.get("no_mesh_reason") else
              f"{res.get('timing') or 'sampler-only'} wall time (the run stops before the mesh decoder)") +
          f". Target: {target.describe()}; fastest = "
          f"{'fewest network forwards, then wall time' if res['rank_by'] == 'forwards' else 'lowest wall time'}.", "",
          *([f"**Note: {res['no_mesh_reason']}.** Measured here: the latent drift of every site and the "
             f"network forwards and time up to the decoder (speed-up is {res.get('timing') or 'sampler-only'}); "
             f"the settings are chosen by the latent-drift target. Run the tune on a CUDA machine for mesh "
             f"metrics and end-to-end time.", ""] if res.get("no_mesh_reason") else []),
          "## Chosen settings", "", "| site | setting | fewer fwd | speed-up | drift |" + (" IoU |" if mesh else ""),
          "|---|---|---|---|---|" + ("---|" if mesh else "")]
    by_id = {r["id"]: r for r in res["rows"]}
    for site in res["sites"]:
        c = by_id.get(chosen.get(site) or "")
        if c is None:
            md.append(f"| {site} | none met the target: uncached | 1.00x | – | 0 |" + (" 1 |" if mesh else ""))
        else:
            md.append(f"| {site} | {setting_label(c['settings'])} | {c['forward_ratio']:.2f}x | {c['speedup']:.2f}x | "
                      f"{_fmt(c['drift'])} |" + (f" {_fmt(c.get('iou_mean'))} |" if mesh else ""))
    cb = res["combined"]
    md += ["", f"All chosen settings together: {cb['forwards']} network forwards ({cb['forward_ratio']:.2f}x fewer), "
               f"{cb['speedup']:.2f}x {res.get('timing') or 'end to end'}, drift {_fmt(cb['drift'])}" +
           (f", IoU {_fmt(cb.get('iou_mean'))} (min {_fmt(cb.get('iou_min'))})" if mesh else "") +
           (": meets the target." if res["combined_meets_target"] else
            ": **misses the target** (the sites' drifts add up); tighten the chosen settings of the "
            "site with the largest drift, or tune with a stricter target."), ""]
    written = []
    for site in res["sites"]:
        rows = [r for r in res["rows"] if r["site"] == site]
        md += [f"## {site}", "", f"![{site}](pareto-{site}.png)", "",
               "| setting | meets | fewer fwd | speed-up | drift | " + " | ".join(
                   f"drift {s}" for s in res["sites"]) + " |" + (" IoU | IoU min | F | Chamfer |" if mesh else "") + " pattern |",
               "|---|---|---|---|---|" + "---|" * len(res["sites"]) + ("---|---|---|---|" if mesh else "") + "---|"]
        for r in sorted(rows, key=lambda r: (r["forwards"], r["seconds"])):
            mark = "**chosen**" if r["id"] == chosen.get(site) else ("yes" if meets(r, target) else "")
            drifts = " | ".join(_fmt((r["latent_drift"].get(s) or {}).get("mean")) for s in res["sites"])
            pat = (r.get("patterns") or {}).get(site) or ""
            md.append(f"| {setting_label(r['settings'])} | {mark} | {r['forward_ratio']:.2f}x | {r['speedup']:.2f}x | "
                      f"{_fmt(r['drift'])} | {drifts} |" +
                      (f" {_fmt(r.get('iou_mean'))} | {_fmt(r.get('iou_min'))} | {_fmt(r.get('fscore_mean'))} | "
                       f"{_fmt(r.get('chamfer_mean'), '.5f')} |" if mesh else "") + (f" `{pat}` |" if pat else " |"))
        md.append("")
        png = out / f"pareto-{site}.png"
        _plot(png, site, rows, target, chosen.get(site), res)
        written.append(png)
    md += [f"Runs: {res['runs_measured_now']} measured now, {res['runs_resumed']} reused from "
           f"`runs/` (a rerun of the same tune resumes from them).", ""]
    atomic_write(out / "tune.md", ("\n".join(md) + "\n").encode())
    return [out / "tune.json", out / "tune.md", *written, out / "settings.toml"]


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _plot(path: Path, site: str, rows: Sequence[Mapping[str, Any]], target, chosen_id, res) -> None:
    """Quality vs forward ratio, one colour per basis (circles: fixed interval, squares:
    adaptive, triangles: searched patterns), the Pareto frontier, the target line and the
    chosen setting."""
    import io

    from PIL import Image, ImageDraw
    W, H, L, R, T, B = 720, 480, 70, 170, 40, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    kind = target.kind
    pts = [(r, r["forward_ratio"], (r.get("iou_mean") if kind == "iou" else r.get("drift"))) for r in rows]
    pts = [p for p in pts if p[2] is not None]
    ylabel = "mesh IoU vs uncached (mean)" if kind == "iou" else "latent drift, worst site (mean rel. L2)"
    d.text((L, 12), f"{res['model']} / {site}: {ylabel} vs network forwards saved", fill="black")
    xs = [p[1] for p in pts] + [1.0]
    ys = [p[2] for p in pts] + [target.value]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 - x0 < 1e-9:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.01, y1 + 0.01
    pad_x, pad_y = 0.05 * (x1 - x0), 0.08 * (y1 - y0)
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y

    def px(x, y):
        return (L + (x - x0) / (x1 - x0) * (W - L - R), T + (y1 - y) / (y1 - y0) * (H - T - B))
    d.rectangle([L, T, W - R, H - B], outline="black")
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        gx, _ = px(xv, y0)
        _, gy = px(x0, yv)
        d.line([gx, T, gx, H - B], fill=(230, 230, 230))
        d.line([L, gy, W - R, gy], fill=(230, 230, 230))
        d.text((gx - 12, H - B + 5), f"{xv:.2f}x", fill="black")
        d.text((4, gy - 6), f"{yv:.3f}", fill="black")
    d.text((L + (W - L - R) // 2 - 90, H - 20), "uncached / cached network forwards", fill="black")
    _, ty = px(x0, target.value)
    d.line([L, ty, W - R, ty], fill=(120, 120, 120), width=1)
    d.text((W - R - 80, ty - 14), f"target {target.value:g}", fill=(90, 90, 90))
    front = pareto_rows(rows, kind)
    if len(front) > 1:
        d.line([px(r["forward_ratio"], r["iou_mean"] if kind == "iou" else r["drift"]) for r in front],
               fill="black", width=2)
    backends = sorted({r["settings"]["backend"] for r in rows})
    for r, x, y in pts:
        c = _COLOURS[backends.index(r["settings"]["backend"]) % len(_COLOURS)]
        cx, cy = px(x, y)
        if r["settings"]["schedule"] == "adaptive":
            d.rectangle([cx - 4, cy - 4, cx + 4, cy + 4], fill=c)
        elif r["settings"]["schedule"] == "pattern":
            d.polygon([(cx, cy - 5), (cx - 5, cy + 4), (cx + 5, cy + 4)], fill=c)
        else:
            d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=c)
        if r["id"] == chosen_id:
            d.ellipse([cx - 9, cy - 9, cx + 9, cy + 9], outline=(200, 0, 0), width=2)
    ly = T
    for i, b in enumerate(backends):
        c = _COLOURS[i % len(_COLOURS)]
        d.ellipse([W - R + 10, ly + 3, W - R + 18, ly + 11], fill=c)
        d.text((W - R + 24, ly), b, fill="black")
        ly += 16
    d.text((W - R + 10, ly + 4), "o fixed, [] adaptive", fill="black")
    d.text((W - R + 10, ly + 20), "^ searched pattern", fill="black")
    d.text((W - R + 10, ly + 36), "black: Pareto front", fill="black")
    d.text((W - R + 10, ly + 52), "red ring: chosen", fill=(200, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())
