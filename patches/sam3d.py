"""SAM 3D Objects (``sam3d_objects``, vendored by PyPI ``sam3d``) and Fast-SAM3D.

Both stages of SAM 3D (sparse structure, structured latent) are ``ShortCut`` flow-matching
generators that hand their velocity function to an ODE solver:

* **one run** is one call of ``ODESolver.solve_iter(dynamics_fn, x_init, times, *args)``
  (a generator function: the run stays open while it is iterated, and closes when it is
  exhausted, closed, or raises);
* **one step** is one call of ``Euler.step(dynamics_fn, x_t, t, dt, *args)``; the adapter
  hands ``Euler.step`` a velocity function that goes through the run's cache, so what is
  forecast is the velocity the solver integrates: the **CFG-combined** output of
  ``ClassifierFreeGuidance`` (two backbone forwards while ``1000 t`` is in the guidance
  interval, one outside it; a forecast step saves both, or the one).

**Which site a run belongs to** is read from the structure of ``x_init`` when the run
opens: a dict (``shape``, ``6drotation_normalized``, ``scale``, ``translation``,
``translation_scale``) is the ``sparse_structure`` stage, a tensor (``[1, N, 8]``, N differs
per object) the ``slat`` stage.  A generator can name its site explicitly with an
attribute ``hicache3d_site = "slat"`` (looked up on the object that owns
``dynamics_fn``), which wins over the structure rule.

**Solvers.**  Only Euler steps are accelerated: ``Midpoint`` / ``RungeKutta4`` call the
velocity function 2 / 4 times per step at intermediate points (a step-indexed forecast
would be fed the wrong history) and ``SDE`` adds noise after the velocity; a run of those
solvers raises :class:`UnsupportedSolverError` naming the solver and the fix
(``solver_method="euler"``, or leave acceleration off for that generator).  A solver is
Euler when a class named ``Euler`` is in its MRO and no subclass below it overrides
``step`` (the Fast-SAM3D fork's ``Euler`` returns ``(x, v)``, which passes through).

**Adaptive CFG** (site option ``adaptive_cfg = true``; ``cfg_gamma``, ``cfg_warmup``,
``cfg_recheck``): on computed steps inside the guidance interval the generator's
``ClassifierFreeGuidance.inner_forward`` is routed through
:class:`hicache3d.cfg.AdaptiveCFG`, which skips the unconditional forward while the
conditional and unconditional velocities stay aligned and forecasts the guidance term.

**Fast-SAM3D** (adapter ``fast_sam3d``): the fork's solver returns ``(x, v)`` from ``step``
and ``solve_iter`` yields ``(x_t, t, v)``; both pass through unchanged.  Site option
``native``:

* ``sparse_structure``: the fork's ``ShortCut_faster._generate_dynamics`` runs its own
  TaylorSeer (full steps on its schedule, a Taylor forecast on the others).
  ``native = "swap"`` keeps its schedule and replaces its forecast by ours: on its full
  steps the velocity is pushed into our forecaster, on its cache steps our forecast is
  returned (and stored as its ``prev_v``).  ``native = "keep"`` leaves it alone.
* ``slat``: the fork's ``Euler_end_slat`` solver skips steps itself (TeaCache-like, plus
  token carving).  ``native = "keep"`` leaves it alone; ``native = "replace"`` replaces its
  ``step`` by an Euler step whose velocity comes from our cache (its own skip and carving
  are not used; its ``solve_iter`` bookkeeping still runs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from hicache3d.cfg import AdaptiveCFG
from hicache3d.patching import (AdapterState, Controller, Run, bind, bound_arguments, current_run,
                                generator_run_wrapper, is_wrapped, swap_class, wrap_method)
from hicache3d.recipe import RecipeError

from .base import Adapter

SS, SLAT = "sparse_structure", "slat"
SOLVER_MODULE = "sam3d_objects.model.backbone.generator.flow_matching.solver"


class UnsupportedSolverError(RuntimeError):
    """The recipe cannot accelerate this solver correctly, so it refuses to run it."""


@dataclass
class _State(AdapterState):
    """What the run's opening decided (the site itself is ``run.site``)."""

    generator: Any = None                   # the object owning ``dynamics_fn``
    mode: str = "cache"                     # "cache", "swap", "replace" or "off" (see module doc)
    cfg_module: Any = None                  # the ClassifierFreeGuidance module under adaptive CFG
    acfg: Optional[AdaptiveCFG] = None


# ------------------------------------------------------------------ classification


def _class_named(obj: Any, name: str) -> Optional[type]:
    for c in type(obj).__mro__:
        if c.__name__ == name:
            return c
    return None


def is_euler(solver: Any) -> bool:
    """A class named ``Euler`` is in the MRO and nothing below it overrides ``step``."""
    euler = _class_named(solver, "Euler")
    if euler is None:
        return False
    for c in type(solver).__mro__:
        if c is euler:
            return True
        if getattr(c, "_hicache3d_base", None) is None and "step" in vars(c):
            return False
    return True


def has_native_skip(solver: Any) -> bool:
    """Fast-SAM3D's ``Euler_end_slat``: a solver with its own skip state."""
    return _class_named(solver, "Euler_end_slat") is not None or (
        hasattr(solver, "cache_dic") and hasattr(solver, "full_steps"))


def has_native_taylorseer(gen: Any) -> bool:
    """Fast-SAM3D's ``ShortCut_faster``: a generator with its own TaylorSeer state."""
    return gen is not None and hasattr(gen, "ss_params") and hasattr(gen, "cache_dic") and hasattr(gen, "current")


def site_of(x_init: Any, owner: Any) -> str:
    explicit = getattr(owner, "hicache3d_site", None)
    if isinstance(explicit, str):
        return explicit
    return SS if isinstance(x_init, dict) else SLAT


def _args_of_solve_iter(args: tuple, kwargs: dict):
    fn = args[0] if args else kwargs.get("dynamics_fn")
    x_init = args[1] if len(args) > 1 else kwargs.get("x_init")
    return fn, x_init


def _steps_of_solve_iter(wrapped: Any, args: tuple, kwargs: dict) -> Optional[int]:
    """A run's step count: one Euler step between each two neighbours of its ``times``
    (``solve_iter(dynamics_fn, x_init, times, ...)``; ``None`` if it has no length)."""
    b = bound_arguments(wrapped, args, kwargs)
    times = b.arguments.get("times") if b is not None else None
    try:
        n = len(times) - 1
    except TypeError:
        return None
    return n if n >= 1 else None


# ------------------------------------------------------------------ per-step helpers


def _forced_step(run: Run, site: str, t: Any, velocity: Optional[Any], full: bool) -> Any:
    """Push ``velocity`` (``full``) or return a forecast, through the site's cache (its
    statistics and trace), on a schedule decided elsewhere (the fork's own TaylorSeer
    schedule)."""
    return run.cache(site).step(t, lambda: velocity, force_compute=full, force_forecast=not full)


class SAM3DAdapter(Adapter):
    """``sam3d`` recipe: Euler solver, both stages cached at ``Euler.step``."""

    fast = False

    # ---------------------------------------------------------------- options
    def options(self, run: Run, site: str) -> Dict[str, Any]:
        return dict(run.controller.recipe.site(site).options)

    # ---------------------------------------------------------------- run open
    def _open(self, run: Run, args: tuple, kwargs: dict) -> None:
        fn, x_init = _args_of_solve_iter(args, kwargs)
        owner = getattr(fn, "__self__", None)
        site = site_of(x_init, owner)
        if site not in run.caches:
            raise RecipeError(f"recipe {run.controller.recipe.name!r} has no site {site!r} "
                              f"(sites: {', '.join(run.caches)})")
        solver = run.instance
        st = run.state(_State)
        run.site, st.generator, st.mode = site, owner, "cache"
        opts = self.options(run, site)
        native = opts.get("native")
        if self.fast and site == SS and has_native_taylorseer(owner):
            if native not in ("swap", "keep"):
                raise RecipeError(f"site {site!r}: native must be 'swap' or 'keep', got {native!r}")
            st.mode = "swap" if native == "swap" else "off"
        elif self.fast and has_native_skip(solver):
            if native not in ("replace", "keep"):
                raise RecipeError(f"site {site!r}: native must be 'replace' or 'keep', got {native!r}")
            st.mode = "replace" if native == "replace" else "off"
        elif not is_euler(solver):
            raise UnsupportedSolverError(
                f"hicache3d ({run.controller.recipe.name}): the {type(solver).__name__} solver of the "
                f"{site} stage is not supported: only Euler steps can be accelerated correctly "
                f"(Midpoint/RK4 evaluate the velocity at intermediate points, SDE adds noise). "
                f"Build the generator with solver_method='euler', or turn acceleration off for it "
                f"(hicache3d.disable / `hicache3d unpatch --model {run.controller.recipe.name}`).")
        if opts.get("adaptive_cfg") and st.mode != "off":
            cfg = getattr(owner, "reverse_fn", None)
            if cfg is None or not hasattr(cfg, "inner_forward") or not hasattr(cfg, "_cfg_step"):
                raise RecipeError(f"site {site!r}: adaptive_cfg needs a ClassifierFreeGuidance reverse_fn")
            if _class_named(cfg, "PointmapCFG") is not None:
                raise UnsupportedSolverError("adaptive_cfg does not support PointmapCFG (three forwards)")
            st.cfg_module = cfg
            st.acfg = AdaptiveCFG(
                gamma=float(opts.get("cfg_gamma", 0.94)), warmup=int(opts.get("cfg_warmup", 2)),
                recheck=int(opts.get("cfg_recheck", 3)), batch_dim=run.cache(site).config.batch_dim)
            wrap_method(run.controller, cfg, "inner_forward", _cfg_wrapper(cfg))

    def _close(self, run: Run) -> None:
        acfg = run.state(_State).acfg
        if acfg is not None:
            run.extra["cfg_uncond_skipped"] += acfg.stats.cond_only
            run.extra["cfg_full"] += acfg.stats.full

    # ---------------------------------------------------------------- wrappers
    def run_wrapper(self, default: Optional[Controller]) -> Callable:
        return generator_run_wrapper(default, on_open=self._open, on_close=self._close,
                                     steps_of=_steps_of_solve_iter)

    def step_wrapper(self) -> Callable:
        def wrapper(wrapped, instance, args, kwargs):
            run = current_run()
            if run is None or run.instance is not instance or run.site is None:
                return wrapped(*args, **kwargs)
            mode, site = run.state(_State).mode, run.site
            if mode == "off":
                return wrapped(*args, **kwargs)
            fn = args[0] if args else kwargs.pop("dynamics_fn")
            rest = args[1:]
            if mode == "replace":          # Fast-SAM3D slat: our Euler step instead of theirs
                return _replace_step(run, site, instance, fn, *rest, **kwargs)
            return wrapped(_cached_fn(run, site, fn, mode), *rest, **kwargs)
        return wrapper

    # ---------------------------------------------------------------- install
    def _solver_classes(self) -> List[type]:
        owner, _ = self.run_target()
        mod = __import__(owner.__module__, fromlist=["_"])
        out = [owner]
        if self.fast and hasattr(mod, "Euler_end_slat"):
            out.append(mod.Euler_end_slat)
        return out

    def _instrument_class(self, controller: Controller) -> None:
        owner, name = self.run_target()
        mod = __import__(owner.__module__, fromlist=["_"])
        solve_owners = [cls for cls in self._solver_classes() if cls is owner or "solve_iter" in vars(cls)]
        step_owners = [mod.Euler] if hasattr(mod, "Euler") else []
        if self.fast and hasattr(mod, "Euler_end_slat"):
            step_owners.append(mod.Euler_end_slat)
        for cls in solve_owners:
            wrap_method(controller, cls, "solve_iter", self.run_wrapper(controller))
        for cls in step_owners:
            wrap_method(controller, cls, "step", self.step_wrapper())

    @staticmethod
    def solvers_of(obj: Any) -> List[Any]:
        """The solvers behind ``obj``: a solver, a generator (``_solver``), or an inference
        pipeline (``ss_generator`` / ``slat_generator``)."""
        if hasattr(obj, "solve_iter") and hasattr(obj, "step"):
            return [obj]
        if hasattr(obj, "_solver"):
            return [obj._solver]
        out = []
        for name in ("ss_generator", "slat_generator"):
            gen = getattr(obj, name, None)
            if gen is not None and hasattr(gen, "_solver"):
                out.append(gen._solver)
        return out

    def matches(self, obj: Any) -> bool:
        try:
            owner, _ = self.run_target()
        except RecipeError:
            return False
        return any(isinstance(s, owner) for s in self.solvers_of(obj))

    def _instrument_object(self, obj: Any, controller: Controller) -> None:
        solvers = self.solvers_of(obj)
        if not solvers:
            raise RecipeError(f"recipe {self.recipe.name!r}: {type(obj).__name__} is not a SAM 3D solver, "
                              f"generator or inference pipeline")
        bind(obj, controller)
        owner, name = self.run_target()
        if is_wrapped(owner, name):
            return
        for s in solvers:
            bind(s, controller)
            swap_class(controller, s, {"solve_iter": self.run_wrapper(None), "step": self.step_wrapper()})


class FastSAM3DAdapter(SAM3DAdapter):
    """``fast-sam3d`` recipe: the fork's solver form and its own accelerations (see module doc)."""

    fast = True


# ------------------------------------------------------------------ velocity functions


def _cached_fn(run: Run, site: str, fn: Callable, mode: str) -> Callable:
    cache = run.cache(site)
    gen = run.state(_State).generator

    if mode == "swap":
        def swapped(x_t, t, *args, **kwargs):
            v = fn(x_t, t, *args, **kwargs)            # the fork's TaylorSeer runs its schedule
            full = gen.current.get("type") == "full"
            out = _forced_step(run, site, t, v, full)
            if not full:
                gen.prev_v = out
            return out
        return swapped

    def cached(x_t, t, *args, **kwargs):
        return cache.step(t, lambda: fn(x_t, t, *args, **kwargs))
    return cached


def _replace_step(run: Run, site: str, solver: Any, fn: Callable, x_t: Any, t: Any, dt: Any,
                  *args: Any, **kwargs: Any):
    from sam3d_objects.data.utils import tree_tensor_map
    v = run.cache(site).step(t, lambda: fn(x_t, t, *args, **kwargs))
    x = tree_tensor_map(lambda a, b: a + b * dt, x_t, v)
    current = getattr(solver, "current", None)
    if isinstance(current, dict) and "step" in current:
        current["step"] += 1
    return x, v


def _cfg_wrapper(module: Any) -> Callable:
    def wrapper(wrapped, _instance, args, kwargs):
        run = current_run()
        if run is None or run.state(_State).cfg_module is not module:
            return wrapped(*args, **kwargs)
        x, t, is_cond, strength, *cond_args = args
        if is_cond:
            return wrapped(*args, **kwargs)
        acfg = run.state(_State).acfg
        cache = run.cache(run.site)
        acfg.step_index = cache.step_index        # positions in the sampler's own step index

        def uncond():
            a, k = module._make_unconditional_args(tuple(cond_args), dict(kwargs))
            return module.backbone(x, t, *a, **k)

        return acfg.step(t, lambda: module.backbone(x, t, *cond_args, **kwargs), uncond,
                         lambda c, u: module._cfg_step(c, u, strength))
    return wrapper
