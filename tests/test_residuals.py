"""Approach 3's residual bootstrap (scaling_lab.residuals) on synthetic data from a known law: the design is kept,
the interval covers the truth in most seeded repetitions, and it widens with the noise."""

import numpy as np

from scaling_lab import laws, resampling, residuals

# Hoffmann et al. 2022, Eq. 10 (Approach 3's fitted law): E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28
TRUE = laws.ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
SIZES, BUDGETS = 1e7 * 2.0 ** np.arange(8), np.logspace(18, 20, 5)  # a quick-like design: 8 sizes x 5 budgets
N, C = np.tile(SIZES, 5), np.repeat(BUDGETS, 8)
D = C / (6 * N)


def _data(noise: float, seed: int) -> np.ndarray:
    return TRUE.loss(N, D) * np.exp(noise * np.random.default_rng(seed).standard_normal(N.size))


def _interval(L: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    fit = laws.approach3(N, D, L)
    starts = laws.a3_starts(N, D, L, fit, n=2, pool=8)
    draws = residuals.residual_bootstrap(N, D, L, fit, starts, n_boot=n_boot, seed=seed)
    return resampling.interval(np.array([f.a for f in draws if f is not None]))


def test_draws_keep_the_design_and_are_seeded():
    L = _data(0.01, 0)
    fit = laws.approach3(N, D, L)
    r = residuals.fit_residuals(fit, N, D, L)
    a = residuals.draw_losses(fit, N, D, L, np.random.default_rng(3))
    b = residuals.draw_losses(fit, N, D, L, np.random.default_rng(3))
    assert np.array_equal(a, b) and a.shape == L.shape
    drawn = np.log(a) - np.log(fit.loss(N, D))  # every drawn residual is one of the centred, inflated residuals
    pool = (r - r.mean()) * np.sqrt(N.size / (N.size - 5))
    assert np.all(np.min(np.abs(drawn[:, None] - pool[None, :]), axis=1) < 1e-12)
    assert not np.allclose(drawn, r)  # redrawn, not the observed residuals in place


def test_interval_covers_the_true_exponent_in_most_repetitions():
    """10 data sets (1% noise), 80 draws each: a 95% interval should cover a = 0.452 about 9.5 times; 7 allows
    for the small number of draws and repetitions."""
    covered = 0
    for rep in range(10):
        ci = _interval(_data(0.01, 100 + rep), n_boot=80, seed=rep)
        covered += ci["lo"] <= TRUE.a <= ci["hi"]
    assert covered >= 7, covered


def test_interval_widens_with_the_noise():
    """The residuals carry the noise (and any misfit): 4x the noise gives a wider interval."""
    w = [(lambda ci: ci["hi"] - ci["lo"])(_interval(_data(noise, 7), n_boot=80, seed=1)) for noise in (0.005, 0.02)]
    assert w[1] > 2 * w[0], w
