"""`hicache3d generate` / `compare` and the mesh metrics, on the bundled generator."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from click.testing import CliRunner

from hicache3d.cli import main
from hicache3d.mesh import MeshError, compare_meshes, export_mesh, load_mesh, voxelize


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    from hicache3d.bundled import shapes
    d = tmp_path_factory.mktemp("img")
    cond = shapes.make_example("held_out", 3)[1]
    p = d / "shape.png"
    shapes.write_png(p, shapes.condition_to_rgba(cond))
    return p


def test_voxelize_matches_an_analytic_sphere():
    m = trimesh.creation.icosphere(4)
    v = (m.vertices / 2) + 0.5                       # radius 0.5 centred in the unit cube
    occ = voxelize(v, m.faces, 32)
    c = (torch.arange(32, dtype=torch.float64) + 0.5) / 32
    X, Y, Z = torch.meshgrid(c, c, c, indexing="ij")
    ref = (X - .5) ** 2 + (Y - .5) ** 2 + (Z - .5) ** 2 < 0.25
    assert float((occ & ref).sum() / (occ | ref).sum()) > 0.97


def test_compare_metrics_against_brute_force():
    a = trimesh.creation.box(extents=(1, 1, 1))
    b = trimesh.creation.box(extents=(1, 1, 0.5))
    m = compare_meshes(a, a)
    assert m["fscore"] == 1.0 and m["iou"] == 1.0 and m["chamfer"] < 0.02
    m = compare_meshes(a, b)
    # after unit-cube normalisation b is 1 x 1 x 0.5 inside a 1 x 1 x 1 cube: IoU 0.5
    assert abs(m["iou"] - 0.5) < 0.04
    # independent F-score: brute-force nearest distances on fresh samples
    pa = trimesh.sample.sample_surface(trimesh.Trimesh((a.vertices + 0.5), a.faces), 3000, seed=5)[0]
    bv = b.vertices.copy()
    bv[:, :2] += 0.5
    bv[:, 2] += 0.5
    pb = trimesh.sample.sample_surface(trimesh.Trimesh(bv, b.faces), 3000, seed=6)[0]
    d = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))
    prec, rec = (d.min(1) < 0.05).mean(), (d.min(0) < 0.05).mean()
    assert abs(m["fscore"] - 2 * prec * rec / (prec + rec)) < 0.05


def test_export_is_atomic_and_checks_extension(tmp_path):
    m = trimesh.creation.box()
    with pytest.raises(MeshError, match="unsupported output extension"):
        export_mesh(m, tmp_path / "x.xyz")
    with pytest.raises(MeshError, match="does not exist"):
        export_mesh(m, tmp_path / "missing" / "x.glb")
    for ext in ("glb", "obj", "ply", "stl"):
        p = export_mesh(m, tmp_path / f"x.{ext}")
        assert len(load_mesh(p).faces) == 12
    assert not list(tmp_path.glob(".*tmp"))


def test_generate_single_image_with_compare(png, tmp_path):
    out = tmp_path / "mesh.glb"
    r = CliRunner().invoke(main, ["generate", "--image", str(png), "--out", str(out),
                                  "--backend", "reuse", "--interval", "3", "--steps", "12", "--compare"])
    assert r.exit_code == 0, r.output
    assert out.exists() and len(load_mesh(out).faces) > 0
    assert "skipped" in r.output and "speed-up" in r.output and "IoU" in r.output


def test_generate_folder_and_no_cache(png, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for n in ("a", "b"):
        (src / f"{n}.png").write_bytes(png.read_bytes())
    r = CliRunner().invoke(main, ["generate", "--image", str(src), "--out", str(tmp_path / "out"),
                                  "--format", "ply", "--steps", "6", "--no-cache"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.ply", "b.ply"]
    assert "6 network calls" in r.output


@pytest.mark.parametrize("args,msg", [
    (["--image", "nope.png", "--out", "o.glb"], "does not exist"),
    (["--out", "o.xyz"], "unsupported output extension"),
    (["--out", "/no/such/dir/o.glb"], "does not exist"),
    (["--model", "nope", "--out", "o.glb"], "known recipes"),
])
def test_generate_bad_input_is_a_clear_error(png, tmp_path, args, msg):
    if "--image" not in args:
        args = ["--image", str(png)] + args
    r = CliRunner().invoke(main, ["generate"] + args)
    assert r.exit_code != 0 and msg in r.output
    assert "Traceback" not in r.output


def test_generate_rejects_a_non_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    r = CliRunner().invoke(main, ["generate", "--image", str(bad), "--out", str(tmp_path / "o.glb")])
    assert r.exit_code != 0 and "cannot read" in r.output and not (tmp_path / "o.glb").exists()


def test_generate_offline_without_weights_names_the_repo(png, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from .upstream import hy3dgen_env as H
    H.activate()
    r = CliRunner().invoke(main, ["generate", "--image", str(png), "--out", str(tmp_path / "o.glb"),
                                  "--model", "hunyuan3d-2mini"])
    assert r.exit_code != 0
    assert "tencent/Hunyuan3D-2mini" in r.output and "huggingface-cli download" in r.output


def test_compare_cli_json(tmp_path):
    a, b = tmp_path / "a.glb", tmp_path / "b.obj"
    export_mesh(trimesh.creation.box(), a)
    export_mesh(trimesh.creation.icosphere(3), b)
    r = CliRunner().invoke(main, ["compare", str(a), str(b), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert 0 < d["iou"] < 1 and 0 < d["fscore"] < 1 and d["tau"] == 0.05
    r = CliRunner().invoke(main, ["compare", str(a), str(tmp_path / "missing.glb")])
    assert r.exit_code != 0 and "does not exist" in r.output


def test_bundled_generator_is_restored_after_accelerate():
    import hicache3d
    from hicache3d.bundled.generator import BundledGenerator
    from hicache3d.bundled import shapes
    gen = BundledGenerator.from_pretrained()
    cond = shapes.make_example("held_out", 1)[1]
    ref = gen(cond, steps=8)
    with hicache3d.accelerate(gen, "bundled", interval=3) as run:
        fast = gen(cond, steps=8)
    assert fast.network_forwards < ref.network_forwards
    again = gen(cond, steps=8)
    assert again.network_forwards == ref.network_forwards and torch.equal(again.latent, ref.latent)
