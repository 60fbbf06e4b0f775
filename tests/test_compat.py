"""hicache3d.compat agrees with the seed package hicache-pp 1.3.0 on its own loop API."""
import math

import numpy as np
import pytest
import torch

hp = pytest.importorskip("hicache_pp", reason="test extra hicache-pp==1.3.0 not installed")
import hicache_pp.tree as hpt  # noqa: E402

from hicache3d import compat  # noqa: E402
from hicache3d.compat import tree as ct  # noqa: E402


def traj(kind, d=64, seed=0, T=40):
    g = torch.Generator().manual_seed(seed)
    if kind == "exp":
        z = torch.tensor([0.92 * np.exp(0.35j), 0.8, 0.96 * np.exp(-0.12j)], dtype=torch.complex128)
        A = torch.randn(d, 3, dtype=torch.complex128, generator=g)
        return [(A @ (z ** t)).real for t in range(T)]
    if kind == "osc_trend":
        A, C, B = (torch.randn(d, generator=g, dtype=torch.float64) for _ in range(3))
        out, ph = [], 0.0
        for t in range(T):
            fr = t / T
            ph += 2.2 * (1 + 0.5 * fr)
            out.append(2 * math.tanh(2.5 * (fr - 0.45)) * A + 1.5 * fr * fr * C
                       + 0.8 * 0.85 ** t * math.cos(ph) * B
                       + 0.01 * torch.randn(d, generator=g, dtype=torch.float64))
        return out
    raise ValueError(kind)


def drive(mod_h, mod_d, traj_, backend, holdout="1step", steps=25, interval=3, first=3,
          order=2, history=6):
    """Run the seed's loop recipe with either implementation; return the velocities used."""
    kw = dict(num_steps=steps, interval=interval, max_order=order, first_enhance=first,
              sigma=0.5, backend=backend, history=history)
    if holdout is not None:
        kw["holdout"] = holdout
    st = mod_h.hicache_init(**kw)
    out = []
    for s in range(steps):
        st["step"] = s
        if mod_h.hicache_decide(st) == "full":
            v = traj_[s]
            mod_h.hicache_update_derivatives(st, v)
            mod_d.dmd_update_snapshots(st, v, history)
        elif backend == "hermite":
            v = mod_h.hicache_forecast(st)
        elif backend == "dmd":
            v = mod_d.dmd_forecast_state(st)
        else:
            v = mod_d.auto_forecast_state(st)
        out.append(v)
    return out, st


@pytest.mark.parametrize("kind", ["exp", "osc_trend"])
@pytest.mark.parametrize("backend,holdout", [("hermite", None), ("dmd", None),
                                             ("auto", "1step"), ("auto", "horizon")])
@pytest.mark.parametrize("interval", [2, 3, 5])
def test_flat_loop_api_agrees_with_seed(kind, backend, holdout, interval):
    tr = traj(kind)
    seed_out, seed_st = drive(hp.hermite, hp.dmd, tr, backend, holdout or "1step", interval=interval)
    ours, st = drive(compat.hermite, compat.dmd, tr, backend, holdout or "1step", interval=interval)
    for a, b in zip(seed_out, ours):
        assert float((a - b).norm() / a.norm().clamp_min(1e-12)) <= 1e-6
    assert seed_st["telemetry"]["method_counts"] == st["telemetry"]["method_counts"]
    assert seed_st["activated_steps"] == st["activated_steps"]
    if backend == "auto":
        assert seed_st.get("_auto_choice") == st.get("_auto_choice")


def test_stateless_dmd_forecast_agrees_with_seed():
    tr = traj("exp")
    for k in (1, 2.5, -3):
        a = hp.dmd_forecast(tr[:6], k)
        b = compat.dmd_forecast(tr[:6], k)
        assert float((a - b).norm() / a.norm()) <= 1e-6


def tree_traj(seed=1, T=30):
    g = torch.Generator().manual_seed(seed)
    z = torch.tensor([0.9 * np.exp(0.3j), 0.75], dtype=torch.complex128)
    A = torch.randn(12, 2, dtype=torch.complex128, generator=g)
    B = torch.randn(6, 2, dtype=torch.complex128, generator=g)
    return [{"shape": (A @ (z ** t)).real.reshape(3, 4),
             "pose": {"rot": (B @ (z ** t)).real}} for t in range(T)]


@pytest.mark.parametrize("backend", ["hermite", "dmd"])
def test_tree_loop_api_agrees_with_seed(backend):
    tr = tree_traj()
    res = []
    for mod in (hpt, ct):
        st = mod.hicache_init(num_steps=20, interval=3, max_order=2, first_enhance=2,
                              sigma=0.5, backend=backend, history=6)
        outs = []
        for s in range(20):
            st["step"] = s
            if mod.hicache_decide(st) == "full":
                mod.hicache_update_tree(st, tr[s])
                mod.dmd_update_snapshots_tree(st, tr[s], 6)
                outs.append(tr[s])
            else:
                outs.append(mod.hicache_forecast_tree(st) if backend == "hermite"
                            else mod.dmd_forecast_tree(st))
        res.append((outs, st))
    for a, b in zip(res[0][0], res[1][0]):
        for key in ("shape",):
            assert float((a[key] - b[key]).norm() / a[key].norm()) <= 1e-6
        assert float((a["pose"]["rot"] - b["pose"]["rot"]).norm() / a["pose"]["rot"].norm()) <= 1e-6
    assert res[0][1]["telemetry"]["method_counts"] == res[1][1]["telemetry"]["method_counts"]


def test_adaptive_cfg_seed_helpers_agree():
    g = torch.Generator().manual_seed(3)
    yc = {"a": torch.randn(4, generator=g)}
    yu = {"a": torch.randn(4, generator=g)}
    for mod in (hpt, ct):
        gt = mod.guidance_term_tree(yc, yu, 3.0)
        v = mod.reconstruct_cfg_tree(yc, gt)
        torch.testing.assert_close(v["a"], 4 * yc["a"] - 3 * yu["a"])
    anchors = [(2, {"a": torch.ones(3) * 2}), (4, {"a": torch.ones(3) * 4}), (5, {"a": torch.ones(3) * 5})]
    for order in (1, 2):
        a = hpt.forecast_guidance_tree(anchors, 7, order)["a"]
        b = ct.forecast_guidance_tree(anchors, 7, order)["a"]
        torch.testing.assert_close(a, b)
    assert abs(hpt.tree_cosine(yc, yu) - ct.tree_cosine(yc, yu)) < 1e-6
    sa, sb = hpt.adaptive_cfg_init(10, 0.9, 2), ct.adaptive_cfg_init(10, 0.9, 2)
    for s, gm in ((0, 0.99), (3, 0.95), (3, 0.5), (9, 0.99)):
        sa["step"] = sb["step"] = s
        sa["anchors"] = sb["anchors"] = [(1, yc)]
        assert hpt.adaptive_cfg_decide(sa, gm) == ct.adaptive_cfg_decide(sb, gm)


def test_telemetry_and_reset():
    st = compat.hicache_init(num_steps=8, interval=2, first_enhance=1)
    st["step"] = 0
    compat.hicache_decide(st)
    compat.hicache_update_derivatives(st, torch.ones(2))
    assert compat.hicache_telemetry(st)["decisions"]["full"] == 1
    compat.hicache_reset(st)
    assert st["derivatives"] == {} and st["step"] == 0
    with pytest.raises(ValueError):
        compat.hicache_init(num_steps=8, sigma=1.5)
