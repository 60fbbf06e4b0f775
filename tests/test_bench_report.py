"""forecast.md carries the sampler's view measured by scripts/bench_fits.py (fits.json):
wall clock against the forward ratio, and the steady-state cost of a prediction."""
import json
import shutil
from pathlib import Path

from hicache3d.forecast_bench.report import STEADY_TARGET, WALL_TARGET, losses, rewrite_report

ROOT = Path(__file__).resolve().parent.parent


def _fits(eff, ratio):
    return {"settings": {"batch": 32, "steps": 25, "interval": 4, "dim": 1 << 22, "history": 6, "k": 3},
            "wall_clock": [{"backend": b, "forward_ratio": 2.93, "speedup": 2.9 * e, "efficiency": e,
                            "efficiency_same_run": e, "forecast_s": 0.1} for b, e in eff.items()],
            "forecast_cost": [{"backend": b, "ratio": r, "ratio_min": r} for b, r in ratio.items()]}


def test_forecast_report_shows_and_judges_the_sampler_view(tmp_path):
    shutil.copy(ROOT / "benchmarks" / "forecast.json", tmp_path / "forecast.json")
    assert rewrite_report(tmp_path).name == "forecast.md"
    assert "## 4." not in (tmp_path / "forecast.md").read_text()        # no fits.json yet
    fits = _fits({"hermite": WALL_TARGET + 0.05, "dmd": WALL_TARGET - 0.02},
                 {"hermite": STEADY_TARGET - 0.2, "dmd": STEADY_TARGET + 0.4})
    (tmp_path / "fits.json").write_text(json.dumps(fits))
    rewrite_report(tmp_path)
    md = (tmp_path / "forecast.md").read_text()
    assert "## 4. The sampler's view" in md
    section = md.split("## 4.")[1].split("## Where")[0]
    assert "| dmd | 2.93x | 0.88 |" in section and "| dmd | 1.90x |" in section
    lost = losses(json.loads((tmp_path / "forecast.json").read_text()), fits)
    assert "wall clock, dmd: 0.88 of the forward ratio (target 0.9)" in lost
    assert "steady-state cost, dmd: 1.90x one weighted sum (target 1.5x)" in lost
    assert not [x for x in lost if x.startswith(("wall clock, hermite", "steady-state cost, hermite"))]
    assert "- wall clock, dmd: 0.88" in md.split("## Where")[1]


def test_forecast_report_needs_its_json(tmp_path):
    (tmp_path / "fits.json").write_text(json.dumps(_fits({"dmd": 1.0}, {"dmd": 1.0})))
    assert rewrite_report(tmp_path) is None and not (tmp_path / "forecast.md").exists()


def test_rerunning_some_sections_keeps_the_others(tmp_path):
    """``bench_forecast.py --sections cost`` replaces the stored cost section only, keeps
    accuracy and coverage, and notes the re-run (with its reason) in the JSON and the
    report; a run of every section stands alone."""
    from ._scripts import load_script
    bf = load_script("bench_forecast")
    jpath = tmp_path / "forecast.json"
    shutil.copy(ROOT / "benchmarks" / "forecast.json", jpath)
    stored = json.loads(jpath.read_text())
    meta = dict(stored["meta"], sections=["cost"], date="2030-01-01 00:00:00", wall_s=5.0)
    merged = bf.merge_rerun({"cost": {"marker": 1}}, meta, jpath, "a faster blend")
    assert merged["cost"] == {"marker": 1}
    assert merged["accuracy"] == stored["accuracy"] and merged["coverage"] == stored["coverage"]
    assert merged["meta"]["date"] == stored["meta"]["date"]                 # the original run's
    last = merged["meta"]["reruns"][-1]
    assert last["sections"] == ["cost"] and last["reason"] == "a faster blend"
    assert len(merged["meta"]["reruns"]) == len(stored["meta"].get("reruns", [])) + 1
    full = dict(meta, sections=list(bf.SECTIONS))
    alone = bf.merge_rerun({"cost": {"marker": 2}}, full, jpath, None)
    assert alone == {"cost": {"marker": 2}, "meta": full}
    merged["cost"] = stored["cost"]
    from hicache3d.forecast_bench.report import render_markdown
    assert "Re-run since: cost on 2030-01-01 00:00:00 (5 s): a faster blend." in render_markdown(merged)
