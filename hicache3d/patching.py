"""The patch engine: reversible wrappers, runs, and per-run cache state.

* A **patch** replaces one attribute (a method on a class, a method on one object, or the
  class of one object) with a wrapt wrapper and restores it exactly on ``remove()``.
  Applying a patch that is already there is a no-op.
* A **controller** holds the settings of one recipe in one scope (a class patched in
  place, or one pipeline object) and collects the statistics of its runs.
* A **run** is one call of a sampling entry point.  Its state (one ``VelocityCache`` per
  site) lives in a context variable, so two threads, or two pipelines, never see each
  other's state; a run that raises leaves nothing behind; a new run always starts fresh.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import time
import weakref
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import wrapt

from .cache import CacheStats, VelocityCache
from .recipe import Recipe

__all__ = ["AttributePatch", "ClassSwapPatch", "Controller", "Run", "RunRecord",
           "current_run", "run_wrapper", "step_wrapper", "uncached"]

_MARK = "_hicache3d_wrapper"
_RUNS: contextvars.ContextVar[Tuple["Run", ...]] = contextvars.ContextVar("hicache3d_runs", default=())
_UNCACHED: contextvars.ContextVar[bool] = contextvars.ContextVar("hicache3d_uncached", default=False)


def _marked(obj: Any) -> bool:
    return getattr(obj, _MARK, False) is True


class _Wrapper(wrapt.FunctionWrapper):
    """A wrapt function wrapper recognisable as ours."""

    def __init__(self, wrapped: Any, wrapper: Callable, label: str):
        super().__init__(wrapped, wrapper)
        self._self_label = label

    @property
    def _hicache3d_wrapper(self) -> bool:  # noqa: D401 - marker
        return True


class AttributePatch:
    """Wrap ``owner.name`` (a class or an object attribute) and restore it exactly."""

    def __init__(self, owner: Any, name: str, wrapper: Callable, label: str = ""):
        self.owner, self.name, self.wrapper, self.label = owner, name, wrapper, label
        self.applied = False

    def apply(self) -> bool:
        d = vars(self.owner)
        if _marked(d.get(self.name)):
            return False
        self._had = self.name in d
        self._orig = d.get(self.name)
        raw = d[self.name] if self._had and isinstance(self.owner, type) else getattr(self.owner, self.name)
        setattr(self.owner, self.name, _Wrapper(raw, self.wrapper, self.label))
        self.applied = True
        return True

    def remove(self) -> None:
        if not self.applied:
            return
        if self._had:
            setattr(self.owner, self.name, self._orig)
        else:
            try:
                delattr(self.owner, self.name)
            except AttributeError:
                pass
        self.applied = False


class ClassSwapPatch:
    """Give one object a private subclass whose methods are wrapped; restore its class.

    Special methods such as ``__call__`` are looked up on the type, so per-object patching
    of them needs a per-object class; every other object of the class is untouched."""

    def __init__(self, obj: Any, wrappers: Dict[str, Callable], label: str = ""):
        self.obj, self.wrappers, self.label = obj, wrappers, label
        self.applied = False

    def apply(self) -> bool:
        cls = type(self.obj)
        if getattr(cls, "_hicache3d_base", None) is not None:
            return False
        ns = {"_hicache3d_base": cls, "__module__": cls.__module__,
              "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
        for name, w in self.wrappers.items():
            ns[name] = _Wrapper(getattr(cls, name), w, self.label)
        self.sub = type(cls.__name__, (cls,), ns)
        self.base = cls
        object.__setattr__(self.obj, "__class__", self.sub)
        self.applied = True
        return True

    def remove(self) -> None:
        if self.applied and type(self.obj) is self.sub:
            object.__setattr__(self.obj, "__class__", self.base)
        self.applied = False


@dataclass
class RunRecord:
    """Statistics of one finished run."""

    recipe: str
    sites: Dict[str, CacheStats]
    wall_s: float
    failed: bool = False
    extra: Counter = field(default_factory=Counter)

    @property
    def network_calls(self) -> int:
        return sum(s.computed for s in self.sites.values())

    @property
    def skipped_calls(self) -> int:
        return sum(s.forecast for s in self.sites.values()) + self.extra.get("wasted_steps_skipped", 0)

    def as_dict(self) -> Dict[str, Any]:
        return {"recipe": self.recipe, "wall_s": round(self.wall_s, 6), "failed": self.failed,
                "network_calls": self.network_calls, "skipped_calls": self.skipped_calls,
                "extra": dict(self.extra),
                "sites": {k: v.as_dict() for k, v in self.sites.items()}}


class Run:
    """State of one sampling run: a fresh cache per site."""

    def __init__(self, controller: "Controller", instance: Any, sites: Optional[List[str]] = None):
        self.controller = controller
        self.instance = instance
        names = sites if sites is not None else [s.name for s in controller.recipe.sites]
        self.caches: Dict[str, VelocityCache] = {n: controller.take_cache(n) for n in names}
        self.extra: Counter = Counter()
        self.scratch: Dict[str, Any] = {}
        self.t0 = time.perf_counter()

    def cache(self, site: str) -> Optional[VelocityCache]:
        return self.caches.get(site)

    def record(self, failed: bool) -> RunRecord:
        return RunRecord(self.controller.recipe.name, {k: c.stats for k, c in self.caches.items()},
                         time.perf_counter() - self.t0, failed, self.extra)


class Controller:
    """Settings of one recipe in one scope, and the records of its runs."""

    def __init__(self, recipe: Recipe, scope: str = "class", keep: int = 256):
        self.recipe = recipe
        self.scope = scope
        self.enabled = True
        self.records: Deque[RunRecord] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._pool = threading.local()
        self.patches: List[Any] = []
        # the controllers of nested / concurrent ``accelerate`` blocks on one object share one
        # list (innermost last) and one set of patches; see ``controller_for``
        self.group: Optional[List["Controller"]] = None

    def take_cache(self, site: str) -> VelocityCache:
        """A reset cache for ``site``: reused from this thread's pool (its buffers stay
        allocated between runs), or a new one."""
        free = self._pool.__dict__.setdefault("caches", {}).get(site)
        if free:
            cache = free.pop()
            cache.runs.clear()
            cache.reset()
            return cache
        return VelocityCache(self.recipe.site(site).config)

    def open_run(self, instance: Any, sites: Optional[List[str]] = None) -> Run:
        return Run(self, instance, sites)

    def close_run(self, run: Run, failed: bool) -> None:
        record = run.record(failed)
        with self._lock:
            self.records.append(record)
        pool = self._pool.__dict__.setdefault("caches", {})
        for site, cache in run.caches.items():
            if failed:                      # nothing of a failed run is kept
                cache.forecaster.reset()
            free = pool.setdefault(site, [])
            if len(free) < 2:
                free.append(cache)

    def remove_patches(self) -> None:
        for p in reversed(self.patches):
            p.remove()
        self.patches.clear()


def current_run(site: Optional[str] = None, instance: Any = None) -> Optional[Run]:
    """The innermost active run of this thread/context (having ``site``, if given)."""
    for run in reversed(_RUNS.get()):
        if site is not None and site not in run.caches:
            continue
        if instance is not None and run.instance is not instance:
            continue
        return run
    return None


# controllers of objects patched one by one (accelerate / enable), and of classes
_instance_controllers: "weakref.WeakKeyDictionary[Any, Controller]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def uncached():
    """``with uncached():`` every patched sampler of this thread/context runs its original
    code, whatever is patched (in place or by ``accelerate``): no run opens, no step is
    forecast, and an enclosing run sees none of the calls.  For reference runs."""
    off, runs = _UNCACHED.set(True), _RUNS.set(())
    try:
        yield
    finally:
        _RUNS.reset(runs)
        _UNCACHED.reset(off)


# the ``accelerate`` blocks open in this context (innermost last): a run uses the settings
# of the innermost block of its own thread, even while another thread's block on the same
# object is open
_SCOPED: contextvars.ContextVar[Tuple[Controller, ...]] = contextvars.ContextVar("hicache3d_scoped",
                                                                                 default=())


def controller_for(instance: Any, default: Optional[Controller]) -> Optional[Controller]:
    if _UNCACHED.get():
        return None
    try:
        ctl = _instance_controllers.get(instance)
    except TypeError:
        ctl = None
    if ctl is not None and ctl.group is not None:
        for c in reversed(_SCOPED.get()):
            if c.group is ctl.group and c.enabled:
                ctl = c
                break
    ctl = ctl or default
    return ctl if ctl is not None and ctl.enabled else None


def run_wrapper(default: Optional[Controller], sites: Optional[List[str]] = None,
                on_open: Optional[Callable[[Run], None]] = None) -> Callable:
    """A wrapt wrapper that makes each call of the wrapped entry point one run."""

    def wrapper(wrapped, instance, args, kwargs):
        ctl = controller_for(instance, default)
        if ctl is None:
            return wrapped(*args, **kwargs)
        run = ctl.open_run(instance, sites)
        if on_open is not None:
            on_open(run)
        token = _RUNS.set(_RUNS.get() + (run,))
        failed = True
        try:
            out = wrapped(*args, **kwargs)
            failed = False
            return out
        finally:
            _RUNS.reset(token)
            ctl.close_run(run, failed)

    return wrapper


def step_wrapper(site: str, t_of: Callable[[tuple, dict], Any],
                 instance_filter: Optional[Callable[[Run, Any], bool]] = None) -> Callable:
    """A wrapt wrapper that routes each call of a per-step velocity callable through the
    active run's cache for ``site`` (outside a run it just calls through)."""

    def wrapper(wrapped, instance, args, kwargs):
        run = current_run(site)
        if run is None or (instance_filter is not None and not instance_filter(run, instance)):
            return wrapped(*args, **kwargs)
        return run.caches[site].step(t_of(args, kwargs), lambda: wrapped(*args, **kwargs))

    return wrapper
