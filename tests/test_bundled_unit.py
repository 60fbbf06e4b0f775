"""Unit tests of the bundled generator: shapes, renderer, lifting, sampler, weights, metrics."""

import itertools
import math
import pickle

import numpy as np
import pytest
import torch

from hicache3d.bundled import shapes
from hicache3d.bundled.generator import DEFAULT_WEIGHTS, BundledGenerator
from hicache3d.bundled.metrics import (
    chamfer_and_fscore,
    occupancy_to_mesh,
    surface_points,
    voxel_iou,
)
from hicache3d.bundled.model import (
    ImageLifter,
    depth_to_space,
    latent_to_grid,
    occupancy_to_latent,
    space_to_depth,
)
from hicache3d.bundled.sampler import OccupancyFlowSampler, rescaled_timesteps

torch.set_num_threads(2)


def sphere_shape(r=0.5, center=(0.0, 0.0, 0.0)):
    prim = shapes.Primitive("sphere", (r,), np.eye(3), np.array(center, dtype=float))
    return shapes.Shape([prim], scale=1.0, offset=np.zeros(3))


# ----------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------

def test_shapes_are_deterministic():
    o1, c1 = shapes.make_example("train", 7)
    o2, c2 = shapes.make_example("train", 7)
    assert torch.equal(o1, o2) and torch.equal(c1, c2)
    o3, _ = shapes.make_example("train", 8)
    assert not torch.equal(o1, o3)
    assert o1.shape == (shapes.GRID,) * 3 and o1.dtype == torch.bool
    assert c1.shape == (2, shapes.IMAGE, shapes.IMAGE)


def test_split_seeds_are_disjoint():
    s = shapes.SPLIT_SIZE
    ranges = {k: (shapes.shape_seed(k, 0), shapes.shape_seed(k, s - 1)) for k in shapes.SPLIT_OFFSETS}
    for (a, ra), (b, rb) in itertools.combinations(ranges.items(), 2):
        assert ra[1] < rb[0] or rb[1] < ra[0], (a, b)
    with pytest.raises(ValueError):
        shapes.shape_seed("held_out", s)
    # held-out shapes differ from the training shapes with the same index
    for i in range(4):
        assert not torch.equal(shapes.make_example("held_out", i)[0], shapes.make_example("train", i)[0])


def test_shapes_fit_grid_and_image():
    occ, cond = shapes.make_batch("val", range(16))
    assert occ.flatten(1).any(1).all()
    # nothing on the grid boundary or the image border (bounding sphere radius 0.95)
    for face in (occ[:, 0], occ[:, -1], occ[:, :, 0], occ[:, :, -1], occ[:, :, :, 0], occ[:, :, :, -1]):
        assert not face.any()
    sil = cond[:, 0]
    assert sil[:, 0].sum() == 0 and sil[:, -1].sum() == 0 and sil[:, :, 0].sum() == 0 and sil[:, :, -1].sum() == 0


def test_primitive_sdf_signs():
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.99, 0.99, 0.99]])
    for kind in shapes.PRIMITIVES:
        if kind == "torus":
            continue  # the centre of a torus is outside
        rng = np.random.default_rng(0)
        params = shapes._random_params(kind, rng, 0.5)
        prim = shapes.Primitive(kind, params, np.eye(3), np.zeros(3))
        d = prim.sdf(pts)
        assert d[0] < 0 and d[1] > 0, kind
    # exact distances of simple cases
    box = shapes.Primitive("box", (0.5, 0.25, 0.125), np.eye(3), np.zeros(3))
    assert box.sdf(torch.tensor([[1.0, 0.0, 0.0]])).item() == pytest.approx(0.5)
    assert box.sdf(torch.tensor([[0.0, 0.0, 0.0]])).item() == pytest.approx(-0.125)
    cyl = shapes.Primitive("cylinder", (0.3, 0.4), np.eye(3), np.zeros(3))
    assert cyl.sdf(torch.tensor([[0.0, 1.0, 0.0]])).item() == pytest.approx(0.6)
    tor = shapes.Primitive("torus", (0.5, 0.1), np.eye(3), np.zeros(3))
    assert tor.sdf(torch.tensor([[0.5, 0.0, 0.0]])).item() == pytest.approx(-0.1)


# ----------------------------------------------------------------------------
# renderer and lifting
# ----------------------------------------------------------------------------

def test_render_sphere():
    r = 0.5
    cond = sphere_shape(r).render()
    px = 2.0 / shapes.IMAGE
    area = cond[0].sum().item() * px * px
    assert area == pytest.approx(math.pi * r * r, rel=0.03)
    # front surface of a centred sphere: s = 1 - r on the central ray
    c = shapes.IMAGE // 2
    centre_depth = cond[1, c - 1:c + 1, c - 1:c + 1].mean().item()
    assert centre_depth == pytest.approx(1 - (1 - r) / 2, abs=0.005)
    assert (cond[1][cond[0] == 0] == 0).all() and (cond[1][cond[0] > 0] > 0).all()


def test_render_is_consistent_with_occupancy():
    occ, cond = shapes.make_batch("val", range(8))
    prior = ImageLifter()(cond)
    hull, carve = prior[:, 0] > 0.5, prior[:, 1] > 0.5
    o = occ
    # (almost) every occupied voxel projects into the silhouette and lies behind the front surface
    assert (hull & o).sum() / o.sum() > 0.99
    assert (carve & o).sum() / o.sum() > 0.97
    # the carve is much tighter than the hull
    assert voxel_iou(carve, o).mean() > voxel_iou(hull, o).mean() + 0.05


def test_lifting_without_depth_is_visual_hull():
    _, cond = shapes.make_example("val", 3)
    cond = cond[None].clone()
    cond[:, 1] = 0
    prior = ImageLifter()(cond)
    assert torch.allclose(prior[:, 1], prior[:, 0])
    assert prior[:, 2].abs().max() == 0 and prior[:, 3].max() == 0


def test_mirror_augmentation_matches_render():
    sh = shapes.get_shape("val", 5)
    occ, cond = sh.occupancy(), sh.render()
    mocc, mcond = shapes.mirror_example(occ, cond)
    swapped = shapes.Shape(sh.primitives, scale=sh.scale, offset=sh.offset)
    # evaluate the same shape with world x and z swapped
    swap = lambda p: p[..., [2, 1, 0]]  # noqa: E731
    assert torch.equal(mocc, swapped.sdf(swap(shapes.grid_points())) <= 0)
    assert (shapes.render_sdf(lambda p: swapped.sdf(swap(p)))[0] != mcond[0]).float().mean() < 0.01


def test_latent_roundtrip():
    occ = torch.rand(3, 32, 32, 32) > 0.5
    z = occupancy_to_latent(occ)
    assert z.shape == (3, 8, 16, 16, 16)
    assert torch.equal(latent_to_grid(z) > 0, occ)
    x = torch.randn(2, 3, 8, 8, 8)
    assert torch.equal(depth_to_space(space_to_depth(x)), x)


def test_png_roundtrip_and_user_condition(tmp_path):
    _, cond = shapes.make_example("val", 2)
    rgba = shapes.condition_to_rgba(cond)
    p = tmp_path / "obj.png"
    shapes.write_png(p, rgba)
    assert np.array_equal(shapes.read_png(p), rgba)
    c_alpha = shapes.image_to_condition(p)
    assert c_alpha.shape == (2, shapes.IMAGE, shapes.IMAGE) and c_alpha[1].abs().max() == 0
    # same object on a white background without alpha
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255
    rgb[rgba[..., 3] > 0] = np.minimum(rgb[rgba[..., 3] > 0], 200)
    p2 = tmp_path / "obj_rgb.png"
    shapes.write_png(p2, rgb)
    c_rgb = shapes.image_to_condition(p2)
    assert voxel_iou(c_alpha[0:1, None] > 0.5, c_rgb[0:1, None] > 0.5).item() > 0.95
    # framing: centred box with the longer side at 2 * USER_EXTENT
    ys, xs = np.nonzero(c_alpha[0].numpy())
    side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / shapes.IMAGE
    assert side == pytest.approx(shapes.USER_EXTENT, abs=2.5 / shapes.IMAGE)


# ----------------------------------------------------------------------------
# sampler
# ----------------------------------------------------------------------------

class CountingModel(torch.nn.Module):
    """v = a * cond_mean + b; records the t of each call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, cond):
        self.calls.append((float(t[0]), float(cond.abs().sum())))
        return torch.ones_like(x) * (1.0 + cond.flatten(1).mean(1).view(-1, 1, 1, 1, 1))


def test_schedule_values():
    for steps, r in [(25, 3.0), (10, 1.0), (7, 5.0)]:
        ts = rescaled_timesteps(steps, r)
        assert len(ts) == steps + 1 and ts[0] == 1.0 and ts[-1] == 0.0
        for i, t in enumerate(ts):
            u = 1 - i / steps
            assert t == pytest.approx(r * u / (1 + (r - 1) * u), abs=1e-12)
        assert all(a > b for a, b in zip(ts, ts[1:]))


def test_guidance_interval_forward_counts():
    s = OccupancyFlowSampler()
    m = CountingModel()
    x = torch.zeros(1, 8, 16, 16, 16)
    cond = torch.ones(1, 2, 64, 64)
    neg = torch.zeros_like(cond)
    out = s.sample(m, x, cond, neg, steps=25, cfg_strength=3.0, cfg_interval=(0.5, 1.0), rescale_t=3.0)
    ts = rescaled_timesteps(25, 3.0)[:-1]
    expected = sum(2 if 0.5 <= t <= 1.0 else 1 for t in ts)
    assert out.network_forwards == expected == len(m.calls)
    for t in ts:
        n = sum(1 for tc, _ in m.calls if abs(tc - t) < 1e-6)
        assert n == (2 if 0.5 <= t <= 1.0 else 1)
    # without guidance: one forward per step
    m2 = CountingModel()
    out2 = s.sample(m2, x, cond, neg, steps=25, cfg_strength=0.0, cfg_interval=(0.5, 1.0), rescale_t=3.0)
    assert out2.network_forwards == 25


def test_guided_velocity_and_euler_integration():
    s = OccupancyFlowSampler()
    m = CountingModel()
    x = torch.zeros(2, 8, 16, 16, 16)
    cond = torch.ones(2, 2, 64, 64)
    neg = torch.zeros_like(cond)
    v_in = s.velocity(m, x, 0.8, cond, neg, 2.0, (0.5, 1.0))
    assert torch.allclose(v_in, torch.full_like(x, (1 + 2.0) * 2.0 - 2.0 * 1.0))
    v_out = s.velocity(m, x, 0.2, cond, neg, 2.0, (0.5, 1.0))
    assert torch.allclose(v_out, torch.full_like(x, 2.0))
    # constant velocity: x_0 = x_1 - integral over t in [0, 1] of v
    out = s.sample(m, x, cond, neg, steps=10, cfg_strength=0.0, rescale_t=3.0)
    assert torch.allclose(out.samples, torch.full_like(x, -2.0), atol=1e-5)


def test_velocity_is_the_only_network_call_site():
    s = OccupancyFlowSampler()
    m = CountingModel()
    seen = []
    orig = s.velocity

    def wrapped(model, x_t, t, *a, **k):
        seen.append(t)
        return orig(model, x_t, t, *a, **k)

    s.velocity = wrapped
    x = torch.zeros(1, 8, 16, 16, 16)
    cond = torch.ones(1, 2, 64, 64)
    s.sample(m, x, cond, torch.zeros_like(cond), steps=12, cfg_strength=1.0, rescale_t=3.0)
    assert seen == pytest.approx(rescaled_timesteps(12, 3.0)[:-1])


# ----------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------

def test_weights_load_without_pickle(monkeypatch):
    assert DEFAULT_WEIGHTS.exists()
    assert DEFAULT_WEIGHTS.stat().st_size <= 8 * 1000 * 1000
    raw = DEFAULT_WEIGHTS.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and header_len < len(raw)

    def forbidden(*a, **k):
        raise AssertionError("pickle-based loading used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    gen = BundledGenerator.from_pretrained()
    assert isinstance(gen.sampler, OccupancyFlowSampler)
    out = gen(shapes.make_example("held_out", 0)[1], steps=2)
    assert out.occupancy.shape == (1, 32, 32, 32) and out.occupancy.dtype == torch.bool
    assert out.probabilities.min() >= 0 and out.probabilities.max() <= 1


# ----------------------------------------------------------------------------
# metrics vs brute force
# ----------------------------------------------------------------------------

def brute_iou(a, b):
    inter = union = 0
    for idx in itertools.product(*(range(s) for s in a.shape)):
        x, y = bool(a[idx]), bool(b[idx])
        inter += x and y
        union += x or y
    return inter / union if union else 1.0


def brute_faces(occ):
    n = occ.shape[0]
    pts = set()
    for i, j, k in itertools.product(range(n), repeat=3):
        if not occ[i, j, k]:
            continue
        for axis in range(3):
            for sign in (-1, 1):
                nb = [i, j, k]
                nb[axis] += sign
                inside = all(0 <= c < n for c in nb)
                if not inside or not occ[tuple(nb)]:
                    c = [i + 0.5, j + 0.5, k + 0.5]
                    c[axis] += 0.5 * sign
                    pts.add(tuple(round(v / n, 5) for v in c))
    return pts


def brute_cd_f(p, q, tau):
    def nn(a, b):
        return [min(math.dist(x, y) for y in b) for x in a]

    dp, dq = nn(p, q), nn(q, p)
    prec = sum(d <= tau for d in dp) / len(dp)
    rec = sum(d <= tau for d in dq) / len(dq)
    f = 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)
    return (sum(dp) / len(dp) + sum(dq) / len(dq)) / 2, prec, rec, f


def test_iou_vs_brute_force():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 5, 5, 5, generator=g) > 0.5
    b = torch.rand(4, 5, 5, 5, generator=g) > 0.6
    got = voxel_iou(a, b)
    for i in range(4):
        assert got[i].item() == pytest.approx(brute_iou(a[i], b[i]))
    assert voxel_iou(torch.zeros(3, 3, 3), torch.zeros(3, 3, 3)).item() == 1.0


def test_surface_points_vs_brute_force():
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        occ = torch.rand(6, 6, 6, generator=g) > 0.55
        got = {tuple(round(float(v), 5) for v in p) for p in surface_points(occ)}
        assert len(got) == len(surface_points(occ))
        assert got == brute_faces(occ)
    pts = surface_points(torch.rand(6, 6, 6, generator=g) > 0.3, max_points=20, seed=3)
    assert pts.shape == (20, 3) and pts.min() >= 0 and pts.max() <= 1


def test_chamfer_fscore_vs_brute_force():
    g = torch.Generator().manual_seed(2)
    for tau in (0.1, 0.25):
        p = torch.rand(37, 3, generator=g)
        q = torch.rand(23, 3, generator=g) * 0.8 + 0.1
        got = chamfer_and_fscore(p, q, tau=tau, chunk=5)
        cd, prec, rec, f = brute_cd_f(p.tolist(), q.tolist(), tau)
        assert got["chamfer"] == pytest.approx(cd, rel=1e-9)
        assert got["precision"] == pytest.approx(prec)
        assert got["recall"] == pytest.approx(rec)
        assert got["fscore"] == pytest.approx(f)
    same = torch.rand(10, 3, generator=g)
    r = chamfer_and_fscore(same, same)
    assert r["chamfer"] == 0 and r["fscore"] == 1


def test_voxel_mesh():
    occ = torch.zeros(4, 4, 4, dtype=torch.bool)
    occ[1, 2, 1] = True
    m = occupancy_to_mesh(occ)
    assert len(m.vertices) == 8 and len(m.faces) == 12
    assert m.is_watertight and m.volume == pytest.approx((2 / 4) ** 3)
    occ[1:3, 1:3, 1:3] = True
    m = occupancy_to_mesh(occ)
    assert m.is_watertight and m.volume == pytest.approx(occ.sum().item() * (2 / 4) ** 3)
