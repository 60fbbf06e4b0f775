"""Polynomial snapshot weights: reuse, Taylor (exact and TaylorSeer form), HiCache Hermite.

All functions return the weights ``w`` (oldest snapshot first) such that the forecast at
``tq`` is ``sum_j w_j V_j``.  Positions ``t`` may be any strictly monotone sequence (step
indices, or sampler times that decrease).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "reuse_weights", "lagrange_weights", "backward_difference_weights",
    "taylorseer_weights", "hermite_weights", "physicists_hermite", "scaled_hermite",
]


def reuse_weights(t: np.ndarray, tq: float) -> np.ndarray:
    w = np.zeros(len(t))
    w[-1] = 1.0
    return w


def lagrange_weights(t: np.ndarray, tq: float, order: int) -> np.ndarray:
    """Weights of the unique polynomial of degree ``order`` through the newest
    ``order + 1`` snapshots, evaluated at ``tq`` (exact on polynomials of that degree;
    with equal spacing it is Newton's backward-difference formula)."""
    n = len(t)
    m = max(0, min(int(order), n - 1))
    w = np.zeros(n)
    idx = range(n - m - 1, n)
    for j in idx:
        num = 1.0
        for i in idx:
            if i != j:
                num *= (tq - t[i]) / (t[j] - t[i])
        w[j] = num
    return w


def backward_difference_weights(t: np.ndarray, order: int) -> list:
    """TaylorSeer's recursive backward differences at the newest snapshot, as weight
    vectors: ``D^0 = V_n``, ``D^i_j = (D^{i-1}_j - D^{i-1}_{j-1}) / (t_j - t_{j-1})``.
    Returns ``[D^0, D^1, ...]`` up to ``min(order, n - 1)``."""
    n = len(t)
    m = max(0, min(int(order), n - 1))
    # prev[i] = D^i at snapshot j-1, built forward over the last m+1 snapshots
    start = n - 1 - m
    prev: list = []
    for j in range(start, n):
        e = np.zeros(n)
        e[j] = 1.0
        cur = [e]
        if prev:
            dist = t[j] - t[j - 1]
            for i in range(len(prev)):
                if i + 1 > m:
                    break
                cur.append((cur[i] - prev[i]) / dist)
        prev = cur
    return prev


def taylorseer_weights(t: np.ndarray, tq: float, order: int) -> np.ndarray:
    """TaylorSeer (arXiv:2503.06923): ``V_n + sum_i D^i k^i / i!`` with ``k = tq - t_n``."""
    k = tq - t[-1]
    diffs = backward_difference_weights(t, order)
    w = np.zeros(len(t))
    for i, d in enumerate(diffs):
        w += d * (k ** i) / math.factorial(i)
    return w


def physicists_hermite(n: int, x: float) -> float:
    """``H_n(x)``: ``H_0 = 1``, ``H_1 = 2x``, ``H_{k+1} = 2x H_k - 2k H_{k-1}``."""
    if n < 0:
        raise ValueError(f"Hermite order must be >= 0, got {n}")
    h_prev, h = 1.0, 2.0 * x
    if n == 0:
        return 1.0
    for k in range(1, n):
        h_prev, h = h, 2.0 * x * h - 2.0 * k * h_prev
    return h


def scaled_hermite(n: int, x: float, sigma: float) -> float:
    """HiCache's dual-scaled Hermite ``Htilde_n(x) = sigma^n H_n(sigma x)``."""
    return (sigma ** n) * physicists_hermite(n, sigma * x)


def hermite_weights(t: np.ndarray, tq: float, order: int, sigma: float) -> np.ndarray:
    """HiCache (arXiv:2508.16984): ``V_n + sum_{i>=1} D^i Htilde_i(k) / i!``, evaluated at
    ``k = tq - t_n`` (forward), with TaylorSeer's backward differences ``D^i``."""
    k = tq - t[-1]
    diffs = backward_difference_weights(t, order)
    w = diffs[0].copy()
    for i in range(1, len(diffs)):
        w += diffs[i] * scaled_hermite(i, k, sigma) / math.factorial(i)
    return w
