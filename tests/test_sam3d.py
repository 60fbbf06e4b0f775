"""The SAM 3D Objects and Fast-SAM3D recipes against the real ``sam3d==0.1.2`` generator code
(``ShortCut``, ``ODESolver`` / ``Euler``, ``ClassifierFreeGuidance``; installed into .upstream/
by upstream_harness) with tiny random-weight networks on CPU.

Fast-SAM3D is not on PyPI.  Its fork changes the solver's return form (``step`` returns
``(x, v)``, ``solve_iter`` yields ``(x_t, t, v)``) and adds its own accelerations
(``ShortCut_faster`` with a TaylorSeer on the SS stage, ``Euler_end_slat`` with a skip rule
on the slat stage).  The tests below stand in for those changes with minimal classes
written here (not the fork's code), on top of the real SAM 3D code."""
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import hicache3d
from hicache3d.recipe import get_recipe
from hicache3d.schedule import Schedule

from upstream_harness import sam3d_env as S

STEPS = 25


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ss():
    S.activate()
    return S.build_ss_generator(0)


@pytest.fixture(scope="module")
def slat():
    S.activate()
    return S.build_slat_generator(0)


@pytest.fixture(scope="module")
def refs(ss, slat):
    return {"sparse_structure": S.generate_ss(ss), "slat": S.generate_slat(slat)}


def net(gen):
    return gen.reverse_fn.backbone


def drift(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        num = sum(float((a[k] - b[k]).norm()) ** 2 for k in a)
        return (num / sum(float(b[k].norm()) ** 2 for k in a)) ** 0.5
    return float((a - b).norm() / b.norm())


def same(a, b):
    if isinstance(a, dict):
        return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def expected_calls(site, steps=STEPS):
    """Backbone forwards at the recipe defaults: 2 per computed guided step, 1 per computed
    unguided step."""
    cfg = get_recipe("sam3d").site(site).config
    guided = [2 if 0 <= float(torch.tensor([t * 1000.0])) <= 500 else 1 for t in S.time_grid(steps, 3)[:-1]]
    return sum(g for g, c in zip(guided, Schedule(cfg.interval, cfg.first_enhance).plan(steps)) if c)


GENERATE = {"sparse_structure": S.generate_ss, "slat": S.generate_slat}


@pytest.mark.parametrize("site", ["sparse_structure", "slat"])
def test_defaults_save_calls_and_stay_close(site, ss, slat, refs):
    gen = ss if site == "sparse_structure" else slat
    with S.count_calls(net(gen)) as c0:
        ref = GENERATE[site](gen)
    assert same(ref, refs[site]) and c0.n == S.expected_calls(STEPS, 3, (0, 500), 7)
    with hicache3d.accelerate(gen, "sam3d") as run:
        with S.count_calls(net(gen)) as c:
            out = GENERATE[site](gen)
    assert c.n == expected_calls(site) < c0.n
    st = run.stats["sites"][site]
    assert st["computed"] + st["forecast"] == STEPS and st["forecast"] > 0
    assert list(run.runs[0].sites) == ["sparse_structure", "slat"]
    other = "slat" if site == "sparse_structure" else "sparse_structure"
    assert run.stats["sites"][other]["steps"] == 0           # the run knew its site
    if site == "sparse_structure":
        assert isinstance(out, dict) and list(out) == list(ref)
        assert all(out[k].shape == ref[k].shape for k in ref)
        # one shared set of weights on the whole tree: one item (batch 1) per forecast
        assert sum(st["per_basis"].values()) == st["forecast"]
    else:
        assert out.shape == ref.shape
    d = drift(out, ref)
    assert d < 0.1, d
    # restored exactly on leaving accelerate
    assert "_hicache3d_base" not in vars(type(gen._solver)) and same(GENERATE[site](gen), ref)


@pytest.mark.parametrize("site", ["sparse_structure", "slat"])
def test_interval_one_is_bit_identical(site, ss, slat, refs):
    gen = ss if site == "sparse_structure" else slat
    with hicache3d.accelerate(gen, "sam3d", interval=1):
        with S.count_calls(net(gen)) as c:
            out = GENERATE[site](gen)
    assert same(out, refs[site]) and c.n == S.expected_calls(STEPS, 3, (0, 500), 7)


@pytest.mark.parametrize("site", ["sparse_structure", "slat"])
def test_adaptive_schedule_makes_fewer_calls(site, ss, slat, refs):
    gen = ss if site == "sparse_structure" else slat
    uncached = S.expected_calls(STEPS, 3, (0, 500), 7)
    with hicache3d.accelerate(gen, "sam3d", schedule="adaptive", tolerance=1.0) as run:
        with S.count_calls(net(gen)) as c:
            out = GENERATE[site](gen)
    st = run.stats["runs"][-1]["sites"][site]
    assert 0 < c.n < uncached and st["forecast"] > 0, st.get("pattern")
    assert len(st["pattern"]) == STEPS and sum(st["reasons"].values()) == st["computed"]
    assert drift(out, refs[site]) < 0.3
    with hicache3d.accelerate(gen, "sam3d", schedule="adaptive", tolerance=0.0):
        with S.count_calls(net(gen)) as c:
            assert same(GENERATE[site](gen), refs[site])
    assert c.n == uncached


@pytest.mark.parametrize("site", ["sparse_structure", "slat"])
def test_searched_pattern_schedule(site, ss, slat, refs):
    """One pattern per run length: the solver's time grid tells the cache the run's length,
    so each run follows the pattern of its own length, and a length without one takes the
    adaptive fallback (not a pattern of another length, cut or overrun)."""
    gen = ss if site == "sparse_structure" else slat
    pat = "CCC" + ".C" * ((STEPS - 3) // 2)                  # 25 steps: 14 computed
    short = "CC..C..C.C"                                     # 10 steps: 5 computed
    with hicache3d.accelerate(gen, "sam3d", pattern=[pat, short]) as run:
        with S.count_calls(net(gen)) as c:
            out = GENERATE[site](gen)
        GENERATE[site](gen, steps=10)
        with warnings.catch_warnings():
            warnings.simplefilter("error")                  # no "past the pattern" warning
            GENERATE[site](gen, steps=7)
    st = run.stats["runs"][0]["sites"][site]
    assert st["pattern"] == pat and st["schedule"] == f"pattern of {STEPS} steps"
    assert 0 < c.n < S.expected_calls(STEPS, 3, (0, 500), 7) and drift(out, refs[site]) < 0.5
    st10 = run.stats["runs"][1]["sites"][site]
    assert st10["pattern"] == short and st10["schedule"] == "pattern of 10 steps"
    st7 = run.stats["runs"][2]["sites"][site]
    assert st7["steps"] == 7 and st7["schedule"].startswith("adaptive")


def test_last_enhance_applies(ss):
    """The run's length comes from the solver's time grid, so the last steps of a fixed
    cadence can be computed (before, the length was unknown and last_enhance did nothing)."""
    with hicache3d.accelerate(ss, "sam3d", interval=4, last_enhance=2) as run:
        S.generate_ss(ss, steps=13)
    st = run.stats["runs"][-1]["sites"]["sparse_structure"]
    assert st["steps"] == 13 and st["pattern"].endswith("CC") and st["pattern"][-3] == "."
    assert st["reasons"].get("last steps") == 2, st["reasons"]


def test_slat_token_count_changes_per_object(slat):
    with hicache3d.accelerate(slat, "sam3d") as run:
        a = S.generate_slat(slat, S.make_coords(1, 200))
        b = S.generate_slat(slat, S.make_coords(2, 400))
    assert a.shape[1] != b.shape[1] and len(run.runs) == 2
    assert all(r.sites["slat"].forecast > 0 for r in run.runs)


def test_non_euler_solver_is_refused(slat):
    from sam3d_objects.model.backbone.generator.flow_matching.solver import Midpoint
    euler = slat._solver
    slat._solver = Midpoint()
    try:
        ref = S.generate_slat(slat, steps=4)                      # unpatched: runs
        with hicache3d.accelerate(slat, "sam3d"):
            with pytest.raises(RuntimeError, match="Midpoint solver .* not supported.*solver_method='euler'"):
                S.generate_slat(slat, steps=4)
        assert torch.equal(S.generate_slat(slat, steps=4), ref)  # restored
    finally:
        slat._solver = euler


def test_adaptive_cfg_skips_unconditional_forwards(ss, refs):
    with hicache3d.accelerate(ss, "sam3d", sites={"sparse_structure": {"interval": 1, "adaptive_cfg": True}}) as run:
        with S.count_calls(net(ss)) as c:
            out = S.generate_ss(ss)
    skipped = run.runs[0].extra["cfg_uncond_skipped"]
    assert skipped > 0 and c.n == S.expected_calls(STEPS, 3, (0, 500), 7) - skipped
    assert drift(out, refs["sparse_structure"]) < 0.05
    # the CFG module is restored after leaving accelerate
    assert "inner_forward" not in vars(ss.reverse_fn)


# ------------------------------------------------------------------ Fast-SAM3D stand-ins
# Minimal stand-ins for the fork's changes (written for this test, not the fork's code).

def fork_classes():
    from sam3d_objects.data.utils import tree_tensor_map
    from sam3d_objects.model.backbone.generator.flow_matching import solver as sol
    from sam3d_objects.model.backbone.generator.shortcut.model import ShortCut

    class Euler(sol.ODESolver):
        """The fork's return form: step -> (x, v); solve_iter yields (x_t, t, v)."""

        def step(self, dynamics_fn, x_t, t, dt, *args, **kwargs):
            v = dynamics_fn(x_t, t, *args, **kwargs)
            return tree_tensor_map(lambda x, u: x + u * dt, x_t, v), v

        def solve_iter(self, dynamics_fn, x_init, times, *args, **kwargs):
            x_t = x_init
            for t0, t1 in zip(times[:-1], times[1:]):
                x_t, v = self.step(dynamics_fn, x_t, t0, t1 - t0, *args, **kwargs)
                yield x_t, t0, v

    class Euler_end_slat(Euler):  # noqa: N801 - the fork's name
        """Own skip rule: compute on even steps, reuse the last velocity on odd ones."""

        def __init__(self, full_steps=25):
            self.full_steps, self.cache_dic, self.current = full_steps, None, None

        def step(self, dynamics_fn, x_t, t, dt, *args, **kwargs):
            if self.current["step"] % 2 == 0 or self.cache_dic is None:
                self.cache_dic = dynamics_fn(x_t, t, *args, **kwargs)
            v = self.cache_dic
            self.current["step"] += 1
            return x_t + v * dt, v

        def solve_iter(self, dynamics_fn, x_init, times, *args, **kwargs):
            self.cache_dic, self.current = None, {"step": 0}
            yield from Euler.solve_iter(self, dynamics_fn, x_init, times, *args, **kwargs)

    class ForkShortCut(ShortCut):
        """The fork's generator loop: unpacks (x_t, t, v) and yields (t, x_t, v, ())."""

        def generate(self, x_shape, x_device, *args, **kwargs):
            for _, x, _v, _ in self.generate_iter(x_shape, x_device, *args, **kwargs):
                pass
            return x

        def generate_iter(self, x_shape, x_device, *args, **kwargs):
            x_0 = self._generate_noise(x_shape, x_device)
            t_seq, d = self._prepare_t_and_d()
            for x_t, t, v in self._solver.solve_iter(self._generate_dynamics, x_0, t_seq, d, *args, **kwargs):
                yield t, x_t, v, ()

    class ShortCut_faster(ForkShortCut):  # noqa: N801 - the fork's name
        """Own TaylorSeer on the CFG-combined dict: full on warm-up (2) and every 3rd step,
        first-order Taylor in between; ``current['type']`` says which."""

        def forward(self, x_shape, x_device, *args, **kwargs):
            self.cache_dic, self.current, self.prev_v = {"full": []}, {"step": 0}, None
            return self.generate(x_shape, x_device, *args, **kwargs)

        def _generate_dynamics(self, x_t, t, d, *args, **kwargs):
            i = self.current["step"]
            full = i < 2 or (i - 2) % 3 == 0
            self.current["type"] = "full" if full else "cache"
            if full:
                v = super()._generate_dynamics(x_t, t, d, *args, **kwargs)
                self.cache_dic["full"] = (self.cache_dic["full"] + [(i, v)])[-2:]
            else:
                (i0, v0), (i1, v1) = self.cache_dic["full"]
                v = {k: v1[k] + (v1[k] - v0[k]) * (i - i1) / (i1 - i0) for k in v1}
            self.prev_v = v
            self.current["step"] += 1
            return v

    return Euler, Euler_end_slat, ShortCut_faster, ForkShortCut


def test_fast_sam3d_swaps_the_basis_of_its_taylorseer(ss, refs):
    Euler, _, Faster, _ = fork_classes()
    gen = S.build_ss_generator(0)
    gen.__class__, gen._solver, gen.ss_params = Faster, Euler(), {}
    with S.count_calls(net(gen)) as c0:
        native = S.generate_ss(gen)
    assert drift(native, refs["sparse_structure"]) < 0.5
    with hicache3d.accelerate(gen, "fast-sam3d") as run:
        with S.count_calls(net(gen)) as c:
            out = S.generate_ss(gen)
    assert c.n == c0.n                                     # same schedule: a true basis swap
    st = run.stats["sites"]["sparse_structure"]
    assert st["forecast"] > 0 and st["computed"] + st["forecast"] == STEPS
    assert isinstance(out, dict) and not same(out, native)
    assert drift(out, refs["sparse_structure"]) < 0.5
    # with a first-order Taylor basis ours reproduces the fork's own forecast
    with hicache3d.accelerate(gen, "fast-sam3d", backend="taylor", order=1):
        assert drift(S.generate_ss(gen), native) < 1e-4
    with hicache3d.accelerate(gen, "fast-sam3d", sites={"sparse_structure": {"native": "keep"}}):
        assert same(S.generate_ss(gen), native)
    assert same(S.generate_ss(gen), native)


def test_fast_sam3d_slat_keep_or_replace_its_skip_logic(slat, refs):
    Euler, EndSlat, _, ForkShortCut = fork_classes()
    gen = S.build_slat_generator(0)
    gen.__class__ = ForkShortCut
    # plain fork Euler on the slat stage: the (x, v) return form passes through our cache
    gen._solver = Euler()
    with hicache3d.accelerate(gen, "fast-sam3d") as run:
        with S.count_calls(net(gen)) as c:
            out = S.generate_slat(gen)
    assert c.n == expected_calls("slat") and drift(out, refs["slat"]) < 0.1
    gen._solver = EndSlat()
    with S.count_calls(net(gen)) as c0:
        native = S.generate_slat(gen)
    with hicache3d.accelerate(gen, "fast-sam3d") as run:                 # native = "keep"
        with S.count_calls(net(gen)) as c:
            assert same(S.generate_slat(gen), native) and c.n == c0.n
    assert run.stats["sites"]["slat"]["steps"] == 0
    with hicache3d.accelerate(gen, "fast-sam3d", sites={"slat": {"native": "replace"}}) as run:
        with S.count_calls(net(gen)) as c:
            out = S.generate_slat(gen)
    assert c.n == expected_calls("slat") and run.stats["sites"]["slat"]["forecast"] > 0
    assert drift(out, refs["slat"]) < 0.1


# ------------------------------------------------------------------ in place, fresh processes

CHILD = textwrap.dedent('''
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {root!r})
    from tests._checkout import use_checkout_packages
    use_checkout_packages()
    from upstream_harness import sam3d_env as S
    S.activate()
    ss, sl = S.build_ss_generator(0), S.build_slat_generator(0)
    with S.count_calls(ss.reverse_fn.backbone) as a:
        x = S.generate_ss(ss)
    with S.count_calls(sl.reverse_fn.backbone) as b:
        y = S.generate_slat(sl)
    print("CALLS", a.n, b.n, "KEYS", sorted(x), "SUM", repr(float(y.double().sum())))
''')


def cli(py, root, *argv):
    from ._venv import run_py
    return run_py(py, "import sys; sys.path.insert(0, %r); from tests._checkout import use_checkout_packages; "
                      "use_checkout_packages(); from hicache3d.cli import main; sys.argv=%r; main()"
                  % (root, ["hicache3d", *argv]), cwd=root)


def test_in_place_patch_in_fresh_processes(tmp_path):
    from ._venv import run_py, throwaway_venv
    py = throwaway_venv(tmp_path / "venv", [S.activate()])
    root = str(Path(__file__).resolve().parent.parent)
    child = CHILD.format(root=root)
    base = run_py(py, child, cwd=root)
    assert f"CALLS {S.expected_calls(STEPS, 3)} {S.expected_calls(STEPS, 3)}" in base.stdout, base.stderr[-2000:]
    r = cli(py, root, "patch", "--model", "sam3d")
    assert r.returncode == 0, r.stderr
    patched = run_py(py, child, cwd=root)
    want = f"CALLS {expected_calls('sparse_structure')} {expected_calls('slat')} KEYS {sorted(S.SS_LATENTS)}"
    assert want in patched.stdout, patched.stdout + patched.stderr[-2000:]
    r = cli(py, root, "unpatch", "--model", "sam3d")
    assert r.returncode == 0, r.stderr
    assert run_py(py, child, cwd=root).stdout == base.stdout
