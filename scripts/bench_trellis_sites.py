"""Calls saved and drift vs uncached at every TRELLIS v1 / TRELLIS.2 sampling site, with the
tiny real-code models of ``upstream_harness``; sweeps settings and ``horizon`` (step index vs
sampler time).  Each family runs in its own interpreter (both import as ``trellis``)::

    python scripts/bench_trellis_sites.py trellis  [--sweep]  > trellis.json
    python scripts/bench_trellis_sites.py trellis2 [--sweep]  > trellis2.json

Drift = ||x_cached - x_uncached|| / ||x_uncached|| of the final sample (sparse: its feats),
averaged over seeds; calls = network forwards per ``sample`` call.
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)


def _feats(x):
    return x.feats if hasattr(x, "feats") else x


def stages(family):
    if family == "trellis":
        from upstream_harness import trellis_env as E
        E.activate()
        ss, sl = E.build_ss_flow(0), E.build_slat_flow(0)
        return E, {
            "sparse_structure": (ss, lambda s, seed: E.sample_ss(s, ss, seed=seed).samples),
            "slat": (sl, lambda s, seed: E.sample_slat(s, sl, seed=seed).samples),
        }
    from upstream_harness import trellis2_env as E
    E.activate()
    ss, sh, tx = E.build_ss_flow(0), E.build_shape_flow(0), E.build_tex_flow(0)
    shape_lat = {}

    def tex(s, seed):
        if seed not in shape_lat:
            shape_lat[seed] = E.sample_shape(E.make_sampler("interval"), sh, seed=seed).samples
        return E.sample_tex(s, tx, shape_lat[seed], seed=seed).samples

    return E, {
        "sparse_structure": (ss, lambda s, seed: E.sample_ss(s, ss, seed=seed).samples),
        "shape_slat": (sh, lambda s, seed: E.sample_shape(s, sh, seed=seed).samples),
        "tex_slat": (tx, tex),
    }


def measure(E, family, site, model, fn, seeds, settings):
    import hicache3d
    drifts, calls = [], None
    for seed in seeds:
        s = E.make_sampler("interval")
        ref = _feats(fn(s, seed))
        with hicache3d.accelerate(s, family, sites={site: settings}):
            with E.count_calls(model) as c:
                out = _feats(fn(s, seed))
        drifts.append(float((out - ref).norm() / ref.norm()))
        calls = c.n
        with E.count_calls(model) as c0:
            fn(s, seed)
        base = c0.n
    return {"calls": calls, "uncached_calls": base, "drift": sum(drifts) / len(drifts), "settings": settings}


def main():
    family = sys.argv[1]
    sweep = "--sweep" in sys.argv
    seeds = [0, 1, 2]
    E, st = stages(family)
    from hicache3d.recipe import get_recipe
    recipe = get_recipe(family)
    out = {"family": family, "defaults": {}, "horizon": {}, "sweep": {}}
    for site, (model, fn) in st.items():
        d = recipe.site(site).config
        base = {"interval": d.interval, "first_enhance": d.first_enhance, "last_enhance": d.last_enhance}
        out["defaults"][site] = measure(E, family, site, model, fn, seeds, dict(base))
        out["horizon"][site] = {h: {b: measure(E, family, site, model, fn, seeds, dict(base, horizon=h, backend=b))["drift"]
                                    for b in ("dmd", "taylor", "hermite", "reuse")}
                                for h in ("step", "time")}
        if sweep:
            rows = []
            for itv, fe, le, h in itertools.product((2, 3, 4), (2, 3, 4), (0, 1), ("step", "time")):
                r = measure(E, family, site, model, fn, seeds,
                            {"interval": itv, "first_enhance": fe, "last_enhance": le, "horizon": h})
                rows.append(r)
            out["sweep"][site] = rows
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
