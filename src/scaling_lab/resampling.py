"""Bootstrap resampling of runs: resamples within budgets, refits on each, percentile intervals, and the
Approach 3 refits of a bootstrap spread over processes (each refit is a pure function of its resample, so the
intervals do not depend on how many processes ran them)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from scaling_lab.laws import ChinchillaFit, FitError, approach3, one_blas_thread


def resample(n: int, rng: np.random.Generator, strata: np.ndarray | None = None) -> np.ndarray:
    """Indices of a bootstrap sample of runs, drawn with replacement within each stratum (budget) when given,
    so every budget keeps its number of runs."""
    if strata is None:
        return rng.integers(0, n, n)
    idx = [rng.choice(np.flatnonzero(strata == s), size=int(np.sum(strata == s)), replace=True)
           for s in np.unique(strata)]
    return np.concatenate(idx)


def resamples(n: int, n_boot: int, seed: int = 0, strata: np.ndarray | None = None) -> list[np.ndarray]:
    """The ``n_boot`` index sets ``bootstrap`` draws with this seed, in its order."""
    rng = np.random.default_rng(seed)
    return [resample(n, rng, strata) for _ in range(n_boot)]


def bootstrap(fit: Callable[[np.ndarray], dict[str, float]], n: int, n_boot: int = 200, seed: int = 0,
              strata: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Refit on ``n_boot`` resamples of the runs; ``fit(idx)`` returns named numbers. A resample whose fit fails
    (e.g. a budget left with < 3 sizes) is skipped. Returns {name: array of values}."""
    out: dict[str, list[float]] = {}
    for idx in resamples(n, n_boot, seed, strata):
        try:
            vals = fit(idx)
        except (FitError, np.linalg.LinAlgError, ValueError, ArithmeticError):
            continue
        for k, v in vals.items():
            out.setdefault(k, []).append(float(v))
    return {k: np.asarray(v) for k, v in out.items()}


def interval(samples: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Percentile interval and standard error of bootstrap samples."""
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    if len(s) < 2:
        return {"lo": float("nan"), "hi": float("nan"), "se": float("nan"), "n": int(len(s))}
    q = (1 - level) / 2
    return {"lo": float(np.quantile(s, q)), "hi": float(np.quantile(s, 1 - q)), "se": float(np.std(s, ddof=1)),
            "n": int(len(s))}


def _approach3_chunk(job: tuple) -> list[ChinchillaFit | None]:
    """Approach 3 refits of one chunk of resamples (a process pool's task): None where a resample cannot be fitted."""
    N, D, L, k, init, idxs = job
    out: list[ChinchillaFit | None] = []
    with one_blas_thread():
        for idx in idxs:
            try:
                out.append(approach3(N[idx], D[idx], L[idx], k=k, starts=0, init=init))
            except (FitError, np.linalg.LinAlgError, ValueError, ArithmeticError):
                out.append(None)
    return out


def approach3_refits(N: np.ndarray, D: np.ndarray, L: np.ndarray, k: float, init: Sequence[np.ndarray],
                     idxs: Sequence[np.ndarray], workers: int = 1, chunk: int = 25) -> list[ChinchillaFit | None]:
    """Approach 3 refitted on each resample ``idxs`` (runs N[idx], D[idx], L[idx]) from the starts ``init``, in
    order; None where a resample cannot be fitted. ``workers`` > 1 spreads chunks of ``chunk`` resamples over that
    many spawned processes: each fit is the same pure function of its inputs, so the results are those of one
    process (tested), only sooner (a bootstrap's refits are most of an analysis' time)."""
    N, D, L = (np.asarray(a, dtype=float) for a in (N, D, L))
    jobs = [(N, D, L, k, list(init), list(idxs[i : i + chunk])) for i in range(0, len(idxs), chunk)]
    if workers <= 1 or len(jobs) < 2:
        return [f for job in jobs for f in _approach3_chunk(job)]
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold MLflow's or matplotlib's threads
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        return [f for part in pool.map(_approach3_chunk, jobs) for f in part]
