"""The pattern schedule (``schedule="pattern"``) and the search that finds one
(``hicache3d.schedule_search``, ``hicache3d tune --schedules pattern``)."""
import itertools
import math
import warnings

import pytest
import torch

import hicache3d
from hicache3d import CacheConfig, VelocityCache
from hicache3d.schedule import PatternPolicy, make_policy
from hicache3d.schedule_search import search_pattern

from .test_schedule import drive, smooth


def test_pattern_computes_exactly_its_steps_and_forecasts_as_the_fixed_cadence_would():
    c = VelocityCache(CacheConfig(backend="hermite", schedule="pattern", pattern="C..C..C.."))
    outs, calls = drive(c, smooth, steps=9)
    assert calls == [0, 3, 6] and c.stats.pattern == "C..C..C.."
    assert dict(c.stats.reasons) == {"no history": 1, "pattern": 2}
    assert c.stats.schedule == "pattern of 9 steps" and "schedule: pattern of 9 steps" in c.stats.summary()
    # the same computed steps by the fixed cadence (interval 3, warm-up 1): the same forecasts
    f = VelocityCache(CacheConfig(backend="hermite", interval=3, first_enhance=1))
    ref, ref_calls = drive(f, smooth, steps=9)
    assert ref_calls == calls and all(torch.equal(a, b) for a, b in zip(outs, ref))
    assert make_policy(c.config).plan(9) == [ch == "C" for ch in "C..C..C.."]


def test_a_run_uses_the_pattern_of_its_length_and_otherwise_the_adaptive_schedule():
    cfg = CacheConfig(backend="taylor", schedule="pattern", pattern=["C.C.C", "C...C...C.C"],
                      tolerance=0.02, first_enhance=2)
    c = VelocityCache(cfg)
    for n, want in ((5, "C.C.C"), (11, "C...C...C.C")):
        c.reset(n)
        drive(c, smooth, steps=n)
        assert c.stats.pattern == want and c.stats.schedule == f"pattern of {n} steps"
    c.reset(20)                                 # no pattern of 20 steps: error-controlled
    drive(c, smooth, steps=20)
    a = VelocityCache(cfg.replace(schedule="adaptive", pattern=()), num_steps=20)
    drive(a, smooth, steps=20)
    assert c.stats.pattern == a.stats.pattern and "." in c.stats.pattern
    assert c.stats.schedule.startswith("adaptive, tolerance 0.02 (no pattern for 20 steps")
    assert any(r.observed is not None for r in c.stats.trace)       # it measured its errors
    c.reset()                                   # unknown length, two patterns: adaptive too
    drive(c, smooth, steps=11)
    assert c.stats.schedule.startswith("adaptive") and "unknown length" in c.stats.schedule


def test_one_pattern_and_a_run_of_unknown_length_past_its_end():
    c = VelocityCache(CacheConfig(backend="hermite", schedule="pattern", pattern="C..C"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, calls = drive(c, smooth, steps=7)
    assert calls == [0, 3, 4, 5, 6] and c.stats.reasons["past the pattern"] == 3
    assert len(w) == 1 and "has 4 steps and this run goes on past it" in str(w[0].message)
    c2 = VelocityCache(CacheConfig(backend="hermite", schedule="pattern", pattern="C..C.C"))
    drive(c2, smooth, steps=4)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        c2.reset()                              # the shorter run is said when it ends
    assert len(w) == 1 and "had 4: it used the first 4 steps" in str(w[0].message)


@pytest.mark.parametrize("value", ["", "C.x", ".CC", ["C.", "CC"], 3, ["C.C", 5]])
def test_bad_patterns_are_refused_naming_the_field(value):
    with pytest.raises(ValueError, match="pattern"):
        CacheConfig(schedule="pattern", pattern=value)


def test_the_pattern_schedule_needs_a_pattern():
    with pytest.raises(ValueError, match="pattern must be at least one pattern"):
        CacheConfig(schedule="pattern")
    assert CacheConfig(pattern="C.C").schedule == "fixed"         # kept, not used
    with pytest.raises(ValueError):
        PatternPolicy([], make_policy(CacheConfig()))


# ------------------------------------------------------------------ the search

def _additive(weights, cfg_steps=()):
    """An evaluator whose quality loss is the sum of the weights of the forecast steps, and
    whose forwards are one per computed step (two in ``cfg_steps``)."""
    calls = []

    def evaluate(pattern):
        calls.append(pattern)
        return {"forwards": sum(2 if i in cfg_steps else 1 for i, ch in enumerate(pattern) if ch == "C"),
                "q": 1.0 - sum(w for w, ch in zip(weights, pattern) if ch == ".")}
    return evaluate, calls


def test_search_removes_the_cheapest_step_per_forward_saved_first():
    w = [0.0, 0.05, 0.01, 0.03, 0.002, 0.04, 0.02, 0.001]
    cfg = {1, 3}
    evaluate, calls = _additive(w, cfg)
    path = search_pattern(evaluate, 8, quality=lambda r: r["q"], meets=lambda r: r["q"] >= 0.9)
    # independent: the removal order by weight / forwards saved
    order = sorted(range(1, 8), key=lambda i: w[i] / (2 if i in cfg else 1))
    removed = [next(i for i in range(8) if a["pattern"][i] == "C" and b["pattern"][i] == ".")
               for a, b in zip(path, path[1:])]
    loss = list(itertools.accumulate(w[i] for i in order))
    n_ok = sum(1 for x in loss if 1.0 - x >= 0.9)
    assert removed == order[:n_ok]
    assert path[0]["pattern"] == "C" * 8 and all(r["q"] >= 0.9 for r in path)
    assert path[-1]["computed"] == sorted(set(range(8)) - set(order[:n_ok]))
    assert len(calls) == len(set(calls))                  # each pattern run once
    # lazy: after the first scan, about one run per removal (plus the final scan)
    assert len(calls) <= 1 + 7 + 2 * len(removed) + 7


def test_search_takes_a_dearer_removal_that_meets_the_target_when_the_cheapest_misses():
    # per forward saved, step 2 is the cheapest (0.05 / 4) but alone crosses the target;
    # then step 3 (0.03 / 1) before step 1 (0.04 / 1); after it, every removal misses
    def evaluate(pattern):
        q = 1.0 - (0.05 if pattern[2] == "." else 0) - (0.04 if pattern[1] == "." else 0) \
            - (0.03 if pattern[3] == "." else 0)
        return {"forwards": pattern.count("C") + (pattern[2] == "C") * 3, "q": q}
    path = search_pattern(evaluate, 4, quality=lambda r: r["q"], meets=lambda r: r["q"] >= 0.955)
    assert [r["pattern"] for r in path] == ["CCCC", "CCC."]
    assert all(r["q"] >= 0.955 for r in path)


def test_search_stops_at_min_computed_and_checks_its_input():
    evaluate, _ = _additive([0.0] * 6)
    path = search_pattern(evaluate, 6, quality=lambda r: r["q"], min_computed=3)
    assert path[-1]["pattern"].count("C") == 3 and path[-1]["pattern"][0] == "C"
    with pytest.raises(ValueError, match="steps"):
        search_pattern(evaluate, 0, quality=lambda r: r["q"])


# ------------------------------------------------------------------ through the adapters

def test_bundled_recipe_reads_the_run_length_so_each_length_gets_its_pattern():
    from hicache3d.bundled import shapes
    from hicache3d.bundled.generator import BundledGenerator
    gen = BundledGenerator.from_pretrained()
    cond = shapes.make_example("held_out", 1)[1]
    pats = ["C.C..C", "C..C.C..C.C."]
    with hicache3d.accelerate(gen, "bundled", pattern=pats) as run:
        a = gen(cond, steps=6)
        b = gen(cond, steps=12)
        c = gen(cond, steps=8)
    sites = [r.sites["sparse_structure"] for r in run.runs]
    assert [s.pattern for s in sites[:2]] == pats
    assert a.network_forwards < 12 and b.network_forwards < 22
    assert sites[2].schedule.startswith("adaptive, tolerance 2")     # the recipe's tolerance
    # the forwards of the computed steps: two where the sampler's guidance applies
    sp = gen.sampling
    ts = gen.sampler.timesteps(6, sp["rescale_t"])[:-1]
    want = sum(2 if gen.sampler.in_cfg_interval(t, sp["cfg_strength"], sp["cfg_interval"]) else 1
               for t, ch in zip(ts, pats[0]) if ch == "C")
    assert a.network_forwards == want


def test_steps_arg_of_a_recipe_is_validated(tmp_path):
    from hicache3d.recipe import RecipeError, get_recipe
    toml = tmp_path / "mine.toml"
    body = ('name = "mine"\nadapter = "generic"\nmodule = "hicache3d.bundled.sampler"\n'
            'run = "OccupancyFlowSampler.sample"\nsteps_arg = {arg}\n[sites.main]\n'
            'step = "OccupancyFlowSampler.velocity"\nt_arg = 2\n')
    toml.write_text(body.format(arg='"steps"'))
    assert get_recipe(str(toml)).steps_arg == "steps"
    for bad in ('"not a name"', "-1", "true"):
        toml.write_text(body.format(arg=bad))
        with pytest.raises(RecipeError, match="steps_arg"):
            get_recipe(str(toml))


def test_cli_pattern_flag(tmp_path):
    from click.testing import CliRunner

    from hicache3d.bundled import shapes
    from hicache3d.cli import main
    png = tmp_path / "in.png"
    shapes.write_png(png, shapes.condition_to_rgba(shapes.make_example("held_out", 3)[1]))
    out = tmp_path / "m.glb"
    r = CliRunner().invoke(main, ["generate", "--image", str(png), "--out", str(out), "--steps", "6",
                                  "--pattern", "C.C..C"])
    assert r.exit_code == 0, r.output
    assert "sparse_structure: C.C..C" in r.output
    r = CliRunner().invoke(main, ["generate", "--image", str(png), "--out", str(out), "--steps", "6",
                                  "--pattern", "C.X"])
    assert r.exit_code != 0 and "pattern" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["patch", "--help"])
    assert "--pattern" in r.output
    r = CliRunner().invoke(main, ["tune", "--help"])
    assert "pattern" in r.output and "--pattern-backend" in r.output


def test_search_finds_no_worse_than_the_best_fixed_cadence_on_a_model(monkeypatch):
    """On the bundled generator (4 shapes, 12 steps), the searched pattern at the target
    saves at least as many forwards as the best fixed interval meeting it (the search
    passes through patterns the fixed cadences are close to, and the measure is the same)."""
    from hicache3d.bundled import shapes
    from hicache3d.bundled.generator import BundledGenerator
    from hicache3d.bench import occupancy_scores
    torch.set_num_threads(1)
    gen = BundledGenerator.from_pretrained()
    cond = shapes.make_batch("held_out", [40, 41, 42, 43])[1]
    ref = gen(cond, steps=12)

    def run(**kw):
        with hicache3d.accelerate(gen, "bundled", backend="hermite", **kw):
            out = gen(cond, steps=12)
        iou = float(occupancy_scores(out.occupancy, ref.occupancy)["iou"].mean())
        return {"forwards": out.network_forwards, "iou": iou}

    target = 0.97
    path = search_pattern(lambda p: run(pattern=p), 12, quality=lambda r: r["iou"],
                          meets=lambda r: r["iou"] >= target)
    fixed = [run(schedule="fixed", interval=iv, first_enhance=fe) for iv in (2, 3, 4) for fe in (1, 2, 3)]
    best_fixed = min((r["forwards"] for r in fixed if r["iou"] >= target), default=ref.network_forwards)
    assert path[-1]["iou"] >= target and path[-1]["forwards"] <= best_fixed
    assert math.isclose(run(pattern=path[-1]["pattern"])["iou"], path[-1]["iou"])   # reproducible


def test_bundled_recipe_patterns_are_what_tune_chooses_in_the_stored_benchmark():
    """The bundled recipe's patterns are, per step count, the searched pattern with the
    most forwards saved whose IoU on the tuning shapes meets 0.98 (what ``tune`` would
    choose), as stored in benchmarks/fidelity.json, and the recipe's comment quotes their
    scores on the 32 held-out shapes."""
    import json
    from pathlib import Path

    from hicache3d.recipe import get_recipe
    root = Path(__file__).resolve().parent.parent
    rows = json.loads((root / "benchmarks" / "fidelity.json").read_text())["rows"]
    cfg = get_recipe("bundled").site("sparse_structure").config
    text = (root / "recipes" / "bundled.toml").read_text()
    assert sorted(len(p) for p in cfg.pattern) == [12, 25, 50]
    for p in cfg.pattern:
        searched = [r for r in rows if r.get("schedule") == "pattern" and r["steps"] == len(p)
                    and r["backend"] == cfg.backend]
        ok = [r for r in searched if r["tuning_iou_mean"] >= 0.98]
        best = max(ok, key=lambda r: (r["forward_ratio"], r["tuning_iou_mean"]))
        assert best["pattern"] == p
        assert f"{best['iou_mean']:.3f} (min {best['iou_min']:.3f}) at" in text.replace("\n# ", " ")
        assert f"{best['forward_ratio']:.2f}x" in text.replace("\n# ", " ")


def test_options_alone_ask_for_their_schedule_and_two_of_them_are_refused(tmp_path):
    """Without a schedule named: a pattern asks for the pattern schedule, an interval for the
    fixed cadence, a tolerance for the adaptive one (so ``--tolerance`` is not silently
    ignored under the bundled recipe's patterns); two of them are refused, clearly."""
    from click.testing import CliRunner

    from hicache3d.api import implied_schedule
    from hicache3d.bundled import shapes
    from hicache3d.bundled.generator import BundledGenerator
    from hicache3d.cli import main
    assert implied_schedule({"tolerance": 1.0})["schedule"] == "adaptive"
    assert implied_schedule({"interval": 3})["schedule"] == "fixed"
    assert implied_schedule({"pattern": "C.C"})["schedule"] == "pattern"
    assert implied_schedule({"interval": 3, "schedule": "adaptive"})["schedule"] == "adaptive"
    assert implied_schedule({"pattern": "C.C", "tolerance": 0.5})["schedule"] == "pattern"   # its fallback
    with pytest.raises(ValueError, match="pattern= and interval="):
        implied_schedule({"pattern": "C.C", "interval": 3})
    with pytest.raises(ValueError, match="interval= and tolerance= belong to different schedules"):
        implied_schedule({"interval": 3, "tolerance": 1.0})
    gen = BundledGenerator.from_pretrained()
    cond = shapes.make_example("held_out", 1)[1]
    with hicache3d.accelerate(gen, "bundled", tolerance=0.0) as run:
        out = gen(cond, steps=25)
    assert run.runs[-1].sites["sparse_structure"].pattern == "C" * 25
    assert out.network_forwards == gen(cond, steps=25).network_forwards
    with hicache3d.accelerate(gen, "bundled", sites={"sparse_structure": {"tolerance": 0.0}}) as run:
        gen(cond, steps=25)
    assert run.runs[-1].sites["sparse_structure"].pattern == "C" * 25
    png = tmp_path / "in.png"
    shapes.write_png(png, shapes.condition_to_rgba(cond))
    r = CliRunner().invoke(main, ["generate", "--image", str(png), "--out", str(tmp_path / "m.glb"),
                                  "--interval", "3", "--tolerance", "1"])
    assert r.exit_code == 2 and "--interval  and --tolerance" not in r.output
    assert "--interval and --tolerance belong to different schedules" in r.output


def test_command_line_schedule_choices_are_the_config_s():
    """The command line spells the schedule names out (importing the config would import
    torch at start-up): they must stay those CacheConfig accepts."""
    from hicache3d.cli import _SCHEDULES
    from hicache3d.config import SCHEDULES
    assert list(_SCHEDULES.choices) == list(SCHEDULES)
