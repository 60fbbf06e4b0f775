"""Folder generation: the split over processes (real torchrun), resuming, bad images."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hicache3d.cli import main
from hicache3d.folder import (RECORDS_NAME, SUMMARY_NAME, generate_folder, launcher_env,
                              plan_outputs, shard)
from hicache3d.generate import GenerateError, Generator
from hicache3d.mesh import load_mesh

from .test_generate import expected_forwards

ROOT = Path(__file__).resolve().parent.parent
STEPS = "2"


def _images(folder: Path, n: int, start: int = 0) -> Path:
    from hicache3d.bundled import shapes
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        cond = shapes.make_example("held_out", i)[1]
        shapes.write_png(folder / f"img{i:02d}.png", shapes.condition_to_rgba(cond))
    return folder


def _records(out: Path):
    return [json.loads(line) for line in (out / RECORDS_NAME).read_text().splitlines()]


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def generator():
    return Generator("bundled", device="cpu")


def test_shard_is_a_deterministic_partition():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(x for p in parts for x in p) == items
    with pytest.raises(GenerateError, match="rank 3 is not in 0..2"):
        shard(items, 3, 3)


def test_launcher_env():
    assert launcher_env({}) == (0, 1, 0)
    assert launcher_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(GenerateError, match="RANK=4 and WORLD_SIZE=4"):
        launcher_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(GenerateError, match="WORLD_SIZE='two'"):
        launcher_env({"WORLD_SIZE": "two"})


def test_outputs_that_would_collide_are_refused(tmp_path):
    with pytest.raises(GenerateError, match="a.jpg and a.png would both be written to a.ply"):
        plan_outputs([tmp_path / "a.jpg", tmp_path / "a.png"], tmp_path, "ply")
    assert plan_outputs([tmp_path / "a.jpg", tmp_path / "b.png"], tmp_path / "o", "obj") == \
        [tmp_path / "o" / "a.obj", tmp_path / "o" / "b.obj"]


def test_python_api_split_resume_and_overwrite(tmp_path, generator):
    src = _images(tmp_path / "in", 3)
    out = tmp_path / "out"
    parts = [generate_folder(src, out, rank=r, world_size=2, steps=int(STEPS), generator=generator,
                             progress=False, say=lambda s: None) for r in range(2)]
    assert [[rec["image"] for rec in p.records] for p in parts] == \
        [["img00.png", "img02.png"], ["img01.png"]]
    assert all(rec["status"] == "done" and rec["network_calls"] > 0 for p in parts for rec in p.records)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.glb")}
    assert len(stamp) == 3
    # a rerun skips what exists and loads; a broken output is regenerated
    (out / "img01.glb").write_bytes(b"half a mesh")
    again = generate_folder(src, out, steps=int(STEPS), generator=generator, progress=False,
                            say=lambda s: None)
    assert {r["image"]: r["status"] for r in again.records} == \
        {"img00.png": "skipped", "img01.png": "done", "img02.png": "skipped"}
    assert all((out / n).stat().st_mtime_ns == t for n, t in stamp.items() if n != "img01.glb")
    assert len(load_mesh(out / "img01.glb").faces) > 0
    full = generate_folder(src, out, steps=int(STEPS), generator=generator, overwrite=True,
                           progress=False, say=lambda s: None)
    assert full.done == 3 and full.skipped == 0
    assert len(_records(out)) == 3 + 3 + 3                 # one line per image per run


def test_corrupt_image_is_reported_and_the_rest_goes_on(tmp_path):
    src = _images(tmp_path / "in", 2)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["generate", "--image", str(src), "--out", str(out), "--steps", STEPS,
                                  "--compare"])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and f"failed: cannot read {src / 'broken.png'}" in r.output
    assert sorted(p.name for p in out.glob("*.glb")) == ["img00.glb", "img01.glb"]
    recs = {x["image"]: x for x in _records(out)}
    assert recs["broken.png"]["status"] == "failed" and "broken.png" in recs["broken.png"]["error"]
    for n in ("img00.png", "img01.png"):
        assert recs[n]["status"] == "done" and 0 <= recs[n]["drift"]["iou"] <= 1
        assert recs[n]["uncached"]["network_calls"] == expected_forwards(int(STEPS))
    summary = (out / SUMMARY_NAME).read_text()
    assert "2 done, 0 skipped (a valid mesh existed), 1 failed" in summary
    assert "Speed-up vs uncached (2 images measured both ways)" in summary and "broken.png" in summary


def test_torchrun_two_processes_split_the_folder(tmp_path):
    src = _images(tmp_path / "in", 5)
    single = tmp_path / "single"
    r = CliRunner().invoke(main, ["generate", "--image", str(src), "--out", str(single), "--steps", STEPS])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "hicache3d", "generate", "--image", str(src),
                        "--out", str(out), "--steps", STEPS],
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    recs = _records(out)
    names = sorted(x.name for x in src.iterdir())
    assert sorted(x["image"] for x in recs) == names                  # every image exactly once
    assert all(x["status"] == "done" and x["world_size"] == 2 for x in recs)
    by_rank = {k: sorted(x["image"] for x in recs if x["rank"] == k) for k in (0, 1)}
    assert by_rank == {0: names[0::2], 1: names[1::2]}                 # the split, no overlap
    for n in names:                                                     # the same meshes
        stem = Path(n).stem
        assert (out / f"{stem}.glb").read_bytes() == (single / f"{stem}.glb").read_bytes()
    assert p.stdout.count("5 done, 0 skipped") == 1                    # rank 0 alone summarises
    assert "5 images over 2 process(es): 5 done" in (out / SUMMARY_NAME).read_text()


def test_killed_run_then_rerun(tmp_path):
    src = _images(tmp_path / "in", 4)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hicache3d", "generate", "--image", str(src), "--out", str(out),
           "--steps", "6"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                            cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(out.glob("*.glb")):
            time.sleep(0.05)
        assert list(out.glob("*.glb")), "no mesh appeared"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.glb")}
    assert 1 <= len(finished) < 4, finished
    for name in finished:                                    # what is there is complete
        assert len(load_mesh(out / name).faces) > 0
    r = CliRunner().invoke(main, ["generate", "--image", str(src), "--out", str(out), "--steps", "6"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.glob("*.glb")) == [f"img{i:02d}.glb" for i in range(4)]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for name, key in finished.items():                      # not regenerated
        p = out / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == key
    last = _records(out)[-4:]
    assert {x["output"]: x["status"] for x in last} == \
        {f"img{i:02d}.glb": ("skipped" if f"img{i:02d}.glb" in finished else "done") for i in range(4)}
    assert f"{4 - len(finished)} done, {len(finished)} skipped" in r.output
