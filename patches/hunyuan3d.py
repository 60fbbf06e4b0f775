"""Hunyuan3D-2 (``hy3dgen``) and Hunyuan3D-2.1 (``hy3dshape``) shape pipelines.

One run is one call of ``Hunyuan3DDiTFlowMatchingPipeline.__call__``.  Each Euler step
calls ``self.model(latents_in, timestep, cond, guidance=...)`` once, on the CFG batch
``[cond; uncond]`` (``[2B, L, 64]``), or on ``[B, L, 64]`` for guidance-distilled "turbo"
models; the pipeline combines CFG after the call.  The adapter forecasts that model output
(both halves of the CFG batch, each fitted on its own), so a skipped step saves the whole
batched forward.

The schedule's sigmas end with a repeated 1.0, so the last step has ``dt = 0``: its
network call cannot change the result.  The adapter skips it (returns zeros, which the
pipeline multiplies by ``dt = 0``) and reports it as ``wasted_steps_skipped``.

The run's step count (``len(sigmas)`` or ``len(timesteps)`` where given, else
``num_inference_steps``) reaches the cache, so a site may hold a searched pattern per step
count (``schedule="pattern"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from hicache3d.patching import (AdapterState, Controller, Run, bind, bound_arguments, current_run, is_wrapped,
                                run_wrapper, steps_getter, swap_class, wrap_method)

from .base import Adapter

SITE = "shape"


@dataclass
class _State(AdapterState):
    sigmas: Optional[List[float]] = None   # the scheduler's sigmas, read at the first step
    last: Any = None                       # the latest model output (shape of the skipped one)


def _model_step_wrapper(model: Any):
    def wrapper(wrapped, _instance, args, kwargs):
        run = current_run(SITE)
        if run is None or getattr(run.instance, "model", None) is not model:
            return wrapped(*args, **kwargs)
        cache = run.cache(SITE)
        st = run.state(_State)
        sigmas = st.sigmas
        if sigmas is None:      # read once per run (set_timesteps ran before the loop)
            sig = getattr(getattr(run.instance, "scheduler", None), "sigmas", None)
            sigmas = sig.tolist() if isinstance(sig, torch.Tensor) and sig.dim() == 1 else []
            st.sigmas = sigmas
        i = cache.step_index
        last = st.last
        if last is not None and i == len(sigmas) - 2 and sigmas[i + 1] == sigmas[i]:
            run.extra["wasted_steps_skipped"] += 1
            cache.skip()
            return torch.zeros_like(last)
        t = args[1] if len(args) > 1 else kwargs.get("t", kwargs.get("timestep", 0.0))
        out = cache.step(t, lambda: wrapped(*args, **kwargs))
        st.last = out
        return out
    return wrapper


def _run_steps(wrapped: Any, args: tuple, kwargs: dict) -> Optional[int]:
    """The number of Euler steps of one call: an explicit schedule's length (``sigmas`` /
    ``timesteps``), else ``num_inference_steps`` (``None``: not known)."""
    b = bound_arguments(wrapped, args, kwargs)
    if b is None:
        return None
    for key in ("sigmas", "timesteps"):
        v = b.arguments.get(key)
        if v is not None:
            try:
                return len(v) or None
            except TypeError:
                return None
    return steps_getter("num_inference_steps")(wrapped, (), dict(b.arguments))


class Hunyuan3DAdapter(Adapter):
    def _on_open(self, controller: Controller):
        def on_open(run: Run) -> None:
            model = getattr(run.instance, "model", None)
            if model is None:
                return
            wrap_method(controller, model, "forward", _model_step_wrapper(model))
        return on_open

    def _instrument_class(self, controller: Controller) -> None:
        owner, name = self.run_target()
        wrap_method(controller, owner, name, run_wrapper(controller, on_open=self._on_open(controller),
                                                         steps_of=_run_steps))

    def _instrument_object(self, obj: Any, controller: Controller) -> None:
        bind(obj, controller)
        owner, name = self.run_target()
        if is_wrapped(owner, name):
            return
        swap_class(controller, obj, {name: run_wrapper(None, on_open=self._on_open(controller), steps_of=_run_steps)})
