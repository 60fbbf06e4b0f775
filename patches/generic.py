"""The generic adapter: a run entry and per-step velocity callables named in a recipe.

A user's own TOML is enough to accelerate any sampler whose velocity comes from one
method or function per step::

    name = "my-sampler"
    adapter = "generic"
    module = "my_pkg.sampling"
    run = "Sampler.sample"               # one call = one run (state resets)
    steps_arg = "steps"                  # optional: the run's step count (name or position),
                                         # for last_enhance and per-length schedule patterns
    [sites.main]
    step = "Sampler.velocity"            # returns the (final, CFG-combined) velocity
    t_arg = "t"                          # name or position of the time argument (optional)
    backend = "dmd"
    interval = 4
"""
from __future__ import annotations

from typing import Any

from hicache3d.patching import (Controller, bind, is_wrapped, run_wrapper, step_wrapper, steps_getter,
                                swap_class, wrap_method)
from hicache3d.recipe import RecipeError

from .base import Adapter, resolve, time_getter


class GenericAdapter(Adapter):
    def _steps(self):
        out = []
        for site in self.recipe.sites:
            if not site.step:
                raise RecipeError(f"recipe {self.recipe.name!r}: site {site.name!r} needs 'step = ...'")
            owner, name = resolve(self.recipe, site.step)
            out.append((site, owner, name))
        return out

    def _instrument_class(self, controller: Controller) -> None:
        owner, name = self.run_target()
        steps = self._steps()                   # every target resolved before any is patched
        wrap_method(controller, owner, name, run_wrapper(controller, steps_of=steps_getter(self.recipe.steps_arg)))
        for site, sowner, sname in steps:
            wrap_method(controller, sowner, sname, step_wrapper(site.name, time_getter(site.t_arg)))

    def _targets(self, obj: Any):
        """``obj`` itself if it is a sampler of the run class, else the samplers among its
        attributes (a pipeline holding its sampler, e.g. ``generator.sampler``)."""
        owner, _ = self.run_target()
        if isinstance(owner, type) and isinstance(obj, owner):
            return [obj]
        return [v for v in vars(obj).values() if isinstance(owner, type) and isinstance(v, owner)] \
            if hasattr(obj, "__dict__") else []

    def matches(self, obj: Any) -> bool:
        try:
            return bool(self._targets(obj))
        except RecipeError:
            return False

    def _instrument_object(self, obj: Any, controller: Controller) -> None:
        targets = self._targets(obj)
        if not targets:
            owner, name = self.run_target()
            raise RecipeError(f"recipe {self.recipe.name!r} runs {owner.__qualname__}.{name}, and "
                              f"{type(obj).__qualname__} neither is one nor holds one")
        for target in targets:
            self._install_one(target, controller)

    def _install_one(self, obj: Any, controller: Controller) -> None:
        bind(obj, controller)
        owner, name = self.run_target()
        if is_wrapped(owner, name):
            return
        wrappers = {name: run_wrapper(None, steps_of=steps_getter(self.recipe.steps_arg))}
        for site, sowner, sname in self._steps():
            w = step_wrapper(site.name, time_getter(site.t_arg))
            if isinstance(sowner, type) and isinstance(obj, sowner):
                wrappers[sname] = w
            else:
                wrap_method(controller, sowner, sname, w)
        swap_class(controller, obj, wrappers)
