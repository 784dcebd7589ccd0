"""Scaling-law fits as pure functions over numpy arrays (numpy and scipy only: no torch, no mlflow).

Sources of the forms and constants used here:
- Kaplan et al. 2020, "Scaling Laws for Neural Language Models", arXiv:2001.08361: power laws L(N), L(D),
  L(C) (Eqs. 1.1-1.3), L(N, D) (Eq. 1.5), compute-optimal N_opt ∝ C^0.73 (Sec. 6.1, Eq. 6.1 / Fig. 14).
- Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", arXiv:2203.15556: Approaches 1-3
  (Sec. 3), fitted L = E + A/N^α + B/D^β with E=1.69, A=406.4, B=410.7, α=0.34, β=0.28 (Eq. 10 / Sec. D.2),
  Huber δ=1e-3 on log loss, L-BFGS from a grid (App. D.2); N_opt ∝ C^0.50 (Table 2).
- Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt", arXiv:2404.10102: bootstrap intervals of
  the Approach 3 fit by resampling runs.

Conventions: x are 1-D float arrays of equal length; N parameters, D tokens, C FLOPs, L loss in nats/token.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize
from threadpoolctl import threadpool_limits

from scaling_lab.errors import ConfigError

KAPLAN_A = 0.73  # N_opt ∝ C^0.73 (Kaplan et al. 2020, Sec. 6.1)
CHINCHILLA_A = 0.50  # N_opt ∝ C^0.50 (Hoffmann et al. 2022, Table 2, Approaches 1-3: 0.50, 0.49, 0.46)
HOFFMANN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022, Eq. 10
# Kaplan et al. 2020: L(N) and L(D) fitted separately (Eqs. 1.1-1.2, Sec. 1.2): alpha_N 0.076, N_c 8.8e13, alpha_D
# 0.095, D_c 5.4e13; the joint L(N, D) of Eq. 1.5 is Table 2's fit: alpha_N 0.076, alpha_D 0.103, N_c 6.4e13, D_c 1.8e13.
KAPLAN_LN_LD = {"alpha_N": 0.076, "alpha_D": 0.095, "N_c": 8.8e13, "D_c": 5.4e13}
KAPLAN_ND = {"alpha_N": 0.076, "alpha_D": 0.103, "N_c": 6.4e13, "D_c": 1.8e13}
NAMED_BUDGETS = {"GPT-3": 3.14e23, "Chinchilla": 5.76e23}  # training FLOPs (Brown et al. 2020; Hoffmann et al. 2022)
HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, App. D.2


class FitError(ConfigError):
    """The data cannot support a fit: the message names what is missing."""


def _arrays(**named: Any) -> dict[str, np.ndarray]:
    """Float arrays of one length; a NaN/inf or non-positive value is an error naming the column."""
    out = {k: np.asarray(v, dtype=float).ravel() for k, v in named.items()}
    lengths = {len(v) for v in out.values()}
    if len(lengths) > 1:
        raise FitError("data", {k: len(v) for k, v in out.items()}, "columns of equal length")
    for k, v in out.items():
        bad = ~np.isfinite(v) | (v <= 0)
        if bad.any():
            raise FitError(k, v[bad][:3].tolist(), f"finite positive values ({int(bad.sum())} rows are not)")
    return out


def _need(n: int, minimum: int, what: str) -> None:
    if n < minimum:
        raise FitError("runs", n, f"at least {minimum} {what}")


# --------------------------------------------------------------------------- budgets


def group_budgets(flops: Sequence[float], rtol: float = 0.05) -> np.ndarray:
    """Label each value with a budget index: in sorted order, a value within ``rtol`` (relative) of the previous
    one joins its group. Published isoFLOP data digitized from figures is noisy, hence the tolerance."""
    c = np.asarray(flops, dtype=float)
    order = np.argsort(c)
    labels = np.empty(len(c), dtype=int)
    k, prev = -1, -math.inf
    for i in order:
        if c[i] > prev * (1 + rtol):
            k += 1
        prev = c[i]
        labels[i] = k
    return labels


def order_labels(labels: np.ndarray, flops: np.ndarray) -> np.ndarray:
    """Renumber budget labels 0..G-1 in ascending order of their geometric-mean FLOPs."""
    uniq = np.unique(labels)
    means = [np.mean(np.log(flops[labels == u])) for u in uniq]
    rank = {u: i for i, u in enumerate(uniq[np.argsort(means)])}
    return np.array([rank[v] for v in labels], dtype=int)


def budget_centers(flops: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Geometric mean of the FLOPs in each budget group (index = label)."""
    return np.array([math.exp(np.mean(np.log(flops[labels == g]))) for g in range(labels.max() + 1)])


# --------------------------------------------------------------------------- Kaplan et al. 2020


def power_law(x: np.ndarray, x_c: float, alpha: float, E: float = 0.0) -> np.ndarray:
    """L = (x_c / x)^alpha + E (Kaplan et al. 2020, Eqs. 1.1-1.3; E = 0 there, an irreducible term here)."""
    return (x_c / np.asarray(x, dtype=float)) ** alpha + E


def fit_power_law(x: Sequence[float], loss: Sequence[float], irreducible: bool = False,
                  init: dict[str, float] | None = None) -> dict[str, float]:
    """Fit L = (x_c/x)^alpha [+ E] by least squares on log L. Returns {x_c, alpha, E, rmse_log}."""
    a = _arrays(x=x, loss=loss)
    x, L = a["x"], a["loss"]
    _need(len(x), 3 if irreducible else 2, "points for a power law" + (" with an irreducible term" if irreducible
                                                                         else ""))
    if np.ptp(np.log(x)) == 0:
        raise FitError("x", float(x[0]), "at least two distinct values")
    slope, icpt = np.polyfit(np.log(x), np.log(L), 1)
    alpha0 = max(-slope, 1e-3)
    if not irreducible:
        x_c = math.exp(min(icpt / alpha0, 700)) if slope < 0 else float("nan")  # inf-safe for tiny alpha
        rmse = float(np.sqrt(np.mean((np.log(L) - (icpt + slope * np.log(x))) ** 2)))
        return {"x_c": x_c, "alpha": float(-slope), "E": 0.0, "rmse_log": rmse}
    lx, lL = np.log(x), np.log(L)

    def resid(q: np.ndarray) -> np.ndarray:  # q = (log x_c, log alpha, log E): unbounded, for Levenberg-Marquardt
        q = np.clip(q, -700, 700)
        return np.logaddexp(np.exp(min(q[1], 5.0)) * (q[0] - lx), q[2]) - lL

    starts = []
    if init:
        starts.append([math.log(min(max(init["x_c"], 1e-20), 1e80)), init["alpha"], math.log(max(init["E"], 1e-9))])
    else:
        for frac in (0.0, 0.5, 0.8, 0.95):
            e0 = math.log(max(L.min() * frac, 1e-6))
            for al in (alpha0, 0.1, 0.3, 1.0):
                resid_pl = np.log(np.maximum(L - math.exp(e0), 1e-9))
                starts.append([float(np.mean(resid_pl / al + lx)), al, e0])
    best = None
    for x0 in starts:
        q0 = [x0[0], math.log(max(x0[1], 1e-4)), x0[2]]
        r = optimize.least_squares(resid, q0, method="lm" if len(x) > 3 else "trf")
        if np.isfinite(r.cost) and (best is None or r.cost < best.cost):
            best = r
    p = best.x
    return {"x_c": math.exp(min(p[0], 700)), "alpha": math.exp(min(p[1], 5.0)), "E": math.exp(min(p[2], 700)),
            "rmse_log": float(np.sqrt(np.mean(best.fun**2)))}


def kaplan_nd(N: np.ndarray, D: np.ndarray, N_c: float, D_c: float, alpha_N: float, alpha_D: float) -> np.ndarray:
    """L(N, D) = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D (Kaplan et al. 2020, Eq. 1.5)."""
    return ((N_c / N) ** (alpha_N / alpha_D) + D_c / D) ** alpha_D


def fit_kaplan_nd(N: Sequence[float], D: Sequence[float], loss: Sequence[float],
                  init: dict[str, float] | None = None) -> dict[str, float]:
    """Fit Eq. 1.5 by least squares on log L from a small grid of starts. Also returns the compute-optimal
    exponent it implies under C ∝ N·D: minimizing over N gives N_opt ∝ C^(α_D/(α_N+α_D))."""
    a = _arrays(N=N, D=D, loss=loss)
    N, D, L = a["N"], a["D"], a["loss"]
    _need(len(N), 5, "runs for L(N, D) (4 parameters)")
    lN, lD, lL = np.log(N), np.log(D), np.log(L)

    def resid(q: np.ndarray) -> np.ndarray:  # q = (log N_c, log D_c, log alpha_N, log alpha_D): unbounded (LM)
        q = np.clip(q, -700, 700)
        a_n, a_d = np.exp(np.clip(q[2:], -12, 2))
        return a_d * np.logaddexp((a_n / a_d) * (q[0] - lN), q[1] - lD) - lL

    if init:  # one start (the bootstrap starts from the full-data fit)
        starts = [[math.log(init["N_c"]), math.log(init["D_c"]), init["alpha_N"], init["alpha_D"]]]
    else:
        starts = [[lnc, ldc, aN, aD] for aN in (0.05, 0.2, 0.6) for aD in (0.05, 0.2, 0.6)
                  for lnc in (lN.mean() + 5, lN.mean() + 20) for ldc in (lD.mean() + 5, lD.mean() + 20)]
    best = None
    for x0 in starts:
        r = optimize.least_squares(resid, [x0[0], x0[1], math.log(x0[2]), math.log(x0[3])], method="lm")
        if np.isfinite(r.cost) and (best is None or r.cost < best.cost):
            best = r
    p = best.x
    a_n, a_d = (math.exp(min(max(v, -12), 2)) for v in p[2:])
    return {"N_c": math.exp(min(p[0], 700)), "D_c": math.exp(min(p[1], 700)), "alpha_N": a_n, "alpha_D": a_d,
            "a": a_d / (a_n + a_d), "b": a_n / (a_n + a_d), "rmse_log": float(np.sqrt(np.mean(best.fun**2)))}


# --------------------------------------------------------------------------- Hoffmann et al. 2022


def chinchilla(N: np.ndarray, D: np.ndarray, E: float, A: float, B: float, alpha: float, beta: float) -> np.ndarray:
    """L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, Eq. 2)."""
    return E + A / np.asarray(N, dtype=float) ** alpha + B / np.asarray(D, dtype=float) ** beta


def fit_line_loglog(C: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares y = k·C^a in log space; returns (a, k)."""
    a, logk = np.polyfit(np.log(C), np.log(y), 1)
    with np.errstate(over="ignore"):
        return float(a), float(np.exp(logk))  # inf for a wild resample rather than an exception


def parabola_min(N: np.ndarray, L: np.ndarray) -> tuple[float, np.ndarray, bool]:
    """Fit L = p0·(log N)^2 + p1·log N + p2 (Hoffmann et al. 2022, Approach 2). Returns (N at the vertex, the
    coefficients, whether the vertex lies inside the sampled N range). A parabola open downwards has no minimum:
    N at the lowest observed loss is returned then, flagged as outside."""
    x = np.log(N)
    p = np.polyfit(x, L, 2)
    if p[0] <= 0:
        return float(N[np.argmin(L)]), p, False
    xv = -p[1] / (2 * p[0])
    return math.exp(xv), p, bool(x.min() <= xv <= x.max())


@dataclass
class IsoFlopFit:
    """Approach 2: per-budget parabolas, then N_opt ∝ C^a and D_opt ∝ C^b."""

    a: float
    k_n: float
    b: float
    k_d: float
    budgets: list[float] = field(default_factory=list)
    n_opt: list[float] = field(default_factory=list)
    d_opt: list[float] = field(default_factory=list)
    inside: list[bool] = field(default_factory=list)
    parabolas: list[list[float]] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    """Budget label of each fitted budget (budgets with fewer than 3 sizes are skipped)."""

    def n_at(self, C: np.ndarray | float) -> np.ndarray:
        return self.k_n * np.asarray(C, dtype=float) ** self.a

    def d_at(self, C: np.ndarray | float) -> np.ndarray:
        return self.k_d * np.asarray(C, dtype=float) ** self.b


def flops_factor(N: np.ndarray, D: np.ndarray, C: np.ndarray) -> float:
    """k in C = k·N·D for these data (6 under both 6N rules); median over runs."""
    return float(np.median(C / (N * D)))


def approach2(N: Sequence[float], D: Sequence[float], C: Sequence[float], loss: Sequence[float],
              labels: Sequence[int] | None = None, rtol: float = 0.05) -> IsoFlopFit:
    """Hoffmann et al. 2022 Approach 2. ``labels`` groups runs into budgets (else grouped from C by ``rtol``);
    each budget's C is the geometric mean of its runs' C. D_opt = C / (k·N_opt) with k = C/(N·D) of the data."""
    a = _arrays(N=N, D=D, flops=C, loss=loss)
    N, D, C, L = a["N"], a["D"], a["flops"], a["loss"]
    lab = group_budgets(C, rtol) if labels is None else order_labels(_relabel(labels), C)
    k = flops_factor(N, D, C)
    centers = budget_centers(C, lab)
    budgets, n_opt, inside, parab, groups = [], [], [], [], []
    for g, cg in enumerate(centers):
        m = lab == g
        if len(np.unique(N[m])) < 3:
            continue  # a parabola needs three model sizes
        n, p, ok = parabola_min(N[m], L[m])
        budgets.append(float(cg))
        n_opt.append(n)
        inside.append(ok)
        parab.append(p.tolist())
        groups.append(g)
    if len(budgets) < 2:
        n_b = int(lab.max() + 1)
        raise FitError("budgets", n_b, "at least 2 FLOP budgets with 3 or more model sizes each "
                       f"(found {len(budgets)} such budget{'s' if len(budgets) != 1 else ''} among {n_b})")
    Cb, Nb = np.array(budgets), np.array(n_opt)
    Db = Cb / (k * Nb)
    a_n, k_n = fit_line_loglog(Cb, Nb)
    b_d, k_d = fit_line_loglog(Cb, Db)
    return IsoFlopFit(a_n, k_n, b_d, k_d, budgets, Nb.tolist(), Db.tolist(), inside, parab, groups)


def _relabel(labels: Sequence[Any]) -> np.ndarray:
    """Arbitrary group keys -> 0..G-1 ordered by first appearance of the sorted keys."""
    keys = np.asarray(labels)
    uniq = sorted(set(keys.tolist()))
    index = {u: i for i, u in enumerate(uniq)}
    return np.array([index[v] for v in keys.tolist()], dtype=int)


@dataclass
class Curve:
    """One run's loss against compute: the points Approach 1 takes the lower envelope of."""

    run_id: str
    N: float
    tokens: np.ndarray
    flops: np.ndarray
    loss: np.ndarray


@dataclass
class EnvelopeFit:
    """Approach 1: lowest loss reached at each FLOP count across runs; N_opt ∝ C^a, D_opt ∝ C^b."""

    a: float
    k_n: float
    b: float
    k_d: float
    flops: list[float] = field(default_factory=list)
    n_opt: list[float] = field(default_factory=list)
    d_opt: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)

    def n_at(self, C: np.ndarray | float) -> np.ndarray:
        return self.k_n * np.asarray(C, dtype=float) ** self.a

    def d_at(self, C: np.ndarray | float) -> np.ndarray:
        return self.k_d * np.asarray(C, dtype=float) ** self.b


def envelope_grid(curves: Sequence[Curve], n_grid: int = 24) -> np.ndarray:
    """A log-spaced grid of FLOP counts over the span of the curves (or the distinct final FLOPs when every run
    is one point)."""
    _need(len(curves), 3, "runs for Approach 1")
    if all(len(c.flops) == 1 for c in curves):
        f = np.array([c.flops[0] for c in curves])
        lab = group_budgets(f)
        return budget_centers(f, lab)
    lo = min(float(c.flops.min()) for c in curves)
    hi = max(float(c.flops.max()) for c in curves)
    if hi <= lo * 1.01:
        raise FitError("flops", lo, "runs spanning more than one FLOP count")
    return np.exp(np.linspace(math.log(lo), math.log(hi), n_grid))


def envelope_matrix(curves: Sequence[Curve], grid: np.ndarray, rtol: float = 0.05) -> tuple[np.ndarray, ...]:
    """Loss and tokens of every run at every grid FLOP count (NaN where the run's curve does not reach it),
    interpolated in log FLOPs. A one-point run counts at grid values within ``rtol`` of its FLOPs.
    Returns (N per run, loss matrix runs x grid, tokens matrix)."""
    Lm = np.full((len(curves), len(grid)), np.nan)
    Dm = np.full_like(Lm, np.nan)
    lg = np.log(grid)
    for i, c in enumerate(curves):
        if not np.all(np.isfinite(c.loss)):
            raise FitError("loss", c.run_id, "finite losses (this run has NaN/inf)")
        lf = np.log(c.flops)
        if len(lf) == 1:
            m = np.abs(lg - lf[0]) <= math.log1p(rtol)
            Lm[i, m], Dm[i, m] = c.loss[0], c.tokens[0]
            continue
        m = (lg >= lf.min() - 1e-9) & (lg <= lf.max() + 1e-9)
        Lm[i, m] = np.interp(lg[m], lf, c.loss)
        Dm[i, m] = np.interp(lg[m], lf, c.tokens)
    return np.array([c.N for c in curves], dtype=float), Lm, Dm


def approach1_matrix(grid: np.ndarray, N: np.ndarray, Lm: np.ndarray, Dm: np.ndarray) -> EnvelopeFit:
    """Approach 1 on a precomputed envelope matrix (rows may repeat: the bootstrap resamples rows)."""
    fin = np.isfinite(Lm)
    have = fin.sum(axis=0) >= min(3, len(N))  # a grid FLOP count reached by at least 3 runs
    if have.sum() < 2:
        raise FitError("flops", int(have.sum()), "at least 2 FLOP counts on the loss envelope")
    Lf = np.where(np.isfinite(Lm[:, have]), Lm[:, have], np.inf)
    best = np.argmin(Lf, axis=0)
    cols = np.flatnonzero(have)
    cs = grid[have]
    ns = N[best]
    ds = Dm[best, cols]
    # Where the smallest or largest model reaching that count wins, the optimum is not bracketed: drop those
    # points when at least 2 bracketed ones remain (with a coarse model ladder they flatten the slope).
    Ncov = np.where(fin[:, cols], N[:, None], np.nan)  # sizes that reach each kept grid count
    interior = (ns > np.nanmin(Ncov, axis=0)) & (ns < np.nanmax(Ncov, axis=0))
    if interior.sum() >= 2 and len(np.unique(ns[interior])) >= 2:
        cs, ns, ds, cols, best = cs[interior], ns[interior], ds[interior], cols[interior], best[interior]
    if len(cs) < 2:
        raise FitError("flops", len(cs), "at least 2 FLOP counts on the loss envelope")
    a, k_n = fit_line_loglog(cs, ns)
    b, k_d = fit_line_loglog(cs, ds)
    return EnvelopeFit(a, k_n, b, k_d, cs.tolist(), ns.tolist(), ds.tolist(), Lm[best, cols].tolist())


def approach1(curves: Sequence[Curve], n_grid: int = 24) -> EnvelopeFit:
    """Hoffmann et al. 2022 Approach 1: on a log grid of FLOP counts, find the run with the lowest loss at that
    count (loss interpolated in log FLOPs along each run's curve), then fit N_opt ∝ C^a and D_opt ∝ C^b.
    Runs without histories are single points; the envelope is then over final losses per budget."""
    grid = envelope_grid(curves, n_grid)
    N, Lm, Dm = envelope_matrix(curves, grid)
    return approach1_matrix(grid, N, Lm, Dm)


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """Huber loss: r²/2 inside ±δ, δ(|r| - δ/2) outside."""
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))


def _a3_objective(p: np.ndarray, lN: np.ndarray, lD: np.ndarray, lL: np.ndarray, delta: float):
    """Hoffmann's objective: Σ Huber_δ(LSE(a - α log N, b - β log D, e) - log L) and its gradient.
    p = (a, b, e, α, β) with A = e^a, B = e^b, E = e^e."""
    a, b, e, al, be = p
    t0, t1 = a - al * lN, b - be * lD  # log A/N^α, log B/D^β; log E is e
    m = np.maximum(np.maximum(t0, t1), e)
    x0, x1, x2 = np.exp(t0 - m), np.exp(t1 - m), np.exp(e - m)
    s = x0 + x1 + x2
    r = m + np.log(s) - lL  # log predicted - log observed
    g = np.clip(r, -delta, delta) / s  # Huber derivative times the softmax normalizer
    w0, w1 = g * x0, g * x1
    grad = np.array([w0.sum(), w1.sum(), (g * x2).sum(), -(w0 * lN).sum(), -(w1 * lD).sum()])
    return float(np.sum(huber(r, delta))), grad


# Hoffmann et al. 2022, App. D.2 initialise from a grid: α, β ∈ {0, 0.5, ..., 2}, e ∈ {-1, -0.5, ..., 1},
# a, b ∈ {0, 5, ..., 25}. Every grid point is scored; L-BFGS runs from the best ``starts`` of them.
GRID = {"a": np.arange(0, 26, 5.0), "b": np.arange(0, 26, 5.0), "e": np.arange(-1, 1.01, 0.5),
        "alpha": np.arange(0, 2.01, 0.5), "beta": np.arange(0, 2.01, 0.5)}


def _grid_points() -> np.ndarray:
    mesh = np.meshgrid(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"], indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)  # (4500, 5)


def _grid_scores(P: np.ndarray, lN: np.ndarray, lD: np.ndarray, lL: np.ndarray, delta: float) -> np.ndarray:
    t0 = P[:, [0]] - P[:, [3]] * lN  # (G, n)
    t1 = P[:, [1]] - P[:, [4]] * lD
    t2 = np.broadcast_to(P[:, [2]], t0.shape)
    r = np.logaddexp(np.logaddexp(t0, t1), t2) - lL
    return huber(r, delta).sum(axis=1)


@dataclass
class ChinchillaFit:
    """Approach 3: L = E + A/N^α + B/D^β, with the implied N_opt = G (C/k)^a, D_opt = G⁻¹ (C/k)^b."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    k: float = 6.0
    objective: float = 0.0
    at_bounds: tuple[str, ...] = ()
    """Parameters the optimizer left on a bound of its search box (the fit is then a limit, not a minimum)."""

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def n_at(self, C: np.ndarray | float) -> np.ndarray:
        """Compute-optimal N at C (Hoffmann et al. 2022, Eq. 4, with C = k·N·D)."""
        return self.G * (np.asarray(C, dtype=float) / self.k) ** self.a

    def d_at(self, C: np.ndarray | float) -> np.ndarray:
        return (np.asarray(C, dtype=float) / self.k) ** self.b / self.G

    def loss(self, N: np.ndarray, D: np.ndarray) -> np.ndarray:
        return chinchilla(N, D, self.E, self.A, self.B, self.alpha, self.beta)

    def isoflop_curvature(self, N: np.ndarray | float, C: np.ndarray | float) -> np.ndarray:
        """Half the second derivative of the isoFLOP curve L(N, C/(k·N)) in ln N at N [nats per (ln N)²]: the x²
        coefficient of the parabola in x = ln N that the law implies there, comparable with the leading coefficient
        of a window parabola fitted to measured losses (approach2). d²L/dx² = α²·A/N^α + β²·B/D^β."""
        N = np.asarray(N, dtype=float)
        D = np.asarray(C, dtype=float) / (self.k * N)
        return 0.5 * (self.alpha ** 2 * self.A * N ** -self.alpha + self.beta ** 2 * self.B * D ** -self.beta)

    def params(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta,
                "a": self.a, "b": self.b}


def _a3_points(N, D, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = _arrays(N=N, D=D, loss=loss)
    _need(len(a["N"]), 6, "runs for Approach 3 (5 parameters)")
    if len(np.unique(a["N"])) < 2 or len(np.unique(a["D"])) < 2:
        raise FitError("runs", len(a["N"]), "at least 2 distinct model sizes N and 2 distinct token counts D")
    return np.log(a["N"]), np.log(a["D"]), np.log(a["loss"])


_BLAS_LIMITED = threading.local()  # depth of nested one_blas_thread contexts in this thread


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """A context with OpenBLAS/MKL limited to one thread (threadpoolctl): these fits are tiny, and
    spreading each small product over busy cores made them 3-4x slower on a shared 2-core machine. Re-entrant:
    a nested context (one fit inside a bootstrap inside the analysis) costs nothing, where each threadpoolctl
    call rescans the loaded libraries (~5 ms, measured: 10 s of a 1,000-resample analysis)."""
    depth = getattr(_BLAS_LIMITED, "depth", 0)
    if depth:
        _BLAS_LIMITED.depth = depth + 1
        try:
            yield
        finally:
            _BLAS_LIMITED.depth = depth
        return
    with threadpool_limits(limits=1, user_api="blas"):
        _BLAS_LIMITED.depth = 1
        try:
            yield
        finally:
            _BLAS_LIMITED.depth = 0


def _lbfgs_best(x0s, lN, lD, lL, delta, bounds):
    best = None
    for x0 in x0s:
        r = optimize.minimize(_a3_objective, x0, args=(lN, lD, lL, delta), jac=True, method="L-BFGS-B",
                              bounds=bounds, options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-10})
        if best is None or r.fun < best.fun:
            best = r
    return best


def approach3(N: Sequence[float], D: Sequence[float], loss: Sequence[float], k: float = 6.0,
              delta: float = HUBER_DELTA, starts: int = 32, init: Sequence[np.ndarray] = ()) -> ChinchillaFit:
    """Hoffmann et al. 2022 Approach 3 (App. D.2): minimize the Huber (δ=1e-3) of log-loss residuals through the
    log-sum-exp form with L-BFGS, started from the ``starts`` best points of Hoffmann's grid (plus ``init``),
    keeping the best result. ``k`` is C/(N·D), used only for the implied N_opt(C)."""
    lN, lD, lL = _a3_points(N, D, loss)
    x0s = [np.asarray(x, dtype=float) for x in init]
    if starts > 0:
        P = _grid_points()
        scores = _grid_scores(P, lN, lD, lL, delta)
        x0s += [P[i] for i in np.argsort(scores)[:starts]]
    if not x0s:
        raise FitError("starts", starts, "a positive number of grid starts, or init points")
    bounds = [(-10, 60), (-10, 60), (-10, 10), (0, 5), (0, 5)]
    with one_blas_thread():
        best = _lbfgs_best(x0s, lN, lD, lL, delta, bounds)
    a, b, e, al, be = best.x
    names = ("A", "B", "E", "alpha", "beta")
    edge = tuple(n for n, v, (lo, hi) in zip(names, best.x, bounds) if min(v - lo, hi - v) < 1e-6)
    return ChinchillaFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(al), beta=float(be), k=k,
                         objective=float(best.fun), at_bounds=edge)


def a3_vector(fit: ChinchillaFit) -> np.ndarray:
    """The optimizer's coordinates of a fit (a start for the next fit, e.g. in the bootstrap)."""
    return np.array([math.log(fit.A), math.log(fit.B), math.log(fit.E), fit.alpha, fit.beta])


def a3_starts(N: Sequence[float], D: Sequence[float], loss: Sequence[float], fit: ChinchillaFit, n: int = 4,
              pool: int = 32, delta: float = HUBER_DELTA, tol: float = 1e-3) -> list[np.ndarray]:
    """Starts for multi-start bootstrap refits of Approach 3 (``approach3(..., starts=0, init=a3_starts(...))``):
    the full-data fit's vector first, then up to ``n - 1`` other local minima of the full-data objective, best
    first, reached by L-BFGS from the ``pool`` best points of Hoffmann's grid (computed once here, not per refit).
    A minimum counts as distinct when its predicted log loss differs from every start kept by more than ``tol``
    at some run (minima that differ only in a parameter the data cannot see, e.g. A on a plateau where the
    A/N^α term is negligible, are one start). Fewer than ``n`` come back when the data have fewer distinct
    minima. Starting each refit at minima rather than at raw grid points keeps it to a few short L-BFGS runs."""
    if n < 1 or pool < 0:
        raise FitError("n", n, "at least 1 start (and pool >= 0)")
    lN, lD, lL = _a3_points(N, D, loss)
    bounds = [(-10, 60), (-10, 60), (-10, 10), (0, 5), (0, 5)]
    P = _grid_points()
    cand = []
    with one_blas_thread():
        for i in np.argsort(_grid_scores(P, lN, lD, lL, delta), kind="stable")[:pool]:
            r = _lbfgs_best([P[i]], lN, lD, lL, delta, bounds)
            cand.append((float(r.fun), r.x))
    cand.sort(key=lambda c: c[0])

    def pred(x: np.ndarray) -> np.ndarray:  # predicted log loss at every run
        return np.logaddexp(np.logaddexp(x[0] - x[3] * lN, x[1] - x[4] * lD), x[2])

    out = [a3_vector(fit)]
    kept = [pred(out[0])]
    for _, x in cand:
        if len(out) >= n:
            break
        p = pred(x)
        if all(np.max(np.abs(p - q)) > tol for q in kept):
            out.append(np.asarray(x, dtype=float))
            kept.append(p)
    return out


# --------------------------------------------------------------------------- cross-validation


def leave_one_budget_out(N: np.ndarray, D: np.ndarray, C: np.ndarray, loss: np.ndarray, labels: np.ndarray,
                         k: float = 6.0, starts: int = 8) -> list[dict[str, float]]:
    """For each budget: fit Approaches 2 and 3 on the other budgets and predict the held-out one.
    Returns per budget: the held-out parabola's N_opt, Approach 2's prediction, their log10 ratio, and Approach 3's
    mean absolute relative loss error on the held-out runs."""
    N, D, C, L = (np.asarray(x, dtype=float) for x in (N, D, C, loss))
    lab = _relabel(labels)
    centers = budget_centers(C, lab)
    rows = []
    for g, cg in enumerate(centers):
        m = lab == g
        row: dict[str, float] = {"budget": float(cg), "runs": int(m.sum())}
        try:
            fit3 = approach3(N[~m], D[~m], L[~m], k=k, starts=starts)
            row["a3_loss_rel_err"] = float(np.mean(np.abs(fit3.loss(N[m], D[m]) / L[m] - 1)))
        except FitError:
            pass
        if len(np.unique(N[m])) >= 3:
            try:
                fit2 = approach2(N[~m], D[~m], C[~m], L[~m], labels=lab[~m])
                n_obs, _, _ = parabola_min(N[m], L[m])
                n_pred = float(fit2.n_at(cg))
                row.update(n_opt_observed=n_obs, n_opt_predicted=n_pred,
                           a2_log10_ratio=math.log10(n_pred / n_obs))
            except FitError:
                pass
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- verdict, extrapolation


def verdict(a: float, ci: dict[str, float]) -> dict[str, Any]:
    """Compare a fitted exponent a (N_opt ∝ C^a) and its bootstrap interval with Kaplan's 0.73 and Chinchilla's
    0.50: inside the 95% interval or not, and how many standard errors away."""
    lo, hi, se = (ci.get(k) for k in ("lo", "hi", "se"))
    # an interval needs 10+ fitted resamples that actually differ (identical resamples give SE ~ 0)
    have = (all(v is not None and math.isfinite(v) for v in (lo, hi, se)) and ci.get("n", 10) >= 10
            and se > 1e-9 * max(1.0, abs(a)))
    out: dict[str, Any] = {"a": a, "ci95": [lo, hi] if have else [None, None], "se": se if have else None}
    for name, ref in (("kaplan", KAPLAN_A), ("chinchilla", CHINCHILLA_A)):
        out[name] = {"reference": ref, "inside_ci95": bool(lo <= ref <= hi) if have else None,
                     "z": (a - ref) / se if have else None}
    zk, zc = out["kaplan"]["z"], out["chinchilla"]["z"]
    if zk is None or zc is None:
        out["closer_to"] = "kaplan" if abs(a - KAPLAN_A) < abs(a - CHINCHILLA_A) else "chinchilla"
    else:
        out["closer_to"] = "kaplan" if abs(zk) < abs(zc) else "chinchilla"
    return out


def verdict_sentence(label: str, v: dict[str, Any]) -> str:
    """One line a person reads: fitted a, interval, and where 0.73 and 0.50 fall."""
    lo, hi = v["ci95"]
    if lo is None:
        return (f"{label}: a = {v['a']:.3f} (no interval: bootstrap off, or under 10 fitted resamples that differ); Kaplan {KAPLAN_A:.2f}, Chinchilla "
                f"{CHINCHILLA_A:.2f}; closer to {v['closer_to'].capitalize()}")

    def part(name: str) -> str:
        r = v[name]
        where = "inside" if r["inside_ci95"] else "outside"
        z = f"{r['z']:+.1f} SE" if r["z"] is not None else "SE n/a"
        return f"{name.capitalize()} {r['reference']:.2f} {where} ({z})"

    return (f"{label}: a = {v['a']:.3f} [95% {lo:.3f}, {hi:.3f}]; {part('kaplan')}; {part('chinchilla')}; "
            f"closer to {v['closer_to'].capitalize()}")


def curve_fit_extrapolate(steps: Sequence[float], loss: Sequence[float], frac: float = 0.5,
                          target: float | None = None) -> dict[str, float]:
    """Fit L(step) = a·step^(-b) + c on the steps up to ``frac`` of the last step and predict the loss at
    ``target`` (default: the last step). Returns {a, b, c, predicted, actual (when known), rel_err}."""
    s = np.asarray(steps, dtype=float)
    y = np.asarray(loss, dtype=float)
    ok = np.isfinite(s) & np.isfinite(y) & (s > 0)
    s, y = s[ok], y[ok]
    if not 0 < frac <= 1:
        raise FitError("frac", frac, "a fraction in (0, 1]")
    target = float(s.max()) if target is None else float(target)
    m = s <= frac * s.max()
    _need(int(m.sum()), 4, "logged steps in the fitted part of the curve")
    xs, ys = s[m], y[m]

    def solve(b: float) -> tuple[float, float, float]:
        """For fixed b the model is linear in (a, c): least squares; returns (cost, a, c)."""
        X = np.stack([xs ** (-b), np.ones_like(xs)], axis=1)
        (a0, c0), *_ = np.linalg.lstsq(X, ys, rcond=None)
        if a0 <= 0 or c0 < 0:  # outside the model's range: refit with c = 0
            a0, c0 = float(np.sum(X[:, 0] * ys) / np.sum(X[:, 0] ** 2)), 0.0
        return float(np.sum((a0 * X[:, 0] + c0 - ys) ** 2)), float(a0), float(c0)

    grid = np.exp(np.linspace(math.log(0.01), math.log(4.0), 40))
    i = int(np.argmin(_grid_costs(xs, ys, grid)))
    lo, hi = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, len(grid) - 1)])
    r = optimize.minimize_scalar(lambda lb: solve(math.exp(lb))[0], bounds=(lo, hi), method="bounded",
                                 options={"xatol": 1e-4})
    b = math.exp(r.x)
    _, a_, c = solve(b)
    la = math.log(max(a_, 1e-300))
    pred = math.exp(la) * target ** (-b) + c
    out = {"a": math.exp(la), "b": float(b), "c": float(c), "predicted": float(pred), "target_step": target,
           "fit_steps": int(m.sum())}
    if target in set(s.tolist()):
        actual = float(y[s == target][-1])
        out.update(actual=actual, rel_err=(pred - actual) / actual)
    return out


def _grid_costs(xs: np.ndarray, ys: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``solve``'s cost at every b of ``grid`` at once: per b the least squares of y = a·x^(-b) + c in closed form,
    or the fit through the origin (c = 0) where that gives a <= 0 or c < 0."""
    X = xs[None, :] ** -grid[:, None]  # (G, n)
    xm, ym = X.mean(axis=1), ys.mean()
    a = ((X - xm[:, None]) * (ys - ym)).sum(axis=1) / np.maximum(((X - xm[:, None]) ** 2).sum(axis=1), 1e-300)
    c = ym - a * xm
    bad = (a <= 0) | (c < 0)
    a = np.where(bad, (X * ys).sum(axis=1) / (X ** 2).sum(axis=1), a)
    c = np.where(bad, 0.0, c)
    return ((a[:, None] * X + c[:, None] - ys) ** 2).sum(axis=1)


def extrapolation_factor(C: float, fitted_max: float) -> float:
    """How far beyond the largest fitted budget: C / max fitted C."""
    return C / fitted_max
