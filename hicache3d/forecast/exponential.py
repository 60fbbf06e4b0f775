"""The exponential basis: exact DMD / Prony from snapshot Gram matrices.

The velocity history ``V = [V_0 ... V_{n-1}]`` (d >> n) is only ever seen through its Gram
matrix ``G = V^T V`` (method of snapshots).  From ``G = W L W^T`` the POD coordinates of
the snapshots are ``Y = L^{1/2} W^T`` (r x n) and ``V ~= V W L^{-1/2} Y``, so any forecast
``y_q`` in POD coordinates is the snapshot combination ``w = W L^{-1/2} y_q``.

In POD coordinates we fit continuous-time exponentials ``y(t) = sum_k phi_k e^{mu_k t}``:

* equally spaced snapshots: exact DMD (Schmid 2010) on ``X = Y[:, :-1]``, ``X' = Y[:, 1:]``;
  eigenvalues ``lambda`` become rates ``mu = log(lambda) / spacing``;
* irregular spacing (the warm-up steps followed by the cache cadence, or sampler time):
  variable projection (optimized DMD, Askham & Kutz 2018): minimise
  ``||Y - B(mu) E(mu)||`` over the rates, amplitudes ``B`` eliminated by least squares,
  initialised from exact DMD on the longest equally spaced run.

The forecast is anchored at the newest snapshot, ``y_q = y_n + Phi (e^{mu tau} - 1) b``
(``tau = t_q - t_n``, ``b`` the modal amplitudes of ``y_n``): it is continuous at ``tau = 0``
and whatever the modes do not explain is carried as plain reuse.  Fractional horizons are
fractional powers of the eigenvalues.  Modes that grow in the forecast direction are
clamped to neutral (|lambda| = 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

__all__ = ["FitError", "ExpFit", "fit_exponential", "is_uniform", "uniform_runs"]

_ZERO_RATE = -700.0   # rate standing in for a zero eigenvalue (per unit spacing)


class FitError(Exception):
    """The exponential fit is not possible on this history; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class ExpFit:
    coef: np.ndarray      # [n, r]  POD coordinates -> snapshot weights
    y_new: np.ndarray     # [r]     newest snapshot in POD coordinates
    modes: np.ndarray     # [r, K]  complex
    amps: np.ndarray      # [K]     complex amplitudes of the newest snapshot
    rates: np.ndarray     # [K]     complex continuous rates (per position unit)
    t_new: float
    keep_residual: bool
    method: str           # "uniform" | "irregular"
    clamped: int          # modes clamped to neutral
    rank: int

    def weights(self, tq: float) -> np.ndarray:
        tau = float(tq) - self.t_new
        g = np.exp(self.rates * tau)
        if self.keep_residual:
            yq = self.y_new + (self.modes @ ((g - 1.0) * self.amps)).real
        else:
            yq = (self.modes @ (g * self.amps)).real
        return self.coef @ yq


def is_uniform(t: np.ndarray, rtol: float = 1e-6) -> bool:
    d = np.diff(t)
    return len(d) > 0 and d[0] != 0 and bool(np.all(np.abs(d - d[0]) <= rtol * abs(d[0])))


def uniform_runs(t: np.ndarray, rtol: float = 1e-6) -> list:
    """Maximal runs ``(start, stop)`` of >= 3 equally spaced snapshots, finest spacing first."""
    n = len(t)
    runs = []
    if n < 3:
        return runs
    d = np.diff(t)
    i = 0
    while i < len(d):
        j = i
        while j + 1 < len(d) and abs(d[j + 1] - d[i]) <= rtol * abs(d[i]):
            j += 1
        if j + 2 - i >= 3:
            runs.append((i, j + 2))
        i = j + 1
    runs.sort(key=lambda r: (abs(t[r[0] + 1] - t[r[0]]), -r[1]))
    return runs


def _pod(G: np.ndarray, tol: float, max_rank: Optional[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """POD of the snapshots from their Gram matrix: ``(Y [r, n], coef [n, r], s [r])``."""
    if not np.all(np.isfinite(G)):
        raise FitError("nonfinite_gram")
    lam, W = np.linalg.eigh(0.5 * (G + G.T))
    lam, W = lam[::-1], W[:, ::-1]
    if lam[0] <= 0:
        raise FitError("zero_history")
    s = np.sqrt(np.clip(lam, 0.0, None))
    r = int(np.sum(s > tol * s[0]))
    if max_rank:
        r = min(r, max_rank)
    r = max(r, 1)
    s, W = s[:r], W[:, :r]
    Y = s[:, None] * W.T
    coef = W / s[None, :]
    return Y, coef, s


def _exact_dmd(Y: np.ndarray, tol: float, rank: int) -> Tuple[np.ndarray, np.ndarray]:
    """Exact DMD of equally spaced columns: ``(lambda [K], modes [r, K])``."""
    X, Xp = Y[:, :-1], Y[:, 1:]
    U, S, Vh = np.linalg.svd(X, full_matrices=False)
    if S[0] <= 0:
        raise FitError("zero_history")
    K = int(np.sum(S > tol * S[0]))
    if rank:
        K = min(K, rank)
    K = max(K, 1)
    U, S, V = U[:, :K], S[:K], Vh[:K].T
    XpVS = (Xp @ V) / S[None, :]
    Atil = U.T @ XpVS
    lam, Q = np.linalg.eig(Atil)
    modes = XpVS @ Q
    return lam, modes


def _rates(lam: np.ndarray, spacing: float) -> np.ndarray:
    lam = np.asarray(lam, dtype=np.complex128)
    small = np.abs(lam) < 1e-300
    safe = np.where(small, 1.0, lam)
    mu = np.log(safe) / spacing
    return np.where(small, _ZERO_RATE / abs(spacing), mu)


def _varpro(Y: np.ndarray, t: np.ndarray, mu0: np.ndarray, iters: int = 25) -> Tuple[np.ndarray, np.ndarray, float]:
    """Levenberg-Marquardt on the variable-projection residual ``Y - B(mu) E(mu)``.

    Returns ``(mu, B, relative residual)``; ``B`` holds the amplitudes at ``t[-1]``."""
    scale = float(np.median(np.abs(np.diff(t)))) or 1.0
    tr = (t - t[-1]) / scale
    K = len(mu0)
    ynorm = float(np.linalg.norm(Y)) or 1.0

    def solve(p: np.ndarray):
        mu = p[:K] + 1j * p[K:]
        with np.errstate(over="ignore", invalid="ignore"):
            E = np.exp(np.outer(mu, tr))                     # [K, n]
        if not np.all(np.isfinite(E)):
            return None, None, np.inf
        Bt, *_ = np.linalg.lstsq(E.T, Y.T.astype(np.complex128), rcond=None)
        R = Y - Bt.T @ E
        return mu, Bt.T, np.concatenate([R.real.ravel(), R.imag.ravel()]) / ynorm

    p = np.concatenate([mu0.real, mu0.imag]) * scale
    p = np.clip(np.nan_to_num(p, nan=0.0, posinf=50.0, neginf=-50.0), -50.0, 50.0)
    mu, B, r = solve(p)
    if B is None:
        raise FitError("varpro_overflow")
    f = float(r @ r)
    damp = 1e-3
    for _ in range(iters):
        if f < 1e-30:
            break
        J = np.empty((len(r), len(p)))
        for k in range(len(p)):
            h = 1e-7 * max(1.0, abs(p[k]))
            pk = p.copy()
            pk[k] += h
            rk = solve(pk)[2]
            if not np.all(np.isfinite(rk)):
                rk = r
            J[:, k] = (rk - r) / h
        JtJ, Jtr = J.T @ J, J.T @ r
        improved = False
        for _ in range(8):
            A = JtJ + damp * (np.diag(np.diag(JtJ)) + 1e-12 * np.eye(len(p)))
            try:
                step = -np.linalg.solve(A, Jtr)
            except np.linalg.LinAlgError:
                damp *= 10
                continue
            pn = np.clip(p + step, -50.0, 50.0)
            mun, Bn, rn = solve(pn)
            fn = float(rn @ rn) if Bn is not None else np.inf
            if fn < f:
                rel_gain = (f - fn) / max(f, 1e-300)
                p, mu, B, r, f = pn, mun, Bn, rn, fn
                damp = max(damp / 3.0, 1e-12)
                improved = True
                break
            damp *= 10.0
        if not improved or rel_gain < 1e-8:
            break
    return mu / scale, B, float(np.sqrt(f))


def fit_exponential(t: np.ndarray, G: np.ndarray, *, rank: int = 0, rank_tol: float = 1e-4,
                    gram_eps: float = 2.2e-16, clamp: bool = True, keep_residual: bool = True,
                    min_snapshots: int = 3, refine: bool = True,
                    pod_tol: Optional[float] = None) -> ExpFit:
    """Fit the exponential model to the snapshots behind Gram matrix ``G`` at positions ``t``."""
    t = np.asarray(t, dtype=np.float64)
    n = len(t)
    if n < max(2, min_snapshots):
        raise FitError("insufficient_history")
    tol = max(rank_tol, 4.0 * np.sqrt(gram_eps))
    Y, coef, _ = _pod(np.asarray(G, dtype=np.float64), tol if pod_tol is None else pod_tol, None)
    r = Y.shape[0]
    direction = np.sign(t[-1] - t[-2]) or 1.0
    if is_uniform(t):
        lam, modes = _exact_dmd(Y, tol, rank)
        rates = _rates(lam, t[1] - t[0])
        method = "uniform"
    else:
        # start from the rates of every equally spaced run (the warm-up steps give the
        # fine spacing, the cache cadence the coarse one), merged without duplicates
        mu0 = []
        for a, b in uniform_runs(t):
            lam0, _ = _exact_dmd(Y[:, a:b], tol, rank)
            for m in _rates(lam0, t[a + 1] - t[a]):
                if all(abs(m - q) > 1e-6 * (1 + abs(q)) for q in mu0):
                    mu0.append(m)
        if not mu0:
            # no equally spaced run: treat the sequence as equally spaced for the start
            lam0, _ = _exact_dmd(Y, tol, rank)
            mu0 = list(_rates(lam0, (t[-1] - t[0]) / (n - 1)))
        mu0 = np.asarray(mu0[:max(1, min(n - 1, r if not rank else rank))], dtype=np.complex128)
        mu0 = np.maximum(mu0.real, _ZERO_RATE / 2) + 1j * mu0.imag
        if refine:
            rates, modes, _ = _varpro(Y, t, mu0)
        else:
            rates = mu0
            E = np.exp(np.outer(rates, (t - t[-1])))
            Bt, *_ = np.linalg.lstsq(E.T, Y.T.astype(np.complex128), rcond=None)
            modes = Bt.T
        method = "irregular"
    if not (np.all(np.isfinite(rates)) and np.all(np.isfinite(modes))):
        raise FitError("nonfinite_fit")
    clamped = 0
    if clamp:
        grow = rates.real * direction > 1e-9
        clamped = int(np.sum(grow))
        rates = np.where(grow, 1j * rates.imag, rates)
    y_new = Y[:, -1]
    amps, *_ = np.linalg.lstsq(modes, y_new.astype(np.complex128), rcond=None)
    if not np.all(np.isfinite(amps)):
        raise FitError("nonfinite_fit")
    return ExpFit(coef=coef, y_new=y_new, modes=modes, amps=amps, rates=rates,
                  t_new=float(t[-1]), keep_residual=keep_residual, method=method,
                  clamped=clamped, rank=len(rates))
