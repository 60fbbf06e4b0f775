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

__all__ = ["FitError", "ExpFit", "backcast_error", "fit_exponential", "is_uniform", "uniform_runs",
           "uniform_tail_length"]

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
    backcast: Optional[float] = None   # error of the selected (window, rank) on the newest
                                       # snapshot when fitted without it (None: not scored)

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


def _fit_window(t: np.ndarray, G: np.ndarray, *, rank: int, tol: float, pod_tol: Optional[float],
                clamp: bool, keep_residual: bool, refine: bool) -> ExpFit:
    """The exponential fit of every snapshot of the window, at most ``rank`` modes (0: the
    POD noise floor decides)."""
    n = len(t)
    Y, coef, _ = _pod(np.asarray(G, dtype=np.float64), tol if pod_tol is None else pod_tol, None)
    r = Y.shape[0]
    direction = np.sign(t[-1] - t[-2]) or 1.0
    if is_uniform(t):
        lam, modes = _exact_dmd(Y, tol, rank)
        rates = _rates(lam, t[1] - t[0])
        method = "uniform"
    else:
        want = max(1, min(n - 1, r if not rank else min(rank, r)))
        starts = _starts(Y, t, tol, want)
        if refine:
            best = None
            for mu0 in starts:
                try:
                    fit = _varpro(Y, t, mu0)
                except FitError:
                    continue
                if best is None or fit[2] < best[2]:
                    best = fit
                if best[2] < 1e-12:
                    break
            if best is None:
                raise FitError("varpro_overflow")
            rates, modes, _ = best
        else:
            rates = starts[0]
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


def _starts(Y: np.ndarray, t: np.ndarray, tol: float, want: int) -> list:
    """Starting rates for variable projection on an irregular window, ``want`` each.

    First the rates of every equally spaced run (the warm-up steps give the fine
    spacing, the cache cadence the coarse one), merged without duplicates; where these
    are fewer than ``want`` (a short run cannot show every mode the whole window holds),
    the missing ones are filled from exact DMD of the whole window taken as equally
    spaced, and from a few real decay rates; each filling is one start."""
    n = len(t)
    base = []
    for a, b in uniform_runs(t):
        lam0, _ = _exact_dmd(Y[:, a:b], tol, want)
        for m in _rates(lam0, t[a + 1] - t[a]):
            if all(abs(m - q) > 1e-6 * (1 + abs(q)) for q in base):
                base.append(m)
    spacing = (t[-1] - t[0]) / (n - 1)
    lam_u, _ = _exact_dmd(Y, tol, want)
    pseudo = list(_rates(lam_u, spacing))
    scale = float(np.median(np.abs(np.diff(t)))) or 1.0
    fills = [pseudo] + [[complex(-c / scale * np.sign(spacing))] * want for c in (0.05, 0.3, 1.0)]
    starts = []
    for fill in fills:
        mu = list(base[:want])
        for m in fill:
            if len(mu) >= want:
                break
            mu.append(m if all(abs(m - q) > 1e-6 * (1 + abs(q)) for q in mu) else m * 1.3 - 0.01)
        mu = np.asarray(mu[:want], dtype=np.complex128)
        mu = np.maximum(mu.real, _ZERO_RATE / 2) + 1j * mu.imag
        starts.append(mu)
        if len(base) >= want:
            break                   # the runs show every mode: one start
    return starts


def _pad(fit: ExpFit, before: int) -> ExpFit:
    """The fit of a window that leaves out the ``before`` oldest snapshots, as weights
    over the whole history (zero on the left-out ones)."""
    if before:
        fit.coef = np.vstack([np.zeros((before, fit.coef.shape[1])), fit.coef])
    return fit


def backcast_error(fit: ExpFit, t: np.ndarray, G: np.ndarray, h: int, start: int = 0) -> float:
    """Relative error of ``fit`` (made on snapshots ``start .. h-1``) forecasting snapshot
    ``h``, from the Gram matrix (no pass over the data)."""
    w = fit.weights(t[h])
    Gh = G[start:h, start:h]
    e2 = float(w @ Gh @ w - 2.0 * w @ G[start:h, h] + G[h, h])
    return float(np.sqrt(max(e2, 0.0) / max(G[h, h], 1e-300)))


def fit_exponential(t: np.ndarray, G: np.ndarray, *, rank: int = 0, rank_tol: float = 1e-4,
                    gram_eps: float = 2.2e-16, clamp: bool = True, keep_residual: bool = True,
                    min_snapshots: int = 3, refine: bool = True,
                    pod_tol: Optional[float] = None, select: bool = True) -> ExpFit:
    """Fit the exponential model to the snapshots behind Gram matrix ``G`` at positions ``t``.

    ``rank=0`` chooses the number of modes, and the window, from the data (``select``):

    * snapshots that span one dimension fewer than their count (the POD noise floor, set
      by ``rank_tol`` and the data's precision ``gram_eps``) determine their modes, and
      no snapshot is left to test a fit: the fit of every mode above the floor is used
      as is (exact on signals of that many modes);
    * otherwise every rank from 1 to ``n - 2`` is fitted on all but the newest snapshot
      and scored by how well it forecasts that one (a held-out backcast, from the Gram
      matrix); when the history ends in an equally spaced run of at least 4 snapshots
      that does not reach its oldest one (the warm-up steps followed by the cache
      cadence), that run is scored as a window of its own next to the whole history.
      The best (window, rank) is refitted on all of its snapshots.  Modes beyond it fit
      noise and the changing dynamics of a trained sampler, not its trend.

    ``select=False`` (or ``rank > 0``) fits the whole window with the noise-floor rank
    (at most ``rank``) without scoring.
    """
    t = np.asarray(t, dtype=np.float64)
    G = np.asarray(G, dtype=np.float64)
    n = len(t)
    if n < max(2, min_snapshots):
        raise FitError("insufficient_history")
    tol = max(rank_tol, 4.0 * np.sqrt(gram_eps))
    opts = dict(tol=tol, pod_tol=pod_tol, clamp=clamp, keep_residual=keep_residual, refine=refine)
    if rank or not select:
        return _fit_window(t, G, rank=rank, **opts)
    r = _pod(G, tol if pod_tol is None else pod_tol, None)[0].shape[0]
    if r == n - 1:
        return _fit_window(t, G, rank=0, **opts)       # determined, nothing left to test it
    starts = [0]
    m = uniform_tail_length(t)
    if 4 <= m < n:
        starts.append(n - m)
    best = None
    for a in starts:
        ta, Ga = t[a:], G[a:, a:]
        na = len(ta)
        ra = _pod(Ga[:-1, :-1], tol if pod_tol is None else pod_tol, None)[0].shape[0]
        for K in range(1, min(ra, na - 2) + 1):
            try:
                f = _fit_window(ta[:-1], Ga[:-1, :-1], rank=K, **opts)
                err = backcast_error(f, ta, Ga, na - 1)
            except (FitError, np.linalg.LinAlgError):
                continue
            if not np.isfinite(err):
                continue
            if best is None or err < best[0]:
                best = (err, a, K)
    if best is None:
        raise FitError("undetermined")
    err, a, K = best
    fit = _pad(_fit_window(t[a:], G[a:, a:], rank=K, **opts), a)
    fit.backcast = err
    return fit


def uniform_tail_length(t: np.ndarray, rtol: float = 1e-6) -> int:
    """How many of the newest snapshots are equally spaced (>= 2 when there are 2)."""
    n = len(t)
    if n < 3:
        return n
    d = np.diff(t)
    k = 1
    while k < len(d) and abs(d[-k - 1] - d[-1]) <= rtol * abs(d[-1]):
        k += 1
    return k + 1
