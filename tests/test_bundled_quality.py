"""Quality of the shipped bundled generator on held-out shapes (uncached sampling).

32 held-out shapes (split ``held_out``, indices 0..31, never used in
training), each generated in one batch from its rendered silhouette + depth
image with the default sampler settings (25 Euler steps, default guidance).
F-score@0.1 and Chamfer use the exposed-face centres of the two 32^3 grids in
the grid's fixed unit-cube frame (voxel (i, j, k) spans [i/32, (i+1)/32] x ...;
no per-shape normalisation), see ``hicache3d.bundled.metrics``.
"""

import numpy as np
import pytest
import torch

from hicache3d.bundled.evaluation import evaluate, load_split
from hicache3d.bundled.generator import BundledGenerator

N_SHAPES = 32


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(2)
    gen = BundledGenerator.from_pretrained()
    occ, cond = load_split("held_out", N_SHAPES)
    return gen, occ, cond


@pytest.fixture(scope="module")
def uncached(setup):
    gen, occ, cond = setup
    return evaluate(gen, occ, cond, seed=0, batch=N_SHAPES, steps=25)


def test_uncached_quality(uncached):
    f, iou = uncached["fscore"], uncached["iou"]
    print(f"\nheld-out F@0.1 mean {f.mean():.3f} min {f.min():.3f}  IoU mean {iou.mean():.3f} min {iou.min():.3f}")
    assert len(f) >= 32
    assert f.mean() >= 0.85
    assert iou.mean() >= 0.5


def test_image_matters(setup, uncached):
    gen, occ, cond = setup
    n = N_SHAPES // 2
    # the first n shapes generated from the image of another shape (same noise seeds)
    shuffled = evaluate(gen, occ[:n], torch.roll(cond[:n], 1, dims=0), seed=0, batch=n, steps=25)
    iou_ok, f_ok = uncached["iou"][:n].mean(), uncached["fscore"][:n].mean()
    iou_bad, f_bad = shuffled["iou"].mean(), shuffled["fscore"].mean()
    print(f"\nright image: IoU {iou_ok:.3f} F@0.1 {f_ok:.3f} | other image: IoU {iou_bad:.3f} F@0.1 {f_bad:.3f}")
    assert iou_bad < iou_ok - 0.25
    assert f_bad < f_ok - 0.1


def test_user_png_silhouette_only(setup, tmp_path):
    """A user-style RGBA PNG (silhouette only, re-framed) gives a shape inside its visual hull."""
    from hicache3d.bundled import shapes
    from hicache3d.bundled.metrics import voxel_iou
    from hicache3d.bundled.model import ImageLifter

    gen, occ, cond = setup
    lifter = ImageLifter()
    ious = []
    for i in range(3):
        path = tmp_path / f"obj{i}.png"
        shapes.write_png(path, shapes.condition_to_rgba(cond[i]))
        out = gen(str(path), seed=i)
        user_cond = shapes.image_to_condition(path)[None]
        hull = lifter(user_cond)[0, 0] > 0.5
        o = out.occupancy[0]
        assert o.sum() > 50
        assert (o & hull).sum() / o.sum() > 0.9
        ious.append(voxel_iou(o, occ[i]).item())
    print(f"\nuser PNG (silhouette only) IoU vs truth: {np.round(ious, 3)}")
    assert np.mean(ious) > 0.1
