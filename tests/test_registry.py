"""The basis registry: one descriptor serves config, validation, the forecaster and the CLI.

A toy basis (the mean of the two newest snapshots) is registered from this module only
and must work end to end, then be gone again."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hicache3d import CacheConfig, VelocityCache
from hicache3d.cli import _BACKENDS, main
from hicache3d.forecast import BasisSpec, Forecaster, registry


def _mean2_weights(spec, t, tq, state):
    w = np.zeros(len(t))
    w[-2:] = 0.5
    return w


@pytest.fixture
def mean2():
    basis = registry.register(registry.Basis(
        "mean2", _mean2_weights, min_history=lambda spec: (2, "it averages two snapshots"),
        summary="mean of the two newest snapshots"))
    try:
        yield basis
    finally:
        registry.unregister("mean2")


def _sampler(cache, steps=10, dim=8):
    """Toy Euler sampler; returns the velocity served at each step and the computed ones."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(dim, dim, generator=g, dtype=torch.float64) * 0.3
    x = torch.randn(2, dim, generator=g, dtype=torch.float64)
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    served, computed = [], {}
    for i in range(steps):
        def net(i=i, x=x):
            computed[i] = torch.tanh(x @ W) * (1 + ts[i])
            return computed[i]
        v = cache.step(ts[i], net)
        served.append(v.clone())
        x = x - (ts[i] - ts[i + 1]) * v
    return served, computed


def test_builtin_bases_are_the_registry():
    assert registry.basis_names() == ("reuse", "taylor", "hermite", "dmd")
    assert registry.backend_names() == ("reuse", "taylor", "hermite", "dmd", "auto")
    assert registry.fallback_names() == ("reuse", "taylor", "hermite")
    assert CacheConfig().candidates == registry.DEFAULT_CANDIDATES
    assert (CacheConfig().backend, CacheConfig().fallback) == ("dmd", "hermite")
    assert (registry.DEFAULT_BACKEND, registry.DEFAULT_FALLBACK) == ("dmd", "hermite")
    for name, p in registry.PARAMS.items():
        assert getattr(CacheConfig(), name) == p.default
        assert getattr(BasisSpec("taylor"), name) == p.default
    assert tuple(_BACKENDS.choices) == registry.backend_names()


def test_toy_basis_through_config_cache_and_cli(mean2):
    assert "mean2" in registry.backend_names()
    # its fewest snapshots reach validation
    with pytest.raises(ValueError, match="history must be >= 2 for backend 'mean2'"):
        CacheConfig(backend="mean2", history=1)
    cache = VelocityCache(CacheConfig(backend="mean2", interval=3, first_enhance=3, history=4))
    served, computed = _sampler(cache)
    forecast_steps = [i for i in range(len(served)) if i not in computed]
    assert forecast_steps, "the schedule forecast no step"
    for i in forecast_steps:
        last_two = sorted(j for j in computed if j < i)[-2:]
        expect = 0.5 * computed[last_two[0]] + 0.5 * computed[last_two[1]]
        torch.testing.assert_close(served[i], expect, rtol=1e-12, atol=1e-12)
    assert cache.forecaster.stats.per_basis["mean2"] > 0
    # a candidate of auto, and listed and accepted by the command line
    Forecaster("auto", 4, candidates=("reuse", "mean2"))
    assert "mean2" in _BACKENDS.choices
    r = CliRunner().invoke(main, ["demo", "--backend", "mean2", "--steps", "12"])
    assert r.exit_code == 0, r.output
    assert "mean2" in CliRunner().invoke(main, ["patch", "--help"]).output


def test_unregistered_basis_is_gone():
    assert "mean2" not in registry.backend_names()
    with pytest.raises(ValueError, match="backend must be one of"):
        CacheConfig(backend="mean2")
    r = CliRunner().invoke(main, ["demo", "--backend", "mean2"])
    assert r.exit_code != 0 and "mean2" in r.output


def test_register_rejects_clashes_and_unknown_parameters():
    with pytest.raises(ValueError, match="already exists"):
        registry.register(registry.Basis("dmd", _mean2_weights))
    with pytest.raises(ValueError, match="already exists"):
        registry.register(registry.Basis("auto", _mean2_weights))
    with pytest.raises(ValueError, match="unknown parameter"):
        registry.register(registry.Basis("toy", _mean2_weights, params=("width",)))
    assert "toy" not in registry.basis_names()
