"""The adapter interface and helpers shared by adapters."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Collection, Tuple

from hicache3d.patching import Instrumentor
from hicache3d.recipe import Recipe, RecipeError

__all__ = ["Adapter", "resolve", "time_getter"]


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


class Adapter(Instrumentor):
    """Hooks one family of samplers, as its recipe says.  ``instrument(controller)``
    patches the classes of an imported target module (in-place patching);
    ``instrument(controller, obj)`` patches one pipeline object (see
    :class:`hicache3d.patching.Instrumentor`)."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def dependencies(self) -> Collection[str]:
        """The recipe's distribution and supported version range, if it names one."""
        if not self.recipe.package:
            return ()
        return (f"{self.recipe.package}{self.recipe.versions}",)

    def run_target(self) -> Tuple[Any, str]:
        if not self.recipe.run:
            raise RecipeError(f"recipe {self.recipe.name!r} names no run entry ('run = ...')")
        return resolve(self.recipe, self.recipe.run)

    def matches(self, obj: Any) -> bool:
        """Whether ``obj`` is a pipeline this recipe can accelerate."""
        try:
            owner, _ = self.run_target()
        except RecipeError:
            return False
        return isinstance(owner, type) and isinstance(obj, owner)
