"""The public adapter surface of ``hicache3d.patching``: an adapter written with it alone
(wrap a method, open a run, the current run and its site, a site's cache, typed per-run
state, instrument / uninstrument), on a toy Euler sampler."""
import sys
import textwrap
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import hicache3d

from hicache3d import patching
from hicache3d.patching import (AdapterState, Controller, Instrumentor, active, bind, controller_of,
                                current_run, open_run, run_wrapper, wrap_method)
from hicache3d.recipe import load_recipe

TOY = textwrap.dedent('''
    import torch

    class Sampler:
        def __init__(self):
            self.W = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)) / 5
            self.calls = 0

        def velocity(self, x, t):
            self.calls += 1
            return torch.tanh(x @ self.W) * (1 + t)

        def sample(self, x, steps=12):
            for i in range(steps):
                t = 1 - i / steps
                x = x - self.velocity(x, t) / steps
            return x
''')

RECIPE = textwrap.dedent('''
    name = "toy-api"
    adapter = "generic"
    module = "toy_api_mod"
    run = "Sampler.sample"
    package = "toy-api-dist"
    versions = ">=1.0,<2"

    [sites.main]
    step = "Sampler.velocity"
    t_arg = 1
    backend = "hermite"
    interval = 3
    first_enhance = 2
''')


@dataclass
class Seen(AdapterState):
    times: Optional[list] = None


class ToyAdapter(Instrumentor):
    """An adapter that uses nothing but the public surface."""

    def __init__(self, mod):
        self.mod = mod
        self.opened = []

    def dependencies(self):
        return ("toy-api-dist>=1.0,<2",)

    def _instrument_class(self, controller):
        def step(wrapped, instance, args, kwargs):
            run = current_run("main")
            if run is None:
                return wrapped(*args, **kwargs)
            seen = run.state(Seen)
            seen.times = (seen.times or []) + [args[1]]
            return run.cache("main").step(args[1], lambda: wrapped(*args, **kwargs))

        def opened(run):
            run.site = "main"
            self.opened.append(run)

        wrap_method(controller, self.mod.Sampler, "sample", run_wrapper(controller, on_open=opened))
        wrap_method(controller, self.mod.Sampler, "velocity", step)


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_api_mod.py").write_text(TOY)
    (tmp_path / "toy.toml").write_text(RECIPE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("toy_api_mod", None)
    import toy_api_mod
    yield toy_api_mod, load_recipe(tmp_path / "toy.toml")
    sys.modules.pop("toy_api_mod", None)


def x0():
    return torch.randn(2, 16, generator=torch.Generator().manual_seed(1))


def test_an_adapter_of_the_public_surface_caches_and_restores_exactly(toy):
    mod, recipe = toy
    s = mod.Sampler()
    ref = s.sample(x0())
    with hicache3d.accelerate(s, recipe) as built_in:      # the generic adapter, same recipe
        s.calls = 0
        expect = s.sample(x0())
        expect_calls = s.calls
    assert 0 < expect_calls < 12
    before = dict(vars(mod.Sampler))
    ctl = ToyAdapter(mod).instrument(Controller(recipe))
    s.calls = 0
    out = s.sample(x0())
    assert s.calls == expect_calls and torch.equal(out, expect)
    rec = ctl.records[-1]
    assert list(rec.sites) == ["main"]
    mine, theirs = rec.sites["main"].as_dict(), built_in.runs[0].sites["main"].as_dict()
    timed = {k for k in mine if k.endswith("_s")}
    assert {k: mine[k] for k in set(mine) - timed} == {k: theirs[k] for k in set(theirs) - timed}
    Instrumentor.uninstrument(ctl)
    assert dict(vars(mod.Sampler)) == before
    s.calls = 0
    assert torch.equal(s.sample(x0()), ref) and s.calls == 12


def test_typed_state_is_fresh_per_run_and_the_site_is_the_runs(toy):
    mod, recipe = toy
    adapter = ToyAdapter(mod)
    ctl = adapter.instrument(Controller(recipe))
    try:
        s = mod.Sampler()
        s.sample(x0(), steps=4)
        s.sample(x0(), steps=5)
    finally:
        Instrumentor.uninstrument(ctl)
    runs = adapter.opened
    assert [r.state(Seen).times for r in runs] == [[1 - i / n for i in range(n)] for n in (4, 5)]
    assert all(r.site == "main" for r in runs) and runs[0].state(Seen) is not runs[1].state(Seen)
    with pytest.raises(TypeError):
        runs[0].caches["other"] = None             # a run's caches are read-only from outside


def test_open_run_by_hand_records_failures_and_activates_only_when_asked(toy):
    _, recipe = toy
    ctl = Controller(recipe)
    with open_run(ctl, "obj") as run:
        assert current_run() is run and current_run(instance="obj") is run
        assert current_run("nope") is None
    assert current_run() is None
    with pytest.raises(ValueError):
        with open_run(ctl, "obj"):
            raise ValueError("boom")
    with open_run(ctl, "obj", activate=False) as run:
        assert current_run() is None
        with active(run):
            assert current_run() is run
    assert [r.failed for r in ctl.records] == [False, True, False]


def test_use_site_keeps_only_that_site_in_the_record(toy):
    _, recipe = toy
    ctl = Controller(recipe)
    with open_run(ctl, None) as run:
        assert run.use_site("elsewhere") is None and run.site == "elsewhere"
        assert run.cache("main") is None
    assert ctl.records[-1].sites == {}


def test_bind_returns_what_it_replaced(toy):
    _, recipe = toy

    class Obj:
        pass

    o, a, b = Obj(), Controller(recipe), Controller(recipe)
    assert bind(o, a) is None and controller_of(o) is a
    assert bind(o, b) is a and controller_of(o) is b
    patching.rebind(b, a)
    assert controller_of(o) is a
    assert bind(o, None) is a and controller_of(o) is None
    assert controller_of(1) is None                 # not weak-referenceable: bound to nothing


def test_adapters_declare_their_distribution(toy):
    _, recipe = toy
    from hicache3d.patches import adapter_class
    assert tuple(adapter_class("generic")(recipe).dependencies()) == ("toy-api-dist>=1.0,<2",)
    assert tuple(Instrumentor().dependencies()) == ()
    with pytest.raises(NotImplementedError, match="cannot patch one object"):
        Instrumentor().instrument(Controller(recipe), object())


def test_uninstall_entry_restores_the_class_and_allows_a_fresh_install():
    from hicache3d.bundled.sampler import OccupancyFlowSampler as S
    from hicache3d.inplace import install_entry, installed, uninstall_entry
    from hicache3d.patching import is_wrapped
    before = vars(S)["sample"]
    entry = {"recipe": "bundled", "module": "hicache3d.bundled.sampler", "settings": {"interval": 3}, "sites": {}}
    ctl = install_entry("bundled", entry)
    try:
        assert installed()["bundled"] is ctl and install_entry("bundled", entry) is ctl
        assert is_wrapped(S, "sample")
    finally:
        assert uninstall_entry("bundled")
    assert vars(S)["sample"] is before and not is_wrapped(S, "sample")
    assert "bundled" not in installed() and not uninstall_entry("bundled")
    ctl2 = install_entry("bundled", entry)
    try:
        assert ctl2 is not ctl and is_wrapped(S, "sample")
    finally:
        uninstall_entry("bundled")
    assert vars(S)["sample"] is before
