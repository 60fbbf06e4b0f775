"""The synthetic velocity trajectories of the forecast benchmark (the "reference scenarios").

Each scenario is a trajectory ``F[t]`` of ``d`` channels, ``t = 0 .. T-1``, drawn from a seed;
a forecaster sees some of its rows (the anchors) and predicts later ones.  The scenarios and
why each is there are described in ``benchmarks/README.md``; the formulas are in
:func:`make_trajectory`.  Pure numpy (float64) and deterministic in ``(kind, T, d, seed)``,
so the unit tests of the bases use the same generators as the benchmark.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import numpy as np
import torch

__all__ = ["HORIZONS", "N_ANCHORS", "SUBSTEP_N", "SCENARIOS", "SCENARIO_TITLE", "SUBSTEP_TRAJ",
           "make_trajectory", "exponential_trajectory", "modal_sum", "accuracy_cases", "rel_l2"]

HORIZONS = (1, 2, 3, 4, 6, 8)        # steps past the last anchor that are forecast
N_ANCHORS = 8                        # anchors (computed snapshots) a forecaster sees
SUBSTEP_N = (3, 5, 6)                # anchor spacings of the sub-step cadence cases
SCENARIOS = ("clean", "noise", "drift", "switch", "drift_noise", "osc_trend")
SCENARIO_TITLE = {
    "clean": "clean", "noise": "+1% noise", "drift": "drift", "switch": "regime switch",
    "drift_noise": "drift + noise", "osc_trend": "oscillation + trend",
}
SUBSTEP_TRAJ = ("clean", "drift_noise")  # the trajectories of the sub-step cadence cases


def _poles(rng: np.random.Generator, k: int = 2) -> np.ndarray:
    r = rng.uniform(0.85, 0.99, k)
    w = rng.uniform(-0.5, 0.5, k)
    return r * np.exp(1j * w)


def _camp(rng: np.random.Generator, d: int, k: int = 2) -> np.ndarray:
    return (rng.standard_normal((d, k)) + 1j * rng.standard_normal((d, k))) / math.sqrt(2.0)


def modal_sum(a: np.ndarray, z: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``Re(sum_j a[:, j] z_j^t)`` at every time of ``t``: rows ``[len(t), d]`` (float64).

    Amplitudes ``a`` are ``[d, k]`` complex, poles ``z`` are ``[k]``; a time may be
    fractional (``z^t`` is the principal power), which is an exact exponential in ``t``."""
    return (a[None, :, :] * (z[None, None, :] ** t[:, None, None])).sum(-1).real


def exponential_trajectory(d: int, seed: int, poles=None):
    """A continuous-time version of the *clean* scenario: ``f(t)`` returns ``[1, d]``
    (float64 torch) for any real ``t``.  ``poles`` (complex or real, any number) default
    to a draw of two like *clean*'s; the amplitudes are complex Gaussian per channel."""
    rng = np.random.default_rng([seed, 104729, d])
    z = _poles(rng) if poles is None else np.asarray(poles, dtype=np.complex128)
    a = _camp(rng, d, len(z))
    return lambda t: torch.from_numpy(modal_sum(a, z, np.asarray([float(t)]))).reshape(1, d)


def _add_noise(F: np.ndarray, rng: np.random.Generator, level: float = 0.01) -> np.ndarray:
    d = F.shape[1]
    scale = level * np.linalg.norm(F, axis=1, keepdims=True) / math.sqrt(d)
    return F + scale * rng.standard_normal(F.shape)


def make_trajectory(kind: str, T: int, d: int, seed: int) -> np.ndarray:
    """One synthetic velocity trajectory ``[T, d]`` (float64) of a reference scenario.

    * clean: ``F_t = Re(sum_j a_j z_j^t)``, 2 complex poles ``z = r e^{i w}``,
      ``r ~ U[0.85, 0.99]``, ``w ~ U[-0.5, 0.5]``, complex Gaussian amplitudes per channel;
    * noise: clean plus ``0.01 * ||F_t|| / sqrt(d) * N(0, I)`` on every snapshot (truth too);
    * drift: the one-step pole drifts, ``w_t = w_0 (1 + 0.6 t/T)``,
      ``log r_t = log r_0 (1 + 0.1 t/T)``; the state is the product of the one-step poles
      (a non-autonomous linear system);
    * switch: the poles change to a fresh draw at ``t = 5`` (the state is continuous);
    * drift_noise: drift plus the 1% noise;
    * osc_trend: ``2 tanh(2.5 (t/T - 0.45)) A + 1.5 (t/T)^2 C + 0.8 * 0.85^t cos(phi_t) B``,
      ``phi_t = phi_{t-1} + 2.2 (1 + 0.5 t/T)``, A, B, C ~ N(0, I), plus the 1% noise.
    """
    rng = np.random.default_rng([seed, 7919, len(kind)] + [ord(c) for c in kind])
    t = np.arange(T, dtype=np.float64)
    if kind == "osc_trend":
        A, B, C = (rng.standard_normal(d) for _ in range(3))
        phi, rows = 0.0, []
        for ti in range(T):
            frac = ti / T
            phi += 2.2 * (1.0 + 0.5 * frac)
            rows.append(2.0 * math.tanh(2.5 * (frac - 0.45)) * A + 1.5 * frac * frac * C
                        + 0.8 * (0.85 ** ti) * math.cos(phi) * B)
        return _add_noise(np.asarray(rows), rng)
    z = _poles(rng)
    a = _camp(rng, d)
    if kind in ("clean", "noise"):
        F = modal_sum(a, z, t)
    elif kind in ("drift", "drift_noise"):
        r0, w0 = np.abs(z), np.angle(z)
        state = np.ones(2, dtype=np.complex128)
        rows = []
        for ti in range(T):
            rows.append((a * state[None, :]).sum(-1).real)
            frac = (ti + 1) / T
            step = np.exp(np.log(r0) * (1 + 0.1 * frac) + 1j * w0 * (1 + 0.6 * frac))
            state = state * step
        F = np.asarray(rows)
    elif kind == "switch":
        z2 = _poles(rng)
        state = np.ones(2, dtype=np.complex128)
        rows = []
        for ti in range(T):
            rows.append((a * state[None, :]).sum(-1).real)
            state = state * (z if ti + 1 < 5 else z2)
        F = np.asarray(rows)
    else:
        raise ValueError(kind)
    if kind in ("noise", "drift_noise"):
        F = _add_noise(F, rng)
    return F


def rel_l2(pred: Any, truth: torch.Tensor) -> float:
    p = torch.as_tensor(pred).to(torch.float64).reshape(-1)
    t = truth.to(torch.float64).reshape(-1)
    return float(torch.linalg.vector_norm(p - t) / torch.linalg.vector_norm(t))


def accuracy_cases() -> List[Dict[str, Any]]:
    """(name, trajectory kind, anchor spacing, horizons) of every accuracy case."""
    cases = [dict(name=s, kind=s, spacing=1, horizons=HORIZONS, geometry="unit") for s in SCENARIOS]
    for kind in SUBSTEP_TRAJ:
        for n in SUBSTEP_N:
            cases.append(dict(name=f"substep{n}_{kind}", kind=kind, spacing=n,
                              horizons=tuple(range(1, n)), geometry="substep"))
    return cases

