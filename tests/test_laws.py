"""Every fitter recovers known parameters from data drawn from its own law with noise; bootstrap coverage;
bad inputs. Tolerances are stated next to each assertion."""

import math

import numpy as np
import pytest

from scaling_lab import laws, resampling


def _isoflop_design(budgets, per_budget=9, span=3.0, k=6.0, centre=0.5, offset=-1.0):
    """Model sizes log-spaced around N ~ C^centre at each budget; D = C / (kN)."""
    N, D, C = [], [], []
    for c in budgets:
        mid = centre * math.log10(c) + offset
        for n in np.logspace(mid - span / 2, mid + span / 2, per_budget):
            N.append(n)
            D.append(c / (k * n))
            C.append(c)
    return np.array(N), np.array(D), np.array(C)


@pytest.mark.parametrize("irreducible", [False, True])
def test_power_law_recovers_exponent(irreducible):
    rng = np.random.default_rng(1)
    x = np.logspace(6, 10, 25)
    E = 1.5 if irreducible else 0.0
    L = laws.power_law(x, 8.8e13, 0.076, E) * np.exp(rng.normal(0, 0.002, x.size))  # Kaplan's L(N) constants
    if irreducible:
        L = laws.power_law(x, 1e8, 0.35, E) * np.exp(rng.normal(0, 0.002, x.size))
    fit = laws.fit_power_law(x, L, irreducible=irreducible)
    if irreducible:
        assert fit["alpha"] == pytest.approx(0.35, rel=0.10)  # 10% on the exponent
        assert fit["E"] == pytest.approx(1.5, abs=0.05)
    else:
        assert fit["alpha"] == pytest.approx(0.076, rel=0.05)  # 5% on the exponent
        assert math.log10(fit["x_c"]) == pytest.approx(math.log10(8.8e13), abs=0.5)


def test_kaplan_nd_recovers_eq_1_5():
    rng = np.random.default_rng(2)
    N, D = np.meshgrid(np.logspace(6, 9.5, 8), np.logspace(8, 11, 8))
    N, D = N.ravel(), D.ravel()
    true = laws.KAPLAN_ND
    L = laws.kaplan_nd(N, D, true["N_c"], true["D_c"], true["alpha_N"], true["alpha_D"])
    L = L * np.exp(rng.normal(0, 0.002, L.size))
    fit = laws.fit_kaplan_nd(N, D, L)
    assert fit["alpha_N"] == pytest.approx(true["alpha_N"], rel=0.15)  # 15% on each exponent
    assert fit["alpha_D"] == pytest.approx(true["alpha_D"], rel=0.15)
    assert fit["a"] == pytest.approx(true["alpha_D"] / (true["alpha_N"] + true["alpha_D"]), abs=0.03)


def test_approach3_recovers_hoffmann_coefficients():
    """Data from E=1.69, A=406.4, B=410.7, α=0.34, β=0.28 (Hoffmann et al. 2022) at 7 budgets, 0.5% noise."""
    rng = np.random.default_rng(0)
    N, D, _ = _isoflop_design(np.logspace(18.5, 21.5, 7), per_budget=9, span=3.0)
    L = laws.chinchilla(N, D, **laws.HOFFMANN) * np.exp(rng.normal(0, 0.005, N.size))
    fit = laws.approach3(N, D, L)
    h = laws.HOFFMANN
    assert fit.alpha == pytest.approx(h["alpha"], abs=0.03)  # ±0.03 on the exponents
    assert fit.beta == pytest.approx(h["beta"], abs=0.03)
    assert fit.E == pytest.approx(h["E"], abs=0.05)  # ±0.05 nats on E
    assert fit.A == pytest.approx(h["A"], rel=0.35)  # A, B trade off with α, β: 35%
    assert fit.B == pytest.approx(h["B"], rel=0.35)
    assert fit.a == pytest.approx(h["beta"] / (h["alpha"] + h["beta"]), abs=0.03)


def test_approach3_exact_without_noise():
    N, D, _ = _isoflop_design(np.logspace(18, 21, 5), per_budget=7)
    fit = laws.approach3(N, D, laws.chinchilla(N, D, **laws.HOFFMANN))
    for k, v in laws.HOFFMANN.items():
        assert fit.params()[k] == pytest.approx(v, rel=1e-3)  # 0.1% without noise


def test_approach2_recovers_known_exponent():
    """IsoFLOP parabolas in log N with vertices on N_opt = 0.1·C^0.62, 0.3% noise on the loss."""
    rng = np.random.default_rng(3)
    a_true, budgets = 0.62, np.logspace(17, 21, 6)
    N, D, C = _isoflop_design(budgets, per_budget=9, span=2.0, centre=a_true, offset=-1.0)
    n_opt = 0.1 * C**a_true
    L = 3.0 - 0.1 * np.log10(C / 1e17) + 0.08 * np.log(N / n_opt) ** 2
    L = L * np.exp(rng.normal(0, 0.003, L.size))
    fit = laws.approach2(N, D, C, L)
    assert fit.a == pytest.approx(a_true, abs=0.02)  # ±0.02 on the exponent
    assert fit.b == pytest.approx(1 - a_true, abs=0.02)
    assert all(fit.inside)


def test_approach2_on_chinchilla_law():
    N, D, C = _isoflop_design(np.logspace(18, 21, 5), per_budget=11, span=2.5)
    fit = laws.approach2(N, D, C, laws.chinchilla(N, D, **laws.HOFFMANN))
    assert fit.a == pytest.approx(0.28 / 0.62, abs=0.03)  # the parabola approximates the law: ±0.03


def test_approach1_recovers_envelope_exponent():
    """Training curves L(N, d) = Hoffmann's law along d for a dense ladder of sizes: the lower envelope's
    N_opt(C) follows β/(α+β) = 0.452."""
    curves = []
    for i, n in enumerate(np.logspace(7.5, 10, 30)):
        d = np.logspace(8, 12, 40)
        curves.append(laws.Curve(f"r{i}", n, d, 6 * n * d, laws.chinchilla(n, d, **laws.HOFFMANN)))
    fit = laws.approach1(curves, n_grid=30)
    assert fit.a == pytest.approx(0.452, abs=0.05)  # ladder quantization: ±0.05


def test_curve_extrapolation_recovers_power_law():
    rng = np.random.default_rng(4)
    steps = np.arange(10, 1001, 10)
    loss = 5.0 * steps**-0.4 + 2.0
    r = laws.curve_fit_extrapolate(steps, loss * np.exp(rng.normal(0, 0.002, steps.size)), frac=0.5)
    assert r["b"] == pytest.approx(0.4, rel=0.15)
    assert r["c"] == pytest.approx(2.0, abs=0.05)
    assert abs(r["rel_err"]) < 0.01  # the final loss within 1%


def test_curve_grid_costs_are_the_least_squares_of_each_exponent():
    """The learning-curve fit scores its grid of exponents b in one array operation: each cost is that of the
    2-parameter least squares of y = a·x^(-b) + c (or through the origin where that gives a <= 0 or c < 0)."""
    rng = np.random.default_rng(5)
    grid = np.exp(np.linspace(np.log(0.01), np.log(4.0), 40))
    for _ in range(20):
        xs = np.arange(10.0, 1001.0, 10.0)
        ys = rng.uniform(0, 4) + rng.uniform(-3, 6) * xs ** -rng.uniform(0.05, 2) + rng.normal(0, 0.02, xs.size)
        want = []
        for b in grid:
            X = np.stack([xs ** -b, np.ones_like(xs)], axis=1)
            (a, c), *_ = np.linalg.lstsq(X, ys, rcond=None)
            if a <= 0 or c < 0:
                a, c = np.sum(X[:, 0] * ys) / np.sum(X[:, 0] ** 2), 0.0
            want.append(np.sum((a * X[:, 0] + c - ys) ** 2))
        np.testing.assert_allclose(laws._grid_costs(xs, ys, grid), want, rtol=1e-9, atol=1e-12)


def test_bootstrap_interval_covers_truth_in_most_trials():
    """20 seeded trials of Approach 2 on noisy parabolas; the 95% percentile interval of a should cover the
    truth in at least 15 (a 95% interval covers ~19 on average; 15 allows for the small samples)."""
    a_true, budgets = 0.55, np.logspace(17, 20, 5)
    N, D, C = _isoflop_design(budgets, per_budget=7, span=2.0, centre=a_true, offset=-1.0)
    labels = laws.group_budgets(C)
    n_opt = 0.1 * C**a_true
    covered = 0
    for trial in range(20):
        rng = np.random.default_rng(100 + trial)
        L = (3.0 + 0.1 * np.log(N / n_opt) ** 2) * np.exp(rng.normal(0, 0.004, N.size))

        def fit(idx, L=L):
            return {"a": laws.approach2(N[idx], D[idx], C[idx], L[idx], labels=labels[idx]).a}

        ci = resampling.interval(resampling.bootstrap(fit, N.size, n_boot=150, seed=trial, strata=labels)["a"])
        covered += ci["lo"] <= a_true <= ci["hi"]
    assert covered >= 15, covered


def test_group_budgets_merges_within_tolerance():
    c = np.array([1e18, 1.03e18, 0.98e18, 3e18, 3.1e18, 1e19])
    lab = laws.group_budgets(c, rtol=0.05)
    assert lab.tolist() == [0, 0, 0, 1, 1, 2]
    assert laws.group_budgets(c, rtol=0.0).max() == 5


def test_verdict_reports_inside_and_distance():
    v = laws.verdict(0.5, {"lo": 0.45, "hi": 0.55, "se": 0.025})
    assert v["chinchilla"]["inside_ci95"] and not v["kaplan"]["inside_ci95"]
    assert v["kaplan"]["z"] == pytest.approx((0.5 - 0.73) / 0.025)
    assert v["closer_to"] == "chinchilla"
    assert "Kaplan 0.73 outside" in laws.verdict_sentence("x", v)


def test_too_few_points_single_budget_and_nan_are_named():
    N, D, C = _isoflop_design([1e18, 1e19], per_budget=5)
    L = laws.chinchilla(N, D, **laws.HOFFMANN)
    with pytest.raises(laws.FitError, match="parameter 'runs'.*at least 6"):
        laws.approach3(N[:4], D[:4], L[:4])
    with pytest.raises(laws.FitError, match="parameter 'budgets'.*at least 2 FLOP budgets"):
        laws.approach2(N[:5], D[:5], C[:5], L[:5])
    bad = L.copy()
    bad[2] = np.nan
    with pytest.raises(laws.FitError, match="parameter 'loss'.*finite positive"):
        laws.approach3(N, D, bad)
    with pytest.raises(laws.FitError, match="parameter 'runs'.*at least 2 points"):
        laws.fit_power_law([1.0], [2.0])


def test_approach3_refits_in_two_processes_equal_the_refits_in_one():
    """The bootstrap's Approach 3 refits spread over spawned processes give the very same fits, in order, and None
    for a resample that cannot be fitted (one model size only)."""
    rng = np.random.default_rng(1)
    N, D, C = _isoflop_design(np.logspace(18, 20, 3), per_budget=5)
    L = laws.chinchilla(N, D, **laws.HOFFMANN) * np.exp(rng.normal(0, 0.01, N.size))
    full = laws.approach3(N, D, L)
    init = laws.a3_starts(N, D, L, full, n=2)
    idxs = resampling.resamples(len(N), 12, seed=3, strata=laws.group_budgets(C))
    idxs.append(np.zeros(len(N), dtype=int))  # every pick the same run: no fit
    one = resampling.approach3_refits(N, D, L, 6.0, init, idxs, workers=1)
    two = resampling.approach3_refits(N, D, L, 6.0, init, idxs, workers=2, chunk=5)
    assert len(one) == len(two) == 13 and one[-1] is None and two[-1] is None
    assert all(f is not None for f in one[:-1])
    assert [f.params() for f in one[:-1]] == [f.params() for f in two[:-1]]  # bit for bit
    assert len({round(f.a, 6) for f in one[:-1]}) > 6  # the resamples differ, so do their fits
