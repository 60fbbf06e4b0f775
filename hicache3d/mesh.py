"""Meshes: export by extension (written atomically), loading, and comparison metrics.

Comparison normalises each mesh to the unit cube (its bounding box scaled uniformly so the
longest side is 1, then centred in [0, 1]^3), samples surface points, and reports the
symmetric Chamfer distance (mean of both directions' mean nearest distance), the F-score
at ``tau`` (harmonic mean of precision and recall of points within ``tau``), and the voxel
IoU of the two solids at ``resolution``^3 (inside test by ray parity along z).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Union

import numpy as np
import torch

from ._io import atomic_write  # noqa: F401  (re-exported: mesh.atomic_write)

__all__ = ["MESH_FORMATS", "MeshError", "export_mesh", "load_mesh", "mesh_format",
           "normalize_unit_cube", "voxelize", "compare_meshes"]

MESH_FORMATS = ("glb", "obj", "ply", "stl")


class MeshError(ValueError):
    """A mesh cannot be read, written or compared; the message says why."""


def mesh_format(path: Union[str, Path]) -> str:
    """The mesh format of ``path`` by its extension (``"glb"``, ``"ply"`` ...), or a
    :class:`MeshError` naming the supported ones."""
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in MESH_FORMATS:
        raise MeshError(f"unsupported output extension {Path(path).suffix or '(none)'!r} for "
                        f"{path}; use one of: {', '.join('.' + e for e in MESH_FORMATS)}")
    return ext


def export_mesh(mesh, path: Union[str, Path]) -> Path:
    """Write ``mesh`` (a ``trimesh.Trimesh``) to ``path``, format by extension.  The file
    appears complete or not at all (temporary file in the same folder, then rename)."""
    path = Path(path)
    ext = mesh_format(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise MeshError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise MeshError(f"cannot write {path}: folder {folder} is not writable")
    data = mesh.export(file_type=ext)
    atomic_write(path, data.encode() if isinstance(data, str) else data)
    return path


def load_mesh(path: Union[str, Path]):
    """Read a mesh file (any format trimesh reads) as one ``trimesh.Trimesh``."""
    import trimesh
    path = Path(path)
    if not path.is_file():
        raise MeshError(f"{path} does not exist or is not a file")
    try:
        m = trimesh.load(str(path), force="mesh")
    except Exception as e:
        raise MeshError(f"cannot read {path} as a mesh: {e}") from None
    if not isinstance(m, trimesh.Trimesh) or len(m.faces) == 0:
        raise MeshError(f"{path} holds no triangles")
    return m


def normalize_unit_cube(vertices: np.ndarray) -> np.ndarray:
    """Scale/translate so the bounding box's longest side is 1, centred in [0, 1]^3."""
    v = np.asarray(vertices, dtype=np.float64)
    lo, hi = v.min(0), v.max(0)
    size = float((hi - lo).max())
    if size <= 0:
        raise MeshError("degenerate mesh: all vertices coincide")
    return (v - (lo + hi) / 2) / size + 0.5


def voxelize(vertices: np.ndarray, faces: np.ndarray, resolution: int = 32) -> torch.Tensor:
    """Solid occupancy of a closed mesh in [0, 1]^3 at ``resolution``^3: a voxel is
    inside when the ray from below its centre along +z crosses the surface an odd number
    of times."""
    tri = torch.as_tensor(np.asarray(vertices)[np.asarray(faces)], dtype=torch.float64)  # [F,3,3]
    n = resolution
    # column centres, nudged off the voxel lattice so rays avoid edges
    c = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    xs, ys = torch.meshgrid(c + 1.234e-5, c + 2.345e-5, indexing="ij")
    px, py = xs.reshape(-1, 1), ys.reshape(-1, 1)                                # [C,1]
    a, b, d = tri[:, 0], tri[:, 1], tri[:, 2]
    det = (b[:, 0] - a[:, 0]) * (d[:, 1] - a[:, 1]) - (d[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
    keep = det.abs() > 1e-15
    a, b, d, det = a[keep], b[:, :][keep], d[keep], det[keep]
    occ = torch.zeros(n * n, n, dtype=torch.bool)
    zc = c.view(1, 1, n)
    for s in range(0, px.shape[0], 128):
        X, Y = px[s:s + 128], py[s:s + 128]
        u = ((X - a[:, 0]) * (d[:, 1] - a[:, 1]) - (d[:, 0] - a[:, 0]) * (Y - a[:, 1])) / det
        v = ((b[:, 0] - a[:, 0]) * (Y - a[:, 1]) - (X - a[:, 0]) * (b[:, 1] - a[:, 1])) / det
        hit = (u >= 0) & (v >= 0) & (u + v <= 1)                                  # [c,F]
        z = a[:, 2] + u * (b[:, 2] - a[:, 2]) + v * (d[:, 2] - a[:, 2])
        below = (hit.unsqueeze(-1) & (z.unsqueeze(-1) < zc)).sum(1)               # [c,n]
        occ[s:s + 128] = (below % 2) == 1
    return occ.view(n, n, n)


def _surface_points(mesh, count: int, seed: int) -> torch.Tensor:
    import trimesh
    v = normalize_unit_cube(mesh.vertices)
    m = trimesh.Trimesh(v, mesh.faces, process=False)
    pts, _ = trimesh.sample.sample_surface(m, count, seed=seed)
    return torch.as_tensor(np.asarray(pts), dtype=torch.float64)


def nearest_distances(p: torch.Tensor, q: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """For each point of ``p`` the distance to its nearest point of ``q``, computed from
    the coordinate differences (exact: a point present in both gives 0, where the
    matrix-product form of ``cdist`` leaves rounding residue)."""
    out = [torch.cdist(p[i:i + chunk], q, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
           for i in range(0, p.shape[0], chunk)]
    return torch.cat(out)


def compare_meshes(a, b, tau: float = 0.05, points: int = 8000, resolution: int = 32,
                   seed: int = 0) -> Dict[str, float]:
    """Chamfer distance, F-score@tau and voxel IoU of two meshes, each normalised to the
    unit cube (see the module docstring)."""
    if not 0 < tau < 1:
        raise MeshError(f"tau must be in (0, 1), got {tau}")
    # the same seed for both: two identical meshes get the same points (distance 0)
    pa, pb = _surface_points(a, points, seed), _surface_points(b, points, seed)
    dab, dba = nearest_distances(pa, pb), nearest_distances(pb, pa)
    precision = float((dab < tau).double().mean())
    recall = float((dba < tau).double().mean())
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    va = voxelize(normalize_unit_cube(a.vertices), a.faces, resolution)
    vb = voxelize(normalize_unit_cube(b.vertices), b.faces, resolution)
    union = int((va | vb).sum())
    iou = float((va & vb).sum()) / union if union else 1.0
    return {"chamfer": float(dab.mean() + dba.mean()) / 2, "fscore": f, "precision": precision,
            "recall": recall, "iou": iou, "tau": tau}
