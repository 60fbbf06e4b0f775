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
                    {"backend": "reuse", "steps": 12, "interval": 2, "iou_mean": 0.8},
                    _row("hermite", 12, iou=0.985, schedule="pattern")],
           "pattern_search": {"hermite/12/held_out/32-39": {"runs": 30}}}
    res = {"shapes": ["a"], "rows": [_row("hermite", 12, 4, 0.91),
                                     _row("hermite", 12, iou=0.98, schedule="adaptive", tolerance=0.5),
                                     _row("auto", 12, iou=0.99, schedule="adaptive", tolerance=1.0)]}
    out = m.with_stored(old, res)
    got = [(r["backend"], r["schedule"], r["interval"], r["iou_mean"]) for r in out["rows"]]
    assert got == [("dmd", "fixed", 3, 0.90), ("reuse", "fixed", 2, 0.8),
                   ("hermite", "adaptive", None, 0.98), ("auto", "adaptive", None, 0.99),
                   ("hermite", "pattern", None, 0.985)]
    assert out["notes"] == old["notes"] and out["rerun_bases"] == ["auto"]
    assert out["pattern_search"] == old["pattern_search"]
    assert "schedule" not in old["rows"][2]              # the stored rows are not modified


def test_adaptive_only_of_some_step_counts_keeps_the_others():
    """--adaptive-only --steps 12: the 12-step adaptive rows and baseline are the fresh
    ones; the stored adaptive rows and baseline of 25 steps stay, in step order."""
    m = _script()
    old = {"shapes": ["a"], "baselines": {"12": {"seconds": 9.0}, "25": {"seconds": 20.0}},
           "rows": [_row("dmd", 12, 3, 0.90), _row("dmd", 25, 3, 0.95),
                    _row("hermite", 12, iou=0.97, schedule="adaptive", tolerance=0.5),
                    _row("hermite", 25, iou=0.96, schedule="adaptive", tolerance=0.5)]}
    res = {"shapes": ["a"], "baselines": {12: {"seconds": 5.0}},
           "rows": [_row("hermite", 12, 4, 0.91), _row("hermite", 12, iou=0.98, schedule="adaptive", tolerance=0.5)]}
    out = m.with_stored(old, res, [12])
    got = [(r["steps"], r["schedule"], r["iou_mean"]) for r in out["rows"]]
    assert got == [(12, "fixed", 0.90), (25, "fixed", 0.95), (12, "adaptive", 0.98), (25, "adaptive", 0.96)]
    assert out["baselines"] == {12: {"seconds": 5.0}, 25: {"seconds": 20.0}}
    with pytest.raises(SystemExit, match="other shapes"):
        m.with_stored(old, dict(res, shapes=["b"]), [12])


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


def test_searched_pattern_frontier_and_tune_choice_by_hand():
    """Pattern rows make a frontier of their own; the tune-choice table picks by the IoU on
    the tuning shapes alone and compares with the fixed frontier at the IoU reached here."""
    from hicache3d.bench import frontier_table, tune_choices
    rows = [dict(steps=25, schedule="fixed", forward_ratio=2.0, iou_mean=0.99, iou_min=0.97),
            dict(steps=25, schedule="fixed", forward_ratio=3.0, iou_mean=0.97, iou_min=0.93),
            dict(steps=25, schedule="pattern", pattern="A", forward_ratio=3.0, iou_mean=0.99, iou_min=0.98,
                 tuning_iou_mean=0.995),
            dict(steps=25, schedule="pattern", pattern="B", forward_ratio=4.0, iou_mean=0.975, iou_min=0.95,
                 tuning_iou_mean=0.982),
            dict(steps=25, schedule="pattern", pattern="C", forward_ratio=5.0, iou_mean=0.97, iou_min=0.94,
                 tuning_iou_mean=0.96)]
    t = {r["iou"]: r for r in frontier_table(rows, levels=(0.98,))}
    assert t[0.98]["pattern_ratio"] == pytest.approx(3.0 + 1.0 * (0.99 - 0.98) / (0.99 - 0.975))
    assert t[0.98]["pattern_gain"] == pytest.approx(t[0.98]["pattern_ratio"] / 2.5 - 1)
    assert t[0.98]["adaptive_ratio"] is None
    ch = {c["target"]: c for c in tune_choices(rows, levels=(0.98, 0.99, 0.999))}
    assert ch[0.98]["pattern"] == "B" and ch[0.99]["pattern"] == "A" and 0.999 not in ch
    # B reaches IoU 0.975 here, where the fixed frontier saves 2.75x
    assert ch[0.98]["fixed_ratio"] == pytest.approx(2.75) and ch[0.98]["gain"] == pytest.approx(4.0 / 2.75 - 1)


def test_bench_pattern_searches_on_other_shapes_and_scores_the_path(tmp_path):
    """scripts/bench_pattern.py (tiny: 2 tuning shapes, 2 scored shapes, 4 steps): the
    search runs on shapes the scored ones do not include, every pattern of its path becomes
    a row scored against the uncached run, an overlap is refused, and a re-run resumes."""
    import json
    import sys

    from hicache3d.bench import run_sweep, write_reports
    write_reports(run_sweep(["hermite"], [2], [4], shapes_n=2), tmp_path)
    m = load_script("bench_pattern")
    argv = ["bench_pattern.py", "--steps", "4", "--tune-shapes", "2", "--tune-from", "2", "--floor", "0.5",
            "--threads", "1", "--out", str(tmp_path)]
    old = sys.argv
    try:
        sys.argv = argv
        m.main()
        res = json.loads((tmp_path / "fidelity.json").read_text())
        pats = [r for r in res["rows"] if r["schedule"] == "pattern"]
        assert pats[0]["pattern"] == "CCCC" and pats[0]["forward_ratio"] == 1.0 and pats[0]["iou_mean"] == 1.0
        assert [p["pattern"].count("C") for p in pats] == list(range(4, 4 - len(pats), -1))
        assert len(pats) >= 2 and all(r["tuned_on"] == "held_out/2-3" for r in pats)
        runs = json.loads((tmp_path / "pattern_search.json").read_text())["runs"]["hermite/4/held_out/2-3"]
        assert {p["pattern"] for p in pats} <= set(runs)
        assert all(runs[p["pattern"]]["iou_mean"] == p["tuning_iou_mean"] for p in pats)
        mtime = (tmp_path / "pattern_search.json").stat().st_mtime_ns
        m.main()                                   # resumed: no search run made again
        assert (tmp_path / "pattern_search.json").stat().st_mtime_ns == mtime
        res2 = json.loads((tmp_path / "fidelity.json").read_text())
        assert [r["pattern"] for r in res2["rows"] if r["schedule"] == "pattern"] == [p["pattern"] for p in pats]
        sys.argv = argv[:5] + ["--tune-from", "1"] + argv[7:]
        with pytest.raises(SystemExit):
            m.main()
    finally:
        sys.argv = old
