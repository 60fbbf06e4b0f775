"""VelocityCache: schedule, statistics, identity at interval 1, config validation."""
import numpy as np
import pytest
import torch

from hicache3d import CacheConfig, VelocityCache
from hicache3d.cfg import AdaptiveCFG
from hicache3d.schedule import Schedule


def test_schedule_cadence_matches_taylorseer():
    plan = Schedule(interval=4, first_enhance=2, last_enhance=2).plan(12)
    computed = [i for i, c in enumerate(plan) if c]
    assert computed == [0, 1, 5, 9, 10, 11]
    assert [i for i, c in enumerate(Schedule(3, 3).plan(12)) if c] == [0, 1, 2, 5, 8, 11]
    assert all(Schedule(1, 0).plan(7))


def run_sampler(cache, steps=12, dim=16, seed=0):
    """A toy Euler sampler with a smooth velocity field, counting network calls."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, dim, generator=g) * 0.3
    x = torch.randn(1, dim, generator=g)
    calls = 0
    ts = torch.linspace(1, 0, steps + 1)
    for i in range(steps):
        t = ts[i]

        def net():
            nonlocal calls
            calls += 1
            return torch.tanh(x @ W) * (1 + t)
        v = cache.step(t, net) if cache is not None else net()
        x = x - (ts[i] - ts[i + 1]) * v
    return x, calls


def test_interval_one_is_bit_identical_to_uncached():
    ref, calls_ref = run_sampler(None)
    out, calls = run_sampler(VelocityCache(CacheConfig(backend="dmd", interval=1)))
    assert torch.equal(ref, out) and calls == calls_ref == 12


@pytest.mark.parametrize("backend", ["reuse", "taylor", "hermite", "dmd", "auto"])
def test_network_calls_follow_the_schedule(backend):
    cache = VelocityCache(CacheConfig(backend=backend, interval=3, first_enhance=3))
    out, calls = run_sampler(cache)
    assert calls == 6 == cache.stats.computed and cache.stats.forecast == 6
    assert sum(cache.stats.per_basis.values()) == 6
    ref, _ = run_sampler(None)
    assert float((out - ref).norm() / ref.norm()) < 0.1


def test_dmd_serves_every_skipped_step_of_a_short_schedule():
    cache = VelocityCache(CacheConfig(backend="dmd", interval=3, first_enhance=3))
    run_sampler(cache)
    assert cache.stats.per_basis["dmd"] == 6, cache.stats.as_dict()


def test_reset_starts_a_new_run_and_keeps_past_stats():
    cache = VelocityCache(CacheConfig(backend="taylor", interval=2, first_enhance=1))
    run_sampler(cache, steps=6)
    cache.reset()
    assert cache.stats.steps == 0 and len(cache.forecaster) == 0
    run_sampler(cache, steps=6)
    assert len(cache.runs) == 1 and cache.total_stats.steps == 12


def test_last_enhance_computes_the_tail():
    cache = VelocityCache(CacheConfig(backend="reuse", interval=4, first_enhance=1,
                                      last_enhance=2, num_steps=10))
    run_sampler(cache, steps=10)
    plan = Schedule(4, 1, 2).plan(10)
    assert cache.stats.computed == sum(plan)


def test_time_horizon_uses_sampler_time():
    cache = VelocityCache(CacheConfig(backend="taylor", interval=2, first_enhance=2, horizon="time"))
    seen = []
    for t in (1.0, 0.9, 0.7, 0.6):
        v = cache.step(t, lambda: torch.full((1, 2), 10 * t))
        seen.append(float(v[0, 0]))
    # linear in t: the forecast at t=0.7 from (1.0, 0.9) is exact
    assert seen[2] == pytest.approx(7.0)


@pytest.mark.parametrize("field,value", [
    ("backend", "pade"), ("interval", 0), ("interval", 2.5), ("history", 0), ("order", -1),
    ("sigma", 0.0), ("damping", 1.5), ("horizon", "sigma"), ("first_enhance", -1),
    ("rank_tol", 0), ("fallback", "dmd"), ("candidates", ("reuse", "nope")),
])
def test_invalid_config_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        CacheConfig(**{field: value})


def test_from_mapping_rejects_unknown_keys():
    with pytest.raises(ValueError, match="intervall"):
        CacheConfig.from_mapping({"intervall": 3})
    assert CacheConfig.from_mapping({"interval": 3}).interval == 3


def test_damping_one_is_reuse():
    cache = VelocityCache(CacheConfig(backend="taylor", interval=3, first_enhance=2, damping=1.0))
    vals = [cache.step(i, lambda i=i: torch.full((1, 2), float(i))) for i in range(4)]
    assert float(vals[2][0, 0]) == 1.0 and float(vals[3][0, 0]) == 1.0


def test_adaptive_cfg_skips_uncond_when_aligned_and_rechecks():
    calls = {"c": 0, "u": 0}
    base = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))

    def cond(i):
        calls["c"] += 1
        return base * (1 + 0.01 * i)

    def uncond(i, flip):
        calls["u"] += 1
        return -base if flip else base * (1 + 0.01 * i) * 0.9

    combine = lambda c, u: 4.0 * c - 3.0 * u
    acfg = AdaptiveCFG(gamma=0.9, warmup=2, recheck=3)
    for i in range(8):
        v = acfg.step(i, lambda: cond(i), lambda: uncond(i, flip=False), combine)
        full = combine(cond(i), uncond(i, flip=False))
        calls["c"] -= 1
        calls["u"] -= 1
        torch.testing.assert_close(v, full, rtol=1e-4, atol=1e-5)
    assert acfg.stats.cond_only >= 4 and acfg.stats.rechecks >= 1
    assert calls["u"] == acfg.stats.full
    # once the two disagree at a re-check, full CFG resumes
    for i in range(8, 16):
        acfg.step(i, lambda: cond(i), lambda: uncond(i, flip=True), combine)
    assert acfg.stats.realigned == 1 and not acfg.aligned


def test_adaptive_cfg_validates():
    with pytest.raises(ValueError, match="gamma"):
        AdaptiveCFG(gamma=2.0)


def test_forecast_time_counts_the_history_update_and_the_decisions(monkeypatch):
    """``forecast_time_s`` is all the cache's own time: the Gram update made at the first
    forecast after a computed step happens outside the forecast itself, and counts."""
    import time as time_mod

    from hicache3d.forecast.store import SnapshotStore
    real = SnapshotStore.finalize
    made = []

    def slow(self, cross=True):
        if self._pending:
            made.append(1)
            time_mod.sleep(0.02)
        return real(self, cross)
    monkeypatch.setattr(SnapshotStore, "finalize", slow)
    cache = VelocityCache(CacheConfig(backend="dmd", interval=3, first_enhance=2))
    for i in range(9):
        cache.step(i, lambda: torch.full((1, 4), float(i)))
    assert made and cache.stats.forecast > 0
    assert cache.stats.forecast_time_s >= 0.02 * len(made)
