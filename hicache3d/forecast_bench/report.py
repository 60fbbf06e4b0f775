"""The Markdown report of the forecast benchmark (``benchmarks/forecast.md``), written from
the result dictionary that is also stored as ``benchmarks/forecast.json``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from .._io import atomic_write
from .cost import TARGETS
from .scenarios import SCENARIO_TITLE

__all__ = ["SEED_PUBLISHED", "SEED_PUBLISHED_TAYLORSEER", "render_markdown", "rewrite_report", "losses"]

# the seed's published table (from its own benchmark; see benchmarks/README.md): (scenario, H) -> {arm: value}
SEED_PUBLISHED = {
    ("clean", 1): {"cubic": 1.5e-2, "pade": 4.9e-2, "dmd": 4.7e-9},
    ("clean", 4): {"cubic": 0.62, "pade": 0.24, "hermite": 0.63, "dmd": 5.3e-8},
    ("clean", 8): {"cubic": 6.5, "pade": 1.2, "dmd": 2.2e-7},
    ("noise", 8): {"cubic": 15.3, "pade": 3.25, "hermite": 1.81, "dmd": 0.30, "auto_1step": 0.30},
    ("switch", 8): {"cubic": 106, "pade": 2.63, "hermite": 1.56, "dmd": 9.40, "auto_1step": 1.56},
    ("osc_trend", 4): {"cubic": 0.93, "pade": 0.52, "hermite": 0.58, "dmd": 1.09,
                       "auto_1step": 0.88, "auto_horizon": 0.58},
}
# TaylorSeer's backward-difference formula on "clean", as published: order -> {H: value}
SEED_PUBLISHED_TAYLORSEER = {1: {1: 9.7e-2, 4: 1.08, 8: 3.95}, 2: {1: 5.2e-2, 4: 0.69, 8: 4.68}}


def _f(x: Optional[float], digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 1e4 or ax < 1e-3:
        return f"{x:.{digits - 1}e}"
    if ax >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}" if ax < 1 else f"{x:.{digits + 1}g}"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _ok(flag: bool) -> str:
    return "pass" if flag else "**FAIL**"


def _mean(tab: Dict[str, Any], arm: str, h: int) -> Optional[float]:
    row = tab.get(arm)
    return None if row is None else row[str(h)]["mean"]


def md_accuracy(acc: Dict[str, Any]) -> List[str]:
    L: List[str] = []
    s = acc["setup"]
    L += ["## 1. Accuracy on the reference scenarios", "",
          f"{s['seeds']} seeds, d = {s['d']}, {s['anchors']} anchors (t = 0..7, or 0, N, .., 7N for the "
          f"sub-step cadence), every arm fed the same float64 anchors (batch of one item, history "
          f"{s['history']} so that every arm sees all 8 anchors). Cells: mean relative L2 over seeds "
          "(medians are in `forecast.json`); the best mean of each column in bold.", "",
          "Generators (described in `benchmarks/README.md`): T = last anchor + largest horizon + 1 (16 for the "
          "unit-spacing cases); the 1% noise is added to every point of the trajectory, truth included; "
          "drift multiplies one-step poles that drift with t/T; the regime switch keeps the state "
          "continuous at t = 5 and changes the poles; the sub-step cadence uses the clean and the "
          "drift + noise trajectories with anchors N apart.", ""]
    cases = acc["cases"]
    # --- the seed's published table next to our measurement
    L += ["### Next to the seed's published table", "",
          "Published = the seed's own numbers (its benchmark in the hicache-pp source repository, other random draws); measured = this run. "
          "DMD uses rank 4 on noisy / drifting / switching data and the automatic rank on clean data, "
          "as in the published table; 'cubic' is `taylor` order 3 (Newton form).", "",
          "| scenario | H | cubic pub. | ours taylor3 | Hermite pub. | seed hermite2 | ours hermite2 | "
          "DMD pub. | seed dmd | ours dmd | cache-dit dmd | auto pub. | seed auto 1step | seed auto horizon | ours auto |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (sc, h), pub in SEED_PUBLISHED.items():
        tab = cases[sc]["table"]
        r4 = "" if sc == "clean" else " r4"
        auto_pub = " / ".join(x for x in (
            f"{_f(pub['auto_1step'])} (1step)" if "auto_1step" in pub else "",
            f"{_f(pub['auto_horizon'])} (horizon)" if "auto_horizon" in pub else "") if x) or "—"
        L.append(f"| {SCENARIO_TITLE[sc]} | {h} | {_f(pub.get('cubic'))} | {_f(_mean(tab, 'ours taylor3', h))} | "
                 f"{_f(pub.get('hermite')) if 'hermite' in pub else '—'} | {_f(_mean(tab, 'seed hermite2', h))} | "
                 f"{_f(_mean(tab, 'ours hermite2', h))} | {_f(pub.get('dmd'))} | "
                 f"{_f(_mean(tab, 'seed dmd' + r4, h))} | {_f(_mean(tab, 'ours dmd' + r4, h))} | "
                 f"{_f(_mean(tab, 'cache-dit dmd', h))} | {auto_pub} | "
                 f"{_f(_mean(tab, 'seed auto 1step', h))} | {_f(_mean(tab, 'seed auto horizon', h))} | "
                 f"{_f(_mean(tab, 'ours auto', h))} |")
    L += ["", "TaylorSeer's backward-difference formula on *clean* (published by the seed) next to the "
          "three implementations measured here:", "",
          "| order | H | published | ours taylorseer | cache-dit TaylorSeerCalibrator | diffusers TaylorSeerState |",
          "|---|---|---|---|---|---|"]
    tab = cases["clean"]["table"]
    for order, pub in SEED_PUBLISHED_TAYLORSEER.items():
        for h, v in pub.items():
            L.append(f"| {order} | {h} | {_f(v)} | {_f(_mean(tab, f'ours taylorseer{order}', h))} | "
                     f"{_f(_mean(tab, f'cache-dit taylorseer{order}', h))} | "
                     f"{_f(_mean(tab, f'diffusers taylorseer{order}', h))} |")
    # --- full tables
    L += ["", "### All arms, every scenario", ""]
    for name, c in cases.items():
        hs = c["horizons"]
        title = SCENARIO_TITLE.get(name) or (
            f"sub-step cadence N = {c['spacing']} on {SCENARIO_TITLE[c['kind']]}")
        L += [f"**{title}**" + (f" (anchors {c['spacing']} apart, H in steps)" if c["spacing"] > 1 else ""), "",
              "| arm | " + " | ".join(f"H={h}" for h in hs) + " |",
              "|---|" + "---|" * len(hs)]
        best = {}
        for h in hs:
            vals = [v[str(h)]["mean"] for v in c["table"].values() if v[str(h)]["mean"] is not None]
            best[h] = min(vals) if vals else None
        for arm, row in c["table"].items():
            cells = []
            for h in hs:
                m = row[str(h)]["mean"]
                txt = _f(m)
                if m is not None and best[h] is not None and m <= best[h] * (1 + 1e-9):
                    txt = f"**{txt}**"
                cells.append(txt)
            L.append(f"| {arm} | " + " | ".join(cells) + " |")
        L.append("")
    if acc["arm_errors"]:
        L += ["Arms that raised (counted as n/a):", ""]
        for arm, errs in acc["arm_errors"].items():
            for msg, n in errs.items():
                L.append(f"- {arm}: {n}x `{msg}`")
        L.append("")
    L += ["Arms: " + "; ".join(f"*{a['label']}* = {a['what']}" for a in acc["arms"]) + ".", ""]
    return L


def md_cost(cost: Dict[str, Any]) -> List[str]:
    s = cost["setup"]
    L = ["## 2. Cost of predict / push", "",
         f"History {s['history']}, one batch item, `torch.set_num_threads({s['threads']})`. Reference = "
         f"{s['reference']}. Every round runs each measurement once, interleaved (reference, then for each "
         "basis: push of a new snapshot, the first predict of that window (includes the fit), a second "
         "predict of the same window (fit cached)); a ratio is the median over the rounds of (time / the "
         "reference's time in the same round), so both sides of a ratio ran back to back under the same load "
         "(the JSON also has the ratio of medians and of minima); times in ms are medians. The seed's DMD (`dmd_forecast(snapshots, 1)`: float64 "
         "stack + SVD + eig + lstsq on every call) and its cached-fit evaluation `dmd_eval` are timed in "
         "their own interleaved rounds with the reference.", "",
         "| d | dtype | ref ms | predict dmd | predict hermite | predict auto | first dmd | first dmd irregular | "
         "first hermite | first auto | push | seed dmd_forecast ms | seed / (ours push + first) | seed dmd_eval / ours predict |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cost["cells"]:
        rr, m = c["ratio_to_ref"], c["median_s"]
        L.append(f"| 2^{int(math.log2(c['d']))} | {c['dtype']} | {m['ref'] * 1e3:.3f} | "
                 f"{rr['dmd:predict']:.2f}x | {rr['hermite:predict']:.2f}x | {rr['auto:predict']:.2f}x | "
                 f"{rr['dmd:first']:.2f}x | {rr['dmd irregular:first']:.2f}x | {rr['hermite:first']:.2f}x | "
                 f"{rr['auto:first']:.2f}x | {rr['dmd:push']:.2f}x | {c['seed_median_s']['dmd_forecast'] * 1e3:.1f} | "
                 f"{c['seed_speedup']['fit+forecast (ours push + first predict)']:.0f}x | "
                 f"{c['seed_speedup']['cached fit (seed dmd_eval vs ours predict)']:.1f}x |")
    L += ["", "Peak extra allocation (workspace beyond the stored history and the returned forecast), "
          "as a share of the history's bytes:", "",
          "| d | dtype | history MiB | ref | push | predict (fit cached) | first dmd | first dmd irregular | "
          "first hermite | first auto | seed dmd_forecast |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cost["cells"]:
        mr = c["memory_ratio_to_history"]
        L.append(f"| 2^{int(math.log2(c['d']))} | {c['dtype']} | {c['history_bytes'] / 2 ** 20:.2f} | "
                 + " | ".join(_pct(mr[k]) for k in ("ref", "push", "predict_dmd", "first_dmd",
                                                    "first_dmd irregular", "first_hermite", "first_auto",
                                                    "seed_dmd_forecast")) + " |")
    L += ["", "Memory method: `torch.profiler.profile(profile_memory=True)` records every CPU allocation and "
          "free made by torch during one call; replaying them in time order gives the peak of memory held "
          "at once beyond what existed before the call; the returned forecast (which any forecaster and the "
          "reference must allocate) is subtracted. numpy-side allocations (weights, Gram matrices, fits) are "
          "measured separately with `tracemalloc` (`python_numpy_peak` in the JSON; a few KiB).", "",
          "### Targets", "",
          f"predict <= {TARGETS['predict']}x the reference, push <= {TARGETS['push']}x, >= "
          f"{TARGETS['seed_speedup']:.0f}x faster than the seed's DMD fit+forecast at 2^22 (ours counted as "
          f"push + first predict), extra memory <= {TARGETS['extra_memory']:.0%} of the history.", "",
          "| cell | predict (dmd / hermite / auto) | push | vs seed DMD | extra memory (push / predict / first dmd / first auto) |",
          "|---|---|---|---|---|"]
    for key, v in cost["verdict"].items():
        p = v["predict"]
        pv = " / ".join(f"{p[b][0]:.2f}x" for b in ("dmd", "hermite", "auto"))
        pok = all(p[b][1] for b in p)
        sp = v["seed_speedup"]
        sp_txt = f"{sp[0]:.0f}x {_ok(sp[1])}" if key.startswith("2^22") else f"{sp[0]:.0f}x (target at 2^22)"
        em = v["extra_memory"]
        ev = " / ".join(_pct(em[k][0]) for k in ("push", "predict_dmd", "first_dmd", "first_auto"))
        eok = all(em[k][1] for k in em)
        L.append(f"| {key} | {pv} {_ok(pok)} | {v['push'][0]:.2f}x {_ok(v['push'][1])} | {sp_txt} | {ev} {_ok(eok)} |")
    L.append("")
    return L


def md_coverage(cov: Dict[str, Any]) -> List[str]:
    s = cov["setup"]
    L = ["## 3. Exponential-basis coverage in the cache geometry", "",
         f"{s['seeds']} seeds, d = {s['d']}, first_enhance {s['first_enhance']}, history {s['history']}. Ours: "
         f"`{s['ours']}` (positions = step index, so the window mixes the warm-up spacing 1 with the cadence and "
         "the exponential fit runs by variable projection until the warm-up leaves the window). Seed: "
         f"`{s['seed']}` (DMD only on >= 4 equally spaced snapshots, Hermite otherwise). Both run the same "
         "schedule (checked). Share = skipped steps served by DMD; errors are mean relative L2 of the forecasts "
         "(median in brackets); 'common' = the steps both serve with DMD.", "",
         "| trajectory | steps | interval | ours DMD share | ours err (DMD steps) | seed DMD share | "
         "seed err (DMD steps) | common: ours / seed | all skipped: ours / seed | ours fallbacks |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in cov["rows"]:
        o, sd = r["ours"], r["seed"]
        fb = ", ".join(f"{k} {v}" for k, v in o["fallbacks"].items()) or "—"
        L.append(f"| {r['trajectory']} | {r['steps']} | {r['interval']} | {_pct(o['dmd_share'])} | "
                 f"{_f(o['mean_err_dmd'])} ({_f(o['median_err_dmd'])}) | {_pct(sd['dmd_share'])} | "
                 f"{_f(sd['mean_err_dmd'])} ({_f(sd['median_err_dmd'])}) | "
                 f"{_f(o['mean_err_on_seed_dmd_steps'])} / {_f(sd['mean_err_on_seed_dmd_steps'])} | "
                 f"{_f(o['mean_err_all_skipped'])} / {_f(sd['mean_err_all_skipped'])} | {fb} |")
    L.append("")
    return L


# targets of the sampler's view (scripts/bench_fits.py)
WALL_TARGET = 0.9       # wall-clock speed-up over the forward ratio, at least
STEADY_TARGET = 1.5     # steady-state cost of a prediction over one weighted sum, at most


def md_fits(fits: Dict[str, Any]) -> List[str]:
    """The sampler's view, from ``fits.json`` (``scripts/bench_fits.py``): wall clock
    against the forward ratio on the bundled generator, and the steady-state cost of a
    prediction (push, then ``k`` predictions at new horizons) against one weighted sum."""
    st = fits.get("settings", {})
    L = ["## 4. The sampler's view: wall clock and steady-state cost", "",
         "From `fits.json`, written by `scripts/bench_fits.py` (its own run; `fits.md` has the method and "
         "every column)."]
    if fits.get("wall_clock"):
        L += ["", f"Wall clock on the bundled generator, batch {st.get('batch')}, {st.get('steps')} steps, "
              f"interval {st.get('interval')}: speed-up over the forward ratio, estimated within each cached "
              f"run (`same run`; target >= {WALL_TARGET}), and the paired quotient (uncached run over the "
              "cached run right after it, drift between runs included).", "",
              "| basis | fewer forwards | of fwd ratio, same run | paired | forecasting s | target |",
              "|---|---|---|---|---|---|"]
        for r in fits["wall_clock"]:
            L.append(f"| {r['backend']} | {r['forward_ratio']:.2f}x | {r['efficiency_same_run']:.2f} | "
                     f"{r['efficiency']:.2f} | {r['forecast_s']:.2f} | "
                     f"{_ok(r['efficiency_same_run'] >= WALL_TARGET)} |")
    if fits.get("forecast_cost"):
        L += ["", f"Steady state at d = {st.get('dim')}, history {st.get('history')}, float32: push, then "
              f"{st.get('k')} predictions at new horizons; time per prediction over one weighted sum "
              f"(target <= {STEADY_TARGET}x).", "",
              "| basis | ratio (median) | ratio (fastest windows) | target |", "|---|---|---|---|"]
        for r in fits["forecast_cost"]:
            L.append(f"| {r['backend']} | {r['ratio']:.2f}x | {r['ratio_min']:.2f}x | "
                     f"{_ok(r['ratio'] <= STEADY_TARGET)} |")
    return L + [""]


def losses(res: Dict[str, Any], fits: Optional[Dict[str, Any]] = None) -> List[str]:
    """Where hicache3d does worse than a comparison or misses a target in this run
    (data-driven); ``fits``: the sampler's view, ``fits.json``."""
    out: List[str] = []
    acc = res.get("accuracy")
    if acc:
        pairs = (("ours dmd", "seed dmd"), ("ours dmd", "cache-dit dmd"), ("ours auto", "seed auto 1step"),
                 ("ours auto", "seed auto horizon"), ("ours hermite2", "seed hermite2"))
        for name, c in acc["cases"].items():
            for a, b in pairs:
                worse = [(h, _mean(c["table"], a, h), _mean(c["table"], b, h)) for h in c["horizons"]]
                worse = [(h, x, y) for h, x, y in worse if x is not None and y is not None and x > 1.1 * y
                         and x > 1e-6]
                if worse:
                    out.append(f"accuracy, {name}: {a} worse than {b} at " + ", ".join(
                        f"H={h} ({_f(x)} vs {_f(y)})" for h, x, y in worse))
    cost = res.get("cost")
    if cost:
        for key, v in cost["verdict"].items():
            bad = [f"predict {b} {v['predict'][b][0]:.2f}x" for b in v["predict"] if not v["predict"][b][1]]
            if not v["push"][1]:
                bad.append(f"push {v['push'][0]:.2f}x")
            if key.startswith("2^22") and not v["seed_speedup"][1]:
                bad.append(f"only {v['seed_speedup'][0]:.1f}x faster than the seed's DMD")
            bad += [f"extra memory {k} {_pct(x)}" for k, (x, ok) in v["extra_memory"].items() if not ok]
            if bad:
                out.append(f"cost, {key}: " + "; ".join(bad))
    cov = res.get("coverage")
    if cov:
        for r in cov["rows"]:
            o, sd = r["ours"], r["seed"]
            if (o["mean_err_all_skipped"] or 0) > 1.1 * (sd["mean_err_all_skipped"] or float("inf")):
                out.append(f"coverage, {r['trajectory']} {r['steps']} steps / interval {r['interval']}: mean error "
                           f"over the skipped steps {_f(o['mean_err_all_skipped'])} vs the seed's "
                           f"{_f(sd['mean_err_all_skipped'])} (medians {_f(o['median_err_all_skipped'])} vs "
                           f"{_f(sd['median_err_all_skipped'])})")
    for r in (fits or {}).get("wall_clock", []):
        if r["efficiency_same_run"] < WALL_TARGET:
            out.append(f"wall clock, {r['backend']}: {r['efficiency_same_run']:.2f} of the forward ratio "
                       f"(target {WALL_TARGET})")
    for r in (fits or {}).get("forecast_cost", []):
        if r["ratio"] > STEADY_TARGET:
            out.append(f"steady-state cost, {r['backend']}: {r['ratio']:.2f}x one weighted sum "
                       f"(target {STEADY_TARGET}x)")
    return out


def rewrite_report(out_dir: Path, stem: str = "forecast") -> Optional[Path]:
    """Rewrite ``<stem>.md`` in ``out_dir`` from ``<stem>.json`` and, when present,
    ``fits.json`` there (either benchmark may run last); None when there is no
    ``<stem>.json``."""
    jpath, mpath, fpath = out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / "fits.json"
    if not jpath.is_file():
        return None
    fits = json.loads(fpath.read_text()) if fpath.is_file() else None
    atomic_write(mpath, render_markdown(json.loads(jpath.read_text()), fits).encode("utf-8"))
    return mpath


def render_markdown(res: Dict[str, Any], fits: Optional[Dict[str, Any]] = None) -> str:
    """The whole report, from the result dictionary of one run (``forecast.json``) and,
    when given, the sampler's view measured by ``scripts/bench_fits.py`` (``fits.json``)."""
    m = res["meta"]
    L = ["# Forecast benchmark", "",
         f"Generated by `scripts/bench_forecast.py{' --quick' if m['quick'] else ''}` on {m['date']} "
         f"({m['wall_s']:.0f} s). Machine: {m['machine']}. torch {m['torch']}, numpy {m['numpy']}, "
         f"hicache3d {m['hicache3d']}."]
    for r in m.get("reruns", []):                    # sections measured again since
        L += ["", f"Re-run since: {', '.join(r['sections'])} on {r['date']} ({r['wall_s']:.0f} s)"
                 + (f": {r['reason']}" if r.get("reason") else "") + "."]
    L += ["",
          "**Timing conditions:** 2 CPU cores shared with other jobs. Every timing is a median over "
         "interleaved repetitions, and only ratios measured side by side in the same run and cell should be "
         "compared; absolute milliseconds are not representative of an idle machine or a GPU.", "",
         "Packages compared (imported from `.bench-deps`, installed with `pip install --no-deps` plus the "
         "few modules their imports need):", ""]
    for name, p in m["imports"].items():
        if p["ok"]:
            L.append(f"- {name} {p['version']}: imported")
        else:
            L.append(f"- {name}: **not imported** -- `{p['error']}`")
    L += ["", "Minimal extra modules for the imports: " + m["deps_note"], ""]
    if "accuracy" in res:
        L += md_accuracy(res["accuracy"])
    if "cost" in res:
        L += md_cost(res["cost"])
    if "coverage" in res:
        L += md_coverage(res["coverage"])
    if fits:
        L += md_fits(fits)
    lost = losses(res, fits)
    L += ["## Where hicache3d loses in this run", "",
          "Listed from the numbers above (accuracy: >10% worse than the named comparison; cost: a missed "
          "target; coverage: a higher mean error over all skipped steps than the seed's; wall clock and "
          "steady-state cost: a missed target of section 4).",
          ""] + ([f"- {x}" for x in lost] or ["- nothing"]) + [""]
    return "\n".join(L).rstrip() + "\n"
