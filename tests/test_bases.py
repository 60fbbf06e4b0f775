"""Exactness of every basis, checked against independent closed forms."""
import math

import numpy as np
import pytest
import torch

from hicache3d.forecast import (fit_exponential, hermite_weights, lagrange_weights,
                                make_forecaster, taylorseer_weights)
from hicache3d.forecast.registry import default
from hicache3d.forecast_bench.scenarios import (N_ANCHORS, SUBSTEP_N, exponential_trajectory,
                                                make_trajectory)


def exp_traj(d=48, seed=0, poles=None):
    """An exact sum of exponentials in continuous time: the benchmark's *clean* scenario."""
    if poles is None:
        poles = [0.93 * np.exp(0.4j), 0.97 * np.exp(-0.15j), 0.8]
    return exponential_trajectory(d, seed, poles)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("horizon", [0.5, 1, 2.25, 3, 5])
def test_dmd_exact_on_exponentials_uniform(horizon):
    f = exp_traj()
    fc = make_forecaster("dmd", history=7)
    for t in range(7):
        fc.push(t, f(t))
    assert rel(fc.predict(6 + horizon), f(6 + horizon)) <= 1e-6
    assert fc.stats.per_basis["dmd"] == 1


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("spacing", (1,) + SUBSTEP_N)
def test_dmd_exact_on_the_clean_benchmark_scenario(seed, spacing):
    """The benchmark's *clean* trajectory is in the exponential basis's model class, on the
    unit cadence and on every sub-step cadence it is benchmarked on."""
    times = [spacing * i for i in range(N_ANCHORS)]
    F = torch.from_numpy(make_trajectory("clean", times[-1] + spacing + 1, 64, seed))
    fc = make_forecaster("dmd", history=N_ANCHORS)
    for t in times:
        fc.push(t, F[t].reshape(1, -1))
    for q in range(times[-1] + 1, times[-1] + spacing + 1):
        assert rel(fc.predict(q), F[q].reshape(1, -1)) <= 1e-6


@pytest.mark.parametrize("times", [[0, 1, 2, 5, 8, 11], [0, 1, 2, 3, 6, 9], [0, 1, 2, 6, 10, 14]])
@pytest.mark.parametrize("frac", [1, 1.5, 2.75])
def test_dmd_exact_on_exponentials_irregular(times, frac):
    """Warm-up snapshots (spacing 1) plus the cache cadence: variable projection."""
    f = exp_traj(poles=[0.9 * np.exp(0.3j), 0.85])
    fc = make_forecaster("dmd", history=8)
    for t in times:
        fc.push(t, f(t))
    tq = times[-1] + frac
    assert rel(fc.predict(tq), f(tq)) <= 1e-6


@pytest.mark.parametrize("K", [1, 2, 3])
def test_variable_projection_jacobian_matches_central_differences(K):
    """The closed-form Jacobian of the variable-projection residual (complex rates, real
    snapshots, irregular positions) against central differences of the residual."""
    from hicache3d.forecast.exponential import _vp_jacobian, _vp_residual
    rng = np.random.default_rng(K)
    P, r = 4, 5
    tr = -np.array([9.0, 8.0, 7.0, 4.0, 1.0, 0.0]) / 3.0
    Y = rng.standard_normal((P, r, len(tr)))
    p = np.concatenate([-rng.uniform(0.05, 1.0, (P, K)), rng.uniform(-1.0, 1.0, (P, K))], axis=1)
    J = _vp_jacobian(Y, tr, p)
    h = 1e-6
    for k in range(2 * K):
        up, down = p.copy(), p.copy()
        up[:, k] += h
        down[:, k] -= h
        fd = (_vp_residual(Y, tr, up)[0] - _vp_residual(Y, tr, down)[0]) / (2 * h)
        np.testing.assert_allclose(J[:, :, k], fd, rtol=0, atol=1e-7 * max(1.0, np.abs(fd).max()))


@pytest.mark.parametrize("start", [(-0.2, -0.6), (0.1, -1.0)])
def test_variable_projection_finds_an_oscillating_pair_from_real_starting_rates(start):
    """With real data the residual is even in every imaginary part at real rates, so an
    exact Jacobian keeps real starts real: the two rates run together on the real axis.
    The fit then restarts from the conjugate pair around them, and is exact."""
    from hicache3d.forecast.exponential import _varpro_batch
    tr = -np.array([9.0, 8.0, 7.0, 4.0, 1.0, 0.0]) / 3.0
    a, b = -0.3, 0.8
    Y = np.stack([np.exp(a * tr) * np.cos(b * tr), np.exp(a * tr) * np.sin(b * tr)])[None]
    mu0 = np.array([start], dtype=np.complex128)
    mu, _, res = _varpro_batch(Y, tr, mu0, 25, split=False)
    assert res[0] > 0.1 and np.all(mu.imag == 0)          # stuck on the real axis
    mu, _, res = _varpro_batch(Y, tr, mu0, 25)
    assert res[0] <= 1e-10
    np.testing.assert_allclose(mu[0][np.argsort(mu[0].imag)], [a - 1j * b, a + 1j * b], atol=1e-6)


def test_exact_dmd_of_many_windows_is_each_window_alone(monkeypatch):
    """Exact DMD of many windows at once (batched by shape, then by the number of modes
    kept): every window gets the eigenvalues of its own ``X' X^+`` (computed directly
    here), and one window that cannot be fitted (all zero, or not finite) costs only
    itself, also where a LAPACK call fails within a batch."""
    from hicache3d.forecast.exponential import FitError, _exact_dmd_many
    rng = np.random.default_rng(3)

    def window(r, m, K):
        lam = rng.uniform(0.3, 0.95, K) * np.exp(1j * rng.uniform(-0.5, 0.5, K))
        modes = rng.standard_normal((r, K)) + 1j * rng.standard_normal((r, K))
        return (modes @ (lam[:, None] ** np.arange(m)[None, :])).real

    inf = window(4, 6, 2)
    inf[1, 2] = np.inf                      # an SVD of it would never return (OpenBLAS LAPACK)
    Ys = [window(4, 6, 2), window(4, 6, 3), window(5, 6, 3), window(4, 6, 1), window(3, 5, 2),
          np.zeros((4, 6)), np.full((5, 6), np.nan), window(5, 6, 4), inf]
    ranks = [0, 0, 2, 0, 0, 0, 0, 0, 0]
    got = _exact_dmd_many(Ys, 1e-8, ranks)
    assert isinstance(got[5], FitError) and got[5].reason == "zero_history"
    assert isinstance(got[6], FitError) and got[6].reason == "nonfinite_fit"
    assert isinstance(got[8], FitError) and got[8].reason == "nonfinite_fit"
    for j in (0, 1, 2, 3, 4, 7):
        lam, modes = got[j]
        X, Xp = Ys[j][:, :-1], Ys[j][:, 1:]
        if ranks[j]:                        # rank-limited: project onto the leading modes
            U = np.linalg.svd(X, full_matrices=False)[0][:, :ranks[j]]
            X, Xp = U.T @ X, U.T @ Xp
        direct = np.linalg.eigvals(Xp @ np.linalg.pinv(X, rcond=1e-8))
        direct = direct[np.argsort(-np.abs(direct))][:len(lam)]
        assert len(lam) == (ranks[j] or np.linalg.matrix_rank(X, 1e-8 * np.linalg.norm(X, 2)))
        np.testing.assert_allclose(np.sort_complex(lam), np.sort_complex(direct), atol=1e-8)
        # and exactly what the window gets when fitted alone
        alone = _exact_dmd_many([Ys[j]], 1e-8, [ranks[j]])[0]
        np.testing.assert_array_equal(alone[0], lam)
        np.testing.assert_array_equal(alone[1], modes)
    # a LAPACK failure in a batch: every window of it is fitted again on its own
    from hicache3d.forecast import exponential as ex
    stack = ex._exact_dmd_stack

    def fails_in_a_batch(Y, tol, r):
        if len(Y) > 1:
            raise np.linalg.LinAlgError("as if one window of the batch failed")
        return stack(Y, tol, r)
    monkeypatch.setattr(ex, "_exact_dmd_stack", fails_in_a_batch)
    again = _exact_dmd_many(Ys, 1e-8, ranks)
    for j in (0, 1, 2, 3, 4, 7):
        np.testing.assert_array_equal(again[j][0], got[j][0])
        np.testing.assert_array_equal(again[j][1], got[j][1])
    assert again[5].reason == "zero_history"


def test_dmd_engages_with_three_warmup_snapshots():
    f = exp_traj(poles=[0.9 * np.exp(0.3j)])        # one oscillation: rank 2
    fc = make_forecaster("dmd", history=6)
    for t in range(3):
        fc.push(t, f(t))
    assert rel(fc.predict(3.0), f(3.0)) <= 1e-6
    assert fc.stats.per_basis["dmd"] == 1


def test_dmd_in_sampler_time_decreasing():
    """Positions may be sampler times running from 1 to 0 on a warped grid."""
    ts = 1 - np.linspace(0, 1, 13)
    ts = 3 * ts / (1 + 2 * ts)
    rates = [-1.5 + 4j, -0.7]
    g = torch.Generator().manual_seed(3)
    A = torch.randn(32, 2, dtype=torch.complex128, generator=g)
    mu = torch.tensor(rates, dtype=torch.complex128)
    f = lambda t: (A @ torch.exp(mu * (1 - t))).real.reshape(1, -1)
    fc = make_forecaster("dmd", history=6)
    for t in ts[:6]:
        fc.push(float(t), f(t))
    assert rel(fc.predict(float(ts[7])), f(ts[7])) <= 1e-6


def test_growing_modes_are_clamped_and_counted():
    f = exp_traj(poles=[1.2, 0.9])
    fc = make_forecaster("dmd", history=6)
    for t in range(6):
        fc.push(t, f(t))
    fc.predict(8)
    assert fc.stats.clamped_modes >= 1
    # the clamped forecast grows no faster than the last value
    w = fit_exponential(np.arange(6.0), fc.store.gram()[0]).weights(8.0)
    assert np.all(np.isfinite(w))


@pytest.mark.parametrize("m", [0, 1, 2, 3])
def test_taylor_exact_on_polynomials_of_its_order(m):
    g = torch.Generator().manual_seed(m)
    C = torch.randn(m + 1, 1, 40, dtype=torch.float64, generator=g)
    poly = lambda t: sum(C[i] * t ** i for i in range(m + 1))
    fc = make_forecaster("taylor", history=6, order=m)
    for t in (0, 1, 2, 5, 8, 11):          # non-uniform spacing too
        fc.push(t, poly(float(t)))
    for tq in (12.0, 13.5, 15.0):
        assert rel(fc.predict(tq), poly(tq)) <= 1e-9


def test_taylorseer_form_matches_published_formula():
    """TaylorSeer: D^i = (D^{i-1}_now - D^{i-1}_prev)/N, forecast sum_i D^i k^i / i!."""
    rng = np.random.default_rng(0)
    V = rng.normal(size=(4, 16))
    N = 3
    t = np.array([0, 3, 6, 9.0])
    # independent recursion on the data itself
    D_prev = None
    for j in range(4):
        D = [V[j]]
        if D_prev is not None:
            for i in range(min(2, len(D_prev))):
                D.append((D[i] - D_prev[i]) / N)
        D_prev = D
    for k in (1, 2):
        expect = sum(D_prev[i] * k ** i / math.factorial(i) for i in range(len(D_prev)))
        got = taylorseer_weights(t, 9.0 + k, 2) @ V
        np.testing.assert_allclose(got, expect, rtol=1e-12)


def test_hermite_matches_published_formula():
    """HiCache: F + sum_i D^i / i! * sigma^i H_i(sigma k), H_1 = 2x, H_2 = 4x^2 - 2,
    H_3 = 8x^3 - 12x (closed forms, written out independently)."""
    H = [lambda x: 1.0, lambda x: 2 * x, lambda x: 4 * x * x - 2, lambda x: 8 * x ** 3 - 12 * x]
    rng = np.random.default_rng(1)
    V = rng.normal(size=(5, 10))
    t = np.array([0, 1, 2, 4, 6.0])
    sigma = 0.6
    # backward differences by hand on the last 4 snapshots
    d1 = [(V[j] - V[j - 1]) / (t[j] - t[j - 1]) for j in range(2, 5)]
    d2 = [(d1[j] - d1[j - 1]) / (t[j + 2] - t[j + 1]) for j in range(1, 3)]
    d3 = (d2[1] - d2[0]) / (t[4] - t[3])
    D = [V[4], d1[-1], d2[-1], d3]
    for k in (1.0, 2.0, 3.0):
        expect = sum(D[i] / math.factorial(i) * sigma ** i * H[i](sigma * k) for i in range(4))
        got = hermite_weights(t, 6.0 + k, 3, sigma) @ V
        np.testing.assert_allclose(got, expect, rtol=1e-12)


def test_lagrange_weights_sum_to_one():
    t = np.array([0, 1, 2, 5, 8.0])
    for m in range(4):
        assert abs(lagrange_weights(t, 10.3, m).sum() - 1) < 1e-12


def test_auto_picks_dmd_on_clean_exponential():
    f = exp_traj()
    fc = make_forecaster("auto", history=7)
    for t in range(7):
        fc.push(t, f(t))
    out = fc.predict(8.0)
    assert fc.last_labels == ["dmd"]
    assert rel(out, f(8.0)) <= 1e-6


def test_auto_picks_reuse_or_damped_after_regime_switch():
    """A velocity that was smooth and then jumps to a new constant: extrapolating the jump
    is wrong; the held-out backcast must prefer a basis that does not extrapolate it."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(1, 32, generator=g, dtype=torch.float64), torch.randn(1, 32, generator=g, dtype=torch.float64)
    slope = torch.randn(1, 32, generator=g, dtype=torch.float64)
    traj = {t: a + 0.3 * t * slope for t in range(4)}
    traj.update({t: b for t in range(4, 12)})
    fc = make_forecaster("auto", history=6)
    for t in range(6):
        fc.push(t, traj[t])
    out = fc.predict(7.0)
    errs = {}
    for name in ("reuse", "taylor", "hermite", "dmd"):
        f2 = make_forecaster(name, history=6)
        for t in range(6):
            f2.push(t, traj[t])
        errs[name] = rel(f2.predict(7.0), traj[7])
    assert rel(out, traj[7]) <= min(errs.values()) + 1e-9
    assert fc.last_labels[0].startswith("reuse")


def test_auto_selection_is_cached_per_window():
    f = exp_traj()
    fc = make_forecaster("auto", history=6)
    for t in range(6):
        fc.push(t, f(t))
    fc.predict(6.0)
    n_fits = len(fc._fits)
    fc.predict(7.0)
    assert len(fc._fits) == n_fits


def _noisy_trajectory(n=8, d=256, seed=3):
    """Two damped modes plus 1% noise: the automatic rank is chosen by backcast."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(3, d, generator=g, dtype=torch.float64)
    return [(A[0] * math.exp(-0.2 * t) + A[1] * math.exp(-0.05 * t) * math.cos(0.3 * t)
             + 0.01 * torch.randn(d, generator=g, dtype=torch.float64)).reshape(1, d) for t in range(n)]


def test_selected_exponential_fit_carries_its_held_out_forecast():
    """The rank trial that chose the fit forecasts the newest snapshot from the others:
    its weights, applied to the snapshots themselves, give the recorded backcast error."""
    vs = _noisy_trajectory()
    V = torch.cat(vs).numpy()
    t = np.arange(len(vs), dtype=np.float64)
    fit = fit_exponential(t, V @ V.T)
    assert fit.backcast is not None and fit.holdout_weights is not None
    w = fit.holdout_weights
    assert w.shape == (len(vs) - 1,)
    direct = np.linalg.norm(w @ V[:-1] - V[-1]) / np.linalg.norm(V[-1])
    assert abs(direct - fit.backcast) <= 1e-9 * max(1.0, direct), (direct, fit.backcast)
    reuse = np.linalg.norm(V[-2] - V[-1]) / np.linalg.norm(V[-1])
    assert fit.backcast < 0.5 * reuse, (fit.backcast, reuse)


def test_auto_ranks_dmd_by_the_backcast_its_fit_already_made(monkeypatch):
    """auto scores dmd with the held-out forecast of dmd's own rank selection: one
    exponential fit per window, not a second one on all but the newest snapshot."""
    import hicache3d.forecast.registry as registry
    vs = _noisy_trajectory()
    calls = []
    orig = registry.fit_exponential_batch

    def counting(t, G, **kw):
        calls.append(len(t))
        return orig(t, G, **kw)
    monkeypatch.setattr(registry, "fit_exponential_batch", counting)
    fc = make_forecaster("auto", history=8, candidates=("reuse", "hermite", "dmd"))
    for t, v in enumerate(vs):
        fc.push(float(t), v)
    fc.predict(8.5)
    assert calls == [len(vs)], calls
    # the score auto gave dmd is that backcast, recomputed here from the snapshots
    fit = fc._fit(fc.candidates[[c.name for c in fc.candidates].index("dmd")], 0).state
    V = torch.cat(vs).numpy()
    direct = np.linalg.norm(fit.holdout_weights @ V[:-1] - V[-1]) / np.linalg.norm(V[-1])
    assert abs(direct - fit.backcast) <= 1e-9


def test_every_scored_rank_trial_carries_its_held_out_forecast():
    """Each (window, rank) the selection scored keeps its forecast of the newest snapshot;
    the selected one is the least wrong of them (the minimum over the trials)."""
    vs = _noisy_trajectory()
    V = torch.cat(vs).numpy()
    t = np.arange(len(vs), dtype=np.float64)
    fit = fit_exponential(t, V @ V.T)
    assert fit.choice in fit.trials and len(fit.trials) >= 3
    np.testing.assert_array_equal(fit.trials[fit.choice], fit.holdout_weights)
    errs = {c: np.linalg.norm(w @ V[:-1] - V[-1]) / np.linalg.norm(V[-1]) for c, w in fit.trials.items()}
    assert min(errs.values()) == pytest.approx(fit.backcast, rel=1e-9)
    assert max(errs.values()) > 1.5 * fit.backcast


def test_auto_scores_dmd_by_the_choice_of_the_window_before():
    """The selected trial's backcast is the least of all the trials on the newest snapshot,
    so it flatters dmd against bases that choose nothing.  auto scores dmd instead by the
    (window, rank) that dmd chose on the window before, which never saw that snapshot:
    recomputed here with an independent fit of that rank on the snapshots before it."""
    vs = _noisy_trajectory()
    fc = make_forecaster("auto", history=6, candidates=("reuse", "hermite", "dmd"))
    dmd = next(c for c in fc.candidates if c.name == "dmd")
    for t in range(4):
        fc.push(float(t), vs[t])
    fc.predict(3.5)
    before = fc._fit(dmd, 0).state.choice
    fc.push(4.0, vs[4])
    fc.predict(4.5)
    now = fc._fit(dmd, 0).state
    assert before[0] == "whole" and now.choice != before     # the new window chooses otherwise
    V = torch.cat(vs[:5]).numpy()
    t = np.arange(5, dtype=np.float64)
    trial = fit_exponential(t[:4], V[:4] @ V[:4].T, rank=before[1])   # equally spaced: exact DMD
    direct = np.linalg.norm(trial.weights(4.0) @ V[:4] - V[4]) / np.linalg.norm(V[4])
    score = next(errs for errs, _, spec in fc._scores(0) if spec == dmd)[0][0]
    assert score == pytest.approx(direct, rel=1e-9)
    assert score > 1.2 * now.backcast                      # the selected trial's, which it was


def test_dmd_error_grows_linearly_with_a_short_horizon():
    """dmd's error model (auto carries backcasts with it, the adaptive schedule plans with
    it): a fit with too few modes starts from the newest snapshot with the modes' slope,
    so its error grows in proportion to a horizon within the spacing, measured here."""
    from hicache3d.forecast import BasisSpec, registry
    p = registry.get("dmd").error_order(BasisSpec("dmd"))
    for poles in (None, [0.9 * np.exp(0.3j), 0.85], [0.95, 0.7, 0.5]):
        f = exp_traj(poles=poles)
        fc = make_forecaster("dmd", history=6, rank=1)
        for t in range(6):
            fc.push(t, f(t))
        e = {tau: rel(fc.predict(5 + tau), f(5 + tau)) for tau in (0.25, 1.0)}
        assert e[1.0] > 1e-3
        assert math.log(e[1.0] / e[0.25]) / math.log(4.0) == pytest.approx(p, abs=0.2), (poles, e)


def test_auto_carries_each_backcast_to_the_horizon_it_forecasts():
    """After a warm-up of three steps the backcast is made at their spacing (1) but the
    first cache window forecasts up to 7 steps ahead.  On a velocity that saturates,
    extrapolating its slope wins the backcast and is the best forecast 1 step ahead,
    while 7 steps ahead plain reuse is: each candidate's backcast error is carried to the
    forecast's horizon by its error model, ``e (H / h)^p`` (p = 1 for reuse, order + 1 for
    the polynomials)."""
    g = torch.Generator().manual_seed(11)
    A, B = (torch.randn(1, 32, generator=g, dtype=torch.float64) for _ in range(2))

    def v(t):
        return 0.5 * A + B * (1.0 - math.exp(-0.5 * t))
    names = ("reuse", "taylor", "hermite")
    fc = make_forecaster("auto", history=6, candidates=names, candidate_damping=(0.0,), blend=0)
    for t in range(3):
        fc.push(float(t), v(t))
    # the ranking the error model gives, from the snapshots themselves
    V = [v(t).numpy().ravel() for t in range(3)]
    held = {"reuse": V[1], "taylor": 2 * V[1] - V[0],
            "hermite": hermite_weights(np.array([0.0, 1.0]), 2.0, 1, default("sigma")) @ np.stack(V[:2])}
    back = {k: np.linalg.norm(f - V[2]) / np.linalg.norm(V[2]) for k, f in held.items()}
    p = {"reuse": 1.0, "taylor": 2.0, "hermite": 2.0}
    served = {}
    for tq in (3.0, 9.0):
        true = {}
        for k in names:
            single = make_forecaster(k, history=6)
            for t in range(3):
                single.push(float(t), v(t))
            true[k] = rel(single.predict(tq), v(tq))
        out = fc.predict(tq)
        model = min(names, key=lambda k: back[k] * (tq - 2.0) ** p[k])
        assert fc.last_labels == [model], (tq, fc.last_labels, back)
        assert rel(out, v(tq)) == pytest.approx(true[model], rel=1e-9)
        assert true[model] == min(true.values()), (tq, true)     # here the model is right
        served[tq] = model
    assert served == {3.0: "hermite", 9.0: "reuse"}


@pytest.mark.parametrize("blend", [1.0, 2.0, 4.0])
def test_auto_blends_its_candidates_by_carried_backcast_error(blend):
    """``blend`` > 0: auto serves every candidate, weighted by its backcast error carried to
    the horizon, to the power -blend; checked against the single bases' own forecasts and
    backcast errors computed here from the snapshots."""
    g = torch.Generator().manual_seed(4)
    A, B, C = (torch.randn(1, 24, generator=g, dtype=torch.float64) for _ in range(3))

    def v(t):
        return A + B * math.exp(-0.3 * t) + 0.2 * C * math.cos(0.7 * t)
    names = ("reuse", "taylor", "hermite")
    times = [0.0, 1.0, 2.0, 5.0]
    fc = make_forecaster("auto", history=6, candidates=names, candidate_damping=(0.0,), blend=blend)
    for t in times:
        fc.push(t, v(t))
    V = np.stack([v(t).numpy().ravel() for t in times])
    tb = np.array(times[:-1])
    held = {"reuse": V[-2], "taylor": lagrange_weights(tb, 5.0, 1) @ V[:-1],
            "hermite": hermite_weights(tb, 5.0, 1, default("sigma")) @ V[:-1]}
    back = {k: np.linalg.norm(f - V[-1]) / np.linalg.norm(V[-1]) for k, f in held.items()}
    p = {"reuse": 1.0, "taylor": 2.0, "hermite": 2.0}
    tq = 7.0
    carried = {k: back[k] * ((tq - 5.0) / 3.0) ** p[k] for k in names}
    a = {k: carried[k] ** -blend for k in names}
    want = 0.0
    for k in names:
        single = make_forecaster(k, history=6)
        for t in times:
            single.push(t, v(t))
        want = want + a[k] / sum(a.values()) * single.predict(tq)
    out = fc.predict(tq)
    assert rel(out, want) <= 1e-12
    assert fc.last_labels == [min(names, key=carried.get)]
    assert len(set(round(x, 6) for x in a.values())) == 3      # a real blend, no tie


def test_blend_is_validated():
    from hicache3d import CacheConfig
    for bad in (-1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match="blend"):
            CacheConfig(backend="auto", blend=bad)


def test_auto_blend_drops_an_implausible_candidate_for_that_item_only():
    """Two batch items: on the first, taylor (and taylor damped by 0.5) extrapolates far
    beyond every snapshot and is left out of the blend (counted once per candidate); the
    second item, a straight line, keeps it and is served the exact linear forecast."""
    fc = make_forecaster("auto", history=4, candidates=("reuse", "taylor"), blend=1.0)
    rows = ((0.0, 1.0), (1.0, 1.1), (-1.0, 1.2), (1.0, 1.3))
    for t, (a, b) in enumerate(rows):
        fc.push(float(t), torch.tensor([[a] * 4, [b] * 4], dtype=torch.float64))
    out = fc.predict(10.0)
    assert dict(fc.stats.fallbacks) == {"taylor:implausible_forecast": 2}
    assert fc.last_labels == ["reuse", "taylor"]
    assert torch.equal(out[0], torch.ones(4, dtype=torch.float64))           # the newest snapshot
    torch.testing.assert_close(out[1], torch.full((4,), 2.0, dtype=torch.float64), rtol=1e-9, atol=1e-9)
