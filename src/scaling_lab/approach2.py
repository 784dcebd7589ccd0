"""Hoffmann et al. 2022 Approach 2 as careful reproductions do it: a parabola per budget through the sizes NEAR
that budget's minimum only, budgets whose minimum is not bracketed dropped (and listed), N_opt(C) by weighted least
squares, and a parametric bootstrap over the measured seed noise. Pure numpy (plus laws.py's helpers).

Why not ``laws.approach2`` (kept there as "the old all-sizes parabola"): an isoFLOP curve is not symmetric in
log N (it climbs faster on the large-model, few-token side), so one parabola through every size of a budget puts
its vertex where the far side pulls it, and by more the wider and more lopsided the sizes trained are around the
minimum. On a fixed ladder of sizes that lopsidedness changes steadily with the budget, so the bias changes with C
and tilts the fitted exponent. Resampling the few sizes of each budget then measures the scatter of that biased
vertex, not the seed noise. (On tests/test_approach2.py's ladder, noise-free: the old fit gives a = 0.402 for
Hoffmann's 0.452, and 0.534 for true minima at 0.454 when very-few-token runs are much worse; this one 0.452, 0.456.)

The window rule (``half_window``, default 2): the size with the lowest mean loss and its ``half_window`` nearest
neighbours on each side in log N (the ladder order), i.e. a 5-point window. Why a count of neighbours rather than
a width in log N or a distance weighting: studies train a fixed, roughly geometric ladder of sizes, so a count is
a fixed width on that ladder (about a factor 4 in N for sizes sqrt(2) apart) with no bandwidth in log N to choose
per study; every window has the same 3 parameters on 5 points (2 degrees of freedom for the pooled noise); and a
cubic (asymmetric) term of the curve biases the vertex by roughly (window width)^2, so keeping the window small
keeps that bias small, while 5 points rather than 3 still average the noise and leave a residual to check.
The window is chosen afresh in every bootstrap draw, as it would be on a new set of seeds.

A minimum is bracketed when at least ``min_side`` (default 2) completed sizes lie on EACH side of the lowest-loss
size. A budget is dropped from the N_opt(C) fit, with a reason, when it has under 3 sizes, its minimum is not
bracketed, its window parabola opens downwards, or the vertex falls outside the window's range of N.

Noise: ``loss_sd`` is the standard error of each row's mean loss over seeds (the seed-to-seed standard deviation
divided by sqrt(n_seeds)), in nats. It weights each window's parabola (1/sd^2); each vertex's variance is taken
over parametric draws (fit_isoflops' docstring says why not the delta method); the N_opt(C) line weights each
budget by 1/var(ln N_opt). Without ``loss_sd`` a pooled estimate is used instead: the RMS residual of the
bracketed window parabolas (sum of squared residuals over their degrees of freedom), reported as
``noise_source='pooled residual'``. That pooled value also contains any misfit of the parabola to the curve, so it
is an upper estimate of the seed noise.

Known limit: a budget whose true minimum sits 1 size from the ladder's edge is dropped on clean data but gets in
when noise makes it look bracketed, and its vertex is then pulled inwards. With 1% noise on the tests' ladder that
biases a by about -0.03 (0.426 for 0.452, 100 seeds), -0.005 at 0.3% noise; the bootstrap's 95% interval still
covered the truth in 95-97 of 100 seeds at 0.1-1% noise.

Units: N parameters, D tokens, C FLOPs, loss in nats/token; "log" is the natural log unless named log10.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scaling_lab import laws
from scaling_lab.laws import FitError

# per-budget outcome codes of the window fit (index into REASONS)
OK, FEW, UNBRACKETED, DOWNWARD, OUTSIDE = range(5)
REASONS = ("fitted", "fewer than 3 model sizes", "minimum not bracketed", "window parabola opens downwards",
           "vertex outside the window's range of N")
CHUNK = 2000  # bootstrap draws per vectorised block (memory ~ CHUNK x budgets x sizes x 8 bytes per array)


@dataclass
class IsoFlopMinima(laws.IsoFlopFit):
    """Approach 2 from windows around each budget's minimum. The fields of ``laws.IsoFlopFit`` keep their meaning
    (a, k_n: N_opt = k_n·C^a; b, k_d: D_opt = k_d·C^b; per FITTED budget: budgets [FLOPs], n_opt, d_opt, inside
    (always True here: a vertex outside its window is dropped), parabolas (np.polyfit coefficients of loss in
    ln N, highest power first, fitted on the window only) and groups (budget label)). Added:"""

    windows: list[tuple[float, float]] = field(default_factory=list)
    """(N_min, N_max) of the sizes in each fitted budget's window [parameters]."""
    n_opt_se_log: list[float] = field(default_factory=list)
    """Standard error of ln N_opt per fitted budget, over the parametric draws (delta method on the window parabola
    for a budget fitted in under MIN_FITS draws) [ln N units]."""
    weights: list[float] = field(default_factory=list)
    """Weight of each fitted budget in the N_opt(C) line: 1/var(ln N_opt) [1/(ln N)^2]."""
    loss_opt: list[float] = field(default_factory=list)
    """Window parabola's loss at its vertex per fitted budget [nats/token]."""
    dropped: list[dict[str, Any]] = field(default_factory=list)
    """Budgets left out of the line: {budget [FLOPs], group, reason, n_sizes}."""
    noise_source: str = "seeds"
    """'seeds' (loss_sd given) or 'pooled residual' (RMS residual of the window parabolas)."""
    sigma: float | None = None
    """The pooled loss noise [nats/token] when noise_source is 'pooled residual', else None."""
    a_se: float = float("nan")
    """Standard error of a from the weighted line with those variances taken as known (the bootstrap's
    interval is the one to quote)."""
    k: float = 6.0
    """C / (N·D) of the data (laws.flops_factor); D_opt = C / (k·N_opt)."""


@dataclass
class _Table:
    """The data as budgets x sizes: sizes sorted by N within a budget, padded to the widest budget."""

    centers: np.ndarray  # (G,) budget FLOPs, geometric mean of its rows
    x: np.ndarray  # (G, S) ln N, NaN padding
    L: np.ndarray  # (G, S) mean loss [nats/token], +inf padding
    sd: np.ndarray | None  # (G, S) standard error of the mean loss, 1 padding; None when not given
    n: np.ndarray  # (G,) distinct sizes per budget
    k: float  # C/(N·D)


def _table(N: Any, D: Any, C: Any, loss: Any, labels: Any, loss_sd: Any, rtol: float) -> _Table:
    cols = {"N": N, "D": D, "flops": C, "loss": loss}
    if loss_sd is not None:
        cols["loss_sd"] = loss_sd
    a = laws._arrays(**cols)
    N, D, C, L = a["N"], a["D"], a["flops"], a["loss"]
    lab = laws.group_budgets(C, rtol) if labels is None else laws.order_labels(laws._relabel(labels), C)
    centers = laws.budget_centers(C, lab)
    per = []
    for g in range(len(centers)):
        m = lab == g
        sizes, inv = np.unique(N[m], return_inverse=True)
        cnt = np.bincount(inv)
        # rows repeating a (budget, size) are averaged: mean loss, and the standard error of that mean
        mean = np.bincount(inv, weights=L[m]) / cnt
        se = np.sqrt(np.bincount(inv, weights=a["loss_sd"][m] ** 2)) / cnt if loss_sd is not None else None
        per.append((np.log(sizes), mean, se))
    S = max(len(p[0]) for p in per)
    G = len(per)
    x, Lt = np.full((G, S), np.nan), np.full((G, S), np.inf)
    sd = np.ones((G, S)) if loss_sd is not None else None
    for g, (xs, ls, ss) in enumerate(per):
        x[g, :len(xs)], Lt[g, :len(xs)] = xs, ls
        if sd is not None:
            sd[g, :len(xs)] = ss
    return _Table(centers, x, Lt, sd, np.array([len(p[0]) for p in per]), laws.flops_factor(N, D, C))


def _windows(t: _Table, L: np.ndarray, sd: np.ndarray | float, half_window: int,
             min_side: int) -> dict[str, np.ndarray]:
    """Window parabolas for R draws at once. ``L`` (R, G, S) losses; ``sd`` (G, S) or a scalar.
    Returns arrays (R, G): code (OK or why not), xv (ln N at the vertex), var (of xv), lv (loss at vertex),
    lo/hi (ln N range of the window), rss/dof (weighted residual sum of squares, degrees of freedom), and
    p (R, G, 3): polyfit coefficients in ln N, highest power first."""
    R, G, S = L.shape
    o = np.arange(-half_window, half_window + 1)  # window offsets on the ladder
    j = np.argmin(L, axis=2)  # (R, G) lowest-loss size (padding is +inf)
    n = t.n[None, :]
    code = np.full((R, G), OK)
    code[j < min_side] = UNBRACKETED
    code[(n - 1 - j) < min_side] = UNBRACKETED
    code[np.broadcast_to(n < 3, (R, G))] = FEW
    idx = j[..., None] + o  # (R, G, W)
    valid = (idx >= 0) & (idx < n[..., None])
    idx = np.clip(idx, 0, S - 1)
    x0 = np.take_along_axis(np.broadcast_to(t.x, (R, G, S)), j[..., None], 2)  # centre: the best size's ln N
    xw = np.take_along_axis(np.broadcast_to(t.x, (R, G, S)), idx, 2)
    u = np.where(valid, xw - x0, 0.0)  # ln N about the centre: keeps the 3x3 systems well conditioned
    y = np.where(valid, np.take_along_axis(L, idx, 2), 0.0)
    if np.ndim(sd) == 0:
        w = valid / float(sd) ** 2
    else:
        w = valid / np.take_along_axis(np.broadcast_to(sd, (R, G, S)), idx, 2) ** 2
    Sk = np.stack([np.sum(w * u**p, axis=2) for p in range(5)], axis=-1)  # (R, G, 5) moments
    T = np.stack([np.sum(w * u**p * y, axis=2) for p in range(3)], axis=-1)  # (R, G, 3)
    M = np.stack([Sk[..., i:i + 3] for i in range(3)], axis=-2)  # (R, G, 3, 3) normal equations
    bad = code != OK
    M[bad] = np.eye(3)
    T[bad] = 0.0
    cov = np.linalg.inv(M)  # parameter covariance when w = 1/sd^2 with the right sd
    c = np.einsum("rgij,rgj->rgi", cov, T)  # (c0, c1, c2) of loss = c0 + c1·u + c2·u^2
    c0, c1, c2 = c[..., 0], c[..., 1], c[..., 2]
    code[(code == OK) & ~(c2 > 0)] = DOWNWARD
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = -c1 / (2 * c2)
        g1, g2 = -1 / (2 * c2), c1 / (2 * c2**2)  # d uv / d(c1, c2)
        var = g1**2 * cov[..., 1, 1] + 2 * g1 * g2 * cov[..., 1, 2] + g2**2 * cov[..., 2, 2]
        lv = c0 - c1**2 / (4 * c2)
    ulo = np.min(np.where(valid, u, np.inf), axis=2)
    uhi = np.max(np.where(valid, u, -np.inf), axis=2)
    code[(code == OK) & ~((uv >= ulo) & (uv <= uhi))] = OUTSIDE
    r = y - (c0[..., None] + c1[..., None] * u + c2[..., None] * u**2)
    x0 = x0[..., 0]
    p = np.stack([c2, c1 - 2 * c2 * x0, c2 * x0**2 - c1 * x0 + c0], axis=-1)  # in ln N, highest power first
    return {"code": code, "xv": x0 + uv, "var": var, "lv": lv, "lo": x0 + ulo, "hi": x0 + uhi,
            "rss": np.sum(w * r**2, axis=2), "dof": valid.sum(axis=2) - 3, "p": p}


def _line(lc: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least squares y = icpt + slope·lc per row of (R, G) arrays; w = 0 leaves a budget out.
    Returns (slope, icpt, se of slope with 1/w as known variances); NaN where under 2 budgets remain."""
    y = np.where(w > 0, y, 0.0)
    sw = w.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        xm = (w * lc).sum(axis=1) / sw
        ym = (w * y).sum(axis=1) / sw
        dx = lc - xm[:, None]
        sxx = (w * dx**2).sum(axis=1)
        slope = (w * dx * (y - ym[:, None])).sum(axis=1) / sxx
        se = 1 / np.sqrt(sxx)
    enough = ((w > 0).sum(axis=1) >= 2) & (sxx > 1e-12 * np.maximum(sw, 1e-300))
    nan = np.full_like(slope, np.nan)
    return np.where(enough, slope, nan), np.where(enough, ym - slope * xm, nan), np.where(enough, se, nan)


def _check(half_window: int, min_side: int) -> None:
    if not (isinstance(half_window, (int, np.integer)) and half_window >= 1):
        raise FitError("half_window", half_window, "an integer >= 1 (sizes each side of the best one)")
    if not (isinstance(min_side, (int, np.integer)) and min_side >= 1):
        raise FitError("min_side", min_side, "an integer >= 1 (sizes needed each side of the best one)")


def _noise(t: _Table, half_window: int, min_side: int) -> tuple[np.ndarray | float, str, float | None]:
    """The loss noise to weight with: the given standard errors, else the pooled window residual."""
    if t.sd is not None:
        return t.sd, "seeds", None
    r = _windows(t, t.L[None], 1.0, half_window, min_side)
    use = np.isin(r["code"], (OK, DOWNWARD, OUTSIDE))  # every bracketed window has a residual
    dof = int(r["dof"][use].sum())
    if dof < 1:
        raise FitError("loss_sd", None, "per-size loss_sd (standard error over seeds), or bracketed windows of "
                       "4 or more sizes to pool a residual noise estimate from")
    sigma = math.sqrt(float(r["rss"][use].sum()) / dof)
    sigma = max(sigma, 1e-9 * float(np.min(t.L)))  # noise-free data: a floor instead of infinite weights
    return sigma, "pooled residual", sigma


def _simulate(t: _Table, sd: np.ndarray | float, draws: int, rng: np.random.Generator, half_window: int,
              min_side: int) -> dict[str, np.ndarray]:
    """Window fits of ``draws`` parametric draws: each (budget, size) mean loss from Normal(mean, sd).
    Returns code and xv as (draws, G) arrays."""
    parts: dict[str, list[np.ndarray]] = {"code": [], "xv": []}
    done = 0
    while done < draws:
        R = min(CHUNK, draws - done)
        Ls = t.L + np.asarray(sd) * rng.standard_normal((R, *t.L.shape))  # +inf padding stays +inf
        r = _windows(t, Ls, sd, half_window, min_side)
        for k_ in parts:
            parts[k_].append(r[k_])
        done += R
    return {k_: np.concatenate(v) for k_, v in parts.items()}


MIN_FITS = 20  # draws a budget must be fitted in for its vertex variance to come from the draws


def _draw_var(sim: dict[str, np.ndarray]) -> np.ndarray:
    """Variance of ln N_opt per budget over the draws that fitted it [(ln N)^2]; NaN under MIN_FITS draws."""
    ok = sim["code"] == OK
    x = np.where(ok, sim["xv"], 0.0)
    cnt = ok.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = x.sum(axis=0) / cnt
        var = (ok * (x - mean) ** 2).sum(axis=0) / (cnt - 1)
    return np.where(cnt >= MIN_FITS, np.maximum(var, 1e-30), np.nan)


def fit_isoflops(N: Sequence[float], D: Sequence[float], C: Sequence[float], loss: Sequence[float],
                 labels: Sequence[Any] | None = None, loss_sd: Sequence[float] | None = None,
                 half_window: int = 2, min_side: int = 2, rtol: float = 0.05, var_draws: int = 1000,
                 seed: int = 0) -> IsoFlopMinima:
    """Approach 2 from windows around each budget's minimum (module docstring: the rule and why).

    Rows are one per (budget, size) with ``loss`` the mean over seeds [nats/token] (repeated rows are averaged);
    ``loss_sd`` is the standard error of that mean [nats/token] (else the pooled window residual is used).
    ``labels`` groups rows into budgets (else grouped from C within ``rtol``). A budget is fitted from its
    lowest-loss size and ``half_window`` sizes each side and needs ``min_side`` sizes each side of the lowest one.

    Each budget's weight in the N_opt(C) line is 1/var(ln N_opt), the variance taken over ``var_draws`` parametric
    draws (seeded by ``seed``) that redraw the losses from their noise and rerun the window choice and fit. The
    delta-method variance of the vertex (used only for a budget fitted in under MIN_FITS of the draws) depends on
    the estimated curvature and offset of that same vertex: with 1% noise on a 5-point window that made the weights
    erratic (RMS error of a 0.096 against 0.070 with the draws' variance, 200 seeds of the tests' design).
    Raises FitError when under 2 budgets survive."""
    t = _table(N, D, C, loss, labels, loss_sd, rtol)
    return _fit_table(t, half_window, min_side, var_draws, seed)[0]


def _fit_table(t: _Table, half_window: int, min_side: int, var_draws: int,
               seed: int) -> tuple[IsoFlopMinima, np.ndarray, np.ndarray | float]:
    """fit_isoflops on a table; also returns the draws' var(ln N_opt) of every budget label and the loss noise."""
    _check(half_window, min_side)
    if not (isinstance(var_draws, int) and var_draws >= MIN_FITS):
        raise FitError("var_draws", var_draws, f"an integer >= {MIN_FITS}")
    sd, source, sigma = _noise(t, half_window, min_side)
    r = {k: v[0] for k, v in _windows(t, t.L[None], sd, half_window, min_side).items()}
    ok = r["code"] == OK
    dropped = []
    for g in np.flatnonzero(~ok):
        why = REASONS[r["code"][g]]
        if r["code"][g] == UNBRACKETED:
            j = int(np.argmin(t.L[g]))
            why += (f": lowest loss at N={math.exp(t.x[g, j]):.3g} with {j} size(s) below and "
                    f"{int(t.n[g]) - 1 - j} above (need {min_side} each side)")
        dropped.append({"budget": float(t.centers[g]), "group": int(g), "reason": why, "n_sizes": int(t.n[g])})
    if ok.sum() < 2:
        raise FitError("budgets", int(ok.sum()), f"at least 2 FLOP budgets with a bracketed minimum ({min_side} sizes "
                       f"each side of the lowest loss) and an upward window parabola; dropped: "
                       + "; ".join(f"{d['budget']:.3g} FLOPs: {d['reason']}" for d in dropped))
    var_all = _draw_var(_simulate(t, sd, var_draws, np.random.default_rng(seed), half_window, min_side))
    var = np.where(np.isfinite(var_all), var_all, r["var"])  # delta method where the draws rarely fit it
    lc = np.log(t.centers)
    w = np.where(ok, 1 / np.where(ok, var, 1.0), 0.0)
    a, icpt, a_se = (v[0] for v in _line(lc[None], r["xv"][None], w[None]))
    ld = lc - math.log(t.k) - r["xv"]  # ln D_opt = ln(C / (k·N_opt)): same variance as ln N_opt
    b, icpt_d, _ = (v[0] for v in _line(lc[None], ld[None], w[None]))
    g_ok = np.flatnonzero(ok)
    n_opt = np.exp(r["xv"][g_ok])
    fit = IsoFlopMinima(
        a=float(a), k_n=float(math.exp(icpt)), b=float(b), k_d=float(math.exp(icpt_d)),
        budgets=t.centers[g_ok].tolist(), n_opt=n_opt.tolist(), d_opt=(t.centers[g_ok] / (t.k * n_opt)).tolist(),
        inside=[True] * len(g_ok), parabolas=r["p"][g_ok].tolist(), groups=[int(g) for g in g_ok],
        windows=[(math.exp(r["lo"][g]), math.exp(r["hi"][g])) for g in g_ok],
        n_opt_se_log=np.sqrt(var[g_ok]).tolist(), weights=w[g_ok].tolist(), loss_opt=r["lv"][g_ok].tolist(),
        dropped=dropped, noise_source=source, sigma=sigma, a_se=float(a_se), k=t.k)
    return fit, np.where(ok, var, var_all), sd


def bootstrap_isoflops(N: Sequence[float], D: Sequence[float], C: Sequence[float], loss: Sequence[float],
                       labels: Sequence[Any] | None = None, loss_sd: Sequence[float] | None = None,
                       draws: int = 1000, seed: int = 0, at: Mapping[str, float] | None = None,
                       **fit_kwargs: Any) -> dict[str, np.ndarray]:
    """Parametric bootstrap of ``fit_isoflops``: every draw redraws each (budget, size) mean loss from
    Normal(mean, sd) (sd = ``loss_sd``, else the pooled residual of the full fit) and reruns the procedure: window
    choice, bracketing and guards (so a budget can drop out of, or join, a draw), vertices, weighted line. The
    line's weights stay at the full fit's 1/var(ln N_opt) per budget (re-estimating them in every draw would need
    draws within draws); a budget never fitted in MIN_FITS of the full fit's draws stays out. Seeded: numpy
    default_rng(seed) (``seed`` is also the full fit's seed). ``fit_kwargs`` go to fit_isoflops.

    Returns arrays of length ``draws`` (NaN where a draw left under 2 budgets): 'a', 'b'; per budget i fitted on the
    full data 'N@fitted{i}' / 'D@fitted{i}' (the line's N_opt, D_opt at that budget, as analyze reads them) and
    'N_opt@fitted{i}' (that draw's own vertex, NaN where the budget was dropped in the draw); 'N@{name}',
    'D@{name}' for each {name: C [FLOPs]} in ``at``; 'budgets_used' (budgets in that draw's line)."""
    if not (isinstance(draws, int) and draws >= 1):
        raise FitError("draws", draws, "a positive integer")
    half_window, min_side = fit_kwargs.pop("half_window", 2), fit_kwargs.pop("min_side", 2)
    rtol, var_draws = fit_kwargs.pop("rtol", 0.05), fit_kwargs.pop("var_draws", 1000)
    if fit_kwargs:
        raise FitError("fit_kwargs", sorted(fit_kwargs), "only half_window, min_side, rtol, var_draws")
    t = _table(N, D, C, loss, labels, loss_sd, rtol)
    fit, var, sd = _fit_table(t, half_window, min_side, var_draws, seed)  # var: the full fit's, per budget label
    sim = _simulate(t, sd, draws, np.random.default_rng(seed), half_window, min_side)
    ok = (sim["code"] == OK) & np.isfinite(var)
    w = np.where(ok, 1 / np.where(np.isfinite(var), var, 1.0), 0.0)
    lc, lk = np.log(t.centers), math.log(t.k)
    a, icpt, _ = _line(np.broadcast_to(lc, ok.shape), sim["xv"], w)
    out = {"a": a, "b": 1 - a, "budgets_used": ok.sum(axis=1).astype(float)}  # ln D_opt = ln C - ln k - ln N_opt
    named = {f"fitted{i}": c for i, c in enumerate(fit.budgets)} | dict(at or {})
    with np.errstate(over="ignore"):  # inf for a wild draw far from the fitted budgets, not a warning
        for name, c in named.items():
            ln_n = icpt + a * math.log(c)
            out[f"N@{name}"] = np.exp(ln_n)
            out[f"D@{name}"] = np.exp(math.log(c) - lk - ln_n)
        for i, g in enumerate(fit.groups):
            out[f"N_opt@fitted{i}"] = np.exp(np.where(sim["code"][:, g] == OK, sim["xv"][:, g], np.nan))
    return out
