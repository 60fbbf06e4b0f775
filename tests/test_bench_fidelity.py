"""scripts/bench_fidelity.py --bases: re-run the fixed rows of some bases, keep the rest."""
import pytest

from ._scripts import load_script


def _script():
    return load_script("bench_fidelity")


def _row(backend, steps, interval=None, iou=0.9, schedule="fixed", tolerance=None):
    return {"backend": backend, "steps": steps, "interval": interval, "schedule": schedule,
            "tolerance": tolerance, "iou_mean": iou}


def test_merge_replaces_only_the_fixed_rows_of_the_rerun_bases():
    m = _script()
    old = {"shapes": ["a", "b"], "seed": 0, "baselines": {"12": {"seconds": 1.0}}, "rows": [
        _row("reuse", 12, 3, 0.95), _row("dmd", 12, 3, 0.90), _row("dmd", 12, 6, 0.80),
        _row("hermite", 12, iou=0.97, schedule="adaptive", tolerance=0.5), _row("auto", 12, 3, 0.93)]}
    new = {"shapes": ["a", "b"], "rows": [_row("dmd", 12, 6, 0.85), _row("dmd", 12, 3, 0.96)]}
    out = m.merge_rows(old, new, ["dmd"])
    got = [(r["backend"], r["schedule"], r["interval"], r["iou_mean"]) for r in out["rows"]]
    assert got == [("reuse", "fixed", 3, 0.95), ("dmd", "fixed", 3, 0.96), ("dmd", "fixed", 6, 0.85),
                   ("hermite", "adaptive", None, 0.97), ("auto", "fixed", 3, 0.93)]
    assert out["baselines"] == old["baselines"] and out["rerun_bases"] == ["dmd"]
    assert old["rows"][1]["iou_mean"] == 0.90          # the stored result is not modified


def test_merge_refuses_other_shapes():
    m = _script()
    with pytest.raises(SystemExit, match="other shapes"):
        m.merge_rows({"shapes": ["a"], "rows": []}, {"shapes": ["b"], "rows": []}, ["dmd"])


def test_adaptive_only_keeps_the_stored_fixed_rows_and_notes():
    """--adaptive-only: the fresh adaptive rows replace the stored ones; the stored fixed
    rows, notes and re-run record stay (a re-run of the adaptive rows once dropped them)."""
    m = _script()
    old = {"shapes": ["a"], "notes": ["how the adaptive rows are set"], "rerun_bases": ["auto"],
           "rows": [_row("dmd", 12, 3, 0.90), _row("hermite", 12, iou=0.97, schedule="adaptive", tolerance=0.5),
                    {"backend": "reuse", "steps": 12, "interval": 2, "iou_mean": 0.8}]}
    res = {"shapes": ["a"], "rows": [_row("hermite", 12, 4, 0.91),
                                     _row("hermite", 12, iou=0.98, schedule="adaptive", tolerance=0.5),
                                     _row("auto", 12, iou=0.99, schedule="adaptive", tolerance=1.0)]}
    out = m.with_stored(old, res)
    got = [(r["backend"], r["schedule"], r["interval"], r["iou_mean"]) for r in out["rows"]]
    assert got == [("dmd", "fixed", 3, 0.90), ("reuse", "fixed", 2, 0.8),
                   ("hermite", "adaptive", None, 0.98), ("auto", "adaptive", None, 0.99)]
    assert out["notes"] == old["notes"] and out["rerun_bases"] == ["auto"]
    assert "schedule" not in old["rows"][2]              # the stored rows are not modified


def test_sweep_runs_adaptive_rows_per_shape_against_the_same_samples(tmp_path):
    """``per_item`` rows: one call per shape, a pattern per shape, the forward ratio against
    the uncached per-shape run (a network call per shape); written as a frontier of their own."""
    from hicache3d.bench import run_sweep, write_reports
    res = run_sweep(["hermite"], [], [12], shapes_n=2, adaptive={"hermite": [4.0]},
                    adaptive_options={"first_enhance": 2}, per_item={"hermite": [4.0]})
    batched, one = res["rows"]
    assert not batched.get("per_item") and one["per_item"] and len(one["patterns"]) == 2
    base = res["baselines"][12]
    assert base["network_forwards_per_item"] == 2 * base["network_forwards"]
    computed = sum(p.count("C") for p in one["patterns"])
    assert one["network_forwards"] < base["network_forwards_per_item"]
    assert one["forward_ratio"] == base["network_forwards_per_item"] / one["network_forwards"]
    assert computed < 2 * 12
    write_reports(res, tmp_path)
    md = (tmp_path / "fidelity.md").read_text()
    assert "adaptive tol 4 per shape" in md
