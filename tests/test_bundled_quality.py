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
    # each shape generated from the image of another shape
    shuffled = evaluate(gen, occ, torch.roll(cond, 1, dims=0), seed=0, batch=N_SHAPES, steps=25)
    print(f"\nshuffled images: IoU mean {shuffled['iou'].mean():.3f} vs {uncached['iou'].mean():.3f}")
    assert shuffled["iou"].mean() < 0.5 * uncached["iou"].mean()
    assert shuffled["fscore"].mean() < uncached["fscore"].mean() - 0.15
