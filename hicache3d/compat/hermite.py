"""The seed package's HiCache loop API on flat tensors, backed by hicache3d's core.

Same state dict, same schedule, same finite differences and Hermite forecast as
``hicache_pp.hermite``: switch an integration by changing its import.
"""
from __future__ import annotations

import math
import uuid
from copy import deepcopy
from typing import Any, Dict, Optional

import torch

from ..forecast.polynomial import physicists_hermite as _h_scalar
from ..forecast.polynomial import scaled_hermite as _sh_scalar

__all__ = ["hicache_init", "hicache_decide", "hicache_reset", "hicache_update_derivatives",
           "hicache_forecast", "hicache_telemetry", "physicists_hermite", "scaled_hermite"]


def _new_telemetry() -> Dict[str, Any]:
    return {"decisions": {"full": 0, "forecast": 0},
            "method_counts": {"hermite": 0, "dmd": 0, "reuse": 0}, "fallbacks": {}}


def _telemetry(state: Dict[str, Any]) -> Dict[str, Any]:
    tel = state.setdefault("telemetry", _new_telemetry())
    for k in ("decisions", "method_counts", "fallbacks"):
        tel.setdefault(k, {})
    return tel


def _record(state: Dict[str, Any], group: str, key: str) -> None:
    d = _telemetry(state)[group]
    d[key] = int(d.get(key, 0)) + 1


def hicache_telemetry(state: Dict[str, Any]) -> Dict[str, Any]:
    """A detached copy of the decision / method / fallback counters."""
    return deepcopy(_telemetry(state))


def physicists_hermite(n: int, x: torch.Tensor) -> torch.Tensor:
    """``H_n(x)`` elementwise (tensor version of the core's recurrence)."""
    if n < 0:
        raise ValueError(f"Hermite order must be >= 0, got {n}")
    if not isinstance(x, torch.Tensor):
        return _h_scalar(n, float(x))
    h_prev, h = torch.ones_like(x), 2.0 * x
    if n == 0:
        return h_prev
    for k in range(1, n):
        h_prev, h = h, 2.0 * x * h - 2.0 * k * h_prev
    return h


def scaled_hermite(n: int, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``sigma^n H_n(sigma x)``."""
    if not isinstance(x, torch.Tensor):
        return _sh_scalar(n, float(x), sigma)
    return (sigma ** n) * physicists_hermite(n, sigma * x)


def hicache_init(num_steps: int, interval: int = 4, max_order: int = 1, first_enhance: int = 2,
                 end_enhance: Optional[int] = None, sigma: float = 0.5, backend: str = "hermite",
                 history: int = 5, holdout: str = "1step") -> Dict[str, Any]:
    """A fresh state dict for one sampling run (see ``hicache_pp.hermite.hicache_init``)."""
    if interval < 1:
        raise ValueError("interval must be >= 1")
    if max_order < 1:
        raise ValueError("max_order must be >= 1")
    if not (0.0 < sigma < 1.0):
        raise ValueError(f"sigma must be in (0, 1), got {sigma}")
    if backend not in ("hermite", "dmd", "auto"):
        raise ValueError(f"backend must be 'hermite', 'dmd', or 'auto', got {backend!r}")
    if holdout not in ("horizon", "1step"):
        raise ValueError(f"holdout must be 'horizon' or '1step', got {holdout!r}")
    return {
        "num_steps": int(num_steps), "interval": int(interval), "max_order": int(max_order),
        "first_enhance": int(first_enhance),
        "end_enhance": int(end_enhance if end_enhance is not None else num_steps),
        "sigma": float(sigma), "backend": str(backend), "history": int(history),
        "holdout": str(holdout), "run_id": uuid.uuid4().hex, "branch_id": None,
        "telemetry": _new_telemetry(), "step": 0, "counter": 0, "type": None,
        "activated_steps": [], "derivatives": {}, "prev_derivatives": {}, "dmd_snapshots": [],
    }


def hicache_decide(state: Dict[str, Any]) -> str:
    """``"full"`` or ``"forecast"`` for ``state["step"]`` (warm-up, tail, cadence)."""
    step = state["step"]
    if (step < state["first_enhance"] or step >= state["end_enhance"]
            or state["counter"] >= state["interval"] - 1 or not state.get("derivatives")):
        state["type"], state["counter"] = "full", 0
        state["activated_steps"].append(step)
    else:
        state["type"] = "forecast"
        state["counter"] += 1
    _record(state, "decisions", state["type"])
    return state["type"]


_PRIVATE = ("_dmd_fit", "_dmd_fit_key", "_dmd_tree_fit", "_dmd_tree_fit_key",
            "_auto_choice", "_auto_choice_key")


def hicache_reset(state: Dict[str, Any], *, run_id: Optional[str] = None,
                  branch_id: Optional[str] = None) -> Dict[str, Any]:
    """Reset the mutable run state in place (configuration kept)."""
    state["run_id"] = str(run_id) if run_id is not None else uuid.uuid4().hex
    if branch_id is not None:
        state["branch_id"] = str(branch_id)
    state.update(step=0, counter=0, type=None, activated_steps=[], derivatives={},
                 prev_derivatives={}, dmd_snapshots=[], telemetry=_new_telemetry())
    for key in _PRIVATE:
        state.pop(key, None)
    return state


def derivative_update(state: Dict[str, Any], feature: Any, sub, div, copy) -> None:
    prev = state["derivatives"]
    new = {0: copy(feature)}
    if prev:
        acts = state["activated_steps"]
        dist = max(int(acts[-1] - acts[-2]) if len(acts) >= 2 else state["interval"], 1)
        for order in range(state["max_order"]):
            if order not in prev:
                break
            new[order + 1] = div(sub(new[order], prev[order]), dist)
    state["prev_derivatives"] = prev
    state["derivatives"] = new


def hicache_update_derivatives(state: Dict[str, Any], feature: torch.Tensor) -> None:
    """TaylorSeer's backward differences at a compute step."""
    derivative_update(state, feature, lambda a, b: a - b, lambda a, d: a / d, lambda a: a)


def hermite_coefficients(state: Dict[str, Any]):
    """``[(order, Htilde_order(k) / order!)]`` for the current skip distance ``k``."""
    k = state["step"] - state["activated_steps"][-1]
    deriv = state["derivatives"]
    out, order = [], 1
    while order in deriv:
        out.append((order, _sh_scalar(order, float(k), state["sigma"]) / math.factorial(order)))
        order += 1
    return out


def hicache_forecast(state: Dict[str, Any]) -> torch.Tensor:
    """Hermite forecast ``F + sum_i D^i Htilde_i(k) / i!`` at the current skip step."""
    deriv = state["derivatives"]
    if 0 not in deriv:
        raise RuntimeError("hicache_forecast called before any compute step")
    _record(state, "method_counts", "hermite")
    out = deriv[0]
    for order, c in hermite_coefficients(state):
        out = out + deriv[order] * c
    return out
