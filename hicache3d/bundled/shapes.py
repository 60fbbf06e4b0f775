"""Procedural shapes for the bundled generator.

A shape is a union of 1-4 random primitives (box, rounded box, sphere,
ellipsoid, cylinder, cone frustum, capsule, torus) with random size,
rotation and placement.  Everything is evaluated analytically: the signed
distance (or a lower bound of it) of each primitive is computed on query
points, the union is the minimum.  From it we get

* the occupancy on a ``GRID``^3 grid of voxel centres over the cube
  ``[-1, 1]^3`` (a voxel is occupied when its centre is inside), and
* the conditioning image: an orthographic 2-channel ``IMAGE`` x ``IMAGE``
  render from a fixed view (silhouette, front-surface depth), obtained by
  dense sampling of the distance function along each pixel ray with a
  linear refinement of the first sign change.

Every shape is normalised so that a conservative bounding sphere of it is
centred at the origin with radius ``0.95``; hence it lies inside the grid
cube and its projection lies inside the image square ``[-1, 1]^2``.

Shapes are deterministic functions of ``(split, index)``.  The splits use
disjoint seed ranges (see :func:`shape_seed`), so ``held_out`` shapes never
coincide with training shapes.

Conditioning format (``(2, IMAGE, IMAGE)`` float32, row 0 is the top):

* channel 0: silhouette in ``[0, 1]``;
* channel 1: depth code ``1 - s / 2`` on the silhouette, where ``s`` in
  ``(0, 2)`` is the distance along the viewing ray from the camera plane
  (which passes through ``VIEW_DIR``, i.e. at distance 1 from the origin);
  0 on the background.  A depth channel that is zero everywhere means
  "depth unknown" (user images), which the model is trained to handle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch

GRID = 32
IMAGE = 64
VIEW_AZIMUTH_DEG = 45.0
VIEW_ELEVATION_DEG = 30.0
RAY_SAMPLES = 48
BOUND_RADIUS = 0.95

SPLIT_OFFSETS = {"train": 0, "val": 500_000_000, "held_out": 1_000_000_000}
SPLIT_SIZE = 500_000_000

PRIMITIVES = ("box", "roundbox", "sphere", "ellipsoid", "cylinder", "cone", "capsule", "torus")


# ----------------------------------------------------------------------------
# camera
# ----------------------------------------------------------------------------

def view_basis() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(right, up, d)`` of the fixed orthographic camera.

    ``d`` points from the origin towards the camera; rays travel along
    ``-d``.  ``right`` and ``up`` span the image plane (image x to the right,
    image y upwards).
    """
    az = math.radians(VIEW_AZIMUTH_DEG)
    el = math.radians(VIEW_ELEVATION_DEG)
    d = torch.tensor([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)], dtype=torch.float64)
    world_up = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    right = torch.linalg.cross(world_up, d)
    right = right / right.norm()
    up = torch.linalg.cross(d, right)
    return right.float(), up.float(), d.float()


def grid_points(n: int = GRID) -> torch.Tensor:
    """Voxel centres of an ``n``^3 grid over ``[-1, 1]^3``, shape ``(n, n, n, 3)``.

    Index order is ``[ix, iy, iz]`` with coordinate ``-1 + (i + 0.5) * 2 / n``.
    """
    c = (torch.arange(n, dtype=torch.float32) + 0.5) * (2.0 / n) - 1.0
    return torch.stack(torch.meshgrid(c, c, c, indexing="ij"), dim=-1)


def pixel_coords(n: int = IMAGE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Image-plane coordinates ``(x, y)`` of pixel centres, each ``(n, n)``; row 0 is the top."""
    c = (torch.arange(n, dtype=torch.float32) + 0.5) * (2.0 / n) - 1.0
    y = -c[:, None].expand(n, n)
    x = c[None, :].expand(n, n)
    return x, y


# ----------------------------------------------------------------------------
# primitives
# ----------------------------------------------------------------------------

@dataclass
class Primitive:
    kind: str
    params: Tuple[float, ...]
    rotation: np.ndarray  # (3, 3), columns are the local axes in world frame
    center: np.ndarray  # (3,)

    def bound_radius(self) -> float:
        p = self.params
        if self.kind in ("box", "roundbox"):
            return float(np.linalg.norm(p[:3]))
        if self.kind == "sphere":
            return p[0]
        if self.kind == "ellipsoid":
            return max(p)
        if self.kind == "cylinder":
            return math.hypot(p[0], p[1])
        if self.kind == "cone":
            return math.hypot(max(p[0], p[1]), p[2])
        if self.kind == "capsule":
            return p[0] + p[1]
        if self.kind == "torus":
            return p[0] + p[1]
        raise ValueError(self.kind)

    def sdf(self, pts: torch.Tensor) -> torch.Tensor:
        """Signed distance (exact or a lower bound) at ``pts`` ``(..., 3)``."""
        R = torch.as_tensor(self.rotation, dtype=pts.dtype)
        c = torch.as_tensor(self.center, dtype=pts.dtype)
        q = (pts - c) @ R  # local coordinates
        return _local_sdf(self.kind, self.params, q)


def _length2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(a * a + b * b)


def _local_sdf(kind: str, p: Sequence[float], q: torch.Tensor) -> torch.Tensor:
    x, y, z = q[..., 0], q[..., 1], q[..., 2]
    if kind in ("box", "roundbox"):
        bx, by, bz = p[0], p[1], p[2]
        r = p[3] if kind == "roundbox" else 0.0
        b = torch.tensor([bx - r, by - r, bz - r], dtype=q.dtype)
        d = q.abs() - b
        outside = d.clamp(min=0).norm(dim=-1)
        inside = d.max(dim=-1).values.clamp(max=0)
        return outside + inside - r
    if kind == "sphere":
        return q.norm(dim=-1) - p[0]
    if kind == "ellipsoid":
        a = torch.tensor(p[:3], dtype=q.dtype)
        k = (q / a).norm(dim=-1)
        return (k - 1.0) * min(p[:3])  # lower bound of the distance
    if kind == "cylinder":
        r, h = p[0], p[1]
        dr = _length2(x, z) - r
        dh = y.abs() - h
        return torch.minimum(torch.maximum(dr, dh), torch.zeros_like(dr)) + _length2(dr.clamp(min=0), dh.clamp(min=0))
    if kind == "cone":
        # frustum along local y: radius r1 at y=-h, r2 at y=+h
        r1, r2, h = p[0], p[1], p[2]
        radial = _length2(x, z)
        r_at = r1 + (r2 - r1) * (y + h) / (2 * h)
        cos_t = 2 * h / math.hypot(2 * h, r1 - r2)
        side = (radial - r_at) * cos_t
        cap = y.abs() - h
        return torch.maximum(side, cap)  # lower bound (intersection of two bounds)
    if kind == "capsule":
        r, h = p[0], p[1]
        yc = y.clamp(-h, h)
        return torch.sqrt(x * x + (y - yc) ** 2 + z * z) - r
    if kind == "torus":
        R, r = p[0], p[1]
        return _length2(_length2(x, z) - R, y) - r
    raise ValueError(kind)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.35:
        # upright: only a rotation around the vertical axis
        a = rng.uniform(0, 2 * math.pi)
        ca, sa = math.cos(a), math.sin(a)
        return np.array([[ca, 0, sa], [0, 1, 0], [-sa, 0, ca]])
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _random_params(kind: str, rng: np.random.Generator, s: float) -> Tuple[float, ...]:
    u = lambda lo, hi: float(rng.uniform(lo, hi)) * s  # noqa: E731
    if kind == "box":
        return (u(0.2, 0.7), u(0.2, 0.7), u(0.2, 0.7))
    if kind == "roundbox":
        b = (u(0.25, 0.7), u(0.25, 0.7), u(0.25, 0.7))
        return b + (float(rng.uniform(0.2, 0.5)) * min(b),)
    if kind == "sphere":
        return (u(0.3, 0.65),)
    if kind == "ellipsoid":
        return (u(0.2, 0.75), u(0.2, 0.75), u(0.2, 0.75))
    if kind == "cylinder":
        return (u(0.15, 0.5), u(0.2, 0.75))
    if kind == "cone":
        r1 = u(0.25, 0.6)
        r2 = float(rng.uniform(0.0, 0.6)) * r1
        return (r1, r2, u(0.25, 0.7))
    if kind == "capsule":
        return (u(0.12, 0.35), u(0.2, 0.6))
    if kind == "torus":
        R = u(0.35, 0.65)
        return (R, float(rng.uniform(0.25, 0.5)) * R)
    raise ValueError(kind)


@dataclass
class Shape:
    """A union of primitives, already normalised into the bounding sphere."""

    primitives: List[Primitive]
    seed: int = 0
    scale: float = 1.0
    offset: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def sdf(self, pts: torch.Tensor) -> torch.Tensor:
        """Distance (lower bound) of the normalised shape at world points ``pts``."""
        local = pts / self.scale + torch.as_tensor(self.offset, dtype=pts.dtype)
        d = None
        for prim in self.primitives:
            di = prim.sdf(local)
            d = di if d is None else torch.minimum(d, di)
        return d * self.scale

    def occupancy(self, n: int = GRID) -> torch.Tensor:
        """Boolean occupancy ``(n, n, n)`` of voxel centres (index ``[ix, iy, iz]``)."""
        return self.sdf(grid_points(n)) <= 0

    def render(self, n: int = IMAGE, samples: int = RAY_SAMPLES) -> torch.Tensor:
        return render_sdf(self.sdf, n=n, samples=samples)


def shape_seed(split: str, index: int) -> int:
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_OFFSETS)}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError("index out of range")
    return SPLIT_OFFSETS[split] + int(index)


def random_shape(seed: int) -> Shape:
    """Deterministic random union of 1-4 primitives from ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([0x5A17E, int(seed)]))
    n = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.3, 0.3, 0.2]))
    prims: List[Primitive] = []
    for i in range(n):
        kind = str(rng.choice(PRIMITIVES))
        s = 1.0 if i == 0 else float(rng.uniform(0.5, 1.0))
        params = _random_params(kind, rng, s)
        rot = _random_rotation(rng)
        if i == 0:
            center = np.zeros(3)
        else:
            # attach to a previous primitive so that the union is mostly connected
            j = int(rng.integers(0, i))
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            dist = float(rng.uniform(0.3, 0.9)) * prims[j].bound_radius()
            center = prims[j].center + direction * dist
        prims.append(Primitive(kind, params, rot, center))
    # conservative bounding sphere: centre of the box around the primitive spheres
    cs = np.stack([p.center for p in prims])
    rs = np.array([p.bound_radius() for p in prims])
    lo = (cs - rs[:, None]).min(0)
    hi = (cs + rs[:, None]).max(0)
    mid = (lo + hi) / 2
    radius = float(max(np.linalg.norm(c - mid) + r for c, r in zip(cs, rs)))
    return Shape(prims, seed=int(seed), scale=BOUND_RADIUS / radius, offset=mid)


def get_shape(split: str, index: int) -> Shape:
    return random_shape(shape_seed(split, index))


# ----------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------

def render_sdf(sdf_fn, n: int = IMAGE, samples: int = RAY_SAMPLES) -> torch.Tensor:
    """Orthographic silhouette + depth render of a distance function whose
    zero set lies inside the ball of radius ``BOUND_RADIUS``.

    Only rays that cross the ball (slightly enlarged) are traced, with
    ``samples`` evenly spaced points on the chord of each ray; the first
    sign change is refined by linear interpolation of the distance values.
    Returns ``(2, n, n)`` float32 in the conditioning format (module doc).
    """
    right, up, d = view_basis()
    x, y = pixel_coords(n)
    origin = x[..., None] * right + y[..., None] * up + d  # (n, n, 3) on the camera plane
    big_r = BOUND_RADIUS + 0.02
    r2 = x * x + y * y
    ray = r2 < big_r * big_r
    half = torch.sqrt((big_r * big_r - r2[ray]).clamp(min=0))  # (M,) half chord
    frac = (torch.arange(samples, dtype=torch.float32) + 0.5) / samples
    s = (1.0 - half)[:, None] + frac[None, :] * (2 * half)[:, None]  # (M, S)
    pts = origin[ray][:, None, :] - s[..., None] * d  # (M, S, 3)
    f = sdf_fn(pts)  # (M, S)
    inside = f <= 0
    hit = inside.any(dim=-1)
    k = torch.argmax(inside.to(torch.uint8), dim=-1)  # first inside sample
    kp = (k - 1).clamp(min=0)
    fk = torch.gather(f, -1, k[:, None])[:, 0]
    fp = torch.gather(f, -1, kp[:, None])[:, 0]
    sk = torch.gather(s, -1, k[:, None])[:, 0]
    sp = torch.gather(s, -1, kp[:, None])[:, 0]
    denom = (fp - fk).clamp(min=1e-8)
    s_hit = torch.where(k > 0, sp + (sk - sp) * (fp / denom).clamp(0, 1), sk)
    sil = torch.zeros(n, n)
    depth = torch.zeros(n, n)
    sil[ray] = hit.float()
    depth[ray] = torch.where(hit, 1.0 - s_hit / 2.0, torch.zeros_like(s_hit))
    return torch.stack([sil, depth], dim=0)


def make_example(split: str, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(occupancy (GRID,)*3 bool, condition (2, IMAGE, IMAGE))`` of one shape."""
    sh = get_shape(split, index)
    return sh.occupancy(), sh.render()


def make_batch(split: str, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    occ, cond = zip(*(make_example(split, int(i)) for i in indices))
    return torch.stack(occ), torch.stack(cond)


def mirror_example(occ: torch.Tensor, cond: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mirror symmetry of the fixed view (azimuth 45 degrees): swapping world
    x and z maps the camera onto itself and flips the image horizontally.
    Works on single examples or batches (leading dims)."""
    assert VIEW_AZIMUTH_DEG == 45.0
    return occ.transpose(-3, -1), cond.flip(-1)


# ----------------------------------------------------------------------------
# user images
# ----------------------------------------------------------------------------

IMAGE_FORMATS = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "WEBP": (".webp",)}
IMAGE_SUFFIXES = tuple(x for v in IMAGE_FORMATS.values() for x in v)


def read_image(path: Union[str, Path], max_side: int = 0) -> np.ndarray:
    """Decode a PNG, JPEG or WebP file (Pillow) as ``uint8`` ``(H, W, C)``: C is 1 (grey),
    2 (grey + alpha), 3 (RGB) or 4 (RGBA); palette images become RGB(A), 16-bit grey is
    reduced to 8 bits.  ``max_side > 0`` shrinks larger images by an integer box filter
    (``Image.reduce``) until no side exceeds ``2 * max_side``.  Raises ``ValueError``
    naming the file for anything else (not an image, truncated, another format)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            if im.format not in IMAGE_FORMATS:
                raise ValueError(f"{path}: {im.format} images are not supported; use PNG, JPEG or WebP")
            im.load()
            if im.mode == "P" or im.mode == "PA":
                im = im.convert("RGBA" if ("transparency" in im.info or im.mode == "PA") else "RGB")
            elif im.mode == "1":
                im = im.convert("L")
            elif im.mode not in ("L", "LA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L"):
                im = im.convert("RGB")                        # CMYK / YCbCr JPEGs
            if max_side > 0 and max(im.size) > 2 * max_side:
                im = im.reduce(max(im.size) // max_side)
            a = np.asarray(im)
    except ValueError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read {path} as a PNG, JPEG or WebP image ({e})") from None
    if a.dtype != np.uint8:                                   # 16-bit grey ("I;16" / "I")
        a = (a.astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    return np.ascontiguousarray(a)


def read_png(path: Union[str, Path]) -> np.ndarray:
    """:func:`read_image` (kept for the name; reads JPEG and WebP too)."""
    return read_image(path)


def write_png(path: Union[str, Path], img: np.ndarray) -> None:
    """Write ``uint8`` ``(H, W)`` or ``(H, W, C)`` (C in 1-4) as PNG (floats in [0, 1]
    are scaled to 8 bits)."""
    from PIL import Image
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    mode = {2: "L", 3: {2: "LA", 3: "RGB", 4: "RGBA"}.get(img.shape[-1])}[img.ndim] if img.ndim in (2, 3) else None
    if mode is None:
        raise ValueError(f"write_png takes (H, W) or (H, W, C) with C in 1-4, got {img.shape}")
    Image.fromarray(np.ascontiguousarray(img), mode=mode).save(str(path), format="PNG")


def condition_to_rgba(cond: torch.Tensor) -> np.ndarray:
    """A viewable RGBA image of a condition: grey shading from depth, alpha = silhouette."""
    sil = cond[0].clamp(0, 1).numpy()
    dep = cond[1].numpy()
    shade = np.where(sil > 0, 0.25 + 0.75 * np.clip((dep - 0.2) / 0.7, 0, 1), 1.0) if dep.max() > 0 else np.where(sil > 0, 0.5, 1.0)
    rgb = np.repeat(shade[..., None], 3, axis=-1)
    return (np.concatenate([rgb, sil[..., None]], axis=-1) * 255 + 0.5).astype(np.uint8)


USER_EXTENT = 0.78  # half-extent of the silhouette box after framing a user image


def silhouette_from_image(img: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Foreground mask of an ``(H, W[, C])`` image.

    Uses the alpha channel when it is present and not fully opaque; otherwise
    pixels whose colour differs from the median border colour by more than
    ``threshold`` (colours in [0, 1], max-abs difference) are foreground.
    """
    a = np.asarray(img)
    a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    if a.ndim == 2:
        a = a[..., None]
    c = a.shape[-1]
    if c in (2, 4) and a[..., -1].min() < 0.99:
        return a[..., -1] > 0.5
    color = a[..., : (c - 1 if c in (2, 4) else c)]
    border = np.concatenate([color[0], color[-1], color[:, 0], color[:, -1]], axis=0)
    bg = np.median(border, axis=0)
    return np.abs(color - bg).max(axis=-1) > threshold


def frame_silhouette(mask: np.ndarray, n: int = IMAGE, extent: float = USER_EXTENT) -> torch.Tensor:
    """Centre the mask's bounding box and scale its longer side to ``2 * extent``
    of the image square, resampling to ``n`` x ``n`` (area average)."""
    mask = np.asarray(mask, dtype=bool)
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return torch.zeros(n, n)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    half = max(y1 - y0, x1 - x0) / 2 / extent  # source pixels per unit of image coordinate
    # supersample 4x4 per output pixel
    ss = 4
    c = (torch.arange(n * ss, dtype=torch.float64) + 0.5) / (n * ss) * 2 - 1
    sy = torch.floor(cy + c * half).long()
    sx = torch.floor(cx + c * half).long()
    valid_y = (sy >= 0) & (sy < mask.shape[0])
    valid_x = (sx >= 0) & (sx < mask.shape[1])
    m = torch.from_numpy(mask)
    sub = m[sy.clamp(0, mask.shape[0] - 1)][:, sx.clamp(0, mask.shape[1] - 1)]
    sub = sub & valid_y[:, None] & valid_x[None, :]
    sil = sub.float().reshape(n, ss, n, ss).mean(dim=(1, 3))
    return (sil >= 0.5).float()


def silhouette_problem(img: np.ndarray, threshold: float = 0.1) -> str:
    """Why :func:`silhouette_from_image` finds no object in ``img`` ('' if it finds one):
    the sentence a user needs to fix the image."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[..., None]
    h, w, c = a.shape
    if silhouette_from_image(a, threshold).any():
        return ""
    if min(h, w) < 8:
        return f"the image is {w}x{h} pixels, too small to show an object (give at least 8x8)"
    f = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    if c in (2, 4) and f[..., -1].min() < 0.99:
        return ("no pixel is more than half opaque (the alpha channel is the silhouette and it is "
                "empty): give the object opaque pixels on a transparent background")
    colour = f[..., : (c - 1 if c in (2, 4) else c)]
    border = np.concatenate([colour[0], colour[-1], colour[:, 0], colour[:, -1]], axis=0)
    bg = ", ".join(str(int(round(v * 255))) for v in np.median(border, axis=0))
    return (f"the object's silhouette is empty: every pixel is within {threshold:g} of the "
            f"background colour ({bg}, the median colour of the image border). Photograph the "
            f"object on a background of another colour, or give a PNG/WebP whose background "
            f"is transparent")


def image_to_condition(image: Union[str, Path, np.ndarray], n: int = IMAGE, threshold: float = 0.1) -> torch.Tensor:
    """Turn a user's image (PNG/JPEG/WebP path or array) into a ``(2, n, n)`` condition
    with unknown depth (depth channel zero).

    The object is assumed to be seen from the fixed training view (azimuth
    45 degrees, elevation 30 degrees, orthographic); it is centred and scaled
    so that its silhouette box spans ``2 * USER_EXTENT`` of the frame.  An image in
    which no object is found raises ``ValueError`` saying why (see
    :func:`silhouette_problem`).
    """
    img = read_image(image, max_side=1024) if isinstance(image, (str, Path)) else np.asarray(image)
    mask = silhouette_from_image(img, threshold)
    if not mask.any():
        name = str(image) if isinstance(image, (str, Path)) else "image"
        raise ValueError(f"{name}: {silhouette_problem(img, threshold)}")
    sil = frame_silhouette(mask, n=n)
    return torch.stack([sil, torch.zeros_like(sil)], dim=0)
