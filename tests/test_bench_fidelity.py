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
