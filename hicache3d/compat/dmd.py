"""The seed package's DMD / auto loop API on flat tensors, backed by hicache3d's core.

Same semantics as ``hicache_pp.dmd``: snapshots recorded at compute steps, DMD on the
longest equally spaced suffix (>= 4 snapshots), fractional horizons, Hermite fallback,
``auto`` holdout selection (``"1step"`` or ``"horizon"``).  The fits are the core's
Gram-matrix exponential fits with the seed's conventions.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from ..forecast.exponential import FitError
from ..forecast.polynomial import hermite_weights
from ._common import all_finite, combine, gram, seed_dmd_weights, uniform_tail
from .hermite import _record, hicache_forecast

__all__ = ["dmd_forecast", "dmd_update_snapshots", "dmd_forecast_state", "auto_forecast_state"]


def dmd_forecast(snapshots: Sequence[torch.Tensor], k: float, rank: int = 0,
                 ridge: float = 1e-8) -> torch.Tensor:
    """DMD forecast ``k`` steps past the newest of >= 3 equally spaced snapshots; the
    newest snapshot when the fit is degenerate."""
    if len(snapshots) >= 3:
        try:
            w = seed_dmd_weights(gram(snapshots), k)
            out = combine(snapshots, w)
            if all_finite(out):
                return out
        except (FitError, np.linalg.LinAlgError):
            pass
    return snapshots[-1].clone()


def dmd_update_snapshots(state: Dict[str, Any], feature: torch.Tensor, history: int = 5) -> None:
    """Record a detached copy of the velocity at the current compute step."""
    snaps = state.setdefault("dmd_snapshots", [])
    snaps.append((int(state["activated_steps"][-1]), feature.detach().clone()))
    h = int(state.get("history", history))
    if len(snaps) > h:
        del snaps[: len(snaps) - h]


def _window(state: Dict[str, Any], key: str, min_len: int):
    """The equally spaced tail ``(steps, vels, spacing, G)`` or ``None`` (+ reason)."""
    snaps = state.get(key, [])
    if len(snaps) < min_len:
        return None, "dmd_insufficient_uniform_history"
    steps = [s for s, _ in snaps]
    n = uniform_tail(steps)
    if n < min_len:
        return None, "dmd_nonuniform_or_short_tail"
    vels = [v for _, v in snaps[-n:]]
    spacing = steps[-1] - steps[-2]
    ckey = (steps[-1], n, spacing)
    if state.get("_dmd_fit_key") != ckey:
        state["_dmd_fit"] = gram(vels)
        state["_dmd_fit_key"] = ckey
    return (steps, vels, spacing, state["_dmd_fit"]), None


def serve_dmd(state: Dict[str, Any], steps: List[int], vels: List[Any], spacing: int, G) -> Any:
    k = (state["step"] - steps[-1]) / spacing
    try:
        out = combine(vels, seed_dmd_weights(G, k))
        if all_finite(out):
            _record(state, "method_counts", "dmd")
            return out
        reason = "dmd_nonfinite_output"
    except (FitError, np.linalg.LinAlgError):
        reason = "dmd_fit_failed"
    _record(state, "fallbacks", reason)
    _record(state, "method_counts", "reuse")
    return combine(vels, np.eye(len(vels))[-1])


def dmd_forecast_state(state: Dict[str, Any]) -> torch.Tensor:
    """DMD forecast at the current skip step, Hermite while the uniform tail is < 4."""
    win, reason = _window(state, "dmd_snapshots", 4)
    if win is not None:
        return serve_dmd(state, *win)
    _record(state, "fallbacks", reason)
    return hicache_forecast(state)


def _poly2_weights(n: int, x: float) -> np.ndarray:
    w = np.zeros(n)
    w[-3:] = [0.5 * x * (x - 1), -x - x * (x - 1), 1 + x + 0.5 * x * (x - 1)]
    return w


def _hermite_holdout_weights(n: int, k: float, sigma: float, max_order: int) -> np.ndarray:
    m = max(1, min(int(max_order), n - 1))
    t = np.arange(n, dtype=np.float64)
    return hermite_weights(t, t[-1] + k, m, sigma)


def _rel_err(G: np.ndarray, idx: Sequence[int], w: np.ndarray, held: int) -> float:
    idx = list(idx)
    Gs = G[np.ix_(idx, idx)]
    e2 = float(w @ Gs @ w - 2.0 * w @ G[idx, held] + G[held, held])
    return math.sqrt(max(e2, 0.0)) / max(math.sqrt(max(G[held, held], 0.0)), 1e-12)


def choose(state: Dict[str, Any], steps, vels, spacing, G) -> str:
    """The seed's holdout selection between DMD and the polynomial arm (cached)."""
    mode = str(state.get("holdout", "1step"))
    n = len(vels)
    if mode == "horizon":
        iv = int(state.get("interval", 0))
        kf_max = (iv - 1.0) / spacing if iv > 1 else (state["step"] - steps[-1]) / spacing
        h = max(1, min(int(math.ceil(kf_max)), n - 1))
        if h < 4 and n - h < 4:
            h = max(1, n - 4)
    else:
        h = 1
    key = (steps[-1], n, mode, h)
    if state.get("_auto_choice_key") == key:
        return state["_auto_choice"]
    sigma, max_order = float(state.get("sigma", 0.5)), int(state.get("max_order", 2))

    def dmd_err(idx, k, held):
        try:
            w = seed_dmd_weights(G[np.ix_(idx, idx)], k)
        except (FitError, np.linalg.LinAlgError):
            w = np.eye(len(idx))[-1]
        return _rel_err(G, idx, w, held)

    if mode == "horizon" and h >= 4:
        idx, held = list(range(n - h, n)), n - 1 - h
        e_dmd = dmd_err(idx, -h, held)
        e_arm = _rel_err(G, idx, _hermite_holdout_weights(h, -h, sigma, max_order), held)
    elif mode == "horizon":
        idx, held = list(range(0, n - h)), n - 1
        e_dmd = dmd_err(idx, h, held)
        e_arm = _rel_err(G, idx, _hermite_holdout_weights(len(idx), float(h), sigma, max_order), held)
    else:
        idx, held = list(range(0, n - 1)), n - 1
        e_dmd = dmd_err(idx, 1, held)
        e_arm = _rel_err(G, idx, _poly2_weights(len(idx), 1.0), held)
    choice = "dmd" if e_dmd <= e_arm else "hermite"
    state["_auto_choice"], state["_auto_choice_key"] = choice, key
    return choice


def auto_forecast_state(state: Dict[str, Any]) -> torch.Tensor:
    """Serve DMD only where a held-out backcast shows it beats the polynomial arm."""
    win, _ = _window(state, "dmd_snapshots", 5)
    if win is not None and choose(state, *win) == "dmd":
        return serve_dmd(state, *win)
    return hicache_forecast(state)
