"""`hicache3d patch` from a source checkout, for every upstream family.

Most users clone TRELLIS, TRELLIS.2, Hunyuan3D-2.1, SAM 3D or Fast-SAM3D and run their
scripts from the clone's root: the package sits in the current directory, with no
distribution metadata.  Each case copies the real upstream code from ``.upstream/`` into
that layout (``upstream_harness/checkout.py``), runs ``patch`` from the checkout with the
current directory off the CLI's own import path (as the installed ``hicache3d`` script
has it), then runs the sampler from the checkout in fresh interpreters: patched (fewer
real network forwards, as the recipe's schedule plans them), then after ``unpatch``
(bit-identical to the uncached run of the same process).  The cases run side by side.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hicache3d.recipe import get_recipe
from hicache3d.schedule import Schedule

from ._venv import throwaway_venv
from upstream_harness import checkout as C

ROOT = Path(__file__).resolve().parent.parent

# the package folder `patch` must report, per case
PACKAGE = {case: layout[2] for case, layout in C.LAYOUTS.items()}
RECIPE = {"trellis": "trellis", "trellis2": "trellis2", "trellis2-as-trellis2": "trellis2",
          "sam3d": "sam3d", "fast-sam3d": "fast-sam3d", "hunyuan3d-2.1": "hunyuan3d-2.1"}
HY_STEPS = 9

PRELUDE = '''
import os, sys, torch
torch.set_num_threads(1)
sys.path.insert(1, {root!r})
from upstream_harness import checkout as C
C.use({case!r}, os.getcwd(), {deps!r})
'''

# each prints CALLS (real network forwards) and SUM of the result, accelerated as the
# process is patched, then REF: the same run with the in-place patch switched off
BODY = {
    "trellis": '''
from upstream_harness import trellis_env as E
model = E.build_ss_flow(0)
def go():
    with E.count_calls(model) as c:
        x = E.sample_ss(E.make_sampler("interval"), model).samples
    return c.n, repr(float(x.double().sum()))
''',
    "trellis2": '''
from upstream_harness import trellis2_env as E
model = E.build_ss_flow(0)
def go():
    with E.count_calls(model) as c:
        x = E.sample_ss(E.make_sampler("interval"), model).samples
    return c.n, repr(float(x.double().sum()))
''',
    "sam3d": '''
from upstream_harness import sam3d_env as S
gen = S.build_ss_generator(0)
def go():
    with S.count_calls(gen.reverse_fn.backbone) as c:
        x = S.generate_ss(gen)
    return c.n, repr(float(sum(v.double().sum() for v in x.values())))
''',
    "fast-sam3d": '''
from upstream_harness import sam3d_env as S
gen = S.build_slat_generator(0)
def go():
    with S.count_calls(gen.reverse_fn.backbone) as c:
        x = S.generate_slat(gen)
    return c.n, repr(float(x.double().sum()))
''',
    "hunyuan3d-2.1": '''
from upstream_harness import hy3dgen_env as H
pipe = H.build_pipeline({models!r})
net = next(m for m in pipe.model.children() if any(True for _ in m.parameters()))
def go():
    with H.count_calls(net) as c:
        x = H.run(pipe, steps=%d, output_type="latent")
    return c.n, repr(float(x.double().sum()))
''' % HY_STEPS,
}
BODY["trellis2-as-trellis2"] = BODY["trellis2"]

EPILOGUE = '''
n, s = go()
print("CALLS", n, "SUM", s)
inplace = sys.modules.get("hicache3d.inplace")
ctls = inplace.installed() if inplace else {}
print("PATCHED", sorted(ctls))
if ctls:
    for ctl in ctls.values():
        ctl.enabled = False
    n, s = go()
    print("REF", n, "SUM", s)
'''


def _planned(forwards, config):
    plan = Schedule(config.interval, config.first_enhance, config.last_enhance).plan(len(forwards))
    return sum(f for f, c in zip(forwards, plan) if c)


def _forwards(case):
    """Real network forwards per step of the uncached run, from the published settings."""
    if case == "trellis":
        from upstream_harness.trellis_env import PIPELINE_DEFAULTS as D, t_pairs
        p = D["ss"]
        lo, hi = p["cfg_interval"]
        return [2 if lo <= t <= hi else 1 for t, _ in t_pairs(12, p["rescale_t"])], "sparse_structure"
    if case.startswith("trellis2"):
        from upstream_harness.trellis2_env import PIPELINE_DEFAULTS as D, t_pairs
        p = D["ss"]
        lo, hi = p["guidance_interval"]
        g = 1 if p["guidance_strength"] in (0, 1) else 2
        return [g if lo <= t <= hi else 1 for t, _ in t_pairs(12, p["rescale_t"])], "sparse_structure"
    if case in ("sam3d", "fast-sam3d"):
        from upstream_harness.sam3d_env import PIPELINE_DEFAULTS as D, time_grid
        stage, site = ("ss", "sparse_structure") if case == "sam3d" else ("slat", "slat")
        p = D[stage]
        lo, hi = p["cfg_interval"]
        ts = time_grid(p["steps"], p["rescale_t"])[:-1]
        return [2 if lo <= float(torch.tensor([t * 1000.0])) <= hi else 1 for t in ts], site
    # Hunyuan3D: one batched [cond; uncond] forward per step; the last step (dt = 0) is
    # never computed when patched
    return [1] * HY_STEPS, "shape"


def _expected(case):
    forwards, site = _forwards(case)
    config = get_recipe(RECIPE[case]).site(site).config
    if case == "hunyuan3d-2.1":
        return sum(forwards), _planned(forwards[:-1], config)
    return sum(forwards), _planned(forwards, config)


def _cli(py, cwd, *argv):
    code = "import sys; from hicache3d.cli import main; sys.argv=%r; main()" % (["hicache3d", *argv],)
    return subprocess.Popen([str(py), "-P", "-c", code], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def _child(py, cwd, script):
    return subprocess.Popen([str(py), "-c", script], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def _env():
    e = {k: v for k, v in os.environ.items() if k not in ("HICACHE3D_DISABLE", "PYTHONPATH")}
    e["OMP_NUM_THREADS"] = "1"
    return e


def _wait(procs):
    out = {}
    for case, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        out[case] = (p.returncode, stdout, stderr)
    return out


def _line(stdout, tag):
    return next((ln for ln in stdout.splitlines() if ln.startswith(tag + " ")), "")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case end to end, side by side: patch, patched run, status, unpatch, run."""
    base = tmp_path_factory.mktemp("checkouts")
    cases = list(RECIPE)
    layout, py = {}, {}
    for case in cases:
        d = base / case
        layout[case] = C.make(case, d)
        py[case] = throwaway_venv(d / "venv")          # one environment per case: own config
    scripts = {}
    for case in cases:
        checkout, deps = layout[case]
        body = BODY[case].format(models=str(base / case / "models")) if "{models" in BODY[case] else BODY[case]
        scripts[case] = textwrap.dedent(PRELUDE.format(root=str(ROOT), case=case, deps=str(deps))) + body + EPILOGUE
    res = {"patch": _wait({c: _cli(py[c], layout[c][0], "patch", "--model", RECIPE[c]) for c in cases})}
    res["patched"] = _wait({c: _child(py[c], layout[c][0], scripts[c]) for c in cases})
    res["status"] = _wait({c: _cli(py[c], layout[c][0], "status") for c in cases})
    res["unpatch"] = _wait({c: _cli(py[c], layout[c][0], "unpatch", "--model", RECIPE[c]) for c in cases})
    res["after"] = _wait({c: _child(py[c], layout[c][0], scripts[c]) for c in cases})
    return layout, res


@pytest.mark.parametrize("case", list(RECIPE))
def test_patch_from_a_source_checkout(runs, case):
    layout, res = runs
    checkout, _ = layout[case]
    pkg = checkout / PACKAGE[case]
    assert not list(checkout.glob("*.dist-info")) and pkg.is_dir()
    rc, out, err = res["patch"][case]
    assert rc == 0, err
    assert f"is a source checkout at {pkg} (found in the current directory" in err, err
    assert f"patched {RECIPE[case]} in place" in out
    rc, out, err = res["status"][case]
    assert rc == 0 and f"generator: source checkout at {pkg}" in out, out + err

    uncached, planned = _expected(case)
    rc, out, err = res["patched"][case]
    assert rc == 0, err[-3000:]
    assert f"PATCHED ['{RECIPE[case]}']" in out, out + err[-3000:]
    assert "hicache3d:" not in err, err[-3000:]                      # no warning: applied
    calls, ref = _line(out, "CALLS").split(), _line(out, "REF").split()
    assert int(calls[1]) == planned < uncached, (out, planned, uncached)
    assert int(ref[1]) == uncached, out

    rc, out, err = res["unpatch"][case]
    assert rc == 0 and f"unpatched {RECIPE[case]}" in out, err
    rc, out, err = res["after"][case]
    assert rc == 0, err[-3000:]
    assert "PATCHED []" in out
    assert _line(out, "CALLS") == "CALLS " + " ".join(ref[1:]), (out, ref)   # bit-identical
