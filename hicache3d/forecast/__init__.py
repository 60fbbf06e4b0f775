"""Pure forecasting math on snapshot histories; knows nothing of models.

Every basis is a weighted sum of cached snapshots: the bases only compute the small
weight vector (per batch item, float64); :class:`SnapshotStore` applies it in one pass.
"""
from .exponential import ExpFit, FitError, fit_exponential
from .forecaster import BACKENDS, BasisSpec, Forecaster, ForecastStats, fit_basis, make_forecaster
from .polynomial import (hermite_weights, lagrange_weights, physicists_hermite, reuse_weights,
                         scaled_hermite, taylorseer_weights)
from .store import SnapshotStore

__all__ = [
    "BACKENDS", "BasisSpec", "ExpFit", "FitError", "Forecaster", "ForecastStats", "SnapshotStore",
    "fit_basis", "fit_exponential", "hermite_weights", "lagrange_weights", "make_forecaster",
    "physicists_hermite", "reuse_weights", "scaled_hermite", "taylorseer_weights",
]
