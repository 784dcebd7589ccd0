"""Approach 3's interval as a fixed-design residual bootstrap (Efron & Tibshirani 1993, "An Introduction to the
Bootstrap", Sec. 9.5; Davison & Hinkley 1997, "Bootstrap Methods and their Application", Sec. 6.2).

The sizes and budgets of an isoFLOP search are chosen, not sampled: a re-run of the same search trains the same
(N, D) grid and only the training noise changes. So each draw keeps every run's (N, D) and redraws its log loss as
the full fit's prediction plus a residual of the full fit drawn with replacement from all runs' residuals
(centred, and inflated by sqrt(n / (n - 5)) for the 5 fitted parameters), then refits Approach 3 from several
starts. The residuals hold the seed noise and whatever the law misses, so a law that fits
badly gets a wide interval. This is the same question Approach 2's parametric bootstrap answers (how far a re-run
of this design moves a), where resampling runs (``resampling.bootstrap``, the "pairs" bootstrap) also redraws the
design: with ~10 runs per budget it often drops the sizes that pin E, alpha and beta. analyze reports both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from scaling_lab import laws

N_PARAMS = 5  # E, A, B, alpha, beta


def fit_residuals(fit: laws.ChinchillaFit, N: np.ndarray, D: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """log observed - log predicted loss of every run (the quantity Approach 3's Huber objective sums)."""
    return np.log(loss) - np.log(fit.loss(N, D))


def draw_losses(fit: laws.ChinchillaFit, N: np.ndarray, D: np.ndarray, loss: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """One bootstrap data set: losses at the same (N, D), prediction x exp(a residual drawn from all runs')."""
    r = fit_residuals(fit, N, D, loss)
    centred = (r - r.mean()) * np.sqrt(len(r) / max(len(r) - N_PARAMS, 1))
    return fit.loss(N, D) * np.exp(centred[rng.integers(0, len(r), len(r))])


def residual_bootstrap(N: Sequence[float], D: Sequence[float], loss: Sequence[float], fit: laws.ChinchillaFit,
                       starts: Sequence[np.ndarray], n_boot: int = 1000,
                       seed: int = 0) -> list[laws.ChinchillaFit | None]:
    """``n_boot`` refits of Approach 3 on residual-bootstrap data sets (``draw_losses``), each started from
    ``starts`` (e.g. ``laws.a3_starts``) and the best of them kept; None where a refit failed. Seeded:
    numpy default_rng(seed)."""
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise laws.FitError("n_boot", n_boot, "a positive integer")
    N_, D_, L_ = (np.asarray(x, dtype=float) for x in (N, D, loss))
    rng = np.random.default_rng(seed)
    out: list[laws.ChinchillaFit | None] = []
    for _ in range(n_boot):
        Lb = draw_losses(fit, N_, D_, L_, rng)
        try:
            out.append(laws.approach3(N_, D_, Lb, k=fit.k, starts=0, init=starts))
        except (laws.FitError, ValueError, ArithmeticError):
            out.append(None)
    return out
