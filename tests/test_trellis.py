"""The TRELLIS v1 (``trellis``) and TRELLIS.2 (``trellis2``) recipes against the real
upstream samplers (``trellis-3d-ms==0.1.0`` / ``trellis-3d-python==0.1.30``, installed
into .upstream/ by upstream_harness) with tiny random-weight models on CPU.

Both generators import as ``trellis`` and can never share a process: every check runs in a
fresh interpreter per family (``tests/_trellis_checks.py``, one subprocess per family), and
the in-place test runs the ``hicache3d patch`` command and the accelerated sampler in fresh
processes of a throw-away environment.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

V1 = ["sparse_structure_defaults", "slat_defaults", "interval_one_is_bit_identical", "adaptive_fewer_calls",
      "cfg_and_plain_samplers",
      "pipeline_object_sites_by_attribute_and_disable", "run_multi_image_instance_replacement",
      "batch_of_two_items_are_independent", "class_patch_sites_by_latent", "other_family_is_refused"]
V2 = ["sparse_structure_defaults", "shape_slat_defaults", "tex_slat_defaults", "interval_one_is_bit_identical",
      "adaptive_fewer_calls",
      "pipeline_object_and_cascade", "batch_of_two_items_are_independent", "class_patch_sites_by_call",
      "other_family_is_refused"]


def _env():
    e = {k: v for k, v in os.environ.items() if k != "HICACHE3D_DISABLE"}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    return e


def _run_checks(family):
    r = subprocess.run([sys.executable, "-m", "tests._trellis_checks", family], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    lines = {l.split(" ", 1)[0]: l.split(" ", 1)[1] for l in r.stdout.splitlines()
             if l.startswith(("RESULTS ", "FIGURES "))}
    assert "RESULTS" in lines, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(lines["RESULTS"]), json.loads(lines["FIGURES"])


@pytest.fixture(scope="module")
def v1_results():
    return _run_checks("trellis")


@pytest.fixture(scope="module")
def v2_results():
    return _run_checks("trellis2")


@pytest.mark.parametrize("name", V1)
def test_trellis_v1(v1_results, name):
    results, _ = v1_results
    assert set(results) == set(V1)
    assert results[name] == "ok", results[name]


@pytest.mark.parametrize("name", V2)
def test_trellis2(v2_results, name):
    results, _ = v2_results
    assert set(results) == set(V2)
    assert results[name] == "ok", results[name]


def test_recipes_parse_and_name_their_sites():
    from hicache3d.recipe import get_recipe
    v1, v2 = get_recipe("trellis"), get_recipe("trellis2")
    assert [s.name for s in v1.sites] == ["sparse_structure", "slat"]
    assert [s.name for s in v2.sites] == ["sparse_structure", "shape_slat", "tex_slat"]
    assert v1.module == v2.module == "trellis.pipelines.samplers.flow_euler"
    assert (v1.package, v2.package) == ("trellis-3d-ms", "trellis-3d-python")
    assert v2.site("sparse_structure").config.interval == 2
    assert v2.site("sparse_structure").config.first_enhance > v2.site("shape_slat").config.first_enhance


CHILD = textwrap.dedent('''
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {root!r})
    from upstream_harness import trellis2_env as E
    E.activate()
    ss, sh, tx = E.build_ss_flow(0), E.build_shape_flow(0), E.build_tex_flow(0)
    out = []
    for model, run in ((ss, lambda: E.sample_ss(E.make_sampler("interval"), ss).samples),
                       (sh, lambda: E.sample_shape(E.make_sampler("interval"), sh).samples)):
        with E.count_calls(model) as c:
            x = run()
        out.append((c.n, float(getattr(x, "feats", x).double().sum())))
    shape = E.sample_shape(E.make_sampler("plain"), sh, steps=4).samples
    with E.count_calls(tx) as c:
        x = E.sample_tex(E.make_sampler("interval"), tx, shape).samples
    out.append((c.n, float(x.feats.double().sum())))
    print("CALLS", [n for n, _ in out], "SUMS", [repr(s) for _, s in out])
''')


def cli(py, *args):
    """``hicache3d ARGS`` with the environment's interpreter (``python -m hicache3d``)."""
    return subprocess.run([str(py), "-m", "hicache3d", *args], capture_output=True, text=True,
                          env=_env(), cwd=str(ROOT), timeout=300)


def test_in_place_patch_trellis2_in_fresh_processes(tmp_path):
    from upstream_harness import install
    from hicache3d.recipe import get_recipe
    from hicache3d.schedule import Schedule
    from .test_engine import run_py
    target = str(install.ensure("trellis2"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    inner = Path(run_py(py, "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    import site
    outer = [p for p in site.getsitepackages() if Path(p).exists()]
    # the runner's packages, this checkout first, and the installed trellis-3d-python
    (inner / "00outer.pth").write_text("import site, sys; " + "; ".join(
        f"site.addsitedir({p!r})" for p in outer) + f"; sys.path.insert(0, {str(ROOT)!r}); sys.path.append({target!r})\n")
    child = CHILD.format(root=str(ROOT))
    env = {"PYTHONPATH": str(ROOT)}
    base = run_py(py, child, env=env, cwd=str(ROOT))
    assert "CALLS [22, 21, 12]" in base.stdout, base.stdout[-1000:] + base.stderr[-2000:]
    r = cli(py, "patch", "--model", "trellis2", "--backend", "dmd")
    assert r.returncode == 0 and "patched trellis2" in r.stdout, r.stdout + r.stderr
    patched = run_py(py, child, env=env, cwd=str(ROOT))
    recipe = get_recipe("trellis2")
    from upstream_harness.trellis2_env import PIPELINE_DEFAULTS as D, t_pairs  # no import of trellis itself
    want = []
    for site, key in (("sparse_structure", "ss"), ("shape_slat", "shape"), ("tex_slat", "tex")):
        p, c = D[key], recipe.site(site).config
        lo, hi = p["guidance_interval"]
        fw = [(1 if p["guidance_strength"] in (0, 1) else 2) if lo <= t <= hi else 1
              for t, _ in t_pairs(12, p["rescale_t"])]
        want.append(sum(f for f, k in zip(fw, Schedule(c.interval, c.first_enhance, c.last_enhance).plan(12)) if k))
    assert f"CALLS {want}" in patched.stdout, patched.stdout[-1000:] + patched.stderr[-2000:]
    assert "hicache3d:" not in patched.stderr, patched.stderr[-2000:]
    r = cli(py, "unpatch", "--model", "trellis2")
    assert r.returncode == 0, r.stderr
    assert run_py(py, child, env=env, cwd=str(ROOT)).stdout == base.stdout
