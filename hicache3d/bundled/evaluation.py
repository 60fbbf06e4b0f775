"""Held-out evaluation of the bundled generator (used by the scripts and tests)."""

from __future__ import annotations

import time
from typing import Dict, Sequence

import numpy as np
import torch

from . import shapes
from .metrics import batch_metrics


def load_split(split: str, n: int, start: int = 0):
    """``(occupancy (n, 32, 32, 32), condition (n, 2, 64, 64))`` of shapes ``start..start+n``."""
    return shapes.make_batch(split, range(start, start + n))


def evaluate(gen, occ: torch.Tensor, cond: torch.Tensor, seed: int = 0, batch: int = 32,
             tau: float = 0.1, **sample_kwargs) -> Dict[str, np.ndarray]:
    """Generate for every condition (batched) and compare with ``occ``.

    Returns per-shape arrays (``iou``, ``fscore``, ``chamfer``, ``precision``,
    ``recall``) plus ``seconds`` (total generation time) and
    ``network_forwards`` (per batch)."""
    preds, forwards = [], 0
    t0 = time.time()
    for i in range(0, cond.shape[0], batch):
        out = gen(cond[i:i + batch], seed=seed + i, **sample_kwargs)
        preds.append(out.occupancy.cpu())
        forwards = out.network_forwards
    seconds = time.time() - t0
    res = batch_metrics(torch.cat(preds), occ, tau=tau)
    res["seconds"] = np.array(seconds)
    res["network_forwards"] = np.array(forwards)
    return res


def summary(res: Dict[str, np.ndarray], keys: Sequence[str] = ("fscore", "iou", "chamfer")) -> Dict[str, float]:
    out = {}
    for k in keys:
        out[f"{k}_mean"] = float(np.mean(res[k]))
        out[f"{k}_min"] = float(np.min(res[k]))
    return out


def without_depth(cond: torch.Tensor) -> torch.Tensor:
    c = cond.clone()
    c[:, 1] = 0
    return c
