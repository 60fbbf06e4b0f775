"""TRELLIS v1 and TRELLIS.2 flow samplers (``...pipelines.samplers.flow_euler``).

Both families share one sampler design: ``FlowEulerSampler.sample`` loops over a
non-uniform ``t`` schedule (1 = noise) and calls ``sample_once`` per step, which calls
``_get_model_prediction(model, x_t, t, cond, **kw) -> (pred_x_0, pred_eps, pred_v)``.
``_get_model_prediction`` calls ``self._inference_model``, where the CFG mixins run one or
two network forwards and combine them (TRELLIS.2 also applies ``guidance_rescale`` there).

What is hooked
    * run: ``sample`` (one call = one run; the cascades of TRELLIS.2, which call the shape
      sampler twice, therefore start from a fresh state each time);
    * step: ``_get_model_prediction``.  Its ``pred_v`` is the **final** velocity of the
      step, after CFG, guidance interval and rescale, so a forecast step saves every
      forward of that step.  On a forecast step the adapter returns
      ``(*self._v_to_xstart_eps(x_t, t, v), v)`` computed from the forecast ``v``; on a
      computed step it returns the sampler's own tuple unchanged.  Because the hook sits
      above ``_inference_model``, the per-object ``_inference_model`` replacement of
      TRELLIS v1's ``run_multi_image`` (``inject_sampler_multi_image``) runs inside it and
      is accelerated too (in "stochastic" mode the images then cycle over the computed
      steps rather than over all steps).

Which site a run belongs to (the rule)
    1. A sampler reached through a pipeline attribute named in the recipe's ``[samplers]``
       table (``accelerate(pipeline)``) belongs to that attribute's site.
    2. Otherwise (class patching in place, or ``accelerate(sampler)``) the first step of a
       run decides by the latent: a dense tensor is ``sparse_structure``; a sparse tensor
       is ``slat`` (v1), or for TRELLIS.2 ``tex_slat`` when the call carries
       ``concat_cond`` (the texture stage's shape latent) and ``shape_slat`` otherwise.
    A run whose site the recipe does not list runs uncached.

Families: both install the module ``trellis.pipelines.samplers.flow_euler`` (PyPI
``trellis-3d-ms`` for v1, ``trellis-3d-python`` for TRELLIS.2).  They are told apart by the
sampler class: TRELLIS.2 defines ``_pred_to_xstart`` and its CFG takes
``guidance_strength``; v1 takes ``cfg_strength``.  The recipe's ``family`` names the one it
supports; patching the other one is refused with a clear message.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Optional

from hicache3d.patching import (AdapterState, Controller, Run, bind, bound_arguments, current_run, is_wrapped,
                                run_wrapper, steps_getter, swap_class, wrap_method)
from hicache3d.recipe import RecipeError

from .base import Adapter, resolve

_FAMILIES = ("trellis", "trellis2")
_DEFAULT_SAMPLERS = {
    "trellis": {"sparse_structure_sampler": "sparse_structure", "slat_sampler": "slat"},
    "trellis2": {"sparse_structure_sampler": "sparse_structure", "shape_slat_sampler": "shape_slat",
                 "tex_slat_sampler": "tex_slat"},
}


@dataclass
class _State(AdapterState):
    pinned: Optional[str] = None    # the site pinned by a pipeline attribute (rule 1)


# sampler object -> site, for samplers reached through a pipeline attribute (rule 1)
_pinned_sites: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def family_of(sampler_cls: Any) -> str:
    """``"trellis2"`` for TRELLIS.2 samplers, ``"trellis"`` for v1 (by the class's methods)."""
    if hasattr(sampler_cls, "_pred_to_xstart"):
        return "trellis2"
    try:
        params = inspect.signature(sampler_cls._inference_model).parameters
    except (TypeError, ValueError, AttributeError):
        params = {}
    return "trellis2" if "guidance_strength" in params else "trellis"


def is_sparse(x: Any) -> bool:
    return hasattr(x, "feats") and hasattr(x, "coords") and callable(getattr(x, "replace", None))


def site_by_call(family: str, x_t: Any, kwargs: Dict[str, Any]) -> str:
    """Rule 2 of the module docstring."""
    if not is_sparse(x_t):
        return "sparse_structure"
    if family == "trellis":
        return "slat"
    return "tex_slat" if kwargs.get("concat_cond") is not None else "shape_slat"


class _Pin:
    """A patch-like object: while applied, pins a sampler's site (rule 1) and, if given,
    registers a controller for it; ``remove`` restores what was there."""

    def __init__(self, sampler: Any, site: Optional[str], controller: Optional[Controller]):
        self.sampler, self.site, self.controller = sampler, site, controller
        self.applied = False

    def apply(self) -> bool:
        if self.site is None and self.controller is None:
            return False
        self._had = _pinned_sites.get(self.sampler)
        if self.site is not None:
            _pinned_sites[self.sampler] = self.site
        if self.controller is not None:
            self._had_ctl = bind(self.sampler, self.controller)
        self.applied = True
        return True

    def remove(self) -> None:
        if not self.applied:
            return
        if self.site is not None:
            if self._had is None:
                _pinned_sites.pop(self.sampler, None)
            else:
                _pinned_sites[self.sampler] = self._had
        if self.controller is not None:
            bind(self.sampler, self._had_ctl)
        self.applied = False


def _on_open(run: Run) -> None:
    try:
        pinned = _pinned_sites.get(run.instance)
    except TypeError:
        pinned = None
    if pinned is not None:
        run.state(_State).pinned = pinned


def sample_wrapper(default: Optional[Controller]):
    """``sample``: one call is one run; the run length is taken from its ``steps``."""
    return run_wrapper(default, on_open=_on_open, steps_of=steps_getter("steps"))


def prediction_wrapper(family: str):
    """``_get_model_prediction(model, x_t, t, cond=None, **kw) -> (pred_x_0, pred_eps, pred_v)``:
    forecast ``pred_v`` (the CFG-combined velocity) on skipped steps."""

    def wrapper(wrapped, instance, args, kwargs):
        run = current_run(instance=instance)
        if run is None:
            return wrapped(*args, **kwargs)
        if run.site is None:            # the first step decides the run's site
            b = bound_arguments(wrapped, args, kwargs)
            x_t = b.arguments.get("x_t") if b is not None else (args[1] if len(args) > 1 else None)
            extra = dict(b.arguments.get("kwargs", {})) if b is not None else dict(kwargs)
            run.use_site(run.state(_State).pinned or site_by_call(family, x_t, extra))  # only it is recorded
        cache = run.cache(run.site)
        if cache is None:
            return wrapped(*args, **kwargs)
        x_t = kwargs["x_t"] if "x_t" in kwargs else args[1]
        t = kwargs["t"] if "t" in kwargs else args[2]
        full = []

        def compute():
            out = wrapped(*args, **kwargs)
            full.append(out)
            return out[2]

        v = cache.step(t, compute)
        if full:
            return full[0]
        pred_x_0, pred_eps = instance._v_to_xstart_eps(x_t=x_t, t=t, v=v)
        return pred_x_0, pred_eps, v

    return wrapper


class TrellisAdapter(Adapter):
    """Adapter of the ``trellis`` and ``trellis2`` recipes (``family`` in the recipe)."""

    def __init__(self, recipe):
        super().__init__(recipe)
        self.family = str(recipe.extra.get("family", "trellis"))
        if self.family not in _FAMILIES:
            raise RecipeError(f"recipe {recipe.name!r}: family must be one of {', '.join(_FAMILIES)}")
        samplers = recipe.extra.get("samplers", _DEFAULT_SAMPLERS[self.family])
        self.samplers: Dict[str, str] = {str(k): str(v) for k, v in dict(samplers).items()}

    # ---------------------------------------------------------------- targets
    def _base(self) -> Any:
        owner, _ = resolve(self.recipe, "FlowEulerSampler.sample")
        return owner

    def _check_family(self, cls: Any) -> None:
        found = family_of(cls)
        if found != self.family:
            names = {"trellis": "TRELLIS v1 (cfg_strength)", "trellis2": "TRELLIS.2 (guidance_strength)"}
            raise RecipeError(f"recipe {self.recipe.name!r} is for {names[self.family]}, but the installed "
                              f"{self.recipe.module} is {names[found]}; use --model {found}")

    def _samplers_of(self, obj: Any) -> Dict[str, Any]:
        """``{site: sampler}`` of a pipeline object (rule 1), or ``{None: obj}`` for a sampler."""
        base = self._base()
        if isinstance(obj, base):
            return {None: obj}
        out = {}
        for attr, site in self.samplers.items():
            s = getattr(obj, attr, None)
            if isinstance(s, base):
                out[site] = s
        return out

    def matches(self, obj: Any) -> bool:
        try:
            base = self._base()
        except RecipeError:
            return False
        if family_of(base) != self.family:
            return False
        return bool(self._samplers_of(obj))

    # ---------------------------------------------------------------- install
    def _instrument_class(self, controller: Controller) -> None:
        base = self._base()
        self._check_family(base)
        wrap_method(controller, base, "sample", sample_wrapper(controller))
        wrap_method(controller, base, "_get_model_prediction", prediction_wrapper(self.family))

    def _instrument_object(self, obj: Any, controller: Controller) -> None:
        base = self._base()
        self._check_family(base)
        samplers = self._samplers_of(obj)
        if not samplers:
            raise RecipeError(f"recipe {self.recipe.name!r}: {type(obj).__name__} is neither a "
                              f"FlowEulerSampler nor a pipeline with one of the attributes "
                              f"{', '.join(self.samplers)}")
        bind(obj, controller)
        # under an in-place class patch the class-level wrappers serve these objects: they
        # only need our controller registered (and their site pinned)
        class_patched = is_wrapped(base, "sample")
        sites = {s.name for s in self.recipe.sites}
        for site, sampler in samplers.items():
            if site is not None and site not in sites:
                continue
            controller.add_patch(_Pin(sampler, site, controller if class_patched and sampler is not obj else None))
            if class_patched:
                continue
            swap_class(controller, sampler, {"sample": sample_wrapper(controller),
                                             "_get_model_prediction": prediction_wrapper(self.family)})
