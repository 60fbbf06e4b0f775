"""``accelerate(pipeline)`` / ``enable`` / ``disable``: patch one pipeline object."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

from .cache import CacheStats
from .patching import Controller, RunRecord, _instance_controllers
from .recipe import Recipe, RecipeError, get_recipe, known_recipes

__all__ = ["Acceleration", "accelerate", "enable", "disable", "detect_recipe"]


def detect_recipe(pipeline: Any) -> Recipe:
    """The recipe whose run entry's class ``pipeline`` is an instance of."""
    from .patches import adapter_class
    names = []
    for name, recipe in known_recipes().items():
        names.append(name)
        mod = __import__("sys").modules.get(recipe.module)
        if mod is None:
            continue
        try:
            if adapter_class(recipe.adapter)(recipe).matches(pipeline):
                return recipe
        except Exception:
            continue
    raise RecipeError(f"no recipe matches a {type(pipeline).__module__}.{type(pipeline).__qualname__}; "
                      f"pass recipe=... (known: {', '.join(sorted(names))}, or a .toml path)")


@dataclass
class Acceleration:
    """Handle of one accelerated pipeline: its settings and the records of its runs."""

    pipeline: Any
    recipe: Recipe
    controller: Controller

    @property
    def runs(self) -> List[RunRecord]:
        return list(self.controller.records)

    @property
    def stats(self) -> Dict[str, Any]:
        """Per site and per run: network calls made and skipped, forecasts per basis,
        fallbacks, wall time."""
        totals: Dict[str, CacheStats] = {}
        for r in self.runs:
            for site, s in r.sites.items():
                totals[site] = totals.get(site, CacheStats()).merge(s)
        return {
            "recipe": self.recipe.name,
            "runs": [r.as_dict() for r in self.runs],
            "sites": {k: v.as_dict() for k, v in totals.items()},
            "network_calls": sum(r.network_calls for r in self.runs),
            "skipped_calls": sum(r.skipped_calls for r in self.runs),
            "wall_s": sum(r.wall_s for r in self.runs),
        }

    def summary(self) -> str:
        s = self.stats
        lines = [f"{self.recipe.name}: {len(s['runs'])} run(s), {s['network_calls']} network calls, "
                 f"{s['skipped_calls']} skipped, {s['wall_s']:.2f} s"]
        for site, d in s["sites"].items():
            lines.append(f"  {site}: {d['computed']} computed / {d['forecast']} forecast; "
                         f"per basis {d['per_basis']}; fallbacks {d['fallbacks']}")
        return "\n".join(lines)


def _settings(recipe: Recipe, settings: Mapping[str, Any],
              sites: Optional[Mapping[str, Mapping[str, Any]]]) -> Recipe:
    # None is a meaningful value of some settings (batch_dim=None: one item; num_steps)
    return recipe.with_settings(dict(settings), sites or {})


def enable(pipeline: Any, recipe: Union[str, Recipe, None] = None, *,
           sites: Optional[Mapping[str, Mapping[str, Any]]] = None, **settings: Any) -> Acceleration:
    """Accelerate one pipeline object until :func:`disable`.  ``settings`` apply to every
    site (``backend=``, ``interval=`` ...); ``sites={"shape": {"interval": 3}}`` per site."""
    from .patches import adapter_class
    if isinstance(pipeline, type):
        raise TypeError("enable() takes a pipeline object, not a class (use `hicache3d patch` "
                        "to accelerate every pipeline of an installed generator)")
    if pipeline in _instance_controllers:
        disable(pipeline)
    if recipe is None:
        recipe = detect_recipe(pipeline)
    elif isinstance(recipe, str):
        recipe = get_recipe(recipe)
    recipe = _settings(recipe, settings, sites)
    controller = Controller(recipe, scope="object")
    adapter = adapter_class(recipe.adapter)(recipe)
    try:
        adapter.install_object(pipeline, controller)
    except Exception:
        _forget(controller)
        raise
    # the adapter may have registered the samplers the pipeline holds; the pipeline itself
    # is registered too, so that disable(pipeline) finds and undoes everything
    _instance_controllers.setdefault(pipeline, controller)
    handle = Acceleration(pipeline, recipe, controller)
    controller.handle = handle
    return handle


def _forget(controller: Controller) -> None:
    """Remove every patch of ``controller`` and every object registered with it."""
    controller.enabled = False
    controller.remove_patches()
    for obj in [o for o, c in list(_instance_controllers.items()) if c is controller]:
        _instance_controllers.pop(obj, None)


def disable(pipeline: Any) -> Optional[Acceleration]:
    """Undo :func:`enable`: the pipeline (and every sampler it holds) is restored exactly."""
    controller = _instance_controllers.get(pipeline)
    if controller is None:
        return None
    _forget(controller)
    return getattr(controller, "handle", None)


@contextlib.contextmanager
def accelerate(pipeline: Any, recipe: Union[str, Recipe, None] = None, *,
               sites: Optional[Mapping[str, Mapping[str, Any]]] = None,
               **settings: Any) -> Iterator[Acceleration]:
    """``with accelerate(pipeline, backend="dmd", interval=5) as run:`` accelerates that
    one pipeline inside the block and restores it exactly on exit; ``run.stats`` reports
    what was computed and skipped."""
    handle = enable(pipeline, recipe, sites=sites, **settings)
    try:
        yield handle
    finally:
        disable(pipeline)
