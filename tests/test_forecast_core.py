"""Forecast core: robustness to bad snapshots, config checks, exactness on short irregular
windows, and the data-chosen exponential rank."""
import numpy as np
import pytest
import torch

from hicache3d import CacheConfig, VelocityCache
from hicache3d.forecast import fit_exponential, make_forecaster


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- non-finite snapshots
@pytest.mark.parametrize("backend", ["reuse", "taylor", "hermite", "dmd", "auto"])
def test_one_nonfinite_snapshot_drops_only_itself(backend):
    torch.manual_seed(0)
    base = torch.randn(2, 64)
    fc = make_forecaster(backend, history=6)
    for t in range(6):
        v = base * (0.9 ** t)
        if t == 2:
            v = v.clone()
            v[1, 3] = float("inf")
        fc.push(t, v)
    out = fc.predict(6.0)
    assert len(fc) == 5 and fc.stats.restarts["nonfinite_snapshot"] == 1
    assert 2.0 not in list(fc.store.times)
    assert torch.isfinite(out).all()
    # forecast from the five good snapshots equals the forecast of a clean history of them
    ref = make_forecaster(backend, history=6)
    for t in (0, 1, 3, 4, 5):
        ref.push(t, base * (0.9 ** t))
    assert torch.allclose(out, ref.predict(6.0), rtol=1e-5, atol=1e-6)


def test_slot_of_a_dropped_snapshot_is_reused_without_overwriting_live_ones():
    fc = make_forecaster("reuse", history=4)
    fc.push(0, torch.full((1, 3), 1.0))
    fc.push(1, torch.full((1, 3), float("nan")))
    fc.push(2, torch.full((1, 3), 3.0))
    assert fc.ready() and list(fc.store.times) == [0.0, 2.0]
    fc.push(3, torch.full((1, 3), 4.0))
    assert list(fc.store.times) == [0.0, 2.0, 3.0]
    assert torch.equal(fc.predict(4.0), torch.full((1, 3), 4.0))
    w = np.zeros((1, 3))
    w[0] = [1.0, 0.0, 0.0]
    assert torch.equal(fc.store.combine(w), torch.full((1, 3), 1.0))


def test_predict_raises_only_when_no_snapshot_is_usable():
    fc = make_forecaster("dmd", history=4)
    fc.push(0, torch.full((1, 3), float("nan")))
    with pytest.raises(RuntimeError, match="no usable snapshot"):
        fc.predict(1.0)
    fc.push(1, torch.ones(1, 3))
    assert torch.equal(fc.predict(2.0), torch.ones(1, 3))


def test_nan_from_the_network_costs_only_that_step():
    cache = VelocityCache(CacheConfig(backend="taylor", order=1, interval=2, first_enhance=2))
    calls = []

    def net(i):
        calls.append(i)
        if i == 3:
            return torch.full((1, 3), float("nan"))
        return torch.full((1, 3), float(i))
    outs = [cache.step(i, lambda i=i: net(i)) for i in range(8)]
    # schedule: computed 0, 1, 3, 5, 7; the NaN at step 3 is that step's own output
    assert calls == [0, 1, 3, 5, 7]
    for i in (2, 4, 6):
        assert torch.isfinite(outs[i]).all()
    assert cache.stats.restarts["nonfinite_snapshot"] == 1
    assert torch.allclose(outs[4], torch.full((1, 3), 4.0))     # linear from 0, 1 (3 dropped)
    assert torch.allclose(outs[6], torch.full((1, 3), 6.0))     # linear from 1, 5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_nonfinite_snapshot_dropped(dtype):
    fc = make_forecaster("taylor", history=4, order=1)
    fc.push(0, torch.full((1, 8), 1.0, dtype=dtype))
    fc.push(1, torch.full((1, 8), float("inf"), dtype=dtype))
    fc.push(2, torch.full((1, 8), 3.0, dtype=dtype))
    out = fc.predict(3.0)
    assert out.dtype == dtype and torch.allclose(out.float(), torch.full((1, 8), 4.0))


def test_empty_velocity_is_a_clear_error():
    fc = make_forecaster("dmd", history=4)
    with pytest.raises(ValueError, match="empty"):
        fc.push(0, torch.zeros(0, 5))
    with pytest.raises(ValueError, match="empty"):
        fc.push(0, {"a": torch.ones(2, 3), "b": torch.zeros(2, 0)})


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize("kw,need", [
    (dict(backend="dmd", history=1), 3), (dict(backend="dmd", history=2), 3),
    (dict(backend="taylor", order=2, history=2), 3), (dict(backend="hermite", order=3, history=3), 4),
    (dict(backend="auto", history=2), 3),
    (dict(backend="auto", candidates=("reuse", "taylor"), order=2, history=2), 3),
])
def test_configs_that_cannot_serve_their_basis_are_rejected(kw, need):
    with pytest.raises(ValueError, match=f"history must be >= {need}"):
        CacheConfig(**kw)
    with pytest.raises(ValueError, match=f"history must be >= {need}"):
        make_forecaster(kw.pop("backend"), **kw)


@pytest.mark.parametrize("kw", [dict(backend="dmd", history=3), dict(backend="taylor", order=2, history=3),
                                dict(backend="reuse", history=1),
                                dict(backend="auto", candidates=("reuse", "hermite"), history=2)])
def test_configs_that_can_serve_their_basis_are_accepted(kw):
    CacheConfig(**kw)


# ---------------------------------------------------------------- accelerate(..., None)
def test_accelerate_honours_settings_whose_value_is_none():
    import hicache3d
    from hicache3d.bundled.generator import BundledGenerator
    gen = BundledGenerator.from_pretrained()
    with hicache3d.accelerate(gen, "bundled", batch_dim=None, num_steps=None) as run:
        cfg = run.recipe.site("sparse_structure").config
    assert cfg.batch_dim is None and cfg.num_steps is None
    with hicache3d.accelerate(gen, "bundled") as run:
        assert run.recipe.site("sparse_structure").config.batch_dim == 0
    cond = torch.zeros(2, 2, 64, 64)
    cond[0, :, 20:40, 20:40] = 1.0
    cond[1, :, 10:30, 25:50] = 1.0
    with hicache3d.accelerate(gen, "bundled", backend="dmd", interval=4, batch_dim=None) as run:
        joint = gen(cond, steps=12, seed=0).latent
    with hicache3d.accelerate(gen, "bundled", backend="dmd", interval=4) as run:
        per_item = gen(cond, steps=12, seed=0).latent
    assert not torch.equal(joint, per_item)


# ---------------------------------------------------------------- exponential basis
def _rank3_signal(seed, d=4096):
    """One real decaying mode plus one complex pair: rank 3, float64."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    a = -rng.uniform(0.05, 0.3)
    mu = complex(-rng.uniform(0.02, 0.2), rng.uniform(0.2, 0.8))
    Ar = torch.randn(d, dtype=torch.float64, generator=g)
    Ac = torch.randn(d, dtype=torch.complex128, generator=g)
    return lambda t: (Ar * np.exp(a * t) + 2 * (Ac * np.exp(mu * t)).real).reshape(1, d)


@pytest.mark.parametrize("seed", range(4))
def test_exponential_exact_from_the_fourth_snapshot_on_a_short_irregular_schedule(seed):
    """12 steps, interval 3, first_enhance 3: computed 0, 1, 2, 5, 8, 11.  Four snapshots
    (0, 1, 2, 5) determine the three modes, so every forecast from step 6 on is exact."""
    f = _rank3_signal(seed)
    cache = VelocityCache(CacheConfig(backend="dmd", interval=3, first_enhance=3, history=6))
    errs = {}
    for i in range(12):
        v = cache.step(i, lambda i=i: f(i))
        if not cache.stats.trace[-1].computed:
            errs[i] = rel(v, f(i))
    assert [r.step for r in cache.stats.trace if r.computed] == [0, 1, 2, 5, 8, 11]
    assert sorted(errs) == [3, 4, 6, 7, 9, 10]
    for i in (6, 7, 9, 10):
        assert errs[i] <= 1e-9, errs
    assert all(r.basis == "dmd" for r in cache.stats.trace if r.step in (6, 7, 9, 10))


def _recorded_velocities(steps, shapes_n):
    """Velocities of an uncached run of the bundled generator (its trained dynamics)."""
    from hicache3d.bench import held_out, record_velocities
    from hicache3d.bundled.generator import BundledGenerator
    cond, _, _ = held_out(shapes_n)
    return record_velocities(BundledGenerator.from_pretrained(), cond, steps)


def _open_loop_errors(vs, interval, backend, **kw):
    from hicache3d.schedule import Schedule
    plan = Schedule(interval, 3, 0).plan(len(vs))
    fc = make_forecaster(backend, history=6, **kw)
    errs = []
    for s, v in enumerate(vs):
        if plan[s]:
            fc.push(float(s), v)
        else:
            p = fc.predict(float(s))
            errs.append(((p - v).flatten(1).norm(dim=1) / v.flatten(1).norm(dim=1)).numpy())
    return np.concatenate(errs)


def test_exponential_rank_is_chosen_from_the_data_on_trained_dynamics():
    """On the bundled generator's own velocities the noise-floor rank kept modes that only
    fit the changing dynamics (mean error 3.4x rank 2's, single forecasts off by more than
    the velocity itself); the held-out backcast over ranks is at least as good as a fixed rank 2."""
    torch.set_num_threads(1)
    vs = _recorded_velocities(50, 4)
    auto = _open_loop_errors(vs, 6, "dmd")
    r2 = _open_loop_errors(vs, 6, "dmd", rank=2)
    assert auto.mean() <= 1.02 * r2.mean(), (auto.mean(), r2.mean())
    assert auto.max() < 0.6, auto.max()
