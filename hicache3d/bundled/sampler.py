"""Euler flow sampler of the bundled generator, shaped like the
sparse-structure sampler of TRELLIS (``FlowEulerGuidanceIntervalSampler``).

Schedule
    ``t = linspace(1, 0, steps + 1)`` rescaled by ``t' = r t / (1 + (r - 1) t)``
    with ``r = rescale_t``; the state starts as pure noise at ``t = 1`` and
    takes Euler steps ``x_{t_prev} = x_t - (t - t_prev) * v``.

Guidance
    Inside ``cfg_interval = (lo, hi)`` (``lo <= t <= hi``) and for
    ``cfg_strength != 0`` the velocity is ``(1 + s) * v(cond) - s * v(neg_cond)``
    using two network forwards; outside it, one forward with ``cond``.

Hooks for an external engine
    :meth:`OccupancyFlowSampler.sample` is the per-run entry and
    :meth:`OccupancyFlowSampler.velocity` returns the final guided velocity
    of one step and is the only place where the network is called, always
    through ``self.velocity``; so wrapping the two methods on an instance
    (or the class) intercepts every run and every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch


def rescaled_timesteps(steps: int, rescale_t: float = 1.0) -> List[float]:
    """The ``steps + 1`` time values from 1 to 0 used by :class:`OccupancyFlowSampler`."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    t = rescale_t * t / (1 + (rescale_t - 1) * t)
    return [float(v) for v in t]


@dataclass
class SampleOutput:
    """Result of :meth:`OccupancyFlowSampler.sample`.

    ``samples`` is the final state (at t = 0).  ``pred_x_t`` / ``pred_x_0``
    hold the per-step states and clean-sample predictions when the sampler
    was asked to keep the trajectory, and are empty otherwise.
    """

    samples: torch.Tensor
    timesteps: List[float]
    pred_x_t: List[torch.Tensor] = field(default_factory=list)
    pred_x_0: List[torch.Tensor] = field(default_factory=list)
    network_forwards: int = 0


class OccupancyFlowSampler:
    """Rectified-flow Euler sampler with classifier-free guidance in a t-interval.

    Convention: ``x_t = (1 - t) x_0 + t * eps``, network predicts ``v = eps - x_0``.
    ``model(x_t, t, cond)`` takes ``t`` as a ``(B,)`` float tensor in [0, 1].
    """

    def __init__(self, keep_trajectory: bool = False):
        self.keep_trajectory = keep_trajectory
        self.network_forwards = 0  # running count of network calls made by velocity()

    @staticmethod
    def timesteps(steps: int, rescale_t: float = 1.0) -> List[float]:
        return rescaled_timesteps(steps, rescale_t)

    @staticmethod
    def in_cfg_interval(t: float, cfg_strength: float, cfg_interval: Sequence[float]) -> bool:
        return cfg_strength != 0 and cfg_interval[0] <= t <= cfg_interval[1]

    def _forward(self, model, x_t: torch.Tensor, t: float, cond: torch.Tensor) -> torch.Tensor:
        self.network_forwards += 1
        tt = torch.full((x_t.shape[0],), float(t), dtype=x_t.dtype, device=x_t.device)
        return model(x_t, tt, cond)

    def velocity(
        self,
        model,
        x_t: torch.Tensor,
        t: float,
        cond: torch.Tensor,
        neg_cond: torch.Tensor,
        cfg_strength: float,
        cfg_interval: Sequence[float],
    ) -> torch.Tensor:
        """Final (guided) velocity at ``(x_t, t)``; the only network call site."""
        if self.in_cfg_interval(t, cfg_strength, cfg_interval):
            v_cond = self._forward(model, x_t, t, cond)
            v_neg = self._forward(model, x_t, t, neg_cond)
            return (1 + cfg_strength) * v_cond - cfg_strength * v_neg
        return self._forward(model, x_t, t, cond)

    def sample_once(self, model, x_t, t, t_prev, cond, neg_cond, cfg_strength, cfg_interval):
        """One Euler step: returns ``(x_{t_prev}, predicted x_0)``."""
        v = self.velocity(model, x_t, t, cond, neg_cond, cfg_strength, cfg_interval)
        return x_t - (t - t_prev) * v, x_t - t * v

    @torch.no_grad()
    def sample(
        self,
        model,
        noise: torch.Tensor,
        cond: torch.Tensor,
        neg_cond: torch.Tensor,
        steps: int = 25,
        cfg_strength: float = 1.0,
        cfg_interval: Tuple[float, float] = (0.5, 1.0),
        rescale_t: float = 3.0,
        progress: Optional[Callable[[int, int, float], None]] = None,
    ) -> SampleOutput:
        """Run the sampler from ``noise`` (the state at t = 1).

        ``progress``, if given, is called as ``progress(i, steps, t)`` after
        step ``i`` (0-based).
        """
        ts = self.timesteps(steps, rescale_t)
        start = self.network_forwards
        out = SampleOutput(samples=noise, timesteps=ts)
        x = noise
        for i, (t, t_prev) in enumerate(zip(ts[:-1], ts[1:])):
            x, x0 = self.sample_once(model, x, t, t_prev, cond, neg_cond, cfg_strength, cfg_interval)
            if self.keep_trajectory:
                out.pred_x_t.append(x)
                out.pred_x_0.append(x0)
            if progress is not None:
                progress(i, steps, t)
        out.samples = x
        out.network_forwards = self.network_forwards - start
        return out
