"""Shape-quality metrics for occupancy grids (pure torch).

Normalisation used for point-based metrics
    A grid of size ``N`` is mapped to the unit cube ``[0, 1]^3`` with voxel
    ``(i, j, k)`` covering ``[i/N, (i+1)/N] x [j/N, (j+1)/N] x [k/N, (k+1)/N]``.
    This fixed frame is the same for the generated and the reference grid
    (no per-shape re-centring or re-scaling), so a distance of 0.1 is 10% of
    the grid cube's edge (3.2 voxels at N = 32).  The surface points of an
    occupancy grid are the centres of its exposed voxel faces (faces between
    an occupied voxel and an empty one or the outside of the grid).

Metrics
    * ``voxel_iou(a, b)`` - |a & b| / |a | b| (1.0 when both are empty).
    * ``chamfer_distance(p, q)`` - ``(mean_p min_q |p - q| + mean_q min_p |p - q|) / 2``
      with Euclidean (not squared) distances.
    * ``fscore(p, q, tau)`` - precision = fraction of ``p`` within ``tau`` of
      ``q``, recall = fraction of ``q`` within ``tau`` of ``p``,
      F = 2PR / (P + R) (0 when P + R = 0).  ``p`` is the prediction.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch


def voxel_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boolean grids; ``(N, N, N)`` -> scalar, ``(B, N, N, N)`` -> ``(B,)``."""
    a = a.bool()
    b = b.bool()
    dims = tuple(range(a.dim() - 3, a.dim()))
    inter = (a & b).sum(dim=dims).double()
    union = (a | b).sum(dim=dims).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


_FACE_DIRS = [(0, -1), (0, 1), (1, -1), (1, 1), (2, -1), (2, 1)]


def exposed_faces(occ: torch.Tensor) -> List[Tuple[int, int, torch.Tensor]]:
    """For each of the 6 directions ``(axis, sign)`` the indices ``(M, 3)`` of
    occupied voxels whose neighbour in that direction is empty/outside."""
    occ = occ.bool()
    padded = torch.nn.functional.pad(occ[None, None].float(), (1, 1, 1, 1, 1, 1))[0, 0].bool()
    n0, n1, n2 = occ.shape
    out = []
    for axis, sign in _FACE_DIRS:
        sl = [slice(1, n0 + 1), slice(1, n1 + 1), slice(1, n2 + 1)]
        s = sl[axis]
        sl[axis] = slice(s.start + sign, s.stop + sign)
        neighbour = padded[tuple(sl)]
        out.append((axis, sign, torch.nonzero(occ & ~neighbour)))
    return out


def surface_points(occ: torch.Tensor, max_points: Optional[int] = None, seed: int = 0) -> torch.Tensor:
    """Centres of the exposed faces of an ``(N, N, N)`` occupancy grid in the
    unit-cube frame (module doc); a deterministic random subset of at most
    ``max_points`` if given.  Returns ``(M, 3)`` float32 (``M = 0`` if empty)."""
    n = torch.tensor(occ.shape, dtype=torch.float32)
    pts = []
    for axis, sign, idx in exposed_faces(occ):
        p = idx.float() + 0.5
        p[:, axis] += 0.5 * sign
        pts.append(p / n)
    pts = torch.cat(pts, dim=0) if pts else torch.zeros(0, 3)
    if max_points is not None and pts.shape[0] > max_points:
        g = torch.Generator().manual_seed(seed)
        pts = pts[torch.randperm(pts.shape[0], generator=g)[:max_points]]
    return pts


def nearest_distances(p: torch.Tensor, q: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """For each point of ``p`` the Euclidean distance to its nearest point of ``q``."""
    if q.shape[0] == 0:
        return torch.full((p.shape[0],), float("inf"))
    out = []
    for i in range(0, p.shape[0], chunk):
        out.append(torch.cdist(p[i:i + chunk].double(), q.double()).min(dim=1).values)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def chamfer_and_fscore(p: torch.Tensor, q: torch.Tensor, tau: float = 0.1, chunk: int = 4096) -> Dict[str, float]:
    """Chamfer distance, precision, recall and F-score@tau of prediction
    points ``p`` against reference points ``q`` (see module doc)."""
    if p.shape[0] == 0 or q.shape[0] == 0:
        both = p.shape[0] == 0 and q.shape[0] == 0
        return {"chamfer": 0.0 if both else float("inf"), "precision": float(both),
                "recall": float(both), "fscore": float(both)}
    dp = nearest_distances(p, q, chunk)
    dq = nearest_distances(q, p, chunk)
    precision = float((dp <= tau).double().mean())
    recall = float((dq <= tau).double().mean())
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"chamfer": float((dp.mean() + dq.mean()) / 2), "precision": precision, "recall": recall, "fscore": f}


def chamfer_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    return chamfer_and_fscore(p, q)["chamfer"]


def fscore(p: torch.Tensor, q: torch.Tensor, tau: float = 0.1) -> float:
    return chamfer_and_fscore(p, q, tau)["fscore"]


def shape_metrics(pred: torch.Tensor, ref: torch.Tensor, tau: float = 0.1, max_points: Optional[int] = 4096) -> Dict[str, float]:
    """IoU, Chamfer and F-score@tau of one predicted vs reference occupancy grid."""
    out = chamfer_and_fscore(surface_points(pred, max_points), surface_points(ref, max_points), tau)
    out["iou"] = float(voxel_iou(pred, ref))
    return out


def batch_metrics(pred: torch.Tensor, ref: torch.Tensor, tau: float = 0.1, max_points: Optional[int] = 4096) -> Dict[str, np.ndarray]:
    """Per-shape metrics of ``(B, N, N, N)`` grids, as arrays keyed by metric name."""
    rows = [shape_metrics(a, b, tau, max_points) for a, b in zip(pred, ref)]
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def occupancy_to_mesh(occ: torch.Tensor, lo: float = -1.0, hi: float = 1.0):
    """Watertight voxel mesh (exposed faces, shared corners) of an occupancy grid,
    placed in the cube ``[lo, hi]^3``.  Returns a ``trimesh.Trimesh``."""
    import trimesh

    n = occ.shape[0]
    quads = []
    # corner offsets of the face orthogonal to `axis` at +/- side, counter-clockwise seen from outside
    for axis, sign, idx in exposed_faces(occ):
        if idx.shape[0] == 0:
            continue
        a1, a2 = (axis + 1) % 3, (axis + 2) % 3
        base = idx.clone()
        if sign > 0:
            base[:, axis] += 1
        corners = []
        for d1, d2 in ((0, 0), (1, 0), (1, 1), (0, 1)):
            c = base.clone()
            c[:, a1] += d1
            c[:, a2] += d2
            corners.append(c)
        if sign < 0:
            corners = corners[::-1]
        quads.append(torch.stack(corners, dim=1))
    if not quads:
        return trimesh.Trimesh(vertices=np.zeros((0, 3)), faces=np.zeros((0, 3), dtype=np.int64))
    q = torch.cat(quads).numpy()  # (F, 4, 3) integer lattice corners
    verts, inv = np.unique(q.reshape(-1, 3), axis=0, return_inverse=True)
    inv = inv.reshape(-1, 4)
    faces = np.concatenate([inv[:, [0, 1, 2]], inv[:, [0, 2, 3]]], axis=0)
    verts = lo + verts.astype(np.float64) * ((hi - lo) / n)
    return trimesh.Trimesh(vertices=verts, faces=faces, process=False)
