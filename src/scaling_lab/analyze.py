"""Fits of the scaling laws, per counting convention: point fits (Kaplan's laws, Chinchilla Approaches 1-3),
bootstrap intervals, assembly with leave-one-budget-out, verdict and extrapolation; and ``analyze_study``, which
runs them all over a run table (``sources``). The report is written by ``report``; only ``tracking`` touches
MLflow.

Pipeline: ``load`` (sources: MLflow, CSV or a simulation) -> ``analyze_study`` -> ``report.write_report``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scaling_lab import approach2, config, laws, report, resampling, residuals
from scaling_lab.errors import ConfigError
from scaling_lab.overlay import load_prediction, overlay_prediction
from scaling_lab.sources import CONVENTIONS, RunTable, load_csv, load_mlflow, parse_tags, simulate

SOURCES = ("mlflow", "csv", "simulate")
CONVENTION_CHOICES = ("all", "both", "kaplan", "total", "exact")  # both: an older name of all
A3_STARTS = 2  # Approach 3 bootstrap refits start from the full fit and another minimum (laws.a3_starts)
KAPLAN_RESAMPLES = 200  # Kaplan's laws are refitted on the first 200 resamples only (intervals, not the verdict)
A3_INTERVALS = ("pairs", "residual")
A2_MIN_DRAWS = 1000  # Approach 2's parametric bootstrap draws at least this many
GROUP_BY = ("", "protocol")  # group_by: one fit of all the runs, or one per ablation step (scaling_lab.grouped)
CURVATURE_BAND = (0.5, 2.0)  # measured / Approach 3's isoFLOP curvature within this: the law has the curves' shape
ILLUSTRATIVE_FACTOR = 100.0  # extrapolations further beyond the fitted compute get no interval (illustrative)


@dataclass
class AnalyzeConfig:
    """What to read, how to fit, where to write. Field names = MLproject parameters = CLI flags."""

    source: str = "mlflow"
    """mlflow (runs in the tracking store), csv (a table of results; the default when csv is given) or simulate
    (a known law plus noise)."""
    experiment: str = "scaling-lab"
    """MLflow experiment(s) to read runs from (comma-separated; '*' = every experiment); the first logs the run."""
    parent_run: str = ""
    """Keep only runs below this run id (a search or study parent), at any depth."""
    tags: str = ""
    """Tag filter 'k=v,k2=v2' (e.g. study=quick); runs are selected by tags, never by names."""
    filter_string: str = ""
    """Extra MLflow search filter, e.g. \"params.mode = 'quick'\"."""
    csv: str = ""
    """CSV file of results; given alone it selects source=csv."""
    columns: str = ""
    """CSV column map 'params=COL,tokens=COL,flops=COL,loss=COL[,budget=COL,run=COL]' (default: same names)."""
    out: str = ""
    """Report folder ('' = reports/analyze-<UTC time>)."""
    budgets: str = ""
    """Extra FLOP budgets to extrapolate to, comma-separated (GPT-3 3.14e23 and Chinchilla 5.76e23 always)."""
    convention: str = "all"
    """all (every convention the runs have), kaplan (non-embedding N, C = 6ND), total (all parameters,
    C = 6 N_total D) or exact (all parameters, C = the matmul FLOPs the model does, head and attention included)."""
    bootstrap: int = 1000
    """Bootstrap resamples of the runs for 95% intervals of Approaches 1 and 3 and Kaplan's laws (0 = none);
    Approach 2's parametric bootstrap draws max(this, 1000) times."""
    a3_interval: str = "pairs"
    """Approach 3's interval: pairs (runs resampled within each budget) or residual (the design kept, each run's log
    loss redrawn as the fit plus a resampled residual, residuals.py; the pairs interval is then reported beside)."""
    seed: int = 0
    """Seed of the bootstrap and of the simulation."""
    rtol: float = 0.05
    """Relative tolerance that merges FLOP values into one budget (when runs carry no budget tag)."""
    curve_frac: float = 0.5
    """Learning-curve extrapolation: fit L(step) = a·step^-b + c on this first fraction of each run."""
    noise: float = 0.01
    """source=simulate: relative (log-normal) noise on each simulated loss."""
    overlay: str = ""
    """"Quick vs real": draw a prediction over the measured runs: 'simulate' (the law source=simulate draws from)
    or an earlier analysis' fits.json (or its report folder), whose Approach 3 law is used; '' = none."""
    group_by: str = ""
    """'' (one fit of all the runs) or protocol: one fit per value of the runs' protocol tag (an ablation's steps,
    scaling_lab.ablation), side by side: a per step under each convention, the N_opt(C) figure of every step."""
    fit_workers: int = 0
    """Processes for the bootstrap's Approach 3 refits (0 = one per CPU core this process may use; 1 = none)."""
    log: bool = True
    """Log the analysis to an MLflow run tagged scaling_lab.kind=analyze."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError("source", self.source, "one of " + ", ".join(SOURCES))
        if self.convention not in CONVENTION_CHOICES:
            raise ConfigError("convention", self.convention, "one of " + ", ".join(CONVENTION_CHOICES))
        if self.source == "csv" and not self.csv:
            raise ConfigError("csv", self.csv, "a CSV file path when source=csv")
        if self.csv and self.source != "csv":  # csv= alone selects CSV input (parse_config)
            raise ConfigError("source", self.source, f"csv (or left unset) when csv={self.csv} is given")
        if self.a3_interval not in A3_INTERVALS:
            raise ConfigError("a3_interval", self.a3_interval, "one of " + ", ".join(A3_INTERVALS))
        if not (isinstance(self.bootstrap, int) and self.bootstrap >= 0 and self.bootstrap != 1):
            raise ConfigError("bootstrap", self.bootstrap, "0 (off) or an integer >= 2")
        if not 0 <= self.rtol < 1:
            raise ConfigError("rtol", self.rtol, "a number in [0, 1)")
        if not 0 < self.curve_frac < 1:
            raise ConfigError("curve_frac", self.curve_frac, "a number in (0, 1)")
        if not 0 <= self.noise < 1:
            raise ConfigError("noise", self.noise, "a number in [0, 1)")
        if not (isinstance(self.fit_workers, int) and self.fit_workers >= 0):
            raise ConfigError("fit_workers", self.fit_workers, "0 (one per CPU core) or a positive number of processes")
        parse_budgets(self.budgets)
        parse_tags(self.tags)
        if self.group_by not in GROUP_BY:
            raise ConfigError("group_by", self.group_by, "'' (none) or protocol")
        if self.group_by and self.overlay:
            raise ConfigError("overlay", self.overlay, "'' with group_by (an overlay draws over one fit)")
        if self.overlay:
            load_prediction(self.overlay)

    def cores(self) -> int:
        """Processes for the bootstrap refits: ``fit_workers``, or the CPU cores this process may run on."""
        if self.fit_workers:
            return self.fit_workers
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def field_names() -> list[str]:
    return [f.name for f in fields(AnalyzeConfig)]


def parse_budgets(spec: str) -> list[float]:
    try:
        vals = [float(x) for x in spec.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise ConfigError("budgets", spec, "comma-separated FLOP counts, e.g. 1e21,1e24") from None
    if any(not math.isfinite(v) or v <= 0 for v in vals):
        raise ConfigError("budgets", spec, "positive finite FLOP counts")
    return vals


def parse_config(raw: dict[str, Any]) -> AnalyzeConfig:
    """Strings (CLI / MLproject) -> a validated AnalyzeConfig (the one parser: '' leaves a field at its default).
    ``csv=PATH`` without an explicit source means source=csv."""
    given = config.parse_fields(raw, config.types_of(AnalyzeConfig))
    if given.get("csv") and "source" not in given:
        given["source"] = "csv"
    return AnalyzeConfig(**given)


def load(cfg: AnalyzeConfig) -> RunTable:
    """The run table ``cfg`` asks for."""
    if cfg.source == "csv":
        return load_csv(cfg.csv, cfg.columns, cfg.rtol)
    if cfg.source == "simulate":
        return simulate(cfg.seed, cfg.noise)
    return load_mlflow(cfg)


# --------------------------------------------------------------------------- fits


def _labels(runs: pd.DataFrame, C: np.ndarray, rtol: float) -> np.ndarray:
    """Budget labels: the runs' budget key (tag or CSV column) when every run has one, else FLOPs grouped
    within ``rtol``."""
    g = runs["group"] if "group" in runs.columns else pd.Series(np.nan, index=runs.index)
    if g.notna().all() and len(g):
        return laws.order_labels(laws._relabel(g.astype(str).tolist()), C)
    return laws.group_budgets(C, rtol)


def _curves_for(study: RunTable, conv: str) -> list[laws.Curve]:
    """Loss against tokens and FLOPs (C of this convention scaled along the run) for every run with a curve;
    runs without one are single final points."""
    ncol, ccol = CONVENTIONS[conv]
    out = []
    src = study.curve_runs if study.curve_runs is not None and len(study.curves) else None
    if src is not None and ncol in src.columns:
        for r in src.itertuples(index=False):
            cv = study.curves.get(r.run_id)
            rd = r._asdict()
            if cv is None or not math.isfinite(rd[ncol]) or not math.isfinite(rd[ccol]):
                continue
            per_token = rd[ccol] / rd["tokens"]
            out.append(laws.Curve(r.run_id, rd[ncol], cv["tokens"].to_numpy(), cv["tokens"].to_numpy() * per_token,
                                  cv["loss"].to_numpy()))
        if len(out) >= 3:
            return out
    runs = study.runs
    return [laws.Curve(r, n, np.array([d]), np.array([c]), np.array([lo]))
            for r, n, d, c, lo in zip(runs["run_id"], runs[ncol], runs["tokens"], runs[ccol], runs["loss"])]


def _ci(samples: dict[str, np.ndarray], key: str) -> dict[str, float]:
    return resampling.interval(samples[key]) if key in samples else {"lo": None, "hi": None, "se": None, "n": 0}


def _pair(ci: dict[str, float]) -> list[float | None]:
    return [ci.get("lo"), ci.get("hi")]


@dataclass
class ConventionData:
    """One convention's arrays: N, D, C, L per run (C = k·N·D), budget labels, named budgets, curves."""

    N: np.ndarray
    D: np.ndarray
    C: np.ndarray
    L: np.ndarray
    labels: np.ndarray
    """Budget index 0..G-1 of each run, ordered by C."""
    k: float
    """C/(N·D) of these data (6 under both 6N rules)."""
    budgets: dict[str, float]
    """Named budgets to extrapolate to (GPT-3, Chinchilla and the user's)."""
    curves: list[laws.Curve]
    cgrid: np.ndarray
    """FLOPs grid for the fitted lines' bands (figures)."""
    seed_std: float = float("nan")
    """Pooled seed-to-seed standard deviation of the final loss over sizes trained with 2+ seeds (nats)."""
    seed_sizes: int = 0
    """(budget, size) pairs trained with 2 or more seeds."""

    @property
    def n_budgets(self) -> int:
        return int(self.labels.max() + 1)


@dataclass
class PointFits:
    """The fits on all the data of one convention."""

    fit1: laws.EnvelopeFit
    fit2: approach2.IsoFlopMinima
    fit3: laws.ChinchillaFit
    kaplan: dict[str, Any]
    grid1: np.ndarray
    """Approach 1's FLOPs grid and its envelope matrices (n1, Lm, Dm), reused by the bootstrap."""
    n1: np.ndarray
    Lm: np.ndarray
    Dm: np.ndarray


def convention_data(study: RunTable, conv: str, cfg: AnalyzeConfig, extra_budgets: dict[str, float]) -> ConventionData:
    """The validated arrays of one convention; a ConfigError naming what is missing when they cannot be fitted."""
    ncol, ccol = CONVENTIONS[conv]
    runs = study.runs
    if ncol not in runs.columns or runs[ncol].isna().all():
        raise ConfigError("convention", conv, f"data with {ncol} (N under this convention)")
    N, D, C, L = (runs[c].to_numpy(dtype=float) for c in (ncol, "tokens", ccol, "loss"))
    if len(N) < 6:
        raise ConfigError("runs", len(N), "at least 6 finished runs with a final loss (Approach 3 has 5 "
                          "parameters)")
    if np.isnan(L).any():
        raise ConfigError("loss", "NaN", f"finite losses (NaN in runs {runs.loc[np.isnan(L), 'run_id'].tolist()[:5]})")
    labels = _labels(runs, C, cfg.rtol)
    if labels.max() + 1 < 2:
        raise ConfigError("budgets", 1, "runs at 2 or more FLOP budgets (all runs share one budget: no exponent "
                          "can be fitted)")
    c_lo, c_hi = float(C.min()), float(C.max())
    cgrid = np.exp(np.linspace(math.log(c_lo) - 0.3, math.log(c_hi) + 0.3, 100))
    seed_std, seed_sizes = seed_noise(labels, N, L)
    return ConventionData(N, D, C, L, labels, laws.flops_factor(N, D, C), {**laws.NAMED_BUDGETS, **extra_budgets},
                          _curves_for(study, conv), cgrid, seed_std, seed_sizes)


def _with_k(f: laws.ChinchillaFit, k: float) -> laws.ChinchillaFit:
    return laws.ChinchillaFit(E=f.E, A=f.A, B=f.B, alpha=f.alpha, beta=f.beta, k=k)


def seed_noise(labels: np.ndarray, N: np.ndarray, L: np.ndarray) -> tuple[float, int]:
    """The pooled seed-to-seed standard deviation of the final loss (nats) over the (budget, size) pairs trained
    with 2 or more seeds, and how many such pairs; (NaN, 0) without any."""
    seeds = pd.DataFrame({"g": labels, "n": N, "L": L}).groupby(["g", "n"])["L"]
    groups = [g.to_numpy() for _, g in seeds if len(g) > 1]
    dof = sum(len(g) - 1 for g in groups)
    std = float(np.sqrt(sum(((g - g.mean()) ** 2).sum() for g in groups) / dof)) if dof else float("nan")
    return std, len(groups)


def _loss_sd(d: ConventionData) -> np.ndarray | None:
    """Each run's seed noise (the pooled seed-to-seed sd) for Approach 2; None when no size has 2+ seeds
    (Approach 2 then pools its window residuals)."""
    return np.full(len(d.L), d.seed_std) if math.isfinite(d.seed_std) else None


def point_fits(d: ConventionData, rtol: float) -> PointFits:
    """Approaches 1-3 and Kaplan's laws on all the data."""
    fit2 = approach2.fit_isoflops(d.N, d.D, d.C, d.L, labels=d.labels, loss_sd=_loss_sd(d))
    fit3 = laws.approach3(d.N, d.D, d.L, k=d.k)
    grid1 = laws.envelope_grid(d.curves)
    n1, Lm, Dm = laws.envelope_matrix(d.curves, grid1, rtol)
    fit1 = laws.approach1_matrix(grid1, n1, Lm, Dm)
    return PointFits(fit1, fit2, fit3, kaplan_fits(d.N, d.D, d.L, fit1), grid1, n1, Lm, Dm)


def bootstrap_fits(d: ConventionData, p: PointFits, n_boot: int, seed: int,
                   a3_cache: dict[bytes, Any] | None = None, a3_interval: str = "pairs",
                   workers: int = 1) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Refit every approach on ``n_boot`` resamples of the runs within each budget. Returns (samples: {name:
    values} of exponents, parameters and N/D/L at the fitted and named budgets; bands: lines and grids of each
    approach for the figures). ``a3_cache`` shares Approach 3 refits between conventions with the same N, D, L
    (total and exact: only k differs); the refits run first, in ``workers`` processes (resampling.approach3_refits)."""
    a3_cache = {} if a3_cache is None else a3_cache
    N, D, L, labels, k = d.N, d.D, d.L, d.labels, d.k
    bnames, bvals = list(d.budgets), np.array(list(d.budgets.values()))
    curves_are_runs = all(len(c.flops) == 1 for c in d.curves) and len(d.curves) == len(N)
    starts3 = laws.a3_starts(N, D, L, p.fit3, n=A3_STARTS)  # several starts: one can end in a worse minimum
    fitted_budgets = np.array(p.fit2.budgets)
    lines: dict[str, list] = {"approach1": [], "approach2": [], "approach3": []}
    grids: dict[str, list] = {f"{a}/{w}_grid": [] for a in lines for w in "nd"}
    rng_curves = np.random.default_rng(seed + 1)

    key0 = N.tobytes() + D.tobytes() + L.tobytes()
    done = [0]
    todo = [idx for idx in resampling.resamples(len(N), n_boot, seed, strata=labels) if key0 + idx.tobytes() not in a3_cache]
    for idx, f in zip(todo, resampling.approach3_refits(N, D, L, k, starts3, todo, workers)):
        a3_cache[key0 + idx.tobytes()] = f

    def a3(idx: np.ndarray) -> laws.ChinchillaFit:
        """Approach 3 on a resample of the runs (the pairs bootstrap: the interval, or beside the residual one);
        the total and exact conventions share N, D and L (only k differs), so the second reuses the first's fit."""
        key = key0 + idx.tobytes()
        if key not in a3_cache:
            a3_cache[key] = laws.approach3(N[idx], D[idx], L[idx], k=k, starts=0, init=starts3)
        if a3_cache[key] is None:
            raise laws.FitError("runs", len(idx), "a resample Approach 3 can fit")
        return _with_k(a3_cache[key], k)

    def draw_values(a_name: str, f: Any) -> dict[str, float]:
        """One draw's exponents, N and D at the fitted and named budgets (and its line and grids, for the bands)."""
        out = {f"{a_name}/a": f.a, f"{a_name}/b": f.b}
        for name, c in zip(bnames, bvals):
            out[f"{a_name}/N@{name}"] = float(f.n_at(c))
            out[f"{a_name}/D@{name}"] = float(f.d_at(c))
        for i, c in enumerate(fitted_budgets):
            out[f"{a_name}/N@fitted{i}"] = float(f.n_at(c))
        lines[a_name].append((f.a, f.k_n) if a_name != "approach3" else (f.a, float(f.n_at(1.0))))
        grids[f"{a_name}/n_grid"].append(f.n_at(d.cgrid))
        grids[f"{a_name}/d_grid"].append(f.d_at(d.cgrid))
        if a_name == "approach3":
            out.update({f"approach3/{q}": v for q, v in f.params().items()})
            for name, c in zip(bnames, bvals):
                out[f"approach3/L@{name}"] = float(f.loss(f.n_at(c), f.d_at(c)))
        return out

    def one(idx: np.ndarray) -> dict[str, float]:
        """Refit every approach on one resample; an approach that cannot fit this resample (e.g. a budget
        left with fewer than 3 distinct sizes) is skipped for it, the others still count."""
        out: dict[str, float] = {}
        fits_b: dict[str, Any] = {}
        ii = idx if curves_are_runs else rng_curves.integers(0, len(d.curves), len(d.curves))
        done[0] += 1
        try:
            f3 = a3(idx)
            out["approach3_pairs/a"], out["approach3_pairs/b"] = f3.a, f3.b
            if a3_interval == "pairs":
                out.update(draw_values("approach3", f3))
        except (laws.FitError, np.linalg.LinAlgError, ValueError, ArithmeticError):
            pass
        try:
            f1 = laws.approach1_matrix(p.grid1, p.n1[ii], p.Lm[ii], p.Dm[ii])
            fits_b["approach1"] = f1
            out.update(draw_values("approach1", f1))
        except (laws.FitError, np.linalg.LinAlgError, ValueError, ArithmeticError):
            pass
        if done[0] > KAPLAN_RESAMPLES:
            return out
        kn = kaplan_fits(N[idx], D[idx], L[idx], fits_b.get("approach1"), init=p.kaplan)
        for key, v in kn.items():
            for q in ("alpha", "alpha_N", "alpha_D", "a"):
                if q in v:
                    out[f"kaplan/{key}/{q}"] = v[q]
        return out

    samples = resampling.bootstrap(one, len(N), n_boot, seed, strata=labels)
    if a3_interval == "residual":
        rkey = b"residual" + key0
        if rkey not in a3_cache:  # total and exact share N, D, L and so these refits too
            a3_cache[rkey] = residuals.residual_bootstrap(N, D, L, p.fit3, starts3, n_boot, seed)
        draws3 = [draw_values("approach3", _with_k(f, k)) for f in a3_cache[rkey] if f is not None]
        samples.update({key: np.array([x[key] for x in draws3]) for key in (draws3[0] if draws3 else {})})
    samples.update(_approach2_draws(d, p, max(n_boot, A2_MIN_DRAWS), seed, grids, lines))
    boot = {k_: np.array(v) for k_, v in grids.items() if v}
    boot.update({f"{a}/params": np.array(v) for a, v in lines.items() if v})
    return samples, boot


def _approach2_draws(d: ConventionData, p: PointFits, draws: int, seed: int, grids: dict[str, list],
                     lines: dict[str, list]) -> dict[str, np.ndarray]:
    """Approach 2's interval: a parametric bootstrap that redraws each size's loss from its measured seed noise
    (approach2.bootstrap_isoflops), not a resampling of the few sizes. Fills the figures' bands too."""
    try:
        raw = approach2.bootstrap_isoflops(d.N, d.D, d.C, d.L, labels=d.labels, loss_sd=_loss_sd(d), draws=draws,
                                           seed=seed, at=d.budgets)
    except laws.FitError:
        return {}
    ok = np.isfinite(raw["a"])
    c0 = p.fit2.budgets[0]
    with np.errstate(over="ignore", invalid="ignore"):
        k_n = raw["N@fitted0"] / c0 ** raw["a"]
        for a, kn in zip(raw["a"][ok], k_n[ok]):
            lines["approach2"].append((float(a), float(kn)))
            grids["approach2/n_grid"].append(kn * d.cgrid ** a)
            grids["approach2/d_grid"].append(d.cgrid / (d.k * kn * d.cgrid ** a))
    return {f"approach2/{key}": v[ok] for key, v in raw.items()}


A3_INTERVAL_TEXT = {"pairs": "pairs bootstrap: runs resampled within each budget",
                    "residual": "residual bootstrap: every run's (N, D) kept, log loss = fit + a resampled residual "
                                "(residuals.py); pairs_ci95: the pairs bootstrap (runs resampled within each budget)"}


def _approach_rows(d: ConventionData, p: PointFits, samples: dict[str, np.ndarray],
                   interval: str = "pairs") -> dict[str, Any]:
    """Approaches 1-3 as fits.json entries: point values, 95% intervals, standard errors, per-budget minima."""
    fit1, fit2, fit3 = p.fit1, p.fit2, p.fit3
    ci = lambda key: _pair(_ci(samples, key))  # noqa: E731
    se = lambda key: _ci(samples, key)["se"]  # noqa: E731
    a1 = {"a": fit1.a, "b": fit1.b, "ci95": {q: ci(f"approach1/{q}") for q in ("a", "b")},
          "se": {q: se(f"approach1/{q}") for q in ("a", "b")},
          "envelope": [{"flops": c, "n_opt": n, "d_opt": dd, "loss": lo}
                       for c, n, dd, lo in zip(fit1.flops, fit1.n_opt, fit1.d_opt, fit1.loss)],
          "from_curves": any(len(c.flops) > 1 for c in d.curves), "runs": len(d.curves)}
    a2 = {"a": fit2.a, "b": fit2.b, "ci95": {q: ci(f"approach2/{q}") for q in ("a", "b")},
          "se": {q: se(f"approach2/{q}") for q in ("a", "b")},
          "method": "window parabolas (lowest mean loss and 2 sizes each side), weighted N_opt(C) line, "
                    "parametric bootstrap over the seed noise (approach2.py)",
          "noise_source": fit2.noise_source, "seed_std": d.seed_std, "seed_sizes": d.seed_sizes,
          "draws": int(len(samples.get("approach2/a", []))),
          "dropped": fit2.dropped,
          "n_opt_by_budget": [
              {"budget": b, "n_opt": n, "d_opt": dd, "minimum_inside_sampled_range": ok,
               "n_opt_ci95": ci(f"approach2/N_opt@fitted{i}"), "window": list(win), "weight": w}
              for i, (b, n, dd, ok, win, w) in enumerate(zip(fit2.budgets, fit2.n_opt, fit2.d_opt, fit2.inside,
                                                             fit2.windows, fit2.weights))]}
    a3 = {**fit3.params(), "k": d.k,
          "ci95": {q: ci(f"approach3/{q}") for q in ("E", "A", "B", "alpha", "beta", "a", "b")},
          "se": {q: se(f"approach3/{q}") for q in ("alpha", "beta", "a", "b")},
          "interval": A3_INTERVAL_TEXT[interval],
          "pairs_ci95": {q: ci(f"approach3_pairs/{q}") for q in ("a", "b")},
          "pairs_se": {q: se(f"approach3_pairs/{q}") for q in ("a", "b")},
          "n_opt_by_budget": [{"budget": b, "n_opt": float(fit3.n_at(b)), "n_opt_ci95": ci(f"approach3/N@fitted{i}")}
                              for i, b in enumerate(fit2.budgets)],
          "huber_delta": laws.HUBER_DELTA, "objective": fit3.objective, "at_bounds": list(fit3.at_bounds),
          "rms_rel_residual": float(np.sqrt(np.mean((fit3.loss(d.N, d.D) / d.L - 1) ** 2))),
          **curvature_check(fit2, fit3)}
    return {"approach1": a1, "approach2": a2, "approach3": a3}


def curvature_check(fit2: approach2.IsoFlopMinima, fit3: laws.ChinchillaFit) -> dict[str, Any]:
    """Does Approach 3's law have the shape of the measured isoFLOP curves? Per budget Approach 2 fitted, the
    leading coefficient of its window parabola (loss in ln N) against the one the law implies at that vertex
    (ChinchillaFit.isoflop_curvature). A median ratio outside CURVATURE_BAND means the E + A/N^α + B/D^β fitted
    through all budgets' losses does not bend like their curves: its a then reflects that misfit too."""
    rows = []
    for b, n, par in zip(fit2.budgets, fit2.n_opt, fit2.parabolas):
        law = float(fit3.isoflop_curvature(n, b))
        rows.append({"budget": float(b), "n_opt": float(n), "measured": float(par[0]), "law": law,
                     "ratio": float(par[0] / law) if law > 0 else None})
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    med = float(np.median(ratios)) if ratios else None
    return {"isoflop_curvature": rows, "curvature_ratio_median": med,
            "curvature_consistent": None if med is None else bool(CURVATURE_BAND[0] <= med <= CURVATURE_BAND[1])}


def _extrapolation(d: ConventionData, p: PointFits, samples: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """N_opt, D_opt (and Approach 3's loss) at the named budgets. Beyond ILLUSTRATIVE_FACTOR times the largest
    fitted budget a row gets no interval and is marked illustrative: nothing measured here supports it, and its
    loss is in nats per token of this vocabulary and text."""
    c_hi = float(d.C.max())
    rows = []
    for name, c in d.budgets.items():
        far = c / c_hi > ILLUSTRATIVE_FACTOR
        ci = (lambda key: [None, None]) if far else (lambda key: _pair(_ci(samples, key)))
        for aname, f in (("approach1", p.fit1), ("approach2", p.fit2), ("approach3", p.fit3)):
            row = {"budget": name, "flops": float(c), "approach": aname, "factor": float(c / c_hi),
                   "illustrative": bool(far), "n_opt": float(f.n_at(c)), "n_opt_ci95": ci(f"{aname}/N@{name}"),
                   "d_opt": float(f.d_at(c)), "d_opt_ci95": ci(f"{aname}/D@{name}")}
            if aname == "approach3":
                row["loss"] = float(p.fit3.loss(f.n_at(c), f.d_at(c)))
                row["loss_ci95"] = ci(f"approach3/L@{name}")
            rows.append(row)
    return rows


def _leave_one_budget_out(d: ConventionData, p: PointFits) -> list[dict[str, Any]]:
    """Approach 3's loss error on each held-out budget (laws.leave_one_budget_out), and Approach 2 (windows) fitted
    on the other budgets predicting the held-out budget's own windowed minimum."""
    rows = laws.leave_one_budget_out(d.N, d.D, d.C, d.L, d.labels, k=d.k)
    vertex = dict(zip(p.fit2.groups, p.fit2.n_opt))
    for g, row in enumerate(rows):
        for key in ("n_opt_observed", "n_opt_predicted", "a2_log10_ratio"):
            row.pop(key, None)
        m = d.labels == g
        if g not in vertex:
            continue
        try:
            fit = approach2.fit_isoflops(d.N[~m], d.D[~m], d.C[~m], d.L[~m], labels=d.labels[~m],
                                         loss_sd=None if _loss_sd(d) is None else _loss_sd(d)[~m])
        except laws.FitError:
            continue
        pred = float(fit.n_at(row["budget"]))
        row.update(n_opt_observed=vertex[g], n_opt_predicted=pred, a2_log10_ratio=math.log10(pred / vertex[g]))
    return rows


def fit_convention(study: RunTable, conv: str, cfg: AnalyzeConfig, extra_budgets: dict[str, float],
                   a3_cache: dict[bytes, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every fit of one convention, with bootstrap intervals, leave-one-budget-out, verdict and extrapolation.
    Returns (json-able result, objects for figures)."""
    ncol, ccol = CONVENTIONS[conv]
    d = convention_data(study, conv, cfg, extra_budgets)
    p = point_fits(d, cfg.rtol)
    samples, boot = (bootstrap_fits(d, p, cfg.bootstrap, cfg.seed, a3_cache, cfg.a3_interval, cfg.cores())
                     if cfg.bootstrap
                     else ({}, {}))
    lobo = _leave_one_budget_out(d, p) if d.n_budgets >= 3 else []
    for key, v in p.kaplan.items():
        for q in ("alpha", "alpha_N", "alpha_D", "a"):
            if q in v and f"kaplan/{key}/{q}" in samples:
                v.setdefault("ci95", {})[q] = _pair(_ci(samples, f"kaplan/{key}/{q}"))
                v.setdefault("se", {})[q] = _ci(samples, f"kaplan/{key}/{q}")["se"]
    verdicts = {name: laws.verdict(a, _ci(samples, key))
                for name, a, key in (("approach1", p.fit1.a, "approach1/a"), ("approach2", p.fit2.a, "approach2/a"),
                                     ("approach3", p.fit3.a, "approach3/a"),
                                     ("kaplan_eq1.5", p.kaplan["L_ND"]["a"], "kaplan/L_ND/a"))}
    result = {"N": ncol, "C": ccol, "flops_per_param_token": d.k, "runs": int(len(d.N)), "budgets": d.n_budgets,
              "fitted_flops_range": [float(d.C.min()), float(d.C.max())], **_approach_rows(d, p, samples, cfg.a3_interval),
              "kaplan": p.kaplan, "verdict": verdicts, "leave_one_budget_out": lobo,
              "extrapolation": _extrapolation(d, p, samples),
              "bootstrap": {"resamples": cfg.bootstrap,
                            "kept": {a: int(len(samples.get(f"{a}/a", []))) for a in ("approach1", "approach2",
                                                                                      "approach3", "approach3_pairs")},
                            "seed": cfg.seed, "strata": "budget"}}
    objects = {"fit1": p.fit1, "fit2": p.fit2, "fit3": p.fit3, "boot": boot, "labels": d.labels, "N": d.N, "D": d.D,
               "C": d.C, "L": d.L, "curves": d.curves, "budgets": d.budgets, "cgrid": d.cgrid}
    return result, objects


def kaplan_fits(N: np.ndarray, D: np.ndarray, L: np.ndarray, fit1: laws.EnvelopeFit | None,
                init: dict[str, Any] | None = None) -> dict[str, Any]:
    """Kaplan et al. 2020 forms on lower envelopes: L(N) over the lowest loss of each model size, L(D) over the
    lowest loss of each token count (within 1%), L(C) over Approach 1's envelope (the frontier L(C_min)), each
    with and without an irreducible term; L(N, D) in the Eq. 1.5 form over all runs. ``init`` (a previous
    result) starts the nonlinear fits from it (the bootstrap)."""

    def start(name: str) -> dict[str, float] | None:
        v = (init or {}).get(name)
        return v if v and "error" not in v else None

    out: dict[str, Any] = {}

    def env(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lab = laws.group_budgets(x, 0.01)
        xs = laws.budget_centers(x, lab)
        ys = np.array([L[lab == g].min() for g in range(len(xs))])
        return xs, ys

    sets = {"L_N": env(N), "L_D": env(D)}
    if fit1 is not None:
        sets["L_C"] = (np.asarray(fit1.flops), np.asarray(fit1.loss))
    for key, (x, y) in sets.items():
        for irr in (False, True):
            name = key + ("_irreducible" if irr else "")
            try:
                out[name] = laws.fit_power_law(x, y, irreducible=irr, init=start(name) if irr else None)
                out[name]["points"] = int(len(x))
            except laws.FitError as exc:
                out[name] = {"error": str(exc)}
    try:
        out["L_ND"] = laws.fit_kaplan_nd(N, D, L, init=start("L_ND"))
    except laws.FitError as exc:
        out["L_ND"] = {"error": str(exc), "a": float("nan")}
    return out


def curve_extrapolation(study: RunTable, frac: float) -> dict[str, Any]:
    """Fit L(step) = a·step^-b + c on the first ``frac`` of each stored validation curve and predict its last
    value; the error across runs (the original notes promised < 5%)."""
    rows = []
    finished = set(study.runs["run_id"])  # complete runs only: a pruned or killed curve has no final loss
    for rid, cv in study.curves.items():
        if len(cv) < 8 or rid not in finished:
            continue
        try:
            r = laws.curve_fit_extrapolate(cv["step"].to_numpy(), cv["loss"].to_numpy(), frac=frac)
        except laws.FitError:
            continue
        if "rel_err" in r:
            rows.append({"run_id": rid, **r})
    if not rows:
        return {"runs": 0, "frac": frac, "note": "no finished run has a validation curve of 8 or more points with "
                "4 or more of them in the fitted part"}
    err = np.abs([r["rel_err"] for r in rows])
    return {"runs": len(rows), "frac": frac, "median_abs_rel_err": float(np.median(err)),
            "mean_abs_rel_err": float(np.mean(err)), "max_abs_rel_err": float(err.max()),
            "mean_rel_err": float(np.mean([r["rel_err"] for r in rows])),
            "within_5pct": float(np.mean(err < 0.05)), "per_run": rows}


def epochs_by_budget(study: RunTable) -> list[dict[str, float]]:
    """The most passes over the train split of any run, per budget (runs that log ``epochs``)."""
    runs = study.runs
    if "epochs" not in runs.columns or runs["epochs"].isna().all() or "budget" not in runs.columns:
        return []
    top = runs.dropna(subset=["epochs", "budget"]).groupby("budget")["epochs"].max()
    return [{"budget": float(b), "max_epochs": float(e)} for b, e in top.items()]


def analyze_study(study: RunTable, cfg: AnalyzeConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit every convention present (or the one asked for); return (fits.json content, figure objects)."""
    with laws.one_blas_thread(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _analyze_study(study, cfg)


def _analyze_study(study: RunTable, cfg: AnalyzeConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    convs = list(study.conventions)
    if cfg.convention not in ("all", "both"):
        if cfg.convention not in convs:
            raise ConfigError("convention", cfg.convention, "one of " + ", ".join(["all", *convs]) +
                              " for this source (a CSV has one convention: its own columns)")
        convs = [cfg.convention]
    extra = {f"{b:.3g} FLOPs": b for b in parse_budgets(cfg.budgets)}
    results: dict[str, Any] = {"conventions": {}, "verdict": {}}
    objects: dict[str, Any] = {}
    a3_cache: dict[bytes, Any] = {}
    for conv in convs:
        res, obj = fit_convention(study, conv, cfg, extra, a3_cache)
        results["conventions"][conv] = res
        results["verdict"][conv] = res["verdict"]
        objects[conv] = obj
    results["curve_extrapolation"] = curve_extrapolation(study, cfg.curve_frac)
    results["epochs_by_budget"] = epochs_by_budget(study)
    if study.truth is not None:
        conv = study.truth["convention"]
        if conv in results["conventions"]:
            got = results["conventions"][conv]["approach3"]
            results["simulation"] = {"convention": conv, "truth": study.truth,
                                     "recovered": {k: got[k] for k in ("E", "A", "B", "alpha", "beta", "a", "b")},
                                     "ci95": got["ci95"],
                                     "approach2_a": results["conventions"][conv]["approach2"]["a"]}
    if cfg.overlay:
        results["overlay"] = overlay_prediction(load_prediction(cfg.overlay), results, objects)
    results["provenance"] = study.provenance
    results["config"] = {f.name: getattr(cfg, f.name) for f in fields(AnalyzeConfig)}
    results["references"] = {"kaplan_a": laws.KAPLAN_A, "chinchilla_a": laws.CHINCHILLA_A,
                             "hoffmann_approach3": laws.HOFFMANN,
                             "sources": ["Kaplan et al. 2020 arXiv:2001.08361", "Hoffmann et al. 2022 arXiv:2203.15556",
                                         "Besiroglu et al. 2024 arXiv:2404.10102"]}
    return results, objects




def run_analysis(cfg: AnalyzeConfig) -> tuple[dict[str, Any], Path]:
    """Load, fit, write the report folder (no MLflow logging); returns (results, folder)."""
    study = load(cfg)
    results, objects = analyze_study(study, cfg)
    folder = report.write_report(results, objects, study, cfg.out)
    return results, folder
