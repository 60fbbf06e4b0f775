"""Shared pieces of the compatibility layer: Gram matrices of snapshot lists, weighted
sums, and the seed's exponential-fit conventions expressed with the core's fit."""
from __future__ import annotations

from typing import Any, List, Sequence

import numpy as np
import torch

from ..forecast.exponential import fit_exponential
from ..tree import flatten, unflatten

# the seed's conventions: automatic rank cut 1e-4 on the fitted snapshots' singular values,
# amplitudes of the newest snapshot, forecast Phi Lambda^k b (no residual), no clamping
SEED_FIT = dict(rank_tol=1e-4, pod_tol=1e-13, clamp=False, keep_residual=False, select=False)


def gram(snapshots: Sequence[Any]) -> np.ndarray:
    """Gram matrix (float64) of a list of tensors or velocity trees."""
    flat = []
    for s in snapshots:
        leaves, _ = flatten(s, batch_dim=None)
        flat.append([l.detach().reshape(-1).to(torch.float64) for l in leaves])
    n = len(flat)
    G = torch.zeros((n, n), dtype=torch.float64)
    for k in range(len(flat[0])):
        M = torch.stack([f[k].cpu() for f in flat])
        G += M @ M.T
    return G.numpy()


def combine(snapshots: Sequence[Any], w: np.ndarray) -> Any:
    """``sum_j w_j snapshots[j]`` in the structure, dtype and device of the newest."""
    flat = [flatten(s, batch_dim=None) for s in snapshots]
    leaves_new, spec = flat[-1]
    out = []
    for k, ref in enumerate(leaves_new):
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for j, (leaves, _) in enumerate(flat):
            if w[j] != 0.0:
                acc += float(w[j]) * leaves[k].detach().to(torch.float64)
        out.append(acc.to(ref.dtype))
    return unflatten(spec, out)


def all_finite(v: Any) -> bool:
    leaves, _ = flatten(v, batch_dim=None)
    return all(bool(torch.isfinite(l).all()) for l in leaves)


def seed_dmd_weights(G: np.ndarray, k: float, min_snapshots: int = 3) -> np.ndarray:
    """Weights of the seed's DMD forecast ``k`` spacings past the newest of the equally
    spaced snapshots behind ``G``; raises :class:`FitError` on a degenerate fit."""
    n = G.shape[0]
    t = np.arange(n, dtype=np.float64)
    fit = fit_exponential(t, G, min_snapshots=min_snapshots, **SEED_FIT)
    return fit.weights(t[-1] + float(k))


def uniform_tail(steps: List[int]) -> int:
    """Length of the longest equally spaced suffix of compute-step indices."""
    if len(steps) < 2:
        return len(steps)
    spacing = steps[-1] - steps[-2]
    if spacing <= 0:
        return 1
    n = 2
    while n < len(steps) and steps[-n] - steps[-n - 1] == spacing:
        n += 1
    return n
