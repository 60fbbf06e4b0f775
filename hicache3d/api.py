"""``accelerate(pipeline)`` / ``enable`` / ``disable``: patch one pipeline object."""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Union

from .cache import CacheStats
from .patching import Controller, Instrumentor, RunRecord, bind, controller_of, rebind, use_controller
from .recipe import Recipe, RecipeError, get_recipe, known_recipes

__all__ = ["Acceleration", "accelerate", "enable", "disable", "detect_recipe", "implied_schedule"]


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
    settings_file: Optional[str] = None      # the settings file applied (``settings=``), if any

    @property
    def runs(self) -> List[RunRecord]:
        return list(self.controller.records)

    @property
    def stats(self) -> Dict[str, Any]:
        """Per site and per run: network calls made and skipped, forecasts per basis,
        fallbacks, wall time."""
        totals = self._totals()
        return {
            "recipe": self.recipe.name,
            "runs": [r.as_dict() for r in self.runs],
            "sites": {k: v.as_dict() for k, v in totals.items()},
            "network_calls": sum(r.network_calls for r in self.runs),
            "skipped_calls": sum(r.skipped_calls for r in self.runs),
            "wall_s": sum(r.wall_s for r in self.runs),
        }

    def _totals(self) -> Dict[str, CacheStats]:
        totals: Dict[str, CacheStats] = {}
        for r in self.runs:
            for site, s in r.sites.items():
                totals[site] = totals.get(site, CacheStats()).merge(s)
        return totals

    def summary(self) -> str:
        """A line for the block, then one per site over all its runs: computed / forecast,
        why steps were computed, forecasts per basis, fallbacks, and the last run's
        computed/forecast pattern."""
        s = self.stats
        lines = [f"{self.recipe.name}: {len(s['runs'])} run(s), {s['network_calls']} network calls, "
                 f"{s['skipped_calls']} skipped, {s['wall_s']:.2f} s"]
        if self.settings_file:
            lines.append(f"  settings from {self.settings_file}")
        last = self.runs[-1].sites if self.runs else {}
        for site, st in self._totals().items():
            line = f"  {site}: {st.summary()}"
            if site in last and last[site].trace:
                line += f"; last run {last[site].pattern}"
            lines.append(line)
        return "\n".join(lines)


def _settings(recipe: Recipe, settings: Mapping[str, Any],
              sites: Optional[Mapping[str, Mapping[str, Any]]]) -> Recipe:
    # None is a meaningful value of some settings (batch_dim=None: one item; num_steps)
    per_site = {k: implied_schedule(v) for k, v in (sites or {}).items()}
    return recipe.with_settings(implied_schedule(settings), per_site)


def implied_schedule(settings: Mapping[str, Any],
                     spell: Callable[[str], str] = lambda key: f"{key}=") -> Dict[str, Any]:
    """``settings`` with the schedule its keys ask for where none is named (as on the
    command line): a ``pattern`` asks for the pattern schedule (a ``tolerance`` beside it
    is that of the adaptive schedule for runs of other lengths), an ``interval`` for the
    fixed cadence, a ``tolerance`` for the adaptive schedule.  An ``interval`` with either
    of the others and no ``schedule`` is ambiguous: ``ValueError``, naming the keys as
    ``spell`` writes them (``--interval`` on the command line)."""
    settings = dict(settings)
    if settings.get("schedule") is not None:
        return settings
    asked = [(k, s) for k, s in (("pattern", "pattern"), ("interval", "fixed"), ("tolerance", "adaptive"))
             if settings.get(k) not in (None, (), "")]
    if [k for k, _ in asked] == ["pattern", "tolerance"]:
        asked = asked[:1]
    if len(asked) > 1:
        keys = " and ".join(spell(k) for k, _ in asked)
        raise ValueError(f"{keys} belong to different schedules ({', '.join(s for _, s in asked)}): "
                         f"name one with {spell('schedule')}")
    if asked:
        settings["schedule"] = asked[0][1]
    return settings


def _with_file(pipeline: Any, recipe: Union[str, Recipe, None], settings_file: Any,
               sites: Optional[Mapping[str, Mapping[str, Any]]], common: Mapping[str, Any]):
    """Merge a settings file (``hicache3d tune``'s settings.toml) under the explicit
    settings: per site, the file's values, then ``common``, then ``sites``.  Returns the
    recipe, the per-site settings and the file's path."""
    from .settings_file import load_settings
    if recipe is None:
        try:
            base = detect_recipe(pipeline)
        except RecipeError:
            base = load_settings(settings_file).model     # the file names its model
            base = get_recipe(base)
    else:
        base = _base(pipeline, recipe)
    f = load_settings(settings_file, base)
    merged = {s: dict(v) for s, v in (sites or {}).items()}
    for s, v in f.sites.items():
        merged[s] = {**dict(v), **dict(common), **merged.get(s, {})}
    return base, merged, str(f.path)


def enable(pipeline: Any, recipe: Union[str, Recipe, None] = None, *,
           sites: Optional[Mapping[str, Mapping[str, Any]]] = None,
           settings: Union[str, "os.PathLike[str]", None] = None, **overrides: Any) -> Acceleration:
    """Accelerate one pipeline object until :func:`disable`.  ``overrides`` apply to every
    site (``backend=``, ``interval=`` ...); ``sites={"shape": {"interval": 3}}`` per site;
    ``settings="tune/settings.toml"``: the per-site settings ``hicache3d tune`` wrote
    (checked: its model, sites and keys), under the explicit ones.
    Enabling an enabled pipeline replaces its settings."""
    if isinstance(pipeline, type):
        raise TypeError("enable() takes a pipeline object, not a class (use `hicache3d patch` "
                        "to accelerate every pipeline of an installed generator)")
    source = None
    if settings is not None:
        recipe, sites, source = _with_file(pipeline, recipe, settings, sites, overrides)
    handle = _enable_locked(pipeline, recipe, sites, overrides)
    handle.settings_file = source
    return handle


def _enable_locked(pipeline, recipe, sites, settings) -> Acceleration:
    with _LOCK:
        if controller_of(pipeline) is not None:
            disable(pipeline)
        base = _base(pipeline, recipe)
        handle = _enable(pipeline, _settings(base, settings, sites))
        handle.controller.base_recipe = base
        return handle


def _base(pipeline: Any, recipe: Union[str, Recipe, None]) -> Recipe:
    """The recipe asked for (a name, a ``.toml`` path, a Recipe; anything else is a clear
    TypeError), or the one matching ``pipeline``."""
    if isinstance(recipe, Recipe):
        return recipe
    return detect_recipe(pipeline) if recipe is None else get_recipe(recipe)


_LOCK = threading.RLock()       # enable / disable / entering and leaving accelerate blocks


def _enable(pipeline: Any, recipe: Recipe) -> Acceleration:
    from .patches import adapter_class
    controller = Controller(recipe)
    adapter = adapter_class(recipe.adapter)(recipe)
    try:
        adapter.instrument(controller, pipeline)
    except Exception:
        Instrumentor.uninstrument(controller)
        raise
    # the adapter may have registered the samplers the pipeline holds; the pipeline itself
    # is registered too, so that disable(pipeline) finds and undoes everything
    if controller_of(pipeline) is None:
        bind(pipeline, controller)
    handle = Acceleration(pipeline, recipe, controller)
    controller.handle = handle
    return handle


def disable(pipeline: Any) -> Optional[Acceleration]:
    """Undo :func:`enable`: the pipeline (and every sampler it holds) is restored exactly
    (inside ``accelerate`` blocks on it, this ends all of them)."""
    with _LOCK:
        controller = controller_of(pipeline)
        if controller is None:
            return None
        for c in controller.group or ():
            c.enabled = False
        if controller.group is not None:
            controller.group.clear()
        Instrumentor.uninstrument(controller)
        return getattr(controller, "handle", None)


def _enter(pipeline: Any, recipe: Union[str, Recipe, None], settings: Mapping[str, Any],
           sites: Optional[Mapping[str, Mapping[str, Any]]]) -> Acceleration:
    """Open one ``accelerate`` block: the first one on ``pipeline`` patches it; one opened
    while another is open (nested, or in another thread) shares the patches and brings
    its own settings and records."""
    with _LOCK:
        outer = controller_of(pipeline)
        if outer is None or outer.group is None or not outer.enabled:
            handle = enable(pipeline, recipe, sites=sites, **settings)
            handle.controller.group = [handle.controller]
            return handle
        base = getattr(outer, "base_recipe", None) if recipe is None else None
        base = base or _base(pipeline, recipe)
        recipe = _settings(base, settings, sites)
        if recipe.name != outer.recipe.name:
            raise RecipeError(f"{type(pipeline).__qualname__} is already accelerated with recipe "
                              f"{outer.recipe.name!r} by an enclosing accelerate block; a nested "
                              f"block must use the same recipe (leave the outer block first)")
        controller = Controller(recipe)
        controller.patches = outer.patches               # one set of patches per object
        controller.group = outer.group
        controller.group.append(controller)
        controller.base_recipe = base
        rebind(outer, controller)
        handle = Acceleration(pipeline, recipe, controller)
        controller.handle = handle
        return handle


def _leave(controller: Controller) -> None:
    """Close one ``accelerate`` block: the enclosing (or still open) block's settings apply
    again; the last one restores the pipeline exactly."""
    with _LOCK:
        group = controller.group
        controller.enabled = False
        if group is None or controller not in group:
            return                       # already ended by disable()
        group.remove(controller)
        if not group:
            Instrumentor.uninstrument(controller)
            return
        rebind(controller, group[-1])


@contextlib.contextmanager
def accelerate(pipeline: Any, recipe: Union[str, Recipe, None] = None, *,
               sites: Optional[Mapping[str, Mapping[str, Any]]] = None,
               settings: Union[str, "os.PathLike[str]", None] = None,
               **overrides: Any) -> Iterator[Acceleration]:
    """``with accelerate(pipeline, backend="dmd", interval=5) as run:`` accelerates that
    one pipeline inside the block and restores it exactly on exit; ``run.stats`` reports
    what was computed and skipped.

    ``settings="tune/settings.toml"`` applies the per-site settings ``hicache3d tune``
    wrote (its model, sites and keys are checked: a :class:`SettingsError` says what is
    wrong); explicit ``sites=`` and keyword settings win over the file's.

    Blocks may nest on one pipeline (same recipe): the inner block's settings apply inside
    it, and the outer block's again after it.  Threads may share one pipeline: each
    thread's runs use the settings of its own innermost block (a thread that opened none
    uses the latest block opened), and each block's ``runs`` holds its own runs only."""
    source = None
    if settings is not None:
        recipe, sites, source = _with_file(pipeline, recipe, settings, sites, overrides)
    handle = _enter(pipeline, recipe, overrides, sites)
    handle.settings_file = source
    try:
        with use_controller(handle.controller):
            yield handle
    finally:
        _leave(handle.controller)
