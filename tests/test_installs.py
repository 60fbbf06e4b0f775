"""What users hit around installing and patching: nested and shared `accelerate`, bad
recipes and targets, `--user` in a venv, clear messages, start-up cost while patched, and
the version ranges of recipes."""
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import hicache3d
from hicache3d.recipe import RecipeError, get_recipe, load_recipe, version_in_range

from ._venv import run_py
from .test_engine import CHILD, RECIPE, toy, venv, x0  # noqa: F401  (fixtures)


def cli(py, *argv, cwd=None, flags=()):
    code = "import sys; from hicache3d.cli import main; sys.argv=%r; main()" % (["hicache3d", *argv],)
    return subprocess.run([str(py), *flags, "-c", code], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={k: v for k, v in __import__("os").environ.items()
                                            if k != "HICACHE3D_DISABLE"})


# ------------------------------------------------------------------ accelerate (issue 13: 3, 12, 15)

def test_nested_accelerate_restores_the_outer_settings(toy):
    mod, recipe = toy
    s = mod.ToySampler()
    ref = s.sample(x0())
    with hicache3d.accelerate(s, str(recipe), backend="reuse", interval=2) as outer:
        s.calls = 0
        a = s.sample(x0())
        assert s.calls == 7                                   # 0, 1, 2 + 4, 6, 8, 10
        with hicache3d.accelerate(s, backend="dmd", interval=4) as inner:
            s.calls = 0
            b = s.sample(x0())
            assert s.calls == 5
        s.calls = 0
        c = s.sample(x0())
        assert s.calls == 7                                   # the outer settings again
    assert torch.equal(a, c) and not torch.equal(c, ref) and not torch.equal(b, a)
    assert [r.network_calls for r in outer.runs] == [7, 7]
    assert [r.network_calls for r in inner.runs] == [5]
    assert type(s) is mod.ToySampler
    s.calls = 0
    assert torch.equal(s.sample(x0()), ref) and s.calls == 12


def test_nested_accelerate_with_another_recipe_is_refused(toy):
    mod, recipe = toy
    other = recipe.parent / "other.toml"
    other.write_text(RECIPE.replace('name = "toy"', 'name = "toy-other"'))
    s = mod.ToySampler()
    with hicache3d.accelerate(s, str(recipe)):
        with pytest.raises(RecipeError, match="already accelerated with recipe 'toy'.*same recipe"):
            with hicache3d.accelerate(s, str(other)):
                pass
        s.calls = 0
        s.sample(x0())
        assert s.calls == 6                                   # the outer block untouched
    assert type(s) is mod.ToySampler


@pytest.mark.parametrize("bad", [123, 4.5, ["toy"], object()])
def test_a_recipe_of_the_wrong_type_is_a_clear_type_error(toy, bad):
    mod, _ = toy
    s = mod.ToySampler()
    with pytest.raises(TypeError, match=r"recipe must be a recipe name .*\.toml recipe or a Recipe, got"):
        with hicache3d.accelerate(s, recipe=bad):
            pass
    assert type(s) is mod.ToySampler


def test_two_threads_sharing_one_generator_each_run_accelerated(toy):
    """Each thread opens its own block on the same object, with its own settings; the
    blocks overlap in time.  Every run of each thread is accelerated with its settings."""
    mod, recipe = toy
    s = mod.ToySampler()
    both_in = threading.Barrier(2)
    out, errors = {}, []

    def go(name, interval):
        try:
            with hicache3d.accelerate(s, str(recipe), interval=interval) as run:
                both_in.wait(timeout=30)
                for _ in range(4):
                    s.sample(x0())
                both_in.wait(timeout=30)                      # nobody leaves before both ran
            out[name] = [r.network_calls for r in run.runs]
        except Exception as e:                                # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=go, args=("a", 2)), threading.Thread(target=go, args=("b", 4))]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors, errors
    assert out == {"a": [7] * 4, "b": [5] * 4}
    assert type(s) is mod.ToySampler


# ------------------------------------------------------------------ recipes (issue 12 and 13: 10)

def test_version_ranges_follow_pep_440():
    assert version_in_range("2.0.2", ">=2.0.2,<2.1")
    assert not version_in_range("2.1.0", ">=2.0.2,<2.1")
    assert version_in_range("2.3.1", "~=2.2")                 # compatible release
    assert not version_in_range("3.0", "~=2.2")
    assert version_in_range("0.1.30.post1", ">=0.1.30,<0.2")  # post-release
    assert not version_in_range("0.2.0rc1", "<0.2")           # pre-release of the excluded one
    assert version_in_range("0.1.31rc1", ">=0.1.30,<0.2")     # an installed pre-release inside
    assert not version_in_range("not-a-version", ">=0.1")
    with pytest.raises(RecipeError, match="cannot read the version range"):
        version_in_range("1.0", ">=1.0 and <2")


def test_a_recipe_with_a_bad_version_range_names_its_file(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text(RECIPE.replace('module = "toy_sampler_mod"', 'module = "toy_sampler_mod"\npackage = "x"\nversions = ">= one"'))
    with pytest.raises(RecipeError, match=r"cannot read the version range '>= one' of recipe 'toy' in .*r\.toml"):
        load_recipe(p)


def test_a_recipe_file_that_is_not_toml_is_named_as_such(tmp_path):
    p = tmp_path / "my_recipe.txt"
    p.write_text(RECIPE)
    with pytest.raises(RecipeError, match=r"my_recipe\.txt is not a \.toml file"):
        get_recipe(str(p))
    with pytest.raises(RecipeError, match=r"missing\.toml does not exist"):
        get_recipe(str(tmp_path / "missing.toml"))


# ------------------------------------------------------------------ patch / unpatch messages

def test_patch_validates_the_recipe_before_writing_anything(toy, venv):
    mod, recipe = toy
    d = recipe.parent
    site = Path(run_py(venv, "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())

    def patch(text, name):
        (d / name).write_text(text)
        return cli(venv, "patch", "--recipe", str(d / name), cwd=str(d))

    r = patch(RECIPE.replace('adapter = "generic"', 'adapter = "warpdrive"'), "warp.toml")
    assert r.returncode != 0 and "unknown adapter 'warpdrive'" in r.stderr and "generic" in r.stderr
    r = patch(RECIPE.replace('module = "toy_sampler_mod"', 'module = "json"')
              .replace("ToySampler.sample", "JSONDecoder.decode").replace("ToySampler.velocity", "JSONDecoder.raw_decode"),
              "stdlib.toml")
    assert r.returncode != 0 and "'json', a module of Python's standard library" in r.stderr
    r = patch(RECIPE.replace('step = "ToySampler.velocity"', 'step = "json:JSONDecoder.decode"'), "outside.toml")
    assert r.returncode != 0 and "'json'" in r.stderr
    r = patch(RECIPE.replace('run = "ToySampler.sample"', 'run = "ToySampler.nope"'), "target.toml")
    assert r.returncode != 0 and "toy_sampler_mod:ToySampler.nope not found" in r.stderr
    r = patch(RECIPE.replace('name = "toy"', 'name = "bundled"'), "bundled.toml")
    assert r.returncode != 0 and "named 'bundled', like a built-in recipe" in r.stderr
    r = cli(venv, "patch", "--recipe", str(d / "nope.txt"), cwd=str(d))
    assert r.returncode != 0 and "nope.txt does not exist" in r.stderr and "unknown model" not in r.stderr
    assert not list(site.glob("hicache3d_inplace*"))          # nothing written by any of them
    r = cli(venv, "unpatch", "--all")
    assert r.returncode == 0 and "nothing was patched in place" in r.stdout


def test_patch_twice_says_it_replaces_the_earlier_settings(toy, venv):
    mod, recipe = toy
    d = str(recipe.parent)
    r = cli(venv, "patch", "--recipe", str(recipe), "--interval", "4", cwd=d)
    assert r.returncode == 0 and "already patched" not in r.stderr, r.stderr
    r = cli(venv, "patch", "--recipe", str(recipe), "--backend", "taylor", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "toy was already patched; its earlier settings ({'settings': {'interval': 4, 'schedule': 'fixed'}}) are replaced" in r.stderr
    st = cli(venv, "status")
    assert "'backend': 'taylor'" in st.stdout and "'interval': 4" not in st.stdout
    assert cli(venv, "unpatch", "--all").returncode == 0


def test_patch_user_inside_a_venv_is_refused_with_the_reason(toy, venv):
    mod, recipe = toy
    r = cli(venv, "patch", "--recipe", str(recipe), "--user", cwd=str(recipe.parent))
    assert r.returncode != 0
    assert "which this virtual environment" in r.stderr and "never reads" in r.stderr
    assert "without --user" in r.stderr and "permission denied" not in r.stderr


def test_a_missing_user_site_is_created_or_named_truly(monkeypatch, tmp_path):
    from hicache3d import inplace
    user_site = tmp_path / "home" / ".local" / "lib" / "python3.x" / "site-packages"
    monkeypatch.setattr(inplace.site, "getusersitepackages", lambda: str(user_site))
    monkeypatch.setattr(inplace.site, "ENABLE_USER_SITE", True)
    monkeypatch.setattr(inplace, "in_venv", lambda: False)
    (tmp_path / "home").mkdir()
    assert inplace.target_dir(user=True) == user_site        # missing, but can be made
    real = inplace.os.access
    monkeypatch.setattr(inplace.os, "access", lambda p, m: False if Path(p) == tmp_path / "home" else real(p, m))
    with pytest.raises(inplace.InPlaceError, match=r"it does not exist and .*home is not writable"):
        inplace.target_dir(user=True)


def test_start_up_imports_nothing_heavy_until_the_generator_is_imported(toy, venv):
    mod, recipe = toy
    assert cli(venv, "patch", "--recipe", str(recipe), cwd=str(recipe.parent)).returncode == 0
    probe = "import sys; print(sorted(m for m in ('wrapt', 'torch', 'hicache3d.patching', 'hicache3d.inplace') if m in sys.modules))"
    r = run_py(venv, probe)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
    r = run_py(venv, CHILD.format(src=str(recipe.parent)))
    assert "CALLS 6" in r.stdout, r.stdout + r.stderr                # and the patch applies
    assert cli(venv, "unpatch", "--all").returncode == 0


# ------------------------------------------------------------------ source checkouts (issue 10)

def test_a_module_found_only_in_the_current_directory_is_a_source_checkout(toy, venv):
    """`python -P` keeps the current directory off the CLI's own path (as the installed
    `hicache3d` script does): patch still finds the checkout the user stands in."""
    mod, recipe = toy
    d = recipe.parent
    r = cli(venv, "patch", "--recipe", str(recipe), cwd=str(d), flags=("-P",))
    assert r.returncode == 0, r.stderr
    assert f"toy_sampler_mod is a source checkout at {d / 'toy_sampler_mod.py'} (found in the current directory" in r.stderr
    st = cli(venv, "status", cwd=str(d), flags=("-P",))
    assert f"generator: source checkout at {d / 'toy_sampler_mod.py'}" in st.stdout, st.stdout
    st = cli(venv, "status", cwd=str(d.parent), flags=("-P",))   # elsewhere: what was recorded
    assert f"patched from the source checkout at {d / 'toy_sampler_mod.py'}" in st.stdout, st.stdout
    assert "CALLS 6" in run_py(venv, CHILD.format(src=str(d))).stdout
    assert cli(venv, "unpatch", "--all").returncode == 0


def test_recipes_lists_a_source_checkout(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from hicache3d.cli import main
    pkg = tmp_path / "hy3dshape"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "pipelines.py").write_text("")
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, ["recipes"]).output
    line = next(ln for ln in out.splitlines() if ln.startswith("hunyuan3d-2.1"))
    assert f"source checkout at {pkg}" in line
