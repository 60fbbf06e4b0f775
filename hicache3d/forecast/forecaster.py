"""Forecasters: a snapshot history plus a basis that turns it into snapshot weights.

``make_forecaster(name, history=6, ...)`` returns a :class:`Forecaster`; ``push(t, v)``
stores a velocity taken at position ``t``; ``predict(t_query)`` returns the forecast in
the structure of the pushed velocities.  Every basis only computes the small weight
vector (per batch item, on the CPU, in float64); the forecast itself is one weighted sum
over the stored history (:meth:`SnapshotStore.combine`).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import registry
from .exponential import FitError
from .registry import DEFAULT_BACKEND, DEFAULT_BLEND, DEFAULT_CANDIDATES, DEFAULT_FALLBACK, default
from .store import PushResult, SnapshotStore

__all__ = ["BACKENDS", "BasisSpec", "Forecaster", "ForecastStats", "make_forecaster", "fit_basis"]

BACKENDS = registry.backend_names()     # the built-in ones; registry.backend_names() is live
_MAX_WEIGHT_L1 = 1e6     # weights beyond this are numerically meaningless
_MAX_NORM_RATIO = 4.0    # a forecast this many times larger than every snapshot is a misfit


@dataclass(frozen=True)
class BasisSpec:
    """One concrete forecast basis with its parameters."""

    name: str                                  # a registered basis (forecast.registry)
    order: int = default("order")              # taylor / hermite order m
    sigma: float = default("sigma")            # hermite contraction
    damping: float = default("damping")        # shrink the extrapolated part toward the newest value
    taylor_form: str = default("taylor_form")  # "newton" (exact polynomial) | "taylorseer" (published)
    rank: int = default("rank")                # dmd: 0 = automatic
    rank_tol: float = default("rank_tol")      # dmd: relative singular-value cut for the automatic rank
    clamp: bool = default("clamp")             # dmd: clamp growing modes to neutral
    min_snapshots: int = 3         # dmd: fewest snapshots to fit

    @property
    def label(self) -> str:
        return self.name if self.damping == 0 else f"{self.name}~{self.damping:g}"

    def undamped(self) -> "BasisSpec":
        return dataclasses.replace(self, damping=0.0) if self.damping else self


class _Fit:
    """Horizon-independent part of a fitted basis; ``weights(tq)`` per query."""

    def __init__(self, spec: BasisSpec, t: np.ndarray, state=None):
        self.spec, self.t, self.state = spec, t, state
        self._memo: Dict[float, np.ndarray] = {}

    def weights(self, tq: float) -> np.ndarray:
        if self.state is not None:
            return registry.get(self.spec.name).weights(self.spec, self.t, tq, self.state)
        # no fit: one weight vector per horizon, shared by every item of the window (read-only)
        w = self._memo.get(tq)
        if w is None:
            w = np.array(registry.get(self.spec.name).weights(self.spec, self.t, tq, None),
                         dtype=np.float64)
            w.setflags(write=False)
            self._memo[tq] = w
        return w


def fit_basis(spec: BasisSpec, t: np.ndarray, G: np.ndarray, gram_eps: float = 2.2e-16) -> _Fit:
    """Fit ``spec`` (undamped) to snapshots at positions ``t`` with Gram ``G``."""
    basis = registry.get(spec.name)
    if basis.fit is not None:
        return _Fit(spec, t, basis.fit(spec, t, G, gram_eps))
    if len(t) < 1:
        raise FitError("insufficient_history")
    return _Fit(spec, t)


def _fits_data(spec: BasisSpec) -> bool:
    """Whether ``spec``'s basis fits the data (reads the Gram matrix for its weights)."""
    basis = registry.get(spec.name)
    return basis.fit is not None or basis.fit_batch is not None


def _damp(w: np.ndarray, damping: float) -> np.ndarray:
    if not damping:
        return w
    w = (1.0 - damping) * w
    w[-1] += damping
    return w


@dataclass
class ForecastStats:
    """What a forecaster did: forecasts per basis (counted per batch item; a blend of
    ``auto`` counts for its best-ranked candidate), fallbacks and why, history restarts
    and why."""

    per_basis: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)
    restarts: Counter = field(default_factory=Counter)
    clamped_modes: int = 0

    def as_dict(self) -> Dict[str, Any]:
        return {"per_basis": dict(self.per_basis), "fallbacks": dict(self.fallbacks),
                "restarts": dict(self.restarts), "clamped_modes": self.clamped_modes}


class Forecaster:
    """A history of velocity snapshots and a forecast basis (or ``auto`` selection)."""

    def __init__(self, backend: str = DEFAULT_BACKEND, history: int = 6, *, order: int = default("order"),
                 sigma: float = default("sigma"), damping: float = default("damping"),
                 taylor_form: str = default("taylor_form"), rank: int = default("rank"),
                 rank_tol: float = default("rank_tol"), clamp: bool = default("clamp"),
                 fallback: str = DEFAULT_FALLBACK, batch_dim: Optional[int] = 0,
                 candidates: Sequence[str] = DEFAULT_CANDIDATES, candidate_damping: Sequence[float] = (0.0, 0.5),
                 holdouts: int = 1, blend: float = DEFAULT_BLEND):
        registry.validate_forecast_options(backend=backend, history=history, order=order, sigma=sigma,
                                  damping=damping, taylor_form=taylor_form, rank=rank,
                                  rank_tol=rank_tol, fallback=fallback, candidates=candidates,
                                  candidate_damping=candidate_damping, holdouts=holdouts,
                                  blend=blend)
        self.backend = backend
        self.store = SnapshotStore(history, batch_dim=batch_dim)
        base = dict(order=order, sigma=sigma, taylor_form=taylor_form, rank=rank,
                    rank_tol=rank_tol, clamp=clamp)
        if backend == "auto":
            specs = []
            for name in candidates:
                for d in (candidate_damping if registry.get(name).damped else (0.0,)):
                    specs.append(BasisSpec(name, damping=float(d), **base))
            self.candidates: List[BasisSpec] = list(dict.fromkeys(specs))
            self.primary = None
        else:
            self.primary = BasisSpec(backend, damping=damping, **base)
            self.candidates = []
        self.fallback_spec = BasisSpec(fallback, **base) if fallback != "reuse" else None
        self.holdouts = int(holdouts)
        self.blend = float(blend)
        self.stats = ForecastStats()
        self.last_labels: List[str] = []
        self._fits: Dict[Tuple[int, BasisSpec], List[Any]] = {}
        self._choice: Dict[int, List[Any]] = {}
        self._gram_cache: Tuple[int, Any] = (-1, None)
        self._times_cache: Tuple[int, Any] = (-1, None)
        self._prev_choice: Dict[Tuple[BasisSpec, int], Any] = {}
        # a basis that fits nothing reads the snapshot products only to check a forecast
        # that could be too large (weights of L1 norm > _MAX_NORM_RATIO): they are made
        # when first needed, not on every new snapshot
        self._needs_gram = backend == "auto" or any(
            _fits_data(s) for s in ([self.primary] if self.primary else self.candidates))

    # ------------------------------------------------------------------ history
    def __len__(self) -> int:
        return len(self.store)

    def reset(self) -> None:
        self.store.restart()
        self._prev_choice.clear()
        self._fits.clear()
        self._choice.clear()
        self._gram_cache = (-1, None)
        self._times_cache = (-1, None)
        self.last_labels = []

    def push(self, t: float, velocity: Any) -> PushResult:
        if self.backend == "auto":
            self._remember_choices()
        res = self.store.push(float(t), velocity)
        if res.restarted:
            self.stats.restarts[res.restarted] += 1
        self._fits.clear()
        self._choice.clear()
        return res

    def ready(self, gram: Optional[bool] = None) -> bool:
        """Whether a forecast can be made: brings the Gram matrix up to date (a non-finite
        snapshot found now is dropped, counted in ``stats.restarts``).  ``gram``: make the
        products of the new snapshots with the others now (default: if the basis fits
        the data), else only their norms, the products waiting for the first use."""
        reason = self.store.finalize(cross=self._needs_gram if gram is None else gram)
        if reason:
            self.stats.restarts[reason] += 1
            self._fits.clear()
            self._choice.clear()
        return len(self.store) > 0

    # ------------------------------------------------------------------ fitting
    def _t(self) -> np.ndarray:
        v = self.store.version
        if self._times_cache[0] != v:
            self._times_cache = (v, self.store.times)
        return self._times_cache[1]

    def _window(self):
        v = self.store.version
        if self._gram_cache[0] != v:
            self._gram_cache = (v, (self._t(), self.store.gram()))
        return self._gram_cache[1]

    def _fit(self, spec: BasisSpec, item: int, n: Optional[int] = None):
        """Fit (cached per window) of ``spec`` on the first ``n`` snapshots of ``item``."""
        t = self._t()
        n = len(t) if n is None else n
        key = (n, spec.undamped())
        fits = self._fits.get(key)
        if fits is None:
            fits = [None] * self.store.items
            self._fits[key] = fits
        if fits[item] is not None:
            return fits[item]
        if not _fits_data(spec):
            # a basis without a fit does not look at the data: one for every item
            try:
                fit = fit_basis(spec.undamped(), t[:n], None, self.store.gram_eps)
            except FitError as e:
                fit = e
            fits[:] = [fit if f is None else f for f in fits]
            return fit
        t, G = self._window()
        fit_batch = registry.get(spec.name).fit_batch
        if fit_batch is not None:
            # every item of the window at once: one batched fit
            s = spec.undamped()
            todo = [i for i in range(self.store.items) if fits[i] is None]
            res = fit_batch(s, t[:n], G[todo, :n, :n], self.store.gram_eps)
            for i, f in zip(todo, res):
                fits[i] = f if isinstance(f, FitError) else _Fit(s, t[:n], f)
        if fits[item] is None:
            try:
                fits[item] = fit_basis(spec.undamped(), t[:n], G[item, :n, :n], self.store.gram_eps)
            except (FitError, np.linalg.LinAlgError, ValueError) as e:
                fits[item] = FitError(getattr(e, "reason", "linalg_error"))
        return fits[item]

    def _weights(self, spec: BasisSpec, item: int, tq: float, n: Optional[int] = None) -> np.ndarray:
        fit = self._fit(spec, item, n)
        if isinstance(fit, FitError):
            raise fit
        with np.errstate(all="ignore"):
            return self._checked(spec, item, fit.weights(tq))

    def _checked(self, spec: BasisSpec, item: int, w: np.ndarray) -> np.ndarray:
        """``w`` damped as ``spec`` says, or :class:`FitError` if it is no forecast."""
        w = _damp(np.array(w, dtype=np.float64), spec.damping)
        if not np.all(np.isfinite(w)) or np.abs(w).sum() > _MAX_WEIGHT_L1:
            raise FitError("nonfinite_weights")
        if registry.get(spec.name).plausibility and np.abs(w).sum() > _MAX_NORM_RATIO:
            # plausibility in Gram space (no pass over the data): |sum w_j V_j|^2 = w^T G w.
            # Weights of L1 norm <= _MAX_NORM_RATIO pass it whatever the data
            # (|sum w_j V_j| <= sum |w_j| |V_j|): no need for the products then
            _, G = self._window()
            m = len(w)
            Gi = G[item, :m, :m]
            if float(w @ Gi @ w) > _MAX_NORM_RATIO ** 2 * float(np.max(np.diag(Gi))):
                raise FitError("implausible_forecast")
        return w

    def _scores(self, item: int) -> List[Tuple[List[Tuple[float, float]], int, BasisSpec]]:
        """Auto: per candidate (that fits), its backcast errors on the held-out snapshots,
        each with the horizon it was made at: ``([(error, horizon), ...], rank, spec)``."""
        v = self.store.version
        per_item = self._choice.setdefault(v, [None] * self.store.items)
        if per_item[item] is not None:
            return per_item[item]
        t, G = self._window()
        n = len(t)
        scores = []
        for rank, spec in enumerate(self.candidates):
            errs = []
            for h in range(n - 1, max(0, n - 1 - self.holdouts), -1):
                try:
                    w = self._holdout_weights(spec, item, h)
                except FitError:
                    if h == n - 1:
                        break
                    continue
                Gh = G[item, :h, :h]
                err2 = float(w @ Gh @ w - 2.0 * w @ G[item, :h, h] + G[item, h, h])
                errs.append((float(np.sqrt(max(err2, 0.0) / max(G[item, h, h], 1e-300))),
                             abs(float(t[h] - t[h - 1]))))
            if errs:
                scores.append((errs, rank, spec))
        per_item[item] = scores
        return scores

    def _carried(self, item: int, horizon: Optional[float] = None) -> List[Tuple[float, int, BasisSpec]]:
        """Auto: ``(error, rank, spec)`` per candidate that fits, best first: its backcast
        error on the held-out snapshots, carried to a forecast ``horizon`` away from the
        newest snapshot (when given) by the candidate's error model, ``e (horizon / h)^p``
        (``h`` the horizon of the backcast, ``p`` the basis's ``error_order``).  The first
        window after the warm-up backcasts at the fine warm-up spacing but forecasts the
        whole cache interval, where a basis whose error grows faster falls behind."""
        ranked = []
        for errs, rank, spec in self._scores(item):
            p = registry.get(spec.name).error_order(spec) if horizon is not None else 0.0
            total = 0.0
            for e, h in errs:
                total += e * (abs(horizon) / h) ** p if p and h > 0 else e
            ranked.append((total / len(errs), rank, spec))
        ranked.sort(key=lambda s: (s[0], s[1]))
        return ranked

    def _ranked_candidates(self, item: int, horizon: Optional[float] = None) -> List[BasisSpec]:
        """Auto: the candidates ordered by :meth:`_carried` (reuse when none fits)."""
        return [s[2] for s in self._carried(item, horizon)] or [BasisSpec("reuse")]

    def _blended(self, tq: float, horizon: float, reasons: List[str]):
        """Auto with ``blend > 0``, every batch item at once: each candidate that serves,
        weighted by its carried backcast error to the power ``-blend`` (relative to the
        best one's).  Returns the weights ``[items, n]``, the best candidate per item, and
        which items got a blend (the others take the fallback chain).  Damping, finiteness
        and the plausibility check run over every candidate and batch item in one go."""
        t, G = self._window()
        items, n, C = self.store.items, len(t), len(self.candidates)
        carried = np.full((items, C), np.inf)
        for item in range(items):
            for err, rank, _ in self._carried(item, horizon):
                carried[item, rank] = err
        Wc = np.zeros((C, items, n))
        ok = np.zeros((C, items), dtype=bool)
        Gn = G[:, :n, :n]
        top = np.max(np.diagonal(Gn, axis1=1, axis2=2), axis=1)
        for c, spec in enumerate(self.candidates):
            for item in np.nonzero(np.isfinite(carried[:, c]))[0]:
                fit = self._fit(spec, int(item))
                if isinstance(fit, FitError):
                    reasons.append(f"{spec.name}:{fit.reason}")
                    continue
                Wc[c, item] = fit.weights(tq)
                ok[c, item] = True
        # damping, finiteness and the plausibility check: every candidate and item at once
        damping = np.array([spec.damping for spec in self.candidates], dtype=np.float64)
        if damping.any():
            Wc *= (1.0 - damping)[:, None, None]
            Wc[:, :, -1] += damping[:, None]
        checked = np.array([registry.get(spec.name).plausibility for spec in self.candidates], dtype=bool)
        with np.errstate(all="ignore"):
            finite = ok & np.all(np.isfinite(Wc), axis=2) & (np.abs(Wc).sum(axis=2) <= _MAX_WEIGHT_L1)
            Wc[~finite] = 0.0
            good = finite.copy()
            if checked.any():
                size = np.einsum("cin,inm,cim->ci", Wc[checked], Gn, Wc[checked])
                good[checked] &= size <= _MAX_NORM_RATIO ** 2 * top[None, :]
        for c in np.nonzero((ok & ~good).any(axis=1))[0]:
            name = self.candidates[c].name
            reasons += [f"{name}:nonfinite_weights"] * int(np.sum(ok[c] & ~finite[c]))
            reasons += [f"{name}:implausible_forecast"] * int(np.sum(finite[c] & ~good[c]))
        Wc[~good] = 0.0
        ok = good
        served = ok.any(axis=0)
        err = np.where(ok.T, carried, np.inf)                       # [items, C]
        best = np.argmin(err, axis=1)                               # ties: candidate order
        low = np.maximum(err[np.arange(items), best], 1e-300)[:, None]
        with np.errstate(all="ignore"):
            a = np.where(ok.T, (low / np.maximum(err, 1e-300)) ** self.blend, 0.0)
        a[~served] = 0.0
        a /= np.maximum(a.sum(axis=1, keepdims=True), 1e-300)
        return np.einsum("ic,cin->in", a, Wc), [self.candidates[c] for c in best], served

    def _remember_choices(self) -> None:
        """Auto, before a new snapshot: the (window, rank) each item's exponential fit
        chose on the current window, which the next window's backcast scores (see
        :meth:`_holdout_weights`)."""
        n = len(self.store)
        for (m, spec), fits in self._fits.items():
            if m != n:
                continue
            for item, fit in enumerate(fits):
                choice = getattr(getattr(fit, "state", None), "choice", None)
                if choice is not None:
                    self._prev_choice[(spec, item)] = choice

    def _holdout_weights(self, spec: BasisSpec, item: int, h: int) -> np.ndarray:
        """Weights over snapshots ``0 .. h-1`` forecasting snapshot ``h`` from them.  A fit
        that chose itself by such backcasts of the newest snapshot (dmd's rank and window)
        carries them, so no second fit on one snapshot fewer is made.  Of those, the one
        of the (window, rank) that the previous window chose is used: the selected one's
        error is the least of all the trials on this very snapshot, biased low against
        bases that choose nothing (on the bundled generator's trajectories it had auto
        blend in DMD where DMD then forecast worse).  Without a previous choice among the
        trials, the selected one."""
        n = len(self.store)
        if h == n - 1:
            state = getattr(self._fit(spec, item), "state", None)
            held = getattr(state, "holdout_weights", None)
            trials = getattr(state, "trials", None) or {}
            prev = self._prev_choice.get((spec.undamped(), item))
            if prev in trials:
                held = trials[prev]
            if held is not None:
                with np.errstate(all="ignore"):
                    return self._checked(spec, item, held)
        return self._weights(spec, item, float(self._t()[h]), n=h)

    # ------------------------------------------------------------------ predict
    def chain(self, item: int, horizon: Optional[float] = None) -> List[BasisSpec]:
        """Bases tried in order for ``item``: the primary (or auto's ranking, for a forecast
        ``horizon`` away from the newest snapshot when given), the polynomial fallback,
        plain reuse."""
        if self.backend == "auto":
            chain = list(self._ranked_candidates(item, horizon))
        else:
            chain = [self.primary]
        if self.fallback_spec is not None and self.fallback_spec.name not in {c.name for c in chain}:
            chain.append(self.fallback_spec)
        chain.append(BasisSpec("reuse"))
        return chain

    def predict_weights(self, tq: float) -> Tuple[np.ndarray, List[str], List[str]]:
        """Snapshot weights ``[items, n]`` for a forecast at ``tq``, the label of the basis
        that served each item, and the fallback reasons met on the way."""
        if not self.ready():
            raise RuntimeError("predict() called with no usable snapshot (none pushed, or the "
                               "history was dropped after a non-finite snapshot)")
        n = len(self.store)
        W = np.zeros((self.store.items, n))
        labels, reasons = [], []
        horizon = float(tq) - float(self._t()[-1])
        blended = self._blended(float(tq), horizon, reasons) if (
            self.backend == "auto" and self.blend > 0) else None
        for item in range(self.store.items):
            if blended is not None and blended[2][item]:
                W[item], spec = blended[0][item], blended[1][item]
                labels.append(spec.label)
                self.stats.clamped_modes += getattr(self._fit(spec, item).state, "clamped", 0)
                continue
            for spec in self.chain(item, horizon):
                try:
                    W[item] = self._weights(spec, item, float(tq))
                    labels.append(spec.label)
                    fit = self._fit(spec, item)
                    self.stats.clamped_modes += getattr(fit.state, "clamped", 0)
                    break
                except FitError as e:
                    reasons.append(f"{spec.name}:{e.reason}")
        return W, labels, reasons

    def predict(self, tq: float) -> Any:
        W, labels, reasons = self.predict_weights(tq)
        if self.store.max_abs_bound(W) >= 0.5 * self.store.low_precision_max():
            reasons.append("overflow_guard")
            W = np.zeros_like(W)
            W[:, -1] = 1.0
            labels = ["reuse"] * len(labels)
        for r in reasons:
            self.stats.fallbacks[r] += 1
        for lab in labels:
            self.stats.per_basis[lab] += 1
        self.last_labels = labels
        return self.store.combine(W)

    def newest_error(self) -> Optional[np.ndarray]:
        """Relative error per batch item, ``|sum_j w_j V_j - V_new| / |V_new|``, of the
        forecast of the newest snapshot from the snapshots before it, with the basis that
        would serve each item (the first of :meth:`chain` that fits; for ``auto`` the
        best-ranked candidate at the backcast's own horizon, not its blend); computed from
        the Gram matrix (``w^T G w - 2 w^T g + G_nn``), no pass over the data.  ``None``
        with fewer than two snapshots.  The serving labels go to ``last_error_labels``."""
        if not self.ready(gram=True) or len(self.store) < 2:
            return None
        t, G = self._window()
        n = len(t)
        out = np.full(self.store.items, np.inf)
        self.last_error_labels = []
        for item in range(self.store.items):
            label = "none"
            for spec in self.chain(item):
                try:
                    w = self._weights(spec, item, float(t[n - 1]), n=n - 1)
                except FitError:
                    continue
                Gi = G[item]
                err2 = float(w @ Gi[:n - 1, :n - 1] @ w - 2.0 * w @ Gi[:n - 1, n - 1] + Gi[n - 1, n - 1])
                out[item] = np.sqrt(max(err2, 0.0) / max(float(Gi[n - 1, n - 1]), 1e-300))
                label = spec.label
                break
            self.last_error_labels.append(label)
        return out


def make_forecaster(name: str = DEFAULT_BACKEND, history: int = 6, **options: Any) -> Forecaster:
    """Build a forecaster: a registered basis (``"reuse" | "taylor" | "hermite" | "dmd"``,
    see :mod:`hicache3d.forecast.registry`) or ``"auto"``.

    Options: ``order``, ``sigma``, ``damping``, ``taylor_form`` ("newton" | "taylorseer"),
    ``rank``, ``rank_tol``, ``clamp``, ``fallback``, ``batch_dim``, ``candidates``,
    ``candidate_damping``, ``holdouts``, ``blend`` (see :class:`hicache3d.CacheConfig`).
    """
    return Forecaster(name, history, **options)
