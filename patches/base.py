"""The adapter interface and helpers shared by adapters."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional, Tuple

from hicache3d.patching import (AttributePatch, ClassSwapPatch, Controller, _instance_controllers,
                                run_wrapper)
from hicache3d.recipe import Recipe, RecipeError


def resolve(recipe: Recipe, dotted: str) -> Tuple[Any, str]:
    """``"Class.method"`` (in the recipe's module) or ``"pkg.mod:Class.method"`` ->
    ``(owner, attribute name)``."""
    if ":" in dotted:
        mod_name, path = dotted.split(":", 1)
    else:
        mod_name, path = recipe.module, dotted
    try:
        owner: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise RecipeError(f"recipe {recipe.name!r}: cannot import {mod_name!r} ({e})") from None
    parts = path.split(".")
    for p in parts[:-1]:
        if not hasattr(owner, p):
            raise RecipeError(f"recipe {recipe.name!r}: {mod_name}.{'.'.join(parts[:-1])} not found")
        owner = getattr(owner, p)
    if not hasattr(owner, parts[-1]):
        raise RecipeError(f"recipe {recipe.name!r}: {mod_name}:{path} not found")
    return owner, parts[-1]


def time_getter(spec: Any) -> Callable[[tuple, dict], Any]:
    """Reads the time argument by name or position (``None``: no time, steps only)."""
    if spec is None:
        return lambda args, kwargs: 0.0
    if isinstance(spec, int):
        return lambda args, kwargs: args[spec] if len(args) > spec else 0.0
    return lambda args, kwargs: kwargs.get(spec, 0.0)


class Adapter:
    """Hooks one family of samplers.  ``install_class`` patches the classes of an imported
    target module (in-place patching); ``install_object`` patches one pipeline object."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def run_target(self) -> Tuple[Any, str]:
        if not self.recipe.run:
            raise RecipeError(f"recipe {self.recipe.name!r} names no run entry ('run = ...')")
        return resolve(self.recipe, self.recipe.run)

    def install_class(self, controller: Controller) -> None:
        raise NotImplementedError

    def install_object(self, obj: Any, controller: Controller) -> None:
        raise NotImplementedError

    def matches(self, obj: Any) -> bool:
        """Whether ``obj`` is a pipeline this recipe can accelerate."""
        try:
            owner, _ = self.run_target()
        except RecipeError:
            return False
        return isinstance(owner, type) and isinstance(obj, owner)

    @staticmethod
    def register_object(obj: Any, controller: Controller) -> None:
        _instance_controllers[obj] = controller

    @staticmethod
    def _already_class_patched(owner: Any, name: str) -> bool:
        from hicache3d.patching import _marked
        return _marked(vars(owner).get(name)) if isinstance(owner, type) else False


def generator_run_wrapper(default: Optional[Controller],
                          on_open: Optional[Callable[[Any, tuple, dict], None]] = None,
                          on_close: Optional[Callable[[Any], None]] = None,
                          sites: Optional[list] = None) -> Callable:
    """Like :func:`hicache3d.patching.run_wrapper`, for an entry point that is a *generator
    function* (``solve_iter``): the run opens at the first ``next()``, is active only while
    the wrapped generator runs (never while the consumer holds control between items), and
    closes when it is exhausted, closed early, or raises.  ``on_open(run, args, kwargs)``
    may raise to refuse the run (nothing stays behind)."""
    from hicache3d.patching import _RUNS, controller_for

    def wrapper(wrapped, instance, args, kwargs):
        ctl = controller_for(instance, default)
        if ctl is None:
            return wrapped(*args, **kwargs)

        def gen():
            run = ctl.open_run(instance, sites)
            failed = True
            it = None
            try:
                if on_open is not None:
                    on_open(run, args, kwargs)
                it = wrapped(*args, **kwargs)
                while True:
                    token = _RUNS.set(_RUNS.get() + (run,))
                    try:
                        item = next(it)
                    except StopIteration as stop:
                        failed = False
                        return stop.value
                    finally:
                        _RUNS.reset(token)
                    try:
                        yield item
                    except GeneratorExit:
                        failed = False
                        raise
            finally:
                if it is not None:
                    it.close()
                if on_close is not None:
                    try:
                        on_close(run)
                    except Exception:
                        pass
                ctl.close_run(run, failed)

        return gen()

    return wrapper
