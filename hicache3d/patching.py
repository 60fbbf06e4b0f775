"""The patch engine: reversible wrappers, runs, and per-run cache state.

* A **patch** replaces one attribute (a method on a class, a method on one object, or the
  class of one object) with a wrapt wrapper and restores it exactly on ``remove()``.
  Applying a patch that is already there is a no-op.
* A **controller** holds the settings of one recipe in one scope (a class patched in
  place, or one pipeline object) and collects the statistics of its runs.
* A **run** is one call of a sampling entry point.  Its state (one ``VelocityCache`` per
  site) lives in a context variable, so two threads, or two pipelines, never see each
  other's state; a run that raises leaves nothing behind; a new run always starts fresh.

The public surface for adapters (``hicache3d/patches/``) and tests is ``__all__``:

* :class:`Instrumentor` -- the base of an adapter: :meth:`~Instrumentor.instrument` (a
  class in place, or one object), :meth:`~Instrumentor.uninstrument`, and the
  :meth:`~Instrumentor.dependencies` it declares;
* patches -- :func:`wrap_method` and :func:`swap_class` (applied and kept by a controller),
  :func:`is_wrapped`; :class:`AttributePatch` / :class:`ClassSwapPatch` for patch-like
  objects of one's own;
* objects -- :func:`bind` (route one object's runs to a controller), :func:`controller_of`,
  :func:`rebind` (move all of one controller's objects to another);
* runs -- :func:`run_wrapper` / :func:`generator_run_wrapper` (an entry point becomes one
  run; ``steps_of``, e.g. :func:`steps_getter`, tells its caches the run's step count),
  :func:`open_run` and :func:`active` (the same by hand), :func:`current_run`;
  :func:`bound_arguments` (a call's arguments by name, defaults applied);
  :meth:`Run.cache` (a site's cache), :attr:`Run.site` / :meth:`Run.use_site` (the site a
  run belongs to), :meth:`Run.state` (typed per-run adapter state, an :class:`AdapterState`);
* steps -- :func:`step_wrapper`; :func:`uncached` for reference runs.

Everything else here is private.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import threading
import time
import weakref
from collections import Counter, deque
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import (Any, Callable, Collection, Deque, Dict, Iterator, List, Mapping, Optional, Tuple,
                    Type, TypeVar)

import wrapt

from .cache import CacheStats, VelocityCache
from .recipe import Recipe

__all__ = ["AdapterState", "AttributePatch", "ClassSwapPatch", "Controller", "Instrumentor", "Run",
           "RunRecord", "active", "bind", "bound_arguments", "controller_of", "current_run",
           "generator_run_wrapper", "is_wrapped", "open_run", "rebind", "run_wrapper", "step_wrapper",
           "steps_getter", "swap_class", "uncached", "use_controller", "wrap_method"]

S = TypeVar("S", bound="AdapterState")

_MARK = "_hicache3d_wrapper"
_RUNS: contextvars.ContextVar[Tuple["Run", ...]] = contextvars.ContextVar("hicache3d_runs", default=())
_UNCACHED: contextvars.ContextVar[bool] = contextvars.ContextVar("hicache3d_uncached", default=False)


def _marked(obj: Any) -> bool:
    return getattr(obj, _MARK, False) is True


def is_wrapped(owner: Any, name: str) -> bool:
    """Whether the class ``owner`` itself holds a hicache3d wrapper as ``name`` (for
    instance because the class is patched in place); ``False`` for a non-class."""
    return _marked(vars(owner).get(name)) if isinstance(owner, type) else False


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


class AdapterState:
    """Base of the typed per-run state of an adapter: subclass it as a dataclass whose
    fields all have defaults, and get this run's instance with ``run.state(MyState)``."""


class Run:
    """State of one sampling run: a fresh cache per site, and the adapters' state."""

    def __init__(self, controller: "Controller", instance: Any, sites: Optional[List[str]] = None):
        self.controller = controller
        self.instance = instance
        names = sites if sites is not None else [s.name for s in controller.recipe.sites]
        self._caches: Dict[str, VelocityCache] = {n: controller.take_cache(n) for n in names}
        self.extra: Counter = Counter()
        #: the site this run belongs to, once an adapter has decided it (else ``None``)
        self.site: Optional[str] = None
        self._states: Dict[type, AdapterState] = {}
        self.t0 = time.perf_counter()

    @property
    def caches(self) -> Mapping[str, VelocityCache]:
        """``{site: cache}`` of this run (read-only)."""
        return MappingProxyType(self._caches)

    def cache(self, site: str) -> Optional[VelocityCache]:
        """The cache of ``site`` in this run, or ``None`` when the run does not have it."""
        return self._caches.get(site)

    def use_site(self, site: str) -> Optional[VelocityCache]:
        """Declare the one site this run belongs to: the others are dropped from the run
        (and from its record).  Returns the site's cache (``None``: not a site of the run,
        which then runs uncached)."""
        self.site = site
        self._caches = {k: v for k, v in self._caches.items() if k == site}
        return self._caches.get(site)

    def state(self, kind: Type[S]) -> S:
        """This run's instance of the adapter state class ``kind`` (made on first use)."""
        st = self._states.get(kind)
        if st is None:
            st = self._states[kind] = kind()
        return st  # type: ignore[return-value]

    def record(self, failed: bool) -> RunRecord:
        return RunRecord(self.controller.recipe.name, {k: c.stats for k, c in self._caches.items()},
                         time.perf_counter() - self.t0, failed, self.extra)


class Controller:
    """Settings of one recipe in one scope, and the records of its runs."""

    def __init__(self, recipe: Recipe, keep: int = 256):
        self.recipe = recipe
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

    def _open_run(self, instance: Any, sites: Optional[List[str]] = None) -> Run:
        return Run(self, instance, sites)

    def _close_run(self, run: Run, failed: bool) -> None:
        record = run.record(failed)
        with self._lock:
            self.records.append(record)
        pool = self._pool.__dict__.setdefault("caches", {})
        for site, cache in run._caches.items():
            if failed:                      # nothing of a failed run is kept
                cache.forecaster.reset()
            free = pool.setdefault(site, [])
            if len(free) < 2:
                free.append(cache)

    def add_patch(self, patch: Any) -> bool:
        """Apply ``patch`` (anything with ``apply()`` / ``remove()``) and keep it, to be
        removed with the others; a patch that was already there is not kept."""
        if patch.apply():
            self.patches.append(patch)
            return True
        return False

    def remove_patches(self) -> None:
        for p in reversed(self.patches):
            p.remove()
        self.patches.clear()


def current_run(site: Optional[str] = None, instance: Any = None) -> Optional[Run]:
    """The innermost active run of this thread/context (having ``site``, if given; of
    ``instance``, if given)."""
    for run in reversed(_RUNS.get()):
        if site is not None and site not in run._caches:
            continue
        if instance is not None and run.instance is not instance:
            continue
        return run
    return None


# ------------------------------------------------------------------ patches


def wrap_method(controller: Controller, owner: Any, name: str, wrapper: Callable) -> bool:
    """Wrap ``owner.name`` (a class, or one object) with the wrapt-style ``wrapper``
    (``wrapper(wrapped, instance, args, kwargs)``), kept by ``controller`` until its patches
    are removed.  ``False`` when a hicache3d wrapper was already there (left alone)."""
    return controller.add_patch(AttributePatch(owner, name, wrapper, controller.recipe.name))


def swap_class(controller: Controller, obj: Any, wrappers: Dict[str, Callable]) -> bool:
    """Give the one object ``obj`` a private subclass whose methods ``wrappers`` names are
    wrapped (special methods such as ``__call__`` need this), kept by ``controller``."""
    return controller.add_patch(ClassSwapPatch(obj, wrappers, controller.recipe.name))


# ------------------------------------------------------------------ objects

# controllers of objects patched one by one (accelerate / enable), and of classes
_instance_controllers: "weakref.WeakKeyDictionary[Any, Controller]" = weakref.WeakKeyDictionary()


def controller_of(obj: Any) -> Optional[Controller]:
    """The controller ``obj``'s runs are routed to (``None``: none, or not weak-referenceable)."""
    try:
        return _instance_controllers.get(obj)
    except TypeError:
        return None


def bind(obj: Any, controller: Optional[Controller]) -> Optional[Controller]:
    """Route the runs of ``obj`` to ``controller`` (``None``: to none); returns the
    controller it replaced, so that ``bind(obj, previous)`` undoes it."""
    previous = controller_of(obj)
    if controller is None:
        _instance_controllers.pop(obj, None)
    else:
        _instance_controllers[obj] = controller
    return previous


def _bound_to(controller: Controller) -> List[Any]:
    return [o for o, c in list(_instance_controllers.items()) if c is controller]


def rebind(old: Controller, new: Optional[Controller]) -> None:
    """Every object bound to ``old`` is bound to ``new`` (``None``: to none)."""
    for obj in _bound_to(old):
        bind(obj, new)


# ------------------------------------------------------------------ runs


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


@contextlib.contextmanager
def use_controller(controller: Controller) -> Iterator[Controller]:
    """Inside the block, runs of this context on the objects of ``controller``'s group
    (nested or concurrent ``accelerate`` blocks on one object) use ``controller``."""
    token = _SCOPED.set(_SCOPED.get() + (controller,))
    try:
        yield controller
    finally:
        _SCOPED.reset(token)


def _controller_for(instance: Any, default: Optional[Controller]) -> Optional[Controller]:
    if _UNCACHED.get():
        return None
    ctl = controller_of(instance)
    if ctl is not None and ctl.group is not None:
        for c in reversed(_SCOPED.get()):
            if c.group is ctl.group and c.enabled:
                ctl = c
                break
    ctl = ctl or default
    return ctl if ctl is not None and ctl.enabled else None


@contextlib.contextmanager
def active(run: Run) -> Iterator[Run]:
    """Make ``run`` the current run of this context inside the block."""
    token = _RUNS.set(_RUNS.get() + (run,))
    try:
        yield run
    finally:
        _RUNS.reset(token)


@contextlib.contextmanager
def open_run(controller: Controller, instance: Any, sites: Optional[List[str]] = None, *,
             on_open: Optional[Callable[[Run], None]] = None,
             on_close: Optional[Callable[[Run], None]] = None,
             activate: bool = True) -> Iterator[Run]:
    """One run of ``controller`` on ``instance``, for the block: fresh caches for
    ``sites`` (default: the recipe's), then ``on_open(run)`` (it may raise to refuse the
    run), and the run is current inside the block (``activate=False``: only inside
    :func:`active` blocks, for code that hands control back and forth).  On leaving,
    ``on_close(run)`` (its errors are ignored) and the run is recorded; a block left by an
    exception records a failed run and keeps nothing of it (closing a generator early is
    not a failure)."""
    run = controller._open_run(instance, sites)
    failed = True
    try:
        if on_open is not None:
            on_open(run)
        if activate:
            with active(run):
                yield run
        else:
            yield run
        failed = False
    except GeneratorExit:
        failed = False
        raise
    finally:
        if on_close is not None:
            try:
                on_close(run)
            except Exception:
                pass
        controller._close_run(run, failed)


def _opener(on_open: Optional[Callable[[Run], None]], steps: Optional[int]) -> Callable[[Run], None]:
    """What a run does as it opens: ``on_open(run)``, then its caches learn the run's
    number of ``steps`` (when known)."""

    def opened(run: Run) -> None:
        if on_open is not None:
            on_open(run)
        if steps is not None:
            for cache in run.caches.values():
                cache.reset(steps)

    return opened


def run_wrapper(default: Optional[Controller], sites: Optional[List[str]] = None,
                on_open: Optional[Callable[[Run], None]] = None,
                steps_of: Optional[Callable[[Any, tuple, dict], Optional[int]]] = None) -> Callable:
    """A wrapt wrapper that makes each call of the wrapped entry point one run (of the
    controller bound to the called object, else of ``default``; none: a plain call).
    ``steps_of(wrapped, args, kwargs)``: the run's number of steps, read from the call
    (``None``: unknown); the run's caches then know it (``VelocityCache.reset``)."""

    def wrapper(wrapped, instance, args, kwargs):
        ctl = _controller_for(instance, default)
        if ctl is None:
            return wrapped(*args, **kwargs)
        opened = _opener(on_open, steps_of(wrapped, args, kwargs) if steps_of is not None else None)
        with open_run(ctl, instance, sites, on_open=opened):
            return wrapped(*args, **kwargs)

    return wrapper


def bound_arguments(wrapped: Any, args: tuple, kwargs: dict) -> Optional[inspect.BoundArguments]:
    """The arguments of one call of ``wrapped``, defaults applied (``None``: they do not
    fit its signature, or it has none)."""
    try:
        b = inspect.signature(wrapped).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    b.apply_defaults()
    return b


def steps_getter(spec: Any) -> Optional[Callable[[Any, tuple, dict], Optional[int]]]:
    """Reads a run's step count from the call of its entry point: ``spec`` names the
    argument (a keyword name, or a position not counting ``self``); an argument left out
    takes the entry point's default.  ``None``: the count is not read."""
    if spec is None:
        return None

    def get(wrapped: Any, args: tuple, kwargs: dict) -> Optional[int]:
        if isinstance(spec, int):
            v = args[spec] if len(args) > spec else None
        elif spec in kwargs:
            v = kwargs[spec]
        else:
            b = bound_arguments(wrapped, args, kwargs)
            v = b.arguments.get(spec) if b is not None else None
        return int(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else None

    return get


def generator_run_wrapper(default: Optional[Controller],
                          on_open: Optional[Callable[[Run, tuple, dict], None]] = None,
                          on_close: Optional[Callable[[Run], None]] = None,
                          sites: Optional[List[str]] = None,
                          steps_of: Optional[Callable[[Any, tuple, dict], Optional[int]]] = None) -> Callable:
    """Like :func:`run_wrapper`, for an entry point that is a *generator function*
    (``solve_iter``): the run opens at the first ``next()``, is active only while the
    wrapped generator runs (never while the consumer holds control between items), and
    closes when it is exhausted, closed early, or raises.  ``on_open(run, args, kwargs)``
    may raise to refuse the run (nothing stays behind); ``steps_of`` as for
    :func:`run_wrapper`."""

    def wrapper(wrapped, instance, args, kwargs):
        ctl = _controller_for(instance, default)
        if ctl is None:
            return wrapped(*args, **kwargs)
        opened = _opener(None if on_open is None else (lambda run: on_open(run, args, kwargs)),
                         steps_of(wrapped, args, kwargs) if steps_of is not None else None)

        def gen():
            it = None
            with open_run(ctl, instance, sites, on_open=opened, on_close=on_close, activate=False) as run:
                try:
                    it = wrapped(*args, **kwargs)
                    while True:
                        with active(run):
                            try:
                                item = next(it)
                            except StopIteration as stop:
                                return stop.value
                        yield item
                finally:
                    if it is not None:
                        it.close()

        return gen()

    return wrapper


def step_wrapper(site: str, t_of: Callable[[tuple, dict], Any],
                 instance_filter: Optional[Callable[[Run, Any], bool]] = None) -> Callable:
    """A wrapt wrapper that routes each call of a per-step velocity callable through the
    active run's cache for ``site`` (outside a run it just calls through)."""

    def wrapper(wrapped, instance, args, kwargs):
        run = current_run(site)
        if run is None or (instance_filter is not None and not instance_filter(run, instance)):
            return wrapped(*args, **kwargs)
        return run._caches[site].step(t_of(args, kwargs), lambda: wrapped(*args, **kwargs))

    return wrapper


# ------------------------------------------------------------------ adapters


class Instrumentor:
    """The base of an adapter (modelled on OpenTelemetry's ``BaseInstrumentor``).

    A subclass implements ``_instrument_class(controller)`` (patch the classes of the
    imported target module, for in-place patching) and/or ``_instrument_object(obj,
    controller)`` (patch one pipeline object), with :func:`wrap_method`,
    :func:`swap_class` and :func:`bind`, keeping every patch on ``controller``; and may
    declare :meth:`dependencies`.  Callers use only the public methods."""

    def dependencies(self) -> Collection[str]:
        """The distributions (PEP 508 requirements) the instrumented code comes from."""
        return ()

    def instrument(self, controller: Controller, obj: Any = None) -> Controller:
        """Patch ``obj`` (one pipeline object), or with ``obj=None`` the target classes in
        place; every patch is kept on ``controller``."""
        if obj is None:
            self._instrument_class(controller)
        else:
            self._instrument_object(obj, controller)
        return controller

    @staticmethod
    def uninstrument(controller: Controller) -> None:
        """Undo :meth:`instrument`: remove ``controller``'s patches (in reverse order) and
        unbind every object bound to it.  Its runs stop at once."""
        controller.enabled = False
        controller.remove_patches()
        rebind(controller, None)

    def _instrument_class(self, controller: Controller) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot patch classes in place")

    def _instrument_object(self, obj: Any, controller: Controller) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot patch one object")
