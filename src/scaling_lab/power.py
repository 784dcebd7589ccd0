"""Design power: how precisely can a search's design pin the exponent a (N_opt ∝ C^a) at all?

Keep every run's (N, D, budget) as the search trained them, draw its final loss from a known law
L = E + A/N^α + B/D^β plus Gaussian noise of a given size (nats), fit Approaches 2 and 3 as the analysis does,
and repeat. The spread of the fitted exponents over the draws is the sampling distribution of each estimator on
this design: its central 95% range is about the width a calibrated 95% interval of that estimator would have
when the law holds and only that noise remains (itself an estimate: its ends move by a few hundredths between
runs of 200 draws). With the seed-to-seed sd as the noise it is a best case for that law (a real search adds
whatever the law misses); with the fit's RMS residual it is the case the runs measured. Approach 2 weights its
budgets from A2_VAR_DRAWS draws per fit here (1,000 in the analysis), and its spread covers the draws it could
fit (budgets whose minimum is not bracketed, or whose window parabola fails, are dropped as in the analysis).
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from scaling_lab import approach2, laws
from scaling_lab.errors import ConfigError

A2_VAR_DRAWS = 100  # draws inside each Approach 2 fit for its budgets' weights (the analysis takes 1,000)
APPROACHES = ("approach2", "approach3")


@dataclass
class Spread:
    """The exponents one approach fitted over the draws of one law and noise."""

    approach: str
    truth: float
    """a of the law the losses were drawn from."""
    noise: float
    """Standard deviation of the loss noise [nats]."""
    a: np.ndarray
    """Fitted a per draw (NaN where the approach could not fit that draw)."""

    @property
    def fitted(self) -> np.ndarray:
        return self.a[np.isfinite(self.a)]

    def summary(self) -> dict[str, float]:
        """Median, central 95% range and its width, bias of the median, and the share of draws fitted."""
        ok = self.fitted
        if not len(ok):
            nan = float("nan")
            return {"median": nan, "lo": nan, "hi": nan, "width": nan, "bias": nan, "fitted": 0.0}
        lo, med, hi = (float(v) for v in np.percentile(ok, [2.5, 50, 97.5]))
        return {"median": med, "lo": lo, "hi": hi, "width": hi - lo, "bias": med - self.truth,
                "fitted": len(ok) / len(self.a)}


def draw_losses(law: laws.ChinchillaFit, N: np.ndarray, D: np.ndarray, noise: float,
                rng: np.random.Generator) -> np.ndarray:
    """One simulated re-run of the design: the law's loss at each run's (N, D) plus N(0, noise²) [nats]."""
    return law.loss(N, D) + rng.normal(0.0, noise, len(N))


def _fit_draws(job: tuple) -> list[dict[str, float]]:
    """Fit the approaches on draws ``first..first+count-1`` (a process pool's task). Draw i uses the generator
    seeded by (seed, i) alone, so the spreads do not depend on how the draws were split over processes."""
    N, D, C, labels, law, noise, seed, approaches, first, count = job
    sd = np.full(len(N), noise if noise > 0 else 1e-9)  # Approach 2 weights by 1/sd²
    out = []
    with laws.one_blas_thread():
        for i in range(first, first + count):
            L = draw_losses(law, N, D, noise, np.random.default_rng([seed, i]))
            a2_seed = int(np.random.SeedSequence([seed, i, 2]).generate_state(1)[0])  # its own stream per draw
            row = {name: float("nan") for name in approaches}
            if "approach3" in row:
                try:
                    row["approach3"] = laws.approach3(N, D, L, k=law.k).a
                except (laws.FitError, ValueError, ArithmeticError):
                    pass
            if "approach2" in row:
                try:
                    row["approach2"] = approach2.fit_isoflops(N, D, C, L, labels=labels, loss_sd=sd,
                                                              var_draws=A2_VAR_DRAWS, seed=a2_seed).a
                except (laws.FitError, ValueError, ArithmeticError, np.linalg.LinAlgError):
                    pass
            out.append(row)
    return out


def design_spread(N: Sequence[float], D: Sequence[float], C: Sequence[float], labels: Sequence[int],
                  law: laws.ChinchillaFit, noise: float, draws: int = 100, seed: int = 0,
                  approaches: Sequence[str] = APPROACHES, workers: int = 1) -> dict[str, Spread]:
    """Fit each approach on ``draws`` simulated re-runs of the design (N, D, C, budget label per run; seeds are
    runs with the same N and label). Approach 3: ``laws.approach3`` from Hoffmann's grid, as the analysis' point
    fit. Approach 2: ``approach2.fit_isoflops`` with every run's loss sd = ``noise``. Seeded: the same arguments
    give the same spreads, for any ``workers`` (spawned processes, each fitting a chunk of the draws)."""
    N, D, C = (np.asarray(v, dtype=float) for v in (N, D, C))
    labels = np.asarray(labels)
    if not (len(N) == len(D) == len(C) == len(labels)):
        raise laws.FitError("runs", len(N), "N, D, C and labels of the same length")
    if not (np.isfinite(noise) and noise >= 0):
        raise laws.FitError("noise", noise, "a finite standard deviation >= 0 (nats)")
    if not (isinstance(draws, int) and draws >= 1):
        raise laws.FitError("draws", draws, "a whole number of simulated re-runs, at least 1")
    if not (isinstance(seed, int) and seed >= 0):
        raise laws.FitError("seed", seed, "a whole number >= 0")
    unknown = sorted(set(approaches) - set(APPROACHES))
    if unknown or not approaches:
        raise laws.FitError("approaches", list(approaches), " and/or ".join(APPROACHES))
    chunk = max(1, -(-draws // max(1, workers * 4)))
    jobs = [(N, D, C, labels, law, float(noise), seed, tuple(approaches), i, min(chunk, draws - i))
            for i in range(0, draws, chunk)]
    if workers <= 1 or len(jobs) < 2:
        rows = [r for job in jobs for r in _fit_draws(job)]
    else:
        ctx = multiprocessing.get_context("spawn")  # as resampling.approach3_refits
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            rows = [r for part in pool.map(_fit_draws, jobs) for r in part]
    return {name: Spread(name, law.a, float(noise), np.array([r[name] for r in rows])) for name in approaches}


# --------------------------------------------------------------------------- the script's inputs

LAW_NAMES = ("E", "A", "B", "alpha", "beta")


def parse_law(text: str, k: float) -> laws.ChinchillaFit | None:
    """'E,A,B,alpha,beta' (L = E + A/N^alpha + B/D^beta in the N of the convention analysed) or '' (None: fit the
    runs). ``k`` is the runs' C/(N·D)."""
    if not text:
        return None
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 5 or not all(math.isfinite(v) and v >= 0 for v in vals) or vals[3] + vals[4] <= 0:
        raise ConfigError("law", text, "five numbers E,A,B,alpha,beta (>= 0, alpha + beta > 0), e.g. "
                          "1.69,406.4,410.7,0.34,0.28, or '' for Approach 3 fitted on the runs")
    return laws.ChinchillaFit(**dict(zip(LAW_NAMES, vals)), k=k)


def parse_noise(text: str, seed_sd: float, resid_sd: float) -> list[tuple[str, float]]:
    """Comma-separated noise levels: 'seed' (the runs' seed-to-seed sd), 'residual' (the law's RMS residual on
    the runs) or a number of nats."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "seed":
            if not math.isfinite(seed_sd):
                raise ConfigError("noise", part, "'residual' or a number of nats (no size here has 2+ seeds)")
            out.append((f"seed sd {seed_sd:.4f}", seed_sd))
        elif part == "residual":
            out.append((f"law residual {resid_sd:.4f}", resid_sd))
        else:
            try:
                v = float(part)
            except ValueError:
                v = -1.0
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError("noise", part, "seed, residual or a number of nats >= 0, comma-separated")
            out.append((f"{v:.4f} nats", v))
    if not out:
        raise ConfigError("noise", text, "seed, residual or a number of nats >= 0, comma-separated")
    return out
