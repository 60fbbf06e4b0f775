"""The schedule policies: fixed cadence and the error-controlled (adaptive) schedule."""
import math
import warnings

import numpy as np
import pytest
import torch

from hicache3d import CacheConfig, VelocityCache
from hicache3d.schedule import AdaptivePolicy, FixedPolicy, Schedule, make_policy


def drive(cache, field, steps=40, t0=1.0, t1=0.0):
    """Feed the velocities ``field(i, t)`` of a run; returns the outputs and the calls."""
    calls, outs = [], []
    ts = np.linspace(t0, t1, steps + 1)
    for i in range(steps):
        t = float(ts[i])
        outs.append(cache.step(t, lambda i=i, t=t: calls.append(i) or field(i, t)))
    return outs, calls


def windows(cache):
    """Lengths of the forecast runs between computed steps (after the warm-up)."""
    out, n = [], 0
    for r in cache.stats.trace:
        if r.computed:
            if r.step >= cache.config.first_enhance:
                out.append(n)
            n = 0
        else:
            n += 1
    return out


def smooth(i, t):
    return torch.tensor([[math.exp(-t), math.exp(-2 * t), 1.0 + 0.5 * t]], dtype=torch.float64)


def kinked(i, t):
    # a velocity whose slope flips every 0.1 of sampler time (a saw-tooth)
    s = (t * 10) % 2
    return torch.tensor([[1.0 + abs(s - 1.0), 0.5, 1.0]], dtype=torch.float64)


def adaptive(**kw):
    base = dict(backend="taylor", schedule="adaptive", tolerance=0.02, first_enhance=3, max_skip=8)
    base.update(kw)
    return VelocityCache(CacheConfig(**base))


def test_smooth_trajectory_gets_long_windows_kinked_short():
    a, b = adaptive(tolerance=0.05), adaptive(tolerance=0.05)
    drive(a, smooth)
    drive(b, kinked)
    wa, wb = windows(a), windows(b)
    assert np.mean(wa) >= 5 and max(wa) == 8, a.stats.pattern
    # the saw-tooth is linear between kinks (long windows there), short ones after a kink
    assert min(wb) <= 1 and np.mean(wb) < 0.6 * np.mean(wa), (a.stats.pattern, b.stats.pattern)
    assert b.stats.computed >= 1.4 * a.stats.computed


def test_abrupt_change_shrinks_the_next_window():
    def field(i, t):
        v = smooth(i, t)
        return v + (torch.tensor([[3.0 * (0.5 - t), 0.0, 0.0]], dtype=torch.float64) if t < 0.5 else 0)

    cache = adaptive()
    drive(cache, field)
    trace = cache.stats.trace
    # the first computed step after the change measured a large error ...
    first = next(r for r in trace if r.computed and r.step >= 20)
    before = [r for r in trace if r.computed and 3 <= r.step < 20]
    assert first.observed > 10 * max(r.observed for r in before)
    # ... and the window after it is shorter than the windows before it
    steps_c = [r.step for r in trace if r.computed]
    k = steps_c.index(first.step)
    assert steps_c[k + 1] - steps_c[k] < min(b - a for a, b in zip(steps_c[2:k], steps_c[3:k + 1]))
    assert "error jump" in cache.stats.reasons


def sampler(cache, steps=12, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, dim, generator=g) * 0.3
    x = torch.randn(3, dim, generator=g)
    ts = torch.linspace(1, 0, steps + 1)
    calls = 0
    for i in range(steps):
        t = ts[i]

        def net():
            nonlocal calls
            calls += 1
            return torch.tanh(x @ W) * (1 + t)
        v = cache.step(t, net) if cache is not None else net()
        x = x - (ts[i] - ts[i + 1]) * v
    return x, calls


@pytest.mark.parametrize("backend", ["reuse", "hermite", "dmd", "auto"])
def test_tolerance_zero_computes_every_step_bit_identical(backend):
    ref, n_ref = sampler(None)
    cache = VelocityCache(CacheConfig(backend=backend, schedule="adaptive", tolerance=0.0))
    out, n = sampler(cache)
    assert torch.equal(ref, out) and n == n_ref == 12 == cache.stats.computed
    assert cache.stats.forecast == 0


def test_adaptive_saves_calls_and_stays_close():
    ref, n_ref = sampler(None, steps=30)
    cache = VelocityCache(CacheConfig(backend="taylor", schedule="adaptive", tolerance=0.05))
    out, n = sampler(cache, steps=30)
    assert n < n_ref // 2
    assert float((out - ref).norm() / ref.norm()) < 0.02


def test_trace_records_every_step_and_the_measured_error():
    cache = adaptive(backend="reuse", tolerance=0.05)
    outs, calls = drive(cache, smooth, steps=20)
    trace = cache.stats.trace
    assert [r.step for r in trace] == list(range(20))
    assert [r.step for r in trace if r.computed] == calls
    assert cache.stats.pattern == "".join("C" if i in calls else "." for i in range(20))
    ts = np.linspace(1, 0, 21)
    # reuse forecasts the previous computed velocity: the measured error of a computed
    # step is |v_i - v_prev| / |v_i|, computed here from the velocities directly
    for a, b in zip(calls[:-1], calls[1:-1] + [calls[-1]]):
        if a == b:
            continue
        rec = trace[b]
        va, vb = smooth(a, float(ts[a])), smooth(b, float(ts[b]))
        want = float((vb - va).norm() / vb.norm())
        if rec.observed is not None:
            assert rec.horizon == b - a
            assert rec.observed == pytest.approx(want, rel=1e-9)
            assert rec.basis == "reuse"
    forecasts = [r for r in trace if not r.computed]
    assert forecasts and all(r.predicted is not None and r.predicted > 0 for r in forecasts)
    assert all(r.reason is None and r.basis == "reuse" for r in forecasts)
    assert {r.reason for r in trace if r.computed} <= {"no history", "warm-up", "budget", "max_skip",
                                                       "error jump"}
    s = cache.stats.summary()
    assert "computed for: " in s and "warm-up 2" in s and f"pattern {cache.stats.pattern}" in s
    d = cache.stats.as_dict()
    assert d["pattern"] == cache.stats.pattern and len(d["trace"]) == 20
    assert d["reasons"] == dict(cache.stats.reasons)


def test_fixed_policy_plan_and_trace_reasons():
    cache = VelocityCache(CacheConfig(backend="hermite", interval=4, first_enhance=2, last_enhance=1,
                                      num_steps=12))
    assert isinstance(cache.policy, FixedPolicy)
    assert cache.policy.plan(12) == Schedule(4, 2, 1).plan(12)
    _, calls = drive(cache, smooth, steps=12)
    assert calls == [i for i, c in enumerate(Schedule(4, 2, 1).plan(12)) if c]
    assert dict(cache.stats.reasons) == {"no history": 1, "warm-up": 1, "cadence": 2, "last steps": 1}
    with pytest.raises(NotImplementedError):
        adaptive().policy.plan(10)


def test_forced_decisions_and_skip_go_through_step():
    cache = VelocityCache(CacheConfig(backend="reuse", interval=100, first_enhance=1))
    v = torch.ones(1, 3)
    cache.step(0.0, lambda: v)
    out = cache.step(0.1, lambda: v * 5, force_compute=True)
    assert torch.equal(out, v * 5)
    assert torch.equal(cache.step(0.2, lambda: v * 9, force_forecast=True), v * 5)
    cache.skip()
    assert cache.step_index == 4 and cache.stats.skipped == 1
    assert cache.stats.pattern == "CC.-" and cache.stats.reasons["forced"] == 1


@pytest.mark.parametrize("field,value", [
    ("tolerance", -0.1), ("tolerance", float("nan")), ("tolerance", float("inf")),
    ("tolerance", "0.1"), ("schedule", "sometimes"), ("max_skip", 0), ("min_skip", -1),
    ("max_skip", 1.5)])
def test_schedule_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        CacheConfig(**{field: value})


def test_max_skip_below_min_skip_names_max_skip():
    with pytest.raises(ValueError, match="max_skip"):
        CacheConfig(schedule="adaptive", max_skip=2, min_skip=3)


def test_min_and_max_skip_bound_the_windows():
    a = adaptive(tolerance=1e3, max_skip=3)
    drive(a, smooth)
    assert set(windows(a)[:-1]) == {3}
    b = adaptive(tolerance=1e-12, min_skip=2, max_skip=4)
    drive(b, kinked)
    assert min(windows(b)[:-1]) >= 2


def test_make_policy_by_config():
    assert isinstance(make_policy(CacheConfig()), FixedPolicy)
    p = make_policy(CacheConfig(schedule="adaptive", backend="reuse", tolerance=0.3))
    assert isinstance(p, AdaptivePolicy) and p.tolerance == 0.3 and p.p == 1.0


def test_dt_weighting_gives_small_steps_longer_windows():
    # the same velocity error per step, steps of the first half 4x smaller in time
    ts = np.concatenate([np.linspace(1.0, 0.8, 21)[:-1], np.linspace(0.8, 0.0, 21)])

    def run():
        cache = adaptive(backend="reuse", tolerance=0.2, first_enhance=3)
        for i in range(40):
            cache.step(float(ts[i]), lambda i=i: torch.tensor([[1.0 + 0.01 * i, 1.0]], dtype=torch.float64))
        return cache

    w_by_step = []
    cache = run()
    steps_c = [r.step for r in cache.stats.trace if r.computed]
    for a, b in zip(steps_c, steps_c[1:]):
        w_by_step.append((a, b - a - 1))
    early = [w for a, w in w_by_step if 4 <= a < 17]
    late = [w for a, w in w_by_step if a >= 24]
    assert np.mean(early) > 2 * np.mean(late), cache.stats.pattern


def test_far_too_long_interval_warns():
    cache = VelocityCache(CacheConfig(backend="reuse", interval=1000))
    with pytest.warns(UserWarning, match="only 3 of 60 steps"):
        drive(cache, smooth, steps=60)
        cache.reset()
    with pytest.warns(UserWarning, match="interval 1000"):
        VelocityCache(CacheConfig(backend="reuse", interval=1000, num_steps=60))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = VelocityCache(CacheConfig(backend="reuse", interval=4, num_steps=60))
        drive(c, smooth, steps=60)
        c.reset()


class _CountHostReads(torch.overrides.TorchFunctionMode):
    """Counts reads of tensor values into Python (a device round-trip on a GPU)."""

    NAMES = {"item", "cpu", "__float__", "__int__", "__bool__"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("settings", [
    dict(schedule="adaptive", tolerance=0.05), dict(interval=4),
    dict(interval=4, horizon="time"), dict(schedule="adaptive", tolerance=0.05, horizon="time")])
def test_computed_steps_do_not_read_device_values(settings, monkeypatch):
    """With step times as device tensors, a computed step reads nothing back to the host,
    and a window reads at most twice at its first forecast step (the step times, in one
    batch, and the small Gram matrix), then only the step's own time with horizon="time"."""
    import hicache3d.cache as cache_mod
    import hicache3d.forecast.store as store_mod
    monkeypatch.setattr(cache_mod, "_on_host", lambda t: not isinstance(t, torch.Tensor))
    monkeypatch.setattr(store_mod, "_defer_products", lambda device: False)
    cache = VelocityCache(CacheConfig(backend="taylor", first_enhance=3, **settings))
    W = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts = torch.linspace(1, 0, 31, dtype=torch.float64)
    reads = []
    for i in range(30):
        t = ts[i].clone()
        v_net = torch.tanh(x @ W) * (1 + i / 30)
        with _CountHostReads() as m:
            v = cache.step(t, lambda: v_net)
        computed = cache.stats.trace[-1].computed
        reads.append((computed, m.n))
        x = x - (1 / 30) * v
    new_window = [n for k, (c, n) in enumerate(reads) if c and k > 0 and not reads[k - 1][0]]
    assert cache.stats.forecast > 5
    # a computed step reached directly from a forecast step (the cadence said so) or in
    # the warm-up reads nothing
    assert [n for _, n in reads[:3]] == [0, 0, 0], reads
    if settings.get("schedule") != "adaptive":
        assert new_window and max(new_window) == 0, reads
    # a forecast step reads at most what a new window needs (its first), then only the
    # time of the step (horizon="time")
    per_step_cap = 1 if settings.get("horizon") == "time" else 0
    first_of_window = {k for k, (c, n) in enumerate(reads) if k > 0 and reads[k - 1][0]}
    for k, (c, n) in enumerate(reads):
        if k not in first_of_window:
            assert n <= per_step_cap, (k, reads)
        else:
            assert n <= 2 + per_step_cap, (k, reads)


def test_recipes_carry_the_schedule_keys(tmp_path):
    from hicache3d.recipe import RecipeError, get_recipe
    b = get_recipe("bundled").site("sparse_structure").config
    assert b.schedule == "pattern" and b.tolerance == 2.0 and b.backend == "hermite"
    assert get_recipe("trellis").site("slat").config.schedule == "fixed"
    toml = tmp_path / "mine.toml"
    body = ('name = "mine"\nadapter = "generic"\nmodule = "hicache3d.bundled.sampler"\n'
            'run = "OccupancyFlowSampler.sample"\n[sites.main]\nstep = "OccupancyFlowSampler.velocity"\n'
            't_arg = 2\nschedule = "adaptive"\ntolerance = {tol}\nmax_skip = 3\n')
    toml.write_text(body.format(tol=0.3))
    c = get_recipe(str(toml)).site("main").config
    assert (c.schedule, c.tolerance, c.max_skip) == ("adaptive", 0.3, 3)
    toml.write_text(body.format(tol=-1))
    with pytest.raises((RecipeError, ValueError), match="tolerance"):
        get_recipe(str(toml))


def test_accelerate_takes_schedule_and_tolerance():
    import hicache3d
    from hicache3d.bundled import shapes
    from hicache3d.bundled.generator import BundledGenerator
    gen = BundledGenerator.from_pretrained()
    cond = shapes.make_example("held_out", 1)[1]
    ref = gen(cond, steps=12)
    with hicache3d.accelerate(gen, "bundled", schedule="adaptive", tolerance=0.0) as run:
        exact = gen(cond, steps=12)
    assert torch.equal(exact.latent, ref.latent) and exact.network_forwards == ref.network_forwards
    with hicache3d.accelerate(gen, "bundled", schedule="adaptive", tolerance=2.0) as run:
        fast = gen(cond, steps=12)
    st = run.stats["runs"][-1]["sites"]["sparse_structure"]
    assert fast.network_forwards < ref.network_forwards and "." in st["pattern"]
    site = run.runs[-1].sites["sparse_structure"]
    assert "computed for:" in site.summary()
    # the block's own summary says why each site computed, and the last run's pattern
    text = run.summary()
    why = text.split("computed for: ")[1].split(";")[0]
    assert sum(int(part.rsplit(" ", 1)[1]) for part in why.split(", ")) == site.computed
    assert f"last run {site.pattern}" in text


def test_cli_schedule_flags(tmp_path):
    from click.testing import CliRunner
    from hicache3d.bundled import shapes
    from hicache3d.cli import main
    png = tmp_path / "in.png"
    shapes.write_png(png, shapes.condition_to_rgba(shapes.make_example("held_out", 3)[1]))
    out = tmp_path / "m.glb"
    r = CliRunner().invoke(main, ["generate", "--image", str(png), "--out", str(out), "--steps", "12",
                                  "--schedule", "adaptive", "--tolerance", "1.0"])
    assert r.exit_code == 0, r.output
    assert "sparse_structure: C" in r.output and "computed:" in r.output
    r = CliRunner().invoke(main, ["generate", "--image", str(png), "--out", str(out), "--steps", "12",
                                  "--schedule", "adaptive", "--tolerance", "-1"])
    assert r.exit_code != 0 and "tolerance" in r.output
    r = CliRunner().invoke(main, ["generate", "--image", str(png), "--out", str(out), "--steps", "60",
                                  "--interval", "1000"])
    from hicache3d.recipe import get_recipe
    warm = get_recipe("bundled").site("sparse_structure").config.first_enhance   # the warm-up only
    assert r.exit_code == 0 and f"warning: sparse_structure ran the network on only {warm} of 60" in r.output
    r = CliRunner().invoke(main, ["patch", "--help"])
    assert "--schedule" in r.output and "--tolerance" in r.output
    r = CliRunner().invoke(main, ["patch", "--model", "bundled", "--schedule", "sometimes"])
    assert r.exit_code != 0 and "sometimes" in r.output


def test_frontier_analysis_by_hand():
    from hicache3d.bench import frontier_table, pareto, ratio_at
    rows = [dict(steps=25, schedule="fixed", forward_ratio=2.0, iou_mean=0.99, iou_min=0.97),
            dict(steps=25, schedule="fixed", forward_ratio=3.0, iou_mean=0.97, iou_min=0.93),
            dict(steps=25, schedule="fixed", forward_ratio=2.5, iou_mean=0.96, iou_min=0.90),  # dominated
            dict(steps=25, schedule="adaptive", forward_ratio=3.0, iou_mean=0.99, iou_min=0.98),
            dict(steps=25, schedule="adaptive", forward_ratio=4.0, iou_mean=0.97, iou_min=0.95)]
    front = pareto([r for r in rows if r["schedule"] == "fixed"])
    assert [r["forward_ratio"] for r in front] == [2.0, 3.0]
    assert ratio_at(front, 0.98) == pytest.approx(2.5) and ratio_at(front, 0.995) is None
    t = {r["iou"]: r for r in frontier_table(rows, levels=(0.98,))}
    assert t[0.98]["fixed_ratio"] == pytest.approx(2.5) and t[0.98]["adaptive_ratio"] == pytest.approx(3.5)
    assert t[0.98]["gain"] == pytest.approx(0.4) and t[0.98]["adaptive_min"] == pytest.approx(0.965)
    assert "per_item_ratio" not in t[0.98]
    # rows run one shape per call make a frontier of their own, beside the batched one
    rows += [dict(steps=25, schedule="adaptive", per_item=True, forward_ratio=5.0, iou_mean=0.99, iou_min=0.96),
             dict(steps=25, schedule="adaptive", per_item=True, forward_ratio=6.0, iou_mean=0.97, iou_min=0.90)]
    t = {r["iou"]: r for r in frontier_table(rows, levels=(0.98,))}
    assert t[0.98]["adaptive_ratio"] == pytest.approx(3.5)
    assert t[0.98]["per_item_ratio"] == pytest.approx(5.5) and t[0.98]["per_item_gain"] == pytest.approx(1.2)
    assert t[0.98]["per_item_min"] == pytest.approx(0.93)


def test_sensitivity_profile_weights_early_steps_more():
    """``sensitivity`` q multiplies each step's weight by ((1/2 + c) / (f + c))^q, f the
    fraction of the way from the first sampler time to 0; 1 on samplers that run upward."""
    ts = list(np.linspace(1.0, 0.0, 21)[:4])            # uniform dt: the dt weights are 1
    base = AdaptivePolicy(1.0)._ahead(ts, 3)[0]
    pol = AdaptivePolicy(1.0, sensitivity=2.0, sensitivity_offset=0.1)
    w, future = pol._ahead(ts, 3)
    f = 1.0 - future / 1.0
    assert np.allclose(future, [0.8, 0.75, 0.7]) and np.allclose(base, 1.0)
    assert np.allclose(w, (0.6 / (f + 0.1)) ** 2)
    up = AdaptivePolicy(1.0, sensitivity=2.0)._ahead(list(np.linspace(0.0, 1.0, 21)[:4]), 3)[0]
    assert np.allclose(up, 1.0)



def test_accelerate_interval_alone_selects_the_fixed_cadence():
    """The bundled recipe defaults to searched patterns; ``interval=`` alone asks for the
    fixed cadence (as ``--interval`` does on the command line), an explicit schedule wins."""
    import hicache3d
    from hicache3d.bundled import shapes
    from hicache3d.bundled.generator import BundledGenerator
    gen = BundledGenerator.from_pretrained()
    cond = shapes.make_example("held_out", 1)[1]
    with hicache3d.accelerate(gen, "bundled", interval=3, first_enhance=3) as run:
        gen(cond, steps=25)
    st = run.stats["runs"][-1]["sites"]["sparse_structure"]
    plan = "".join("C" if c else "." for c in Schedule(3, 3, 0).plan(25))
    assert st["pattern"] == plan
    with hicache3d.accelerate(gen, "bundled", interval=3, schedule="adaptive", tolerance=0.0) as run:
        gen(cond, steps=25)
    assert run.stats["runs"][-1]["sites"]["sparse_structure"]["pattern"] == "C" * 25


def test_compute_cost_gives_dear_steps_longer_windows():
    """The same error per step everywhere; computes in the first half of sampler time
    (t >= 0.5) cost twice the others (two-forward guidance there): with ``compute_cost``
    the windows there are longer than in the cheap half, without it they are not."""
    ts = np.linspace(1.0, 0.0, 61)

    def run(**kw):
        cache = adaptive(backend="reuse", tolerance=0.3, first_enhance=3, **kw)
        for i in range(60):
            cache.step(float(ts[i]), lambda i=i: torch.tensor([[1.0 + 0.01 * i, 1.0]], dtype=torch.float64))
        steps_c = [r.step for r in cache.stats.trace if r.computed]
        w = [(a, b - a - 1) for a, b in zip(steps_c, steps_c[1:]) if a >= 3]
        dear = np.mean([x for a, x in w if ts[a] >= 0.55])
        cheap = np.mean([x for a, x in w if ts[a] < 0.45 and a < 55])
        return dear, cheap, cache

    dear, cheap, plain = run()
    assert dear == pytest.approx(cheap, abs=1.0), plain.stats.pattern
    dear, cheap, costed = run(compute_cost=[[0.5, 1.0, 2.0]])
    assert dear > cheap + 1.0, costed.stats.pattern
    # the budget follows the cost: twice the budget is (2)^(1/2) longer windows for reuse
    # (errors grow as j^1, sum ~ j^2 / 2)
    assert dear / cheap == pytest.approx(2 ** 0.5, rel=0.3), costed.stats.pattern


def test_interval_cost_and_the_budget_it_scales():
    from hicache3d.schedule import IntervalCost
    cost = IntervalCost([(0.5, 1.0, 2.0), (0.0, 0.1, 0.5)])
    assert (cost(0.7), cost(0.3), cost(0.05), cost.ref) == (2.0, 1.0, 0.5, 2.0)
    pol = AdaptivePolicy(1.0, max_skip=8, exponent=1.0, first_enhance=0, cost=cost)
    pol.c = 0.1
    # steps of 0.05 from t = 0.56: one dear step (t = 0.51) then cheap ones; the budget of
    # a window is tolerance x the mean cost of its steps / the dearest cost; by hand
    pol._plan([0.66, 0.61, 0.56])
    spent, m = 0.0, 0
    for j in range(1, 9):
        costs = [2.0 if 0.56 - 0.05 * k >= 0.5 else 1.0 for k in range(1, j + 1)]
        spent += 0.1 * j
        if spent > 1.0 * np.mean(costs) / 2.0:
            break
        m = j
    assert pol.window == m == 3
    plain = AdaptivePolicy(1.0, max_skip=8, exponent=1.0, first_enhance=0)
    plain.c = 0.1
    plain._plan([0.66, 0.61, 0.56])
    assert plain.window == 4


@pytest.mark.parametrize("value", [[[0.5, 1.0]], [[1.0, 0.5, 2.0]], [[0.5, 1.0, 0.0]], [[0, 1, float("nan")]],
                                   "cfg"])
def test_compute_cost_is_validated(value):
    with pytest.raises(ValueError, match="compute_cost"):
        CacheConfig(compute_cost=value)


def test_bundled_recipe_compute_cost_matches_its_sampler():
    """The bundled recipe's ``compute_cost`` says what its sampler does: two network
    forwards per step where guidance applies, one elsewhere (counted here per step)."""
    from hicache3d.bundled.generator import DEFAULT_SAMPLING
    from hicache3d.bundled.sampler import OccupancyFlowSampler
    from hicache3d.recipe import get_recipe
    from hicache3d.schedule import IntervalCost
    c = get_recipe("bundled").site("sparse_structure").config
    cost = IntervalCost(c.compute_cost)
    s = OccupancyFlowSampler()
    x = torch.zeros(1, 2)
    for t in s.timesteps(25, DEFAULT_SAMPLING["rescale_t"])[:-1]:
        n0 = s.network_forwards
        s.velocity(lambda x, t, c: x, x, t, x, x, DEFAULT_SAMPLING["cfg_strength"],
                   DEFAULT_SAMPLING["cfg_interval"])
        assert cost(t) == s.network_forwards - n0, t
    policy = make_policy(c)               # its patterns; the adaptive schedule for other lengths
    assert isinstance(policy.otherwise.cost, IntervalCost)


def test_dt_power_raises_the_step_weights():
    times = [1.0, 0.9, 0.75]              # dt 0.1 then 0.15: growth clipped to 1.25
    a, b = AdaptivePolicy(1.0), AdaptivePolicy(1.0, dt_power=2.0)
    wa, wb = a._weights(times, 4), b._weights(times, 4)
    want = 0.15 / 0.125 * 1.25 ** np.arange(1, 5)
    assert np.allclose(wa, want) and np.allclose(wb, want ** 2)


def test_oracle_search_script_uses_the_library_pattern_schedule():
    """scripts/oracle_schedule.py scores its patterns with ``schedule="pattern"`` (tested in
    tests/test_pattern_schedule.py), not a copy of the policy; it still loads."""
    from ._scripts import load_script
    m = load_script("oracle_schedule")
    assert callable(m.main) and not hasattr(m, "PatternPolicy")


def test_first_window_forecasts_before_the_first_error_signal(monkeypatch):
    """``first_window`` (policy option): after a warm-up of 1, that many steps are forecast
    (from the one snapshot) before the first error is measured; 0 computes them."""
    from hicache3d import cache as cache_mod

    def run(**kw):
        monkeypatch.setattr(cache_mod, "make_policy",
                            lambda config: AdaptivePolicy(1.0, first_enhance=1, exponent=2.0, **kw))
        c = VelocityCache(CacheConfig(backend="hermite", schedule="adaptive", tolerance=1.0, first_enhance=1))
        drive(c, smooth, steps=10)
        return c.stats.pattern

    assert run().startswith("CC") and run(first_window=1).startswith("C.C")
    assert run(first_window=2).startswith("C..C")
