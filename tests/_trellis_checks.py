"""Checks of the ``trellis`` / ``trellis2`` recipes against the real upstream samplers.

TRELLIS v1 and TRELLIS.2 are both importable as ``trellis`` and can never share a
process, so ``tests/test_trellis.py`` runs ``python -m tests._trellis_checks FAMILY`` in a
fresh interpreter per family; this module runs every check of that family and prints one
JSON line ``RESULTS {name: "ok" | traceback}`` (plus ``FIGURES`` with calls and drift).
"""
from __future__ import annotations

import json
import sys
import traceback
import types

import torch

import hicache3d
from hicache3d.recipe import RecipeError
from hicache3d.schedule import Schedule

CHECKS = {}
FIGURES = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def feats(x):
    return x.feats if hasattr(x, "feats") else x


def drift(out, ref):
    out, ref = feats(out), feats(ref)
    return float((out - ref).norm() / ref.norm())


def same(a, b):
    return torch.equal(feats(a), feats(b)) and (not hasattr(a, "coords") or torch.equal(a.coords, b.coords))


def planned_calls(forwards, config, steps=12):
    """Network forwards of one accelerated run: the forwards of the computed steps."""
    plan = Schedule(config.interval, config.first_enhance, config.last_enhance).plan(steps)
    return sum(f for f, c in zip(forwards, plan) if c)


def batch_independence(E, s, recipe_name, sample_dense, sample_sparse, SparseTensor):
    """Batch of 2 with different conditions: changing item 1 (its condition) leaves item 0
    exactly as it was, and each item matches its own batch-of-1 run (closely with DMD,
    whose fit amplifies the ~1e-7 batch/no-batch rounding of the network; tightly with
    Taylor); every forecast serves 2 items."""
    cond = E.make_cond(2, seed=5)
    other = {k: v.clone() for k, v in cond.items()}
    other["cond"][1] = E.make_cond(1, seed=9)["cond"][0]
    noise = E.make_ss_noise(2, seed=5)
    coords = E.make_coords(2, seed=5)
    snoise = E.make_slat_noise(coords, seed=5)
    rows0 = coords[:, 0] == 0

    def solo(i, backend):
        c = {k: v[i:i + 1] for k, v in cond.items()}
        rows = coords[:, 0] == i
        c_i = coords[rows].clone()
        c_i[:, 0] = 0
        with hicache3d.accelerate(s, recipe_name, backend=backend):
            return (sample_dense(s, noise=noise[i:i + 1], cond=c).samples,
                    sample_sparse(s, noise=SparseTensor(feats=snoise.feats[rows], coords=c_i), cond=c).samples)

    for backend, tol in (("dmd", 0.05), ("taylor", 1e-4)):
        with hicache3d.accelerate(s, recipe_name, backend=backend) as run:
            both = sample_dense(s, noise=noise, cond=cond).samples
            both2 = sample_dense(s, noise=noise, cond=other).samples
            sboth = sample_sparse(s, noise=snoise, cond=cond).samples
            sboth2 = sample_sparse(s, noise=snoise, cond=other).samples
        assert torch.equal(both[0], both2[0]) and drift(both[1:], both2[1:]) > 0.05
        assert torch.equal(sboth.feats[rows0], sboth2.feats[rows0])
        assert drift(sboth2.feats[~rows0], sboth.feats[~rows0]) > 0.05
        for r in run.runs:
            st = list(r.sites.values())[0]
            assert st.forecast > 0 and sum(st.per_basis.values()) == 2 * st.forecast
        for i in range(2):
            d_solo, s_solo = solo(i, backend)
            rows = coords[:, 0] == i
            dd = drift(both[i:i + 1], d_solo), float((sboth.feats[rows] - s_solo.feats).norm() / s_solo.feats.norm())
            FIGURES.setdefault("batch_vs_solo", {}).setdefault(backend, []).extend(dd)
            assert max(dd) < tol, (backend, dd)


def adaptive_check(E, stages, recipe_name, call, uncached_forwards):
    """Adaptive schedule on every site: fewer network forwards than uncached, a per-step
    trace with the reasons, a result close to uncached; tolerance 0 is bit-identical."""
    for site, (model, fn, _) in stages.items():
        s = E.make_sampler("interval")
        ref = call(fn, s, model).samples
        with hicache3d.accelerate(s, recipe_name, schedule="adaptive", tolerance=0.5) as run:
            with E.count_calls(model) as c:
                out = call(fn, s, model).samples
        st = run.stats["runs"][-1]["sites"][site]
        assert 0 < c.n < uncached_forwards(site), (site, c.n, st.get("pattern"))
        assert st["forecast"] > 0 and len(st["pattern"]) == 12 and sum(st["reasons"].values()) == st["computed"]
        assert any(r["observed"] is not None for r in st["trace"]), st["trace"]
        FIGURES[site + "_adaptive"] = {"calls": c.n, "uncached_calls": uncached_forwards(site),
                                       "pattern": st["pattern"], "drift": drift(out, ref)}
        assert drift(out, ref) < 0.5, (site, drift(out, ref))      # random tiny weights
        with hicache3d.accelerate(s, recipe_name, schedule="adaptive", tolerance=0.0):
            with E.count_calls(model) as c:
                assert same(call(fn, s, model).samples, ref), site
        assert c.n == uncached_forwards(site)
        # a searched pattern: the sampler's step count reaches the cache, so of two
        # patterns the one of the run's length decides
        pat = "CC..C.C..C.C"
        with hicache3d.accelerate(s, recipe_name, pattern=[pat, "C.C.C"]) as run:
            with E.count_calls(model) as c:
                out = call(fn, s, model).samples
        st = run.stats["runs"][-1]["sites"][site]
        assert st["pattern"] == pat and st["schedule"] == "pattern of 12 steps", st
        assert 0 < c.n < uncached_forwards(site) and drift(out, ref) < 0.5, (site, c.n)


class Pipe:
    """Stands for a pipeline object: only its sampler attributes matter to the adapter."""

    def __init__(self, **samplers):
        self.__dict__.update(samplers)


# ============================================================================ TRELLIS v1
def v1():
    from upstream_harness import trellis_env as E
    E.activate()
    from trellis.pipelines import samplers as S

    from hicache3d.recipe import get_recipe
    recipe = get_recipe("trellis")
    ss, sl = E.build_ss_flow(0), E.build_slat_flow(0)
    d = E.PIPELINE_DEFAULTS
    stages = {"sparse_structure": (ss, E.sample_ss, d["ss"]), "slat": (sl, E.sample_slat, d["slat"])}

    def forwards(kind, stage):
        lo, hi = stages[stage][2]["cfg_interval"]
        pairs = E.t_pairs(12, stages[stage][2]["rescale_t"])
        if kind == "plain":
            return [1] * 12
        if kind == "cfg":
            return [2] * 12
        return [2 if lo <= t <= hi else 1 for t, _ in pairs]

    def stage_check(site):
        model, fn, _ = stages[site]
        s = E.make_sampler("interval")
        cls = type(s)
        with E.count_calls(model) as c:
            ref = fn(s, model).samples
        assert c.n == E.expected_calls("interval", 12, 3.0, (0.5, 0.95)) == sum(forwards("interval", site))
        with hicache3d.accelerate(s, "trellis") as run:
            assert type(s) is not cls
            with E.count_calls(model) as c:
                out = fn(s, model).samples
        want = planned_calls(forwards("interval", site), recipe.site(site).config)
        assert c.n == want, (c.n, want)
        st = run.stats["sites"]
        assert list(st) == [site], st
        assert st[site]["computed"] + st[site]["forecast"] == 12
        dr = drift(out, ref)
        FIGURES[site] = {"calls": c.n, "uncached_calls": sum(forwards("interval", site)), "drift": dr}
        assert dr < 0.25, dr
        assert type(s) is cls and "_get_model_prediction" not in vars(s)
        with E.count_calls(model) as c:
            again = fn(s, model).samples
        assert same(again, ref) and c.n == sum(forwards("interval", site))

    @check
    def sparse_structure_defaults():
        stage_check("sparse_structure")

    @check
    def slat_defaults():
        stage_check("slat")

    @check
    def interval_one_is_bit_identical():
        for site, (model, fn, _) in stages.items():
            for kind in ("plain", "cfg", "interval"):
                s = E.make_sampler(kind)
                ref = fn(s, model).samples
                with hicache3d.accelerate(s, "trellis", interval=1):
                    assert same(fn(s, model).samples, ref), (site, kind)

    @check
    def adaptive_fewer_calls():
        adaptive_check(E, stages, "trellis", lambda fn, s, model: fn(s, model),
                       lambda site: sum(forwards("interval", site)))

    @check
    def cfg_and_plain_samplers():
        for kind in ("plain", "cfg"):
            for site, (model, fn, _) in stages.items():
                s = E.make_sampler(kind)
                ref = fn(s, model).samples
                with hicache3d.accelerate(s, "trellis") as run:
                    with E.count_calls(model) as c:
                        out = fn(s, model).samples
                assert c.n == planned_calls(forwards(kind, site), recipe.site(site).config), (kind, site, c.n)
                assert list(run.stats["sites"]) == [site]
                assert drift(out, ref) < 0.3, (kind, site, drift(out, ref))

    @check
    def pipeline_object_sites_by_attribute_and_disable():
        pipe = Pipe(sparse_structure_sampler=E.make_sampler("interval"), slat_sampler=E.make_sampler("interval"))
        ref_ss = E.sample_ss(pipe.sparse_structure_sampler, ss).samples
        ref_sl = E.sample_slat(pipe.slat_sampler, sl).samples
        h = hicache3d.enable(pipe)            # recipe detected from the samplers
        assert h.recipe.name == "trellis"
        E.sample_ss(pipe.sparse_structure_sampler, ss)
        E.sample_slat(pipe.slat_sampler, sl)
        # rule 1 beats rule 2: a run of the slat sampler belongs to "slat" whatever its latent
        E.sample_ss(pipe.slat_sampler, ss)
        assert [list(r.sites) for r in h.runs] == [["sparse_structure"], ["slat"], ["slat"]]
        hicache3d.disable(pipe)
        for s in (pipe.sparse_structure_sampler, pipe.slat_sampler):
            assert type(s) is S.FlowEulerGuidanceIntervalSampler and not vars(s).keys() - {"sigma_min"}
        from hicache3d.patches import trellis as TA
        assert len(TA._pinned_sites) == 0
        assert same(E.sample_ss(pipe.sparse_structure_sampler, ss).samples, ref_ss)
        assert same(E.sample_slat(pipe.slat_sampler, sl).samples, ref_sl)

    @check
    def run_multi_image_instance_replacement():
        """``inject_sampler_multi_image`` ("multidiffusion") replaces ``_inference_model`` on
        the sampler object during the run; the accelerated step sits above it."""
        s = E.make_sampler("interval")
        pipe = Pipe(sparse_structure_sampler=s)
        cond = E.make_cond(3)["cond"]
        neg = torch.zeros_like(cond[:1])
        base_inference = S.FlowEulerSampler._inference_model

        def multi(self, model, x_t, t, cond, neg_cond, cfg_strength, cfg_interval, **kw):
            mean = sum(base_inference(self, model, x_t, t, cond[i:i + 1], **kw) for i in range(cond.shape[0]))
            mean = mean / cond.shape[0]
            if not cfg_interval[0] <= t <= cfg_interval[1]:
                return mean
            return (1 + cfg_strength) * mean - cfg_strength * base_inference(self, model, x_t, t, neg_cond, **kw)

        def sample():
            s._old_inference_model = s._inference_model
            s._inference_model = types.MethodType(multi, s)
            try:
                return E.sample_ss(s, ss, cond={"cond": cond, "neg_cond": neg}).samples
            finally:
                s._inference_model = s._old_inference_model
                del s._old_inference_model

        with E.count_calls(ss) as c:
            ref = sample()
        per_step = [f + 2 for f in forwards("interval", "sparse_structure")]   # 3 images (+1 neg)
        assert c.n == sum(per_step)
        with hicache3d.accelerate(pipe) as run:
            with E.count_calls(ss) as c:
                out = sample()
        assert c.n == planned_calls(per_step, recipe.site("sparse_structure").config), c.n
        assert run.stats["sites"]["sparse_structure"]["forecast"] > 0
        assert drift(out, ref) < 0.25, drift(out, ref)

    @check
    def batch_of_two_items_are_independent():
        from trellis.modules import sparse as sp
        batch_independence(E, E.make_sampler("interval"), "trellis", lambda s, **k: E.sample_ss(s, ss, **k),
                           lambda s, **k: E.sample_slat(s, sl, **k), sp.SparseTensor)

    @check
    def class_patch_sites_by_latent():
        from hicache3d.inplace import install_entry, uninstall_entry
        ctl = install_entry("trellis", {"recipe": "trellis", "module": recipe.module})
        try:
            s = E.make_sampler("interval")
            with E.count_calls(ss) as c:
                E.sample_ss(s, ss)
            assert c.n == planned_calls(forwards("interval", "sparse_structure"), recipe.site("sparse_structure").config)
            E.sample_slat(E.make_sampler("cfg"), sl)
            assert [list(r.sites) for r in ctl.records] == [["sparse_structure"], ["slat"]]
            # accelerate() on top of the class patch: our settings and our attribute sites win
            pipe = Pipe(slat_sampler=s)
            with hicache3d.accelerate(pipe, "trellis", interval=1) as run:
                with E.count_calls(ss) as c:
                    E.sample_ss(s, ss)
            assert c.n == sum(forwards("interval", "sparse_structure"))
            assert [list(r.sites) for r in run.runs] == [["slat"]] and len(ctl.records) == 2
        finally:
            uninstall_entry("trellis")
        assert not hasattr(S.FlowEulerSampler.sample, "_hicache3d_wrapper")

    @check
    def other_family_is_refused():
        s = E.make_sampler("interval")
        from hicache3d.api import detect_recipe
        assert detect_recipe(s).name == "trellis"
        try:
            hicache3d.enable(s, "trellis2")
        except RecipeError as e:
            assert "--model trellis" in str(e), e
        else:
            raise AssertionError("trellis2 recipe accepted a v1 sampler")
        assert type(s) is S.FlowEulerGuidanceIntervalSampler

    return CHECKS


# ============================================================================ TRELLIS.2
def v2():
    from upstream_harness import trellis2_env as E
    E.activate()
    from trellis.pipelines import samplers as S

    from hicache3d.recipe import get_recipe
    recipe = get_recipe("trellis2")
    ss, sh, tx = E.build_ss_flow(0), E.build_shape_flow(0), E.build_tex_flow(0)
    shape_lat = E.sample_shape(E.make_sampler("interval"), sh).samples
    d = E.PIPELINE_DEFAULTS
    stages = {
        "sparse_structure": (ss, lambda s, m=ss, **k: E.sample_ss(s, m, **k), d["ss"]),
        "shape_slat": (sh, lambda s, m=sh, **k: E.sample_shape(s, m, **k), d["shape"]),
        "tex_slat": (tx, lambda s, m=tx, **k: E.sample_tex(s, m, shape_lat, **k), d["tex"]),
    }

    def forwards(stage):
        p = stages[stage][2]
        lo, hi = p["guidance_interval"]
        g = 1 if p["guidance_strength"] in (0, 1) else 2
        return [g if lo <= t <= hi else 1 for t, _ in E.t_pairs(12, p["rescale_t"])]

    def stage_check(site):
        model, fn, p = stages[site]
        s = E.make_sampler("interval")
        cls = type(s)
        with E.count_calls(model) as c:
            ref = fn(s).samples
        assert c.n == sum(forwards(site)) == E.expected_calls(
            "interval", 12, p["rescale_t"], p["guidance_strength"], p["guidance_interval"])
        with hicache3d.accelerate(s, "trellis2") as run:
            with E.count_calls(model) as c:
                out = fn(s).samples
        want = planned_calls(forwards(site), recipe.site(site).config)
        assert c.n == want, (c.n, want)
        assert list(run.stats["sites"]) == [site], run.stats["sites"]
        dr = drift(out, ref)
        FIGURES[site] = {"calls": c.n, "uncached_calls": sum(forwards(site)), "drift": dr}
        assert dr < 0.25, dr
        assert type(s) is cls
        with E.count_calls(model) as c:
            again = fn(s).samples
        assert same(again, ref) and c.n == sum(forwards(site))

    @check
    def sparse_structure_defaults():          # g 7.5, rescale 0.7, interval [0.6, 1], rescale_t 5
        stage_check("sparse_structure")

    @check
    def shape_slat_defaults():                # g 7.5, rescale 0.5, rescale_t 3
        stage_check("shape_slat")

    @check
    def tex_slat_defaults():                  # concat_cond, g 1 -> one forward per step
        stage_check("tex_slat")

    @check
    def interval_one_is_bit_identical():
        for site, (model, fn, _) in stages.items():
            for kind in ("plain", "cfg", "interval"):
                s = E.make_sampler(kind)
                ref = fn(s).samples
                with hicache3d.accelerate(s, "trellis2", interval=1):
                    assert same(fn(s).samples, ref), (site, kind)

    @check
    def adaptive_fewer_calls():
        adaptive_check(E, stages, "trellis2", lambda fn, s, model: fn(s),
                       lambda site: sum(forwards(site)))

    @check
    def pipeline_object_and_cascade():
        pipe = Pipe(sparse_structure_sampler=E.make_sampler("interval"),
                    shape_slat_sampler=E.make_sampler("interval"), tex_slat_sampler=E.make_sampler("interval"))
        sh_hr = E.build_shape_flow(1)
        hr_coords = E.make_coords(1, seed=7, occupancy=0.03)
        ref_lr = E.sample_shape(pipe.shape_slat_sampler, sh).samples
        ref_hr = E.sample_shape(pipe.shape_slat_sampler, sh_hr, coords=hr_coords, seed=7).samples
        with hicache3d.accelerate(pipe) as run:
            assert run.recipe.name == "trellis2"
            E.sample_ss(pipe.sparse_structure_sampler, ss)
            # the 1024 / 1536 cascade: the shape sampler twice, new model and coords
            lr = E.sample_shape(pipe.shape_slat_sampler, sh).samples
            hr = E.sample_shape(pipe.shape_slat_sampler, sh_hr, coords=hr_coords, seed=7).samples
            E.sample_tex(pipe.tex_slat_sampler, tx, shape_lat)
        assert [list(r.sites) for r in run.runs] == [["sparse_structure"], ["shape_slat"], ["shape_slat"], ["tex_slat"]]
        cfg = recipe.site("shape_slat").config
        n = sum(Schedule(cfg.interval, cfg.first_enhance, cfg.last_enhance).plan(12))
        for r in run.runs[1:3]:                 # a fresh state per call: no restart, same schedule
            st = r.sites["shape_slat"]
            assert st.computed == n and not st.restarts, (st.computed, st.restarts)
        assert drift(lr, ref_lr) < 0.25 and drift(hr, ref_hr) < 0.25
        assert type(pipe.shape_slat_sampler) is S.FlowEulerGuidanceIntervalSampler

    @check
    def batch_of_two_items_are_independent():
        from trellis.modules.sparse import SparseTensor
        batch_independence(E, E.make_sampler("interval"), "trellis2", lambda s, **k: E.sample_ss(s, ss, **k),
                           lambda s, **k: E.sample_shape(s, sh, **k), SparseTensor)

    @check
    def class_patch_sites_by_call():
        from hicache3d.inplace import install_entry, uninstall_entry
        ctl = install_entry("trellis2", {"recipe": "trellis2", "module": recipe.module})
        try:
            for site, (model, fn, _) in stages.items():
                with E.count_calls(model) as c:
                    fn(E.make_sampler("interval"))
                assert c.n == planned_calls(forwards(site), recipe.site(site).config), (site, c.n)
            assert [list(r.sites) for r in ctl.records] == [["sparse_structure"], ["shape_slat"], ["tex_slat"]]
        finally:
            uninstall_entry("trellis2")

    @check
    def other_family_is_refused():
        s = E.make_sampler("interval")
        from hicache3d.api import detect_recipe
        assert detect_recipe(s).name == "trellis2"
        try:
            hicache3d.enable(s, "trellis")
        except RecipeError as e:
            assert "--model trellis2" in str(e), e
        else:
            raise AssertionError("trellis recipe accepted a TRELLIS.2 sampler")

    return CHECKS


def main(family: str) -> None:
    torch.set_num_threads(1)
    checks = {"trellis": v1, "trellis2": v2}[family]()
    results = {}
    for name, fn in checks.items():
        try:
            fn()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    print("FIGURES " + json.dumps(FIGURES))
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
