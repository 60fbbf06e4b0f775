"""The Hunyuan3D recipes against the real ``hy3dgen==2.0.2`` pipeline code (installed from
PyPI into .upstream/ by upstream_harness), with a tiny random-weight model on CPU."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import hicache3d
from hicache3d.schedule import Schedule

from upstream_harness import hy3dgen_env as H

STEPS = 9


def net(pipe):
    """A submodule every real forward of the DiT runs through: counting it counts real
    network work (a hook on the DiT itself would also count the forecast calls, which
    enter the module but skip its computation)."""
    return next(m for m in pipe.model.children() if any(True for _ in m.parameters()))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    H.activate()
    return H.build_pipeline(tmp_path_factory.mktemp("hy") / "models")


@pytest.fixture(scope="module")
def turbo(tmp_path_factory):
    H.activate()
    return H.build_pipeline(tmp_path_factory.mktemp("hyt") / "models", turbo=True)


def latents(pipe, **kw):
    return H.run(pipe, steps=STEPS, output_type="latent", **kw)


def test_patched_pipeline_makes_the_expected_calls_and_returns_a_mesh(pipe):
    with H.count_calls(net(pipe)) as c:
        ref = latents(pipe)
    assert c.n == STEPS
    with hicache3d.accelerate(pipe, backend="dmd", interval=3) as run:
        with H.count_calls(net(pipe)) as c:
            out = latents(pipe)
        mesh = H.run(pipe, steps=STEPS)[0]
    # the last step has dt = 0 and is skipped; the rest follows the schedule
    expected = sum(Schedule(3, 4).plan(STEPS - 1))
    assert c.n == expected
    assert run.runs[0].extra["wasted_steps_skipped"] == 1
    assert run.stats["sites"]["shape"]["computed"] == 2 * expected
    assert mesh is not None and len(mesh.vertices) > 0
    assert torch.isfinite(out).all()
    drift = float((out - ref).norm() / ref.norm())
    assert drift < 0.2, drift
    # restored exactly
    assert type(pipe).__name__ == "Hunyuan3DDiTFlowMatchingPipeline" and "forward" not in vars(pipe.model)
    assert torch.equal(latents(pipe), ref)


def test_interval_one_is_bit_identical(pipe):
    ref = latents(pipe)
    with hicache3d.accelerate(pipe, interval=1):
        with H.count_calls(net(pipe)) as c:
            out = latents(pipe)
    assert torch.equal(out, ref) and c.n == STEPS - 1      # only the dt = 0 call saved


def test_adaptive_schedule_makes_fewer_calls(pipe):
    ref = latents(pipe)
    with hicache3d.accelerate(pipe, schedule="adaptive", tolerance=1.0) as run:
        with H.count_calls(net(pipe)) as c:
            out = latents(pipe)
    st = run.stats["runs"][-1]["sites"]["shape"]
    assert 0 < c.n < STEPS - 1 and st["forecast"] > 0, st.get("pattern")
    # the dt = 0 last step goes through the cache's one path too: recorded as skipped
    assert len(st["pattern"]) == STEPS and st["pattern"].endswith("-") and st["skipped"] == 1
    assert any(r["observed"] is not None for r in st["trace"])
    assert float((out - ref).norm() / ref.norm()) < 0.3
    with hicache3d.accelerate(pipe, schedule="adaptive", tolerance=0.0):
        with H.count_calls(net(pipe)) as c:
            assert torch.equal(latents(pipe), ref)
    assert c.n == STEPS - 1


def test_searched_pattern_of_the_run_length(pipe):
    """``schedule="pattern"`` on the real pipeline: the run's step count reaches the cache
    (from ``num_inference_steps``, or an explicit ``sigmas``), so the pattern of that length
    decides, and a run of another length falls back to the adaptive schedule."""
    pat = "CC.C..C.C"                                         # STEPS = 9; the last step has dt = 0
    ref = latents(pipe)
    with hicache3d.accelerate(pipe, pattern=[pat, "C.C.C"], tolerance=0.5) as run:
        with H.count_calls(net(pipe)) as c:
            out = latents(pipe)
        other = H.run(pipe, steps=7, output_type="latent")
    st = run.stats["runs"][0]["sites"]["shape"]
    assert st["schedule"] == f"pattern of {STEPS} steps"
    assert st["pattern"] == pat[:-1] + "-" and c.n == pat[:-1].count("C")
    assert float((out - ref).norm() / ref.norm()) < 0.3 and other.shape == out.shape
    assert run.stats["runs"][1]["sites"]["shape"]["schedule"].startswith("adaptive, tolerance 0.5 (no pattern for 7")


def test_cfg_batch_items_are_fitted_independently(pipe):
    with hicache3d.accelerate(pipe, backend="dmd", interval=3) as run:
        latents(pipe)
    # the CFG batch is [cond; uncond]: two items per forecast
    st = run.stats["sites"]["shape"]
    assert sum(st["per_basis"].values()) == 2 * st["forecast"]


def test_turbo_variant_has_no_cfg_doubling(turbo):
    ref = H.run(turbo, steps=STEPS, output_type="latent")
    with hicache3d.accelerate(turbo, backend="taylor", interval=2) as run:
        with H.count_calls(net(turbo)) as c:
            out = H.run(turbo, steps=STEPS, output_type="latent")
    assert c.n == sum(Schedule(2, 4).plan(STEPS - 1))
    assert run.stats['sites']['shape']['per_basis'] and sum(run.stats['sites']['shape']['per_basis'].values()) == run.stats['sites']['shape']['forecast']  # one item: no [cond; uncond]
    assert float((out - ref).norm() / ref.norm()) < 0.2


def test_hunyuan3d_2_1_recipe_on_the_same_code_under_its_module_names(pipe):
    """hy3dshape (2.1) is not on PyPI: its pipeline has the same loop, so the recipe is
    tested by serving the hy3dgen pipeline module under the 2.1 module name."""
    import types
    import hy3dgen.shapegen.pipelines as real
    from hicache3d.recipe import get_recipe
    pkg = types.ModuleType("hy3dshape")
    pkg.__path__ = []
    sys.modules["hy3dshape"] = pkg
    sys.modules["hy3dshape.pipelines"] = real
    try:
        recipe = get_recipe("hunyuan3d-2.1")
        with hicache3d.accelerate(pipe, recipe, interval=3) as run:
            with H.count_calls(net(pipe)) as c:
                latents(pipe)
        assert c.n == sum(Schedule(3, 4).plan(STEPS - 1))
        assert run.recipe.name == "hunyuan3d-2.1"
    finally:
        sys.modules.pop("hy3dshape.pipelines", None)
        sys.modules.pop("hy3dshape", None)


CHILD = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, {root!r})
    from upstream_harness import hy3dgen_env as H
    H.activate()
    pipe = H.build_pipeline({models!r})
    m = next(m for m in pipe.model.children() if any(True for _ in m.parameters()))
    with H.count_calls(m) as c:
        out = H.run(pipe, steps={steps}, output_type="latent")
    mesh = H.run(pipe, steps={steps})[0]
    print("CALLS", c.n, "MESH", len(mesh.vertices) > 0, "SUM", repr(float(out.double().sum())))
''')


def test_in_place_patch_in_fresh_processes(tmp_path):
    from ._venv import run_py, throwaway_venv
    py = throwaway_venv(tmp_path / "venv", [H.activate()])
    root = str(Path(__file__).resolve().parent.parent)
    child = CHILD.format(root=root, models=str(tmp_path / "models"), steps=STEPS)
    base = run_py(py, child, cwd=root)
    assert f"CALLS {STEPS}" in base.stdout, base.stderr[-2000:]
    r = run_py(py, "import sys; from hicache3d.cli import main; sys.argv=['hicache3d','patch','--model','hunyuan3d-2mini','--backend','dmd','--interval','3']; main()")
    assert r.returncode == 0, r.stderr
    patched = run_py(py, child, cwd=root)
    n = sum(Schedule(3, 4).plan(STEPS - 1))
    assert f"CALLS {n} MESH True" in patched.stdout, patched.stderr[-2000:]
    r = run_py(py, "import sys; from hicache3d.cli import main; sys.argv=['hicache3d','unpatch','--model','hunyuan3d-2mini']; main()")
    assert r.returncode == 0, r.stderr
    assert run_py(py, child, cwd=root).stdout == base.stdout
