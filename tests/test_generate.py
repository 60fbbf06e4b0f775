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


def expected_forwards(steps: int) -> int:
    """Network forwards of an uncached bundled run, from the sampler's definition: two
    (classifier-free guidance) at the steps whose t lies in the guidance interval, else one."""
    from hicache3d.bundled.generator import DEFAULT_SAMPLING as S
    from hicache3d.bundled.sampler import rescaled_timesteps
    lo, hi = S["cfg_interval"]
    ts = rescaled_timesteps(steps, S["rescale_t"])[:-1]
    return sum(2 if (S["cfg_strength"] != 0 and lo <= t <= hi) else 1 for t in ts)


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
    assert m["fscore"] == 1.0 and m["iou"] == 1.0 and m["chamfer"] == 0.0
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
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.ply", "b.ply", "records.jsonl",
                                                                  "summary.md"]
    assert r.output.count(f"{expected_forwards(6)} network calls") == 2


@pytest.mark.parametrize("args,msg", [
    (["--image", "nope.png", "--out", "o.glb"], "does not exist"),
    (["--out", "o.xyz"], "unsupported output extension"),
    (["--out", "/no/such/dir/o.glb"], "does not exist"),
    (["--model", "nope", "--out", "o.glb"], "known models"),
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
    from upstream_harness import hy3dgen_env as H
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


# ---------------------------------------------------------------------------------------
# issue 13: what a new user hit
# ---------------------------------------------------------------------------------------

def _mesh_arrays(path):
    m = load_mesh(path)
    return np.asarray(m.vertices), np.asarray(m.faces)


@pytest.fixture
def inplace_bundled():
    """The bundled sampler patched in place (class level), exactly as the start-up hook
    of `hicache3d patch --model bundled` does it; removed afterwards."""
    from hicache3d.inplace import install_entry, uninstall_entry
    ctl = install_entry("bundled", {"recipe": "bundled", "module": "hicache3d.bundled.sampler",
                                    "settings": {"interval": 3}, "sites": {}})
    try:
        yield ctl
    finally:
        uninstall_entry("bundled")


def _reference_mesh(png, steps, tmp_path):
    """The uncached mesh, made with no patch of any kind active."""
    from hicache3d.bundled import shapes
    from hicache3d.bundled.generator import BundledGenerator
    from hicache3d.bundled.metrics import occupancy_to_mesh
    out = BundledGenerator.from_pretrained()(shapes.image_to_condition(png), steps=steps, seed=0)
    assert out.network_forwards == expected_forwards(steps)
    p = tmp_path / "reference.ply"
    export_mesh(occupancy_to_mesh(out.occupancy[0]), p)
    return _mesh_arrays(p)


def test_no_cache_and_compare_are_uncached_under_an_in_place_patch(png, tmp_path):
    steps = 12
    ref_v, ref_f = _reference_mesh(png, steps, tmp_path)
    from hicache3d.inplace import install_entry, uninstall_entry
    ctl = install_entry("bundled", {"recipe": "bundled", "module": "hicache3d.bundled.sampler",
                                    "settings": {"interval": 3}, "sites": {}})
    try:
        # the patch is active: a plain sampler call is accelerated
        from hicache3d.bundled import shapes
        from hicache3d.bundled.generator import BundledGenerator
        patched = BundledGenerator.from_pretrained()(shapes.image_to_condition(png), steps=steps)
        assert patched.network_forwards < expected_forwards(steps)
        out = tmp_path / "nc.ply"
        r = CliRunner().invoke(main, ["generate", "--image", str(png), "--out", str(out),
                                      "--steps", str(steps), "--no-cache"])
        assert r.exit_code == 0, r.output
        v, f = _mesh_arrays(out)
        assert np.array_equal(v, ref_v) and np.array_equal(f, ref_f)
        assert f"{expected_forwards(steps)} network calls" in r.output
        r = CliRunner().invoke(main, ["generate", "--image", str(png), "--out", str(tmp_path / "c.ply"),
                                      "--steps", str(steps), "--compare"])
        assert r.exit_code == 0, r.output
        assert f"uncached" in r.output and f"{expected_forwards(steps)} network calls: speed-up" in r.output
    finally:
        uninstall_entry("bundled")


def test_call_counts_come_from_the_network(png, inplace_bundled):
    from hicache3d.generate import Generator
    gen = Generator("bundled")
    payload = gen.prepare(png)
    seen = []
    h = gen.pipe.model.register_forward_hook(lambda *a: seen.append(1))   # independent count
    try:
        for cache in (True, False):
            seen.clear()
            res = gen.run(payload, steps=10, cache=cache, settings={"interval": 4})
            assert res.network_calls == len(seen) > 0
        assert res.network_calls == expected_forwards(10)          # the uncached one
    finally:
        h.remove()


def test_uncached_block_runs_the_original_code(png, inplace_bundled):
    import hicache3d
    from hicache3d.bundled import shapes
    from hicache3d.bundled.generator import BundledGenerator
    gen = BundledGenerator.from_pretrained()
    cond = shapes.image_to_condition(png)
    with hicache3d.uncached():
        a = gen(cond, steps=8)
        with hicache3d.accelerate(gen, "bundled", interval=3):
            b = gen(cond, steps=8)
    assert a.network_forwards == b.network_forwards == expected_forwards(8)
    assert torch.equal(a.latent, b.latent)
    assert gen(cond, steps=8).network_forwards < expected_forwards(8)   # patched again after


def _write(path, arr):
    from PIL import Image
    Image.fromarray(arr).save(path)
    return path


@pytest.mark.parametrize("kind,hint", [
    ("one_pixel", "1x1 pixels, too small"),
    ("transparent", "no pixel is more than half opaque"),
    ("white", "background colour (255, 255, 255"),
])
def test_empty_silhouette_is_a_clear_error(tmp_path, kind, hint):
    arr = {"one_pixel": np.full((1, 1, 3), 120, np.uint8),
           "transparent": np.zeros((64, 64, 4), np.uint8),
           "white": np.full((64, 64, 3), 255, np.uint8)}[kind]
    img = _write(tmp_path / f"{kind}.png", arr)
    out = tmp_path / "o.glb"
    r = CliRunner().invoke(main, ["generate", "--image", str(img), "--out", str(out), "--steps", "2"])
    assert r.exit_code != 0 and str(img) in r.output and hint in r.output, r.output
    assert "Traceback" not in r.output and not out.exists()


def test_identical_meshes_compare_to_zero_and_no_skipped_step_is_said(png, tmp_path):
    m = trimesh.creation.icosphere(3)
    d = compare_meshes(m, m.copy())
    assert d["chamfer"] == 0.0 and d["fscore"] == 1.0 and d["iou"] == 1.0
    r = CliRunner().invoke(main, ["generate", "--image", str(png), "--out", str(tmp_path / "o.glb"),
                                  "--steps", "1", "--compare"])
    assert r.exit_code == 0, r.output
    assert "0 steps skipped" in r.output and "no speed-up" in r.output and "no step was skipped" in r.output
    assert "Chamfer 0.0000" in r.output and "speed-up 3" not in r.output


def test_jpeg_and_webp_inputs_decoded_once(png, tmp_path, monkeypatch):
    from PIL import Image

    from hicache3d.bundled import shapes
    rgba = shapes.read_image(png)
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] > 0] = np.minimum(rgb[rgba[..., 3] > 0], 200)   # a grey object ...
    rgb[rgba[..., 3] == 0] = 255                                      # ... photographed on white
    jpg = tmp_path / "photo.jpg"
    Image.fromarray(rgb).save(jpg, quality=92)
    webp = tmp_path / "cut.webp"
    Image.fromarray(rgba).save(webp, lossless=True)
    ref = shapes.image_to_condition(png)
    assert torch.equal(shapes.image_to_condition(webp), ref)      # lossless: the same pixels
    c = shapes.image_to_condition(jpg)                            # lossy: nearly the same
    assert float((c[0] * ref[0]).sum() / ((c[0] + ref[0]) > 0).sum()) > 0.95
    calls = []
    real = shapes.read_image
    monkeypatch.setattr(shapes, "read_image", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    for src in (jpg, webp):
        calls.clear()
        out = tmp_path / f"{src.stem}.glb"
        r = CliRunner().invoke(main, ["generate", "--image", str(src), "--out", str(out), "--steps", "4"])
        assert r.exit_code == 0, r.output
        assert calls == [src] and len(load_mesh(out).faces) > 0


def test_generation_time_excludes_decoding(png, monkeypatch):
    from hicache3d.bundled import shapes
    from hicache3d.generate import Generator
    gen = Generator("bundled")
    payload = gen.prepare(png)

    def no_decoding(*a, **k):
        raise AssertionError("decoded inside the timed run")
    monkeypatch.setattr(shapes, "read_image", no_decoding)
    assert gen.run(payload, steps=3).mesh is not None


def test_unsupported_image_format_names_the_file(tmp_path):
    from PIL import Image
    p = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p, format="BMP")   # BMP under a .png name
    r = CliRunner().invoke(main, ["generate", "--image", str(p), "--out", str(tmp_path / "o.glb")])
    assert r.exit_code != 0 and str(p) in r.output and "BMP images are not supported" in r.output


def test_same_stem_images_in_a_folder_are_refused(png, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(png.read_bytes())
    (src / "a.PNG").write_bytes(png.read_bytes())
    r = CliRunner().invoke(main, ["generate", "--image", str(src), "--out", str(tmp_path / "out")])
    assert r.exit_code != 0 and "a.PNG and a.png would both be written to a.glb" in r.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.glb"))


def test_weights_option_wins_over_hy3dgen_models(tmp_path, monkeypatch):
    from upstream_harness import hy3dgen_env as H
    H.activate()
    H.write_model_dir(tmp_path / "models")
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.setenv("HY3DGEN_MODELS", str(other))
    from hicache3d.generate import GenerateError, Generator
    gen = Generator("hunyuan3d-2mini", weights=str(tmp_path / "models"), device="cpu")
    assert gen.kind == "hunyuan3d" and os.environ["HY3DGEN_MODELS"] == str(other)
    # the loaded DiT is the one written under --weights
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "models" / H.REPO_ID / H.SUBFOLDER / "model.fp16.safetensors"))
    name, p = next(iter(gen.pipe.model.state_dict().items()))
    assert torch.equal(p.float().cpu(), sd[f"model.{name}"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GenerateError, match=f"--weights {empty} is an empty folder"):
        Generator("hunyuan3d-2mini", weights=str(empty), device="cpu")
    with pytest.raises(GenerateError, match="holds neither tencent/Hunyuan3D-2mini/hunyuan3d-dit-v2-mini/"):
        Generator("hunyuan3d-2mini", weights=str(tmp_path), device="cpu")


@pytest.mark.parametrize("kind,msg", [
    ("missing", "no such file"),
    ("text", "not weights of the bundled model"),
    ("folder", "is a folder with no .safetensors file"),
])
def test_bundled_weights_errors_are_clear(png, tmp_path, kind, msg):
    w = {"missing": tmp_path / "nope.safetensors", "text": tmp_path / "w.safetensors",
         "folder": tmp_path / "wdir"}[kind]
    if kind == "text":
        w.write_text("not weights")
    if kind == "folder":
        w.mkdir()
    r = CliRunner().invoke(main, ["generate", "--image", str(png), "--out", str(tmp_path / "o.glb"),
                                  "--weights", str(w)])
    assert r.exit_code != 0 and msg in r.output and str(w) in r.output, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)


def _read_only_location():
    """A location no process can write, even as root (sysfs), or skip."""
    p = Path("/sys")
    if not p.is_dir():
        pytest.skip("no /sys")
    try:
        (p / "hicache3d-probe").mkdir()
    except OSError:
        return p
    (p / "hicache3d-probe").rmdir()
    pytest.skip("/sys is writable here")


def test_out_naming_an_existing_folder_fails_before_generating(png, tmp_path, monkeypatch):
    d = tmp_path / "existing.glb"
    d.mkdir()
    from hicache3d import generate as G
    monkeypatch.setattr(G.Generator, "run", lambda *a, **k: pytest.fail("generated anyway"))
    r = CliRunner().invoke(main, ["generate", "--image", str(png), "--out", str(d)])
    assert r.exit_code != 0 and f"--out {d} is a folder" in r.output and "Traceback" not in r.output


def test_folder_out_on_a_read_only_location(png, tmp_path):
    ro = _read_only_location()
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(png.read_bytes())
    for out in (ro / "hicache3d-out", ro):
        r = CliRunner().invoke(main, ["generate", "--image", str(src), "--out", str(out)])
        assert r.exit_code != 0 and f"--out {out}: cannot write there" in r.output, r.output
        assert r.exception is None or isinstance(r.exception, SystemExit)


def test_bench_input_and_output_checks(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(main, ["bench", "--images", str(empty), "--out", str(tmp_path / "b")])
    assert r.exit_code != 0 and f"no .png/.jpg/.jpeg/.webp images in folder {empty}" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    import hicache3d.bench as B
    monkeypatch.setattr(B, "run_sweep", lambda *a, **k: pytest.fail("swept before checking --out"))
    ro = _read_only_location()
    for out in (ro, ro / "bench"):
        r = CliRunner().invoke(main, ["bench", "--out", str(out)])
        assert r.exit_code != 0 and f"--out {out}: cannot write there" in r.output, r.output


def test_bench_keeps_partial_results_when_the_reports_cannot_be_written(tmp_path, monkeypatch):
    import hicache3d.bench as B

    def fails(res, out, stem="fidelity"):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(B, "write_reports", fails)
    out = tmp_path / "b"
    r = CliRunner().invoke(main, ["bench", "--backends", "reuse", "--intervals", "2", "--steps", "4",
                                  "--shapes", "1", "--out", str(out)])
    assert r.exit_code != 0 and "Permission denied" in r.output and "fidelity.partial.json" in r.output
    d = json.loads((out / "fidelity.partial.json").read_text())
    assert d["partial"] is True and len(d["rows"]) == 1 and d["rows"][0]["backend"] == "reuse"


@pytest.mark.parametrize("args,msg", [
    (["--seed", "1e23"], "'1e23' is not a valid integer"),
    (["--seed", str(10 ** 23)], "is not in the range 0<=x<="),
    (["--seed", "-1"], "is not in the range 0<=x<="),
    (["--no-cache", "--compare"], "--compare already runs the generator uncached"),
])
def test_generate_option_errors(png, tmp_path, args, msg):
    r = CliRunner().invoke(main, ["generate", "--image", str(png), "--out", str(tmp_path / "o.glb")] + args)
    assert r.exit_code == 2 and msg in r.output, r.output
    assert not (tmp_path / "o.glb").exists()


def test_unknown_model_suggests_only_what_generate_has(png, tmp_path):
    r = CliRunner().invoke(main, ["generate", "--image", str(png), "--out", str(tmp_path / "o.glb"),
                                  "--model", "trelis"])
    assert r.exit_code == 1 and "unknown model 'trelis'" in r.output and "--recipe" not in r.output
    assert "Did you mean 'trellis'?" in r.output and "hicache3d recipes" in r.output
