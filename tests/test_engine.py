"""The patch engine on a toy sampler: accelerate/enable/disable, generic recipes, exact
restore, thread isolation, failing runs, and in-place patching in a fresh interpreter."""
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import hicache3d
from hicache3d.recipe import RecipeError, get_recipe, load_recipe, version_in_range

TOY = textwrap.dedent('''
    import torch

    class ToySampler:
        """Euler sampler: `sample` is one run, `velocity` is the per-step network call."""
        def __init__(self, dim=32, seed=0):
            g = torch.Generator().manual_seed(seed)
            self.W = torch.randn(dim, dim, generator=g) / 6
            self.calls = 0

        def velocity(self, x, t):
            self.calls += 1
            if getattr(self, "fail_at", None) == self.calls:
                raise RuntimeError("network failed")
            return torch.tanh(x @ self.W) * (1 + t)

        def sample(self, x, steps=12):
            ts = torch.linspace(1, 0, steps + 1)
            for i in range(steps):
                v = self.velocity(x, float(ts[i]))
                x = x - (ts[i] - ts[i + 1]) * v
            return x
''')

RECIPE = textwrap.dedent('''
    name = "toy"
    adapter = "generic"
    module = "toy_sampler_mod"
    run = "ToySampler.sample"

    [sites.main]
    step = "ToySampler.velocity"
    t_arg = 1
    backend = "dmd"
    interval = 3
    first_enhance = 3
''')


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_sampler_mod.py").write_text(TOY)
    (tmp_path / "toy.toml").write_text(RECIPE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("toy_sampler_mod", None)
    import toy_sampler_mod
    yield toy_sampler_mod, tmp_path / "toy.toml"
    sys.modules.pop("toy_sampler_mod", None)


def x0():
    return torch.randn(2, 32, generator=torch.Generator().manual_seed(1))


def test_accelerate_counts_calls_and_restores_exactly(toy):
    mod, recipe = toy
    s = mod.ToySampler()
    ref = s.sample(x0())
    cls_dict = dict(vars(mod.ToySampler))
    with hicache3d.accelerate(s, str(recipe)) as run:
        s.calls = 0
        out = s.sample(x0())
        assert s.calls == 6
        assert type(s) is not mod.ToySampler
    assert type(s) is mod.ToySampler and dict(vars(mod.ToySampler)) == cls_dict
    st = run.stats
    assert st["network_calls"] == 6 and st["skipped_calls"] == 6
    assert st["sites"]["main"]["per_basis"] == {"dmd": 12}          # 2 batch items x 6
    assert float((out - ref).norm() / ref.norm()) < 0.05
    s.calls = 0
    assert torch.equal(s.sample(x0()), ref) and s.calls == 12        # bit-identical after


def test_interval_one_bit_identical(toy):
    mod, recipe = toy
    s = mod.ToySampler()
    ref = s.sample(x0())
    with hicache3d.accelerate(s, str(recipe), interval=1):
        assert torch.equal(s.sample(x0()), ref)


def test_enable_twice_is_a_noop_and_other_objects_untouched(toy):
    mod, recipe = toy
    a, b = mod.ToySampler(), mod.ToySampler()
    hicache3d.enable(a, str(recipe))
    hicache3d.enable(a, str(recipe))
    a.calls = b.calls = 0
    a.sample(x0())
    b.sample(x0())
    assert a.calls == 6 and b.calls == 12
    hicache3d.disable(a)
    assert type(a) is mod.ToySampler
    assert hicache3d.disable(a) is None


def test_per_site_overrides_and_bad_values(toy):
    mod, recipe = toy
    s = mod.ToySampler()
    with hicache3d.accelerate(s, str(recipe), sites={"main": {"interval": 4}}) as run:
        s.calls = 0
        s.sample(x0())
    assert s.calls == 5                                   # 0,1,2 + 6 + 10
    with pytest.raises(RecipeError, match="interval"):
        hicache3d.enable(s, str(recipe), interval=0)
    with pytest.raises(RecipeError, match="no site"):
        hicache3d.enable(s, str(recipe), sites={"nope": {"interval": 2}})
    assert type(s) is mod.ToySampler


def test_two_threads_two_settings_do_not_interfere(toy):
    mod, recipe = toy
    a, b = mod.ToySampler(), mod.ToySampler()
    res = {}

    def go(s, name, interval):
        with hicache3d.accelerate(s, str(recipe), interval=interval) as run:
            for _ in range(5):
                s.calls = 0
                s.sample(x0())
                res.setdefault(name, []).append(s.calls)

    ts = [threading.Thread(target=go, args=(a, "a", 2)), threading.Thread(target=go, args=(b, "b", 4))]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert res["a"] == [7] * 5 and res["b"] == [5] * 5


def test_a_failing_run_leaves_no_stale_state(toy):
    mod, recipe = toy
    s = mod.ToySampler()
    ref = s.sample(x0())
    with hicache3d.accelerate(s, str(recipe)) as run:
        s.fail_at, s.calls = 4, 0
        with pytest.raises(RuntimeError, match="network failed"):
            s.sample(x0())
        s.fail_at, s.calls = None, 0
        out = s.sample(x0())
        assert s.calls == 6
        assert hicache3d.patching.current_run() is None
    assert run.runs[0].failed and not run.runs[1].failed
    assert run.runs[1].sites["main"].computed == 6
    assert float((out - ref).norm() / ref.norm()) < 0.05


def test_velocity_outside_a_run_is_untouched(toy):
    mod, recipe = toy
    s = mod.ToySampler()
    with hicache3d.accelerate(s, str(recipe)):
        s.calls = 0
        for _ in range(4):
            s.velocity(x0(), 0.5)
        assert s.calls == 4


def test_unknown_model_lists_known_recipes():
    with pytest.raises(RecipeError, match="known recipes: .*hunyuan3d-2mini"):
        get_recipe("nope")


def test_recipe_errors_are_clear(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('name = "x"\nadapter = "generic"\n')
    with pytest.raises(RecipeError, match="module"):
        load_recipe(p)
    p.write_text('name = "x"\nadapter = "generic"\nmodule = "m"\n[sites.a]\ninterval = "fast"\n')
    with pytest.raises(RecipeError, match="interval"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")


def test_version_ranges():
    assert version_in_range("2.0.2", ">=2.0.2,<2.1")
    assert not version_in_range("2.1.0", ">=2.0.2,<2.1")
    assert version_in_range("0.1.30", "==0.1.30")


# ---------------------------------------------------------------- in place, fresh processes
from ._venv import run_py, throwaway_venv  # noqa: E402


@pytest.fixture()
def venv(tmp_path):
    return throwaway_venv(tmp_path / "venv")


CHILD = '''
    import sys, torch
    sys.path.insert(0, {src!r})
    import toy_sampler_mod as m
    s = m.ToySampler()
    out = s.sample(torch.randn(2, 32, generator=torch.Generator().manual_seed(1)))
    print("CALLS", s.calls, "SUM", float(out.double().sum()))
'''


def test_patch_in_place_then_unpatch_exactly(toy, venv):
    mod, recipe = toy
    src = str(recipe.parent)
    child = CHILD.format(src=src)
    base = run_py(venv, child)
    assert "CALLS 12" in base.stdout, base.stderr
    r = run_py(venv, f"import sys; from hicache3d.cli import main; sys.argv=['hicache3d','patch','--recipe',{str(recipe)!r},'--interval','4']; main()")
    assert r.returncode == 0, r.stderr
    patched = run_py(venv, child)
    assert "CALLS 5" in patched.stdout, patched.stderr + patched.stdout
    # imported before hicache3d, hook still applies; HICACHE3D_DISABLE turns it off
    off = run_py(venv, child, env={"HICACHE3D_DISABLE": "1"})
    assert "CALLS 12" in off.stdout
    st = run_py(venv, "import sys; from hicache3d.cli import main; sys.argv=['hicache3d','status']; main()")
    assert "toy" in st.stdout and "interval" in st.stdout
    r = run_py(venv, "import sys; from hicache3d.cli import main; sys.argv=['hicache3d','unpatch','--all']; main()")
    assert r.returncode == 0, r.stderr
    after = run_py(venv, child)
    assert after.stdout == base.stdout                            # bit-identical to never patched
    site = Path(run_py(venv, "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    assert not list(site.glob("hicache3d_inplace*"))


def test_broken_config_never_breaks_the_interpreter(toy, venv):
    mod, recipe = toy
    site = Path(run_py(venv, "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "hicache3d_inplace.pth").write_text(
        "import importlib.util as _h3; _h3.find_spec('hicache3d') and __import__('hicache3d._bootstrap').__dict__; del _h3\n")
    (site / "hicache3d_inplace.json").write_text("{ this is not json")
    r = run_py(venv, CHILD.format(src=str(recipe.parent)))
    assert r.returncode == 0 and "CALLS 12" in r.stdout
    assert r.stderr.count("hicache3d:") == 1 and "running unpatched" in r.stderr
    (site / "hicache3d_inplace.json").write_text('{"models": {"toy": {"recipe": "nope", "module": "toy_sampler_mod"}}}')
    r = run_py(venv, CHILD.format(src=str(recipe.parent)))
    assert r.returncode == 0 and "CALLS 12" in r.stdout and "unknown model" in r.stderr


def test_patch_refuses_unknown_model_and_notes_a_generator_not_importable_here(venv, tmp_path):
    r = run_py(venv, "import sys; from hicache3d.cli import main; sys.argv=['hicache3d','patch','--model','nope']; main()")
    assert r.returncode != 0 and "known recipes" in r.stderr
    # not importable from the CLI's path, the current directory or PYTHONPATH: the hook
    # still fires wherever a process imports the module, so patch says so and succeeds
    r = run_py(venv, "import sys; from hicache3d.cli import main; sys.argv=['hicache3d','patch','--model','hunyuan3d-2.1']; main()",
               cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "hy3dshape.pipelines is not importable here" in r.stderr and "current directory" in r.stderr


def test_recipes_from_the_entry_point_group(tmp_path, monkeypatch):
    """A plug-in package ships its own recipe TOML under the hicache3d.recipes group."""
    import importlib.metadata as md
    pkg = tmp_path / "myplug"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mine.toml").write_text(RECIPE.replace('name = "toy"', 'name = "plug-model"'))
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = md.EntryPoint(name="myplug", value="myplug", group="hicache3d.recipes")
    real = md.entry_points

    def fake(**kw):
        return [ep] if kw.get("group") == "hicache3d.recipes" else real(**kw)
    monkeypatch.setattr(md, "entry_points", fake)
    assert get_recipe("plug-model").sites[0].name == "main"
    assert "bundled" in hicache3d.recipe.known_recipes()          # shipped ones still there


def test_unwritable_site_packages_is_a_clear_error(monkeypatch, tmp_path):
    from hicache3d import inplace
    monkeypatch.setattr(inplace.sysconfig, "get_paths", lambda: {"purelib": str(tmp_path / "sp")})
    (tmp_path / "sp").mkdir()
    monkeypatch.setattr(inplace.os, "access", lambda p, mode: False)
    with pytest.raises(inplace.InPlaceError, match=r"cannot write to .*sp.*virtual environment.*--user"):
        inplace.target_dir()


def test_force_is_recorded_and_unpatching_an_unknown_model_fails(venv):
    r = run_py(venv, "import sys; from hicache3d.cli import main; sys.argv=['hicache3d','patch','--model','hunyuan3d-2.1','--force']; main()")
    assert r.returncode == 0 and "not importable here" in r.stderr
    st = run_py(venv, "import sys; from hicache3d.cli import main; sys.argv=['hicache3d','status']; main()")
    assert "hunyuan3d-2.1" in st.stdout and "forced" in st.stdout
    r = run_py(venv, "import sys; from hicache3d.cli import main; sys.argv=['hicache3d','unpatch','--model','nope']; main()")
    assert r.returncode != 0 and "not patched: nope" in r.stderr


def test_alternative_module_name_is_patched_in_place(toy, venv):
    """A recipe may name the same code under other module names (a source install of a
    generator vs its PyPI packaging); `patch` targets the one that is installed."""
    mod, recipe = toy
    alt = recipe.parent / "alt.toml"
    alt.write_text(RECIPE.replace('module = "toy_sampler_mod"',
                                  'module = "not_installed_mod.sampler"\nalt_modules = ["toy_sampler_mod"]'))
    child = CHILD.format(src=str(recipe.parent))
    r = run_py(venv, f"import sys; sys.path.insert(0, {str(recipe.parent)!r}); from hicache3d.cli import main; "
                     f"sys.argv=['hicache3d','patch','--recipe',{str(alt)!r}]; main()")
    assert r.returncode == 0, r.stderr
    assert f"toy_sampler_mod is a source checkout at {recipe.parent / 'toy_sampler_mod.py'}" in r.stderr
    assert "CALLS 6" in run_py(venv, child).stdout


def test_pipeline_holding_a_sampler_is_fully_restored(toy):
    """accelerate(holder) patches the sampler the holder carries; leaving the block must
    restore that sampler too (it is what actually runs)."""
    mod, recipe = toy

    class Holder:
        def __init__(self):
            self.sampler = mod.ToySampler()

    h = Holder()
    with hicache3d.accelerate(h, str(recipe)) as run:
        h.sampler.calls = 0
        h.sampler.sample(x0())
        assert h.sampler.calls == 6
    assert type(h.sampler) is mod.ToySampler
    h.sampler.calls = 0
    h.sampler.sample(x0())
    assert h.sampler.calls == 12
    with hicache3d.accelerate(h, str(recipe), interval=4):       # and again, new settings
        h.sampler.calls = 0
        h.sampler.sample(x0())
        assert h.sampler.calls == 5
