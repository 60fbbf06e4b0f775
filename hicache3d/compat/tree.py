"""The seed package's tree-aware loop API (``hicache_pp.tree``), backed by hicache3d.

Velocities are nested dicts/lists/tuples of tensors (any structure
:mod:`hicache3d.tree` understands).  Hermite coefficients and DMD weights are shared
across leaves; DMD is fitted on the whole tree (its Gram matrix is the sum of the leaves').
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..forecast.polynomial import physicists_hermite as _h_scalar
from ..forecast.polynomial import scaled_hermite as _sh_scalar
from ..tree import flatten, item_cosines, map_leaves, map_pairs, unflatten
from . import hermite as _flat
from .dmd import _window, serve_dmd
from .hermite import _record, hicache_decide, hicache_reset, hicache_telemetry

__all__ = [
    "physicists_hermite", "hermite_coeff", "tree_axpy", "tree_sub_div", "tree_detach",
    "tree_cosine", "hicache_init", "hicache_decide", "hicache_reset", "hicache_telemetry",
    "hicache_update_tree", "hicache_forecast_tree", "dmd_update_snapshots_tree",
    "dmd_forecast_tree", "adaptive_cfg_init", "adaptive_cfg_decide", "guidance_term_tree",
    "forecast_guidance_tree", "reconstruct_cfg_tree",
]


def physicists_hermite(n: int, x: float) -> float:
    return _h_scalar(n, float(x))


def hermite_coeff(order: int, k: float, sigma: float) -> float:
    """``Htilde_order(k) / order!``, the scalar shared by all leaves."""
    return _sh_scalar(order, float(k), sigma) / math.factorial(order)


def tree_axpy(c: float, a: Any, b: Any) -> Any:
    return map_pairs(lambda x, y: x + c * y, a, b)


def tree_sub_div(a: Any, b: Any, d: float) -> Any:
    return map_pairs(lambda x, y: (x - y) / d, a, b)


def tree_detach(a: Any) -> Any:
    return map_leaves(lambda v: v.detach(), a)


def _snapshot(a: Any) -> Any:
    return map_leaves(lambda v: v.detach().clone(), a)


def tree_cosine(a: Any, b: Any, eps: float = 1e-12) -> float:
    return float(item_cosines(a, b, batch_dim=None)[0])


def hicache_init(num_steps, interval=4, max_order=1, first_enhance=2, end_enhance=None,
                 sigma=0.5, backend="hermite", history=5) -> Dict[str, Any]:
    if interval < 1 or max_order < 1:
        raise ValueError("interval and max_order must be >= 1")
    state = _flat.hicache_init(num_steps, interval=interval, max_order=max_order,
                               first_enhance=first_enhance, end_enhance=end_enhance,
                               sigma=sigma, backend=backend, history=history)
    state.pop("holdout", None)
    return state


def hicache_update_tree(state: Dict[str, Any], velocity_tree: Any) -> None:
    _flat.derivative_update(state, velocity_tree, lambda a, b: tree_sub_div(a, b, 1.0),
                            lambda a, d: map_leaves(lambda v: v / d, a), _snapshot)


def hicache_forecast_tree(state: Dict[str, Any]) -> Any:
    deriv = state["derivatives"]
    if 0 not in deriv:
        raise RuntimeError("hicache_forecast_tree called before any compute step")
    _record(state, "method_counts", "hermite")
    out = deriv[0]
    for order, c in _flat.hermite_coefficients(state):
        out = tree_axpy(c, out, deriv[order])
    return out


def dmd_update_snapshots_tree(state: Dict[str, Any], velocity_tree: Any, history: int = 5) -> None:
    snaps = state.setdefault("dmd_snapshots", [])
    snaps.append((int(state["activated_steps"][-1]), _snapshot(velocity_tree)))
    h = int(state.get("history", history))
    if len(snaps) > h:
        del snaps[: len(snaps) - h]


def dmd_forecast_tree(state: Dict[str, Any]) -> Any:
    """DMD on the whole tree (>= 4 equally spaced snapshots), Hermite otherwise."""
    win, reason = _window(state, "dmd_snapshots", 4)
    if win is not None:
        return serve_dmd(state, *win)
    _record(state, "fallbacks", reason)
    return hicache_forecast_tree(state)


# ----------------------------------------------------------------- Adaptive-CFG (seed API)
def adaptive_cfg_init(num_steps, gamma_bar=0.94, warmup=2, max_order=1) -> Dict[str, Any]:
    if not (0.0 <= gamma_bar <= 1.0):
        raise ValueError(f"gamma_bar must be in [0,1], got {gamma_bar}")
    return {"num_steps": int(num_steps), "gamma_bar": float(gamma_bar), "warmup": int(warmup),
            "max_order": int(max_order), "step": 0, "anchors": [], "last_gamma": None,
            "n_full": 0, "n_skip": 0}


def adaptive_cfg_decide(state: Dict[str, Any], gamma: Optional[float]) -> bool:
    """True: run the unconditional forward this step."""
    step = state["step"]
    if step < state["warmup"] or step >= state["num_steps"] - 1:
        return True
    if not state["anchors"] or gamma is None:
        return True
    return gamma < state["gamma_bar"]


def guidance_term_tree(y_cond: Any, y_uncond: Any, strength: float) -> Any:
    return map_pairs(lambda c, u: strength * (c - u), y_cond, y_uncond)


def forecast_guidance_tree(anchors: List[Tuple[int, Any]], step: int, max_order: int = 1) -> Any:
    """Newton divided-difference forecast of the guidance term at ``step`` (the core's
    exact polynomial weights on the newest ``max_order + 1`` anchors)."""
    from ..forecast.polynomial import lagrange_weights
    if not anchors:
        raise ValueError("forecast_guidance_tree requires at least one anchor")
    if len(anchors) == 1 or max_order < 1:
        return anchors[-1][1]
    used = anchors[-(max_order + 1):]
    t = np.array([float(s) for s, _ in used])
    w = lagrange_weights(t, float(step), len(used) - 1)
    flat = [flatten(g, batch_dim=None) for _, g in used]
    leaves0, spec = flat[-1]
    out = []
    for k in range(len(leaves0)):
        acc = sum(float(w[j]) * flat[j][0][k] for j in range(len(used)))
        out.append(acc)
    return unflatten(spec, out)


def reconstruct_cfg_tree(y_cond: Any, g: Any) -> Any:
    return map_pairs(lambda c, gv: c + gv, y_cond, g)
