"""The ``analyze`` entry point: runs (MLflow), a CSV or a simulated study -> fits -> verdict -> report.

Pipeline, top to bottom: ``load`` (a table of runs + loss curves + provenance) -> ``fit_all`` (per convention:
Approaches 1-3, Kaplan's laws, bootstrap intervals, leave-one-budget-out, verdict, extrapolation) ->
``write_report`` (fits.json, figures, report.md, report.html) -> ``main`` logs it all to an MLflow run tagged
``scaling_lab.kind=analyze``. Only ``scaling_lab.tracking`` touches MLflow.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scaling_lab import laws
from scaling_lab.config import ConfigError

SOURCES = ("mlflow", "csv", "simulate")
CONVENTION_CHOICES = ("both", "kaplan", "total")
# convention -> (N column, C column). kaplan: non-embedding N with C = 6N·D (Kaplan et al. 2020, Sec. 2.1);
# total: all parameters with C = 6·N_total·D (as Hoffmann et al. 2022 count N); csv: the CSV's own columns.
CONVENTIONS = {"kaplan": ("n_params", "flops_kaplan"), "total": ("n_params_total", "flops_total"),
               "csv": ("n_params", "flops")}
CSV_KEYS_REQUIRED = ("params", "loss")
CSV_KEYS = ("params", "tokens", "flops", "loss", "budget", "run")
HISTORY_KEYS = ("val/loss",)


@dataclass
class AnalyzeConfig:
    """What to read, how to fit, where to write. Field names = MLproject parameters = CLI flags."""

    source: str = "mlflow"
    """mlflow (runs in the tracking store), csv (a table of results) or simulate (a known law plus noise)."""
    experiment: str = "scaling-lab"
    """MLflow experiment to read runs from, and to log the analyze run in ('' = read every experiment)."""
    parent_run: str = ""
    """Keep only runs below this run id (a search or study parent), at any depth."""
    tags: str = ""
    """Tag filter 'k=v,k2=v2' (e.g. study=quick); runs are selected by tags, never by names."""
    filter_string: str = ""
    """Extra MLflow search filter, e.g. \"params.mode = 'quick'\"."""
    csv: str = ""
    """CSV file of results (source=csv)."""
    columns: str = ""
    """CSV column map 'params=COL,tokens=COL,flops=COL,loss=COL[,budget=COL,run=COL]' (default: same names)."""
    out: str = ""
    """Report folder ('' = reports/analyze-<UTC time>)."""
    budgets: str = ""
    """Extra FLOP budgets to extrapolate to, comma-separated (GPT-3 3.14e23 and Chinchilla 5.76e23 always)."""
    convention: str = "both"
    """both, kaplan (non-embedding N, C = 6ND) or total (all parameters, C = 6 N_total D)."""
    bootstrap: int = 200
    """Bootstrap resamples of the runs for 95% intervals (0 = no intervals)."""
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
    log: bool = True
    """Log the analysis to an MLflow run tagged scaling_lab.kind=analyze."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError("source", self.source, "one of " + ", ".join(SOURCES))
        if self.convention not in CONVENTION_CHOICES:
            raise ConfigError("convention", self.convention, "one of " + ", ".join(CONVENTION_CHOICES))
        if self.source == "csv" and not self.csv:
            raise ConfigError("csv", self.csv, "a CSV file path when source=csv")
        if not (isinstance(self.bootstrap, int) and self.bootstrap >= 0 and self.bootstrap != 1):
            raise ConfigError("bootstrap", self.bootstrap, "0 (off) or an integer >= 2")
        if not 0 <= self.rtol < 1:
            raise ConfigError("rtol", self.rtol, "a number in [0, 1)")
        if not 0 < self.curve_frac < 1:
            raise ConfigError("curve_frac", self.curve_frac, "a number in (0, 1)")
        if not 0 <= self.noise < 1:
            raise ConfigError("noise", self.noise, "a number in [0, 1)")
        parse_budgets(self.budgets)
        parse_tags(self.tags)
        if self.overlay:
            load_prediction(self.overlay)


def field_names() -> list[str]:
    return [f.name for f in fields(AnalyzeConfig)]


def parse_tags(spec: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise ConfigError("tags", spec, "comma-separated key=value pairs, e.g. study=quick,flops_rule=total")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_budgets(spec: str) -> list[float]:
    try:
        vals = [float(x) for x in spec.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise ConfigError("budgets", spec, "comma-separated FLOP counts, e.g. 1e21,1e24") from None
    if any(not math.isfinite(v) or v <= 0 for v in vals):
        raise ConfigError("budgets", spec, "positive finite FLOP counts")
    return vals


def parse_config(raw: dict[str, Any]) -> AnalyzeConfig:
    """Strings (CLI / MLproject) -> a validated AnalyzeConfig; '' leaves a field at its default."""
    types = {f.name: f.type for f in fields(AnalyzeConfig)}
    kw: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in types:
            raise ConfigError(name, value, "one of " + ", ".join(types))
        if value is None or (isinstance(value, str) and value.strip() == "" and types[name] != "str"):
            continue
        t = types[name]
        s = value.strip() if isinstance(value, str) else value
        try:
            if t == "int":
                f = float(s)
                if not f.is_integer():
                    raise ValueError
                kw[name] = int(f)
            elif t == "float":
                kw[name] = float(s)
            elif t == "bool":
                if str(s).lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                kw[name] = str(s).lower() in ("true", "1", "yes")
            else:
                kw[name] = s
        except ValueError:
            raise ConfigError(name, value, {"int": "an integer", "float": "a number", "bool": "true or false"}[t]) \
                from None
    return AnalyzeConfig(**kw)


# --------------------------------------------------------------------------- inputs


@dataclass
class Study:
    """The analysis' input: one row per run (final values), loss curves, where it came from."""

    runs: pd.DataFrame
    """run_id, tokens, loss, group (budget key or NaN), and N/C columns of each convention present."""
    curves: dict[str, pd.DataFrame] = field(default_factory=dict)
    """run_id -> DataFrame(step, tokens, loss) of validation loss (also PRUNED runs: curves only)."""
    curve_runs: pd.DataFrame | None = None
    """N/C/tokens of every run that has a curve (finals plus pruned)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    conventions: tuple[str, ...] = ("kaplan", "total")
    truth: dict[str, Any] | None = None
    """source=simulate: the law the data were drawn from."""


def _num(frame: pd.DataFrame, col: str) -> pd.Series:
    if col not in frame.columns:
        return pd.Series(np.nan, index=frame.index)
    return pd.to_numeric(frame[col], errors="coerce")


def from_frame(frame: pd.DataFrame, histories: dict[str, dict[str, list]] | None = None,
               provenance: dict[str, Any] | None = None) -> Study:
    """An MLflow runs frame (``tracking.runs_frame``) -> Study. Keeps FINISHED train/trial runs with N and a final
    loss; trials count only when trial_state is COMPLETE (PRUNED ones give curves only)."""
    if frame.empty:
        raise ConfigError("runs", 0, "runs with params n_params, tokens_trained and metric final/val_loss "
                          "(check experiment, parent_run, tags)")
    kind = frame.get("tags.scaling_lab.kind", pd.Series("", index=frame.index)).fillna("")
    state = frame.get("tags.trial_state", pd.Series("", index=frame.index)).fillna("")
    has_n = _num(frame, "params.n_params").notna()
    base = frame[has_n & ~kind.isin(["study", "analyze", "search"])]
    if base.empty:
        raise ConfigError("runs", len(frame), "runs that log param n_params (training runs); none among the "
                          f"{len(frame)} selected")
    table = pd.DataFrame({
        "run_id": base["run_id"].values,
        "n_params": _num(base, "params.n_params").values,
        "n_params_total": _num(base, "params.n_params_total").values,
        "tokens": _num(base, "params.tokens_trained").values,
        "flops_kaplan": _num(base, "params.flops_kaplan").values,
        "flops_total": _num(base, "params.flops_total").values,
        "loss": _num(base, "metrics.final/val_loss").values,
        "tokens_per_step": _num(base, "params.tokens_per_step").values,
        "status": base["status"].values,
        "state": state[base.index].values,
        "budget": _num(base, "tags.budget").values,
        "flops_rule": base.get("tags.flops_rule", pd.Series("", index=base.index)).fillna("").values,
    })
    if "metrics.final/val_loss" not in base.columns:
        raise ConfigError("final/val_loss", None, "a final/val_loss metric on the selected runs (none has one)")
    final = table[(table["status"] == "FINISHED") & table["state"].isin(["", "COMPLETE"])]
    nan_ids = final.loc[final["loss"].isna(), "run_id"].tolist()
    if nan_ids:
        raise ConfigError("final/val_loss", "NaN", f"a finite final loss on every finished run; missing or NaN in "
                          f"{len(nan_ids)} run(s): {', '.join(nan_ids[:5])}")
    final = final[final["loss"].notna()].copy()
    if final["budget"].notna().all() and len(final):
        final["group"] = final["flops_rule"].astype(str) + ":" + final["budget"].map(lambda b: f"{b:.6g}")
    else:
        final["group"] = np.nan
    curves: dict[str, pd.DataFrame] = {}
    by_id = table.set_index("run_id")
    for rid, h in (histories or {}).items():
        pts = h.get("val/loss", [])
        if not pts or rid not in by_id.index:
            continue
        tps = float(by_id.at[rid, "tokens_per_step"])
        steps = np.array([s for s, _ in pts], dtype=float)
        if not math.isfinite(tps):
            tps = float(by_id.at[rid, "tokens"]) / steps.max()
        curves[rid] = pd.DataFrame({"step": steps, "tokens": steps * tps, "loss": [v for _, v in pts]})
    curve_runs = table[table["run_id"].isin(curves) & table["status"].isin(["FINISHED", "KILLED"])
                       & table["state"].isin(["", "COMPLETE", "PRUNED"])]
    prov = {"source": "mlflow", "run_ids": final["run_id"].tolist(), **(provenance or {})}
    return Study(final.reset_index(drop=True), curves, curve_runs.reset_index(drop=True), prov, ("kaplan", "total"))


def load_mlflow(cfg: AnalyzeConfig, with_histories: bool = True) -> Study:
    from scaling_lab import tracking

    exps = [e.strip() for e in cfg.experiment.split(",") if e.strip()] or None
    frame = tracking.runs_frame(exps, cfg.filter_string, cfg.parent_run, parse_tags(cfg.tags))
    hist = None
    if with_histories and not frame.empty and "params.n_params" in frame.columns:
        ids = frame.loc[frame["params.n_params"].notna(), "run_id"].tolist()
        hist = tracking.metric_histories(ids, list(HISTORY_KEYS))
    prov = {"tracking_uri": _redact(tracking.tracking_uri()), "experiment": cfg.experiment,
            "parent_run": cfg.parent_run, "tags": cfg.tags, "filter_string": cfg.filter_string}
    return from_frame(frame, hist, prov)


def _redact(uri: str) -> str:
    """Drop a password from a URI before it goes into a report."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return uri


def parse_columns(spec: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise ConfigError("columns", spec, "key=COLUMN pairs with keys " + ", ".join(CSV_KEYS))
        k, v = (x.strip() for x in part.split("=", 1))
        if k not in CSV_KEYS:
            raise ConfigError("columns", k, "keys " + ", ".join(CSV_KEYS))
        out[k] = v
    return out


def load_csv(path: str | Path, columns: str = "", rtol: float = 0.05) -> Study:
    """A CSV of results -> Study (convention 'csv': N, D, C as the file gives them). tokens or flops may be
    absent: D = C/(6N) or C = 6ND."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("csv", str(path), "an existing CSV file")
    raw = p.read_bytes()
    df = pd.read_csv(p)
    mapping = parse_columns(columns)
    for k in CSV_KEYS:  # default: a column named like the key
        if k not in mapping and k in df.columns:
            mapping[k] = k
    missing_keys = [k for k in CSV_KEYS_REQUIRED if k not in mapping]
    if "tokens" not in mapping and "flops" not in mapping:
        missing_keys.append("tokens or flops")
    if missing_keys:
        raise ConfigError("columns", columns or "(none)", f"a mapping for {', '.join(missing_keys)} "
                          f"(CSV columns: {', '.join(map(str, df.columns))})")
    absent = [f"{k}={c}" for k, c in mapping.items() if c not in df.columns]
    if absent:
        raise ConfigError("columns", ", ".join(absent), f"columns of {p.name}: {', '.join(map(str, df.columns))}")
    N = pd.to_numeric(df[mapping["params"]], errors="coerce")
    L = pd.to_numeric(df[mapping["loss"]], errors="coerce")
    D = pd.to_numeric(df[mapping["tokens"]], errors="coerce") if "tokens" in mapping else None
    C = pd.to_numeric(df[mapping["flops"]], errors="coerce") if "flops" in mapping else None
    D = C / (6 * N) if D is None else D
    C = 6 * N * D if C is None else C
    for key, s in (("params", N), ("tokens", D), ("flops", C), ("loss", L)):
        bad = s.isna() | ~np.isfinite(s) | (s <= 0)
        if bad.any():
            rows = (np.flatnonzero(bad.values) + 2).tolist()[:5]  # +2: header line, 1-based
            raise ConfigError("loss" if key == "loss" else "columns", f"{mapping.get(key, key)}",
                              f"finite positive numbers in every row (NaN/invalid at CSV lines {rows})")
    runs = pd.DataFrame({
        "run_id": df[mapping["run"]].astype(str) if "run" in mapping else [f"row{i + 2}" for i in range(len(df))],
        "n_params": N.values, "tokens": D.values, "flops": C.values, "loss": L.values,
        "group": df[mapping["budget"]].astype(str).values if "budget" in mapping else np.nan,
    })
    prov = {"source": "csv", "csv": str(p.resolve()), "sha256": hashlib.sha256(raw).hexdigest(),
            "columns": mapping, "rows": len(df)}
    return Study(runs, {}, None, prov, ("csv",))


# Simulation: an illustrative law in total N (not a published fit): Hoffmann et al.'s exponents with A, B, E
# chosen so that the minimum at C = 1e12 lands near the N_total ≈ 44k measured on CPU (design/PROBES.md).
SIM_LAW = {"E": 1.8, "A": 40.0, "B": 60.0, "alpha": 0.34, "beta": 0.28}
SIM_SHAPES = [(1, 16), (1, 32), (2, 32), (2, 48), (2, 64), (3, 64), (3, 96), (4, 128)]  # (n_layer, n_embd)
SIM_BUDGETS = [3e11, 1e12, 3e12, 1e13]  # FLOPs under the total rule
SIM_VOCAB, SIM_BLOCK, SIM_TOKENS_PER_STEP = 513, 128, 2048  # quick mode: vocab_size 512 (+ end-of-text), 16 x 128


def simulate(seed: int = 0, noise: float = 0.01, law: dict[str, float] | None = None,
             shapes=SIM_SHAPES, budgets=SIM_BUDGETS, evals: int = 10) -> Study:
    """A quick-mode isoFLOP study drawn from ``law`` (in total N, C = 6 N_total D) with log-normal noise:
    each shape at each budget, validation loss at 10%, 20%, ... 100% of its tokens."""
    from scaling_lab import counting

    law = dict(law or SIM_LAW)
    rng = np.random.default_rng(seed)
    rows, curves = [], {}
    for c in budgets:
        for n_layer, d in shapes:
            n = counting.n_params_nonembed(n_layer, d)
            nt = counting.n_params_total(n_layer, d, SIM_VOCAB, SIM_BLOCK)
            steps = int(c / (6 * nt) // SIM_TOKENS_PER_STEP)
            if steps < evals:
                continue
            D = steps * SIM_TOKENS_PER_STEP
            rid = f"sim-C{c:.0e}-L{n_layer}-d{d}".replace("+", "")
            st = np.array([max(1, round(steps * k / evals)) for k in range(1, evals + 1)], dtype=float)
            lc = laws.chinchilla(nt, st * SIM_TOKENS_PER_STEP, **law) * np.exp(rng.normal(0, noise, len(st)))
            curves[rid] = pd.DataFrame({"step": st, "tokens": st * SIM_TOKENS_PER_STEP, "loss": lc})
            rows.append({"run_id": rid, "n_params": n, "n_params_total": nt, "tokens": D,
                         "flops_kaplan": 6.0 * n * D, "flops_total": 6.0 * nt * D, "loss": float(lc[-1]),
                         "tokens_per_step": SIM_TOKENS_PER_STEP, "group": f"total:{c:.6g}"})
    runs = pd.DataFrame(rows)
    truth = {**law, "a": law["beta"] / (law["alpha"] + law["beta"]), "b": law["alpha"] / (law["alpha"] + law["beta"]),
             "convention": "total"}
    prov = {"source": "simulate", "seed": seed, "noise": noise, "law": law, "budgets": list(budgets),
            "shapes": [list(s) for s in shapes]}
    return Study(runs, curves, runs.copy(), prov, ("kaplan", "total"), truth)


def log_study(study: Study, experiment: str, study_name: str = "simulated", train_points: int = 0,
              pruned: int = 0) -> str:
    """Write a (simulated) study to MLflow the way a search stores one: a study parent run and one trial child
    per run with the agreed params, tags and metrics (val/loss history, final/val_loss). ``train_points`` > 0 also
    logs about that many train/loss values per run (every step when the run has fewer). The last ``pruned`` runs
    are stored as PRUNED trials (curve cut at half). Returns the parent run id. For demos, tests, benchmarks."""
    from scaling_lab import tracking

    with tracking.run(experiment, f"study-{study_name}", tags={"scaling_lab.kind": "study", "study": study_name,
                                                               "flops_rule": "total"}, system_metrics=False) as parent:
        parent_id = parent.run_id
    cut = len(study.runs) - pruned
    for i, r in enumerate(study.runs.itertuples(index=False)):
        cv = study.curves[r.run_id]
        state = "COMPLETE" if i < cut else "PRUNED"
        budget = r.group.split(":", 1)[1] if isinstance(r.group, str) and ":" in r.group else ""
        tags = {"scaling_lab.kind": "trial", "study": study_name, "budget": budget, "flops_rule": "total",
                "trial_number": i, "allocation": "search", "trial_state": state}
        with tracking.run(experiment, r.run_id, parent_run_id=parent_id, tags=tags, system_metrics=False) as log:
            log.log_params({"n_params": r.n_params, "n_params_total": r.n_params_total, "tokens_trained": r.tokens,
                            "flops_kaplan": r.flops_kaplan, "flops_total": r.flops_total,
                            "tokens_per_step": r.tokens_per_step, "steps": int(cv["step"].max())})
            steps, vals = cv["step"].to_numpy(), cv["loss"].to_numpy()
            if state == "PRUNED":
                steps, vals = steps[: len(steps) // 2], vals[: len(vals) // 2]
            if train_points:
                last = int(steps.max())
                for st in range(1, last + 1, max(1, last // train_points)):
                    log.log_metrics({"train/loss": float(np.interp(st, steps, vals)) + 0.05}, step=st)
            for st, v in zip(steps, vals):
                log.log_metrics({"val/loss": float(v)}, step=int(st))
            if state == "COMPLETE":
                log.log_metrics({"final/val_loss": float(vals[-1])}, step=int(steps[-1]))
            log.flush()
    return parent_id


def load(cfg: AnalyzeConfig) -> Study:
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


def _curves_for(study: Study, conv: str) -> list[laws.Curve]:
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
    return laws.interval(samples[key]) if key in samples else {"lo": None, "hi": None, "se": None, "n": 0}


def _pair(ci: dict[str, float]) -> list[float | None]:
    return [ci.get("lo"), ci.get("hi")]


def fit_convention(study: Study, conv: str, cfg: AnalyzeConfig, extra_budgets: dict[str, float]) -> dict[str, Any]:
    """Every fit of one convention, with bootstrap intervals, leave-one-budget-out, verdict and extrapolation.
    Returns (json-able result, objects for figures)."""
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
    n_budgets = int(labels.max() + 1)
    if n_budgets < 2:
        raise ConfigError("budgets", 1, "runs at 2 or more FLOP budgets (all runs share one budget: no exponent "
                          "can be fitted)")
    k = laws.flops_factor(N, D, C)
    budgets_all = {**laws.NAMED_BUDGETS, **extra_budgets}
    bnames = list(budgets_all)
    bvals = np.array([budgets_all[b] for b in bnames])

    fit2 = laws.approach2(N, D, C, L, labels=labels)
    fit3 = laws.approach3(N, D, L, k=k)
    curves = _curves_for(study, conv)
    grid1 = laws.envelope_grid(curves)
    n1, Lm, Dm = laws.envelope_matrix(curves, grid1, cfg.rtol)
    fit1 = laws.approach1_matrix(grid1, n1, Lm, Dm)
    kap = kaplan_fits(N, D, L, fit1)
    curves_are_runs = all(len(c.flops) == 1 for c in curves) and len(curves) == len(N)

    c_lo, c_hi = float(C.min()), float(C.max())
    cgrid = np.exp(np.linspace(math.log(c_lo) - 0.3, math.log(c_hi) + 0.3, 100))
    boot: dict[str, np.ndarray] = {}
    samples: dict[str, np.ndarray] = {}
    if cfg.bootstrap:
        start3 = laws.a3_vector(fit3)
        fitted_budgets = np.array(fit2.budgets)
        lines: dict[str, list] = {"approach1": [], "approach2": [], "approach3": []}
        grids: dict[str, list] = {f"{a}/{w}_grid": [] for a in lines for w in "nd"}

        def one(idx: np.ndarray) -> dict[str, float]:
            """Refit every approach on one resample; an approach that cannot fit this resample (e.g. a budget
            left with fewer than 3 distinct sizes) is skipped for it, the others still count."""
            out: dict[str, float] = {}
            fits_b: dict[str, Any] = {}
            ii = idx if curves_are_runs else rng_curves.integers(0, len(curves), len(curves))
            attempts = (
                ("approach2", lambda: laws.approach2(N[idx], D[idx], C[idx], L[idx], labels=labels[idx])),
                ("approach3", lambda: laws.approach3(N[idx], D[idx], L[idx], k=k, starts=0, init=[start3])),
                ("approach1", lambda: laws.approach1_matrix(grid1, n1[ii], Lm[ii], Dm[ii])),
            )
            for a_name, make in attempts:
                try:
                    f = make()
                except (laws.FitError, np.linalg.LinAlgError, ValueError, ArithmeticError):
                    continue
                fits_b[a_name] = f
                out[f"{a_name}/a"], out[f"{a_name}/b"] = f.a, f.b
                for name, c in zip(bnames, bvals):
                    out[f"{a_name}/N@{name}"] = float(f.n_at(c))
                    out[f"{a_name}/D@{name}"] = float(f.d_at(c))
                for i, c in enumerate(fitted_budgets):
                    out[f"{a_name}/N@fitted{i}"] = float(f.n_at(c))
                lines[a_name].append((f.a, f.k_n) if a_name != "approach3" else (f.a, float(f.n_at(1.0))))
                grids[f"{a_name}/n_grid"].append(f.n_at(cgrid))
                grids[f"{a_name}/d_grid"].append(f.d_at(cgrid))
            f3 = fits_b.get("approach3")
            if f3 is not None:
                out.update({f"approach3/{p}": v for p, v in f3.params().items()})
                for name, c in zip(bnames, bvals):
                    out[f"approach3/L@{name}"] = float(f3.loss(f3.n_at(c), f3.d_at(c)))
            kn = kaplan_fits(N[idx], D[idx], L[idx], fits_b.get("approach1"), init=kap)
            for key, v in kn.items():
                for p in ("alpha", "alpha_N", "alpha_D", "a"):
                    if p in v:
                        out[f"kaplan/{key}/{p}"] = v[p]
            return out

        rng_curves = np.random.default_rng(cfg.seed + 1)
        strata = labels
        samples = laws.bootstrap(one, len(N), cfg.bootstrap, cfg.seed, strata=strata)
        boot = {k_: np.array(v) for k_, v in grids.items() if v}
        boot.update({f"{a}/params": np.array(v) for a, v in lines.items() if v})

    lobo = laws.leave_one_budget_out(N, D, C, L, labels, k=k) if n_budgets >= 3 else []

    a1 = {"a": fit1.a, "b": fit1.b, "ci95": {p: _pair(_ci(samples, f"approach1/{p}")) for p in ("a", "b")},
          "se": {p: _ci(samples, f"approach1/{p}")["se"] for p in ("a", "b")},
          "envelope": [{"flops": c, "n_opt": n, "d_opt": d, "loss": lo}
                       for c, n, d, lo in zip(fit1.flops, fit1.n_opt, fit1.d_opt, fit1.loss)],
          "from_curves": any(len(c.flops) > 1 for c in curves), "runs": len(curves)}
    a2 = {"a": fit2.a, "b": fit2.b, "ci95": {p: _pair(_ci(samples, f"approach2/{p}")) for p in ("a", "b")},
          "se": {p: _ci(samples, f"approach2/{p}")["se"] for p in ("a", "b")},
          "n_opt_by_budget": [
              {"budget": b, "n_opt": n, "d_opt": d, "minimum_inside_sampled_range": ok,
               "n_opt_ci95": _pair(_ci(samples, f"approach2/N@fitted{i}"))}
              for i, (b, n, d, ok) in enumerate(zip(fit2.budgets, fit2.n_opt, fit2.d_opt, fit2.inside))]}
    a3 = {**fit3.params(), "k": k,
          "ci95": {p: _pair(_ci(samples, f"approach3/{p}")) for p in ("E", "A", "B", "alpha", "beta", "a", "b")},
          "se": {p: _ci(samples, f"approach3/{p}")["se"] for p in ("alpha", "beta", "a", "b")},
          "n_opt_by_budget": [{"budget": b, "n_opt": float(fit3.n_at(b)),
                               "n_opt_ci95": _pair(_ci(samples, f"approach3/N@fitted{i}"))}
                              for i, b in enumerate(fit2.budgets)],
          "huber_delta": laws.HUBER_DELTA, "objective": fit3.objective, "at_bounds": list(fit3.at_bounds),
          "rms_rel_residual": float(np.sqrt(np.mean((fit3.loss(N, D) / L - 1) ** 2)))}
    for key, v in kap.items():
        for p in ("alpha", "alpha_N", "alpha_D", "a"):
            if p in v and f"kaplan/{key}/{p}" in samples:
                v.setdefault("ci95", {})[p] = _pair(_ci(samples, f"kaplan/{key}/{p}"))
                v.setdefault("se", {})[p] = _ci(samples, f"kaplan/{key}/{p}")["se"]

    verdicts = {}
    for name, a, key in (("approach1", fit1.a, "approach1/a"), ("approach2", fit2.a, "approach2/a"),
                         ("approach3", fit3.a, "approach3/a"), ("kaplan_eq1.5", kap["L_ND"]["a"], "kaplan/L_ND/a")):
        verdicts[name] = laws.verdict(a, _ci(samples, key))

    extrap = []
    for name, c in zip(bnames, bvals):
        for aname, f in (("approach1", fit1), ("approach2", fit2), ("approach3", fit3)):
            row = {"budget": name, "flops": float(c), "approach": aname, "factor": float(c / c_hi),
                   "n_opt": float(f.n_at(c)), "n_opt_ci95": _pair(_ci(samples, f"{aname}/N@{name}")),
                   "d_opt": float(f.d_at(c)), "d_opt_ci95": _pair(_ci(samples, f"{aname}/D@{name}"))}
            if aname == "approach3":
                row["loss"] = float(fit3.loss(f.n_at(c), f.d_at(c)))
                row["loss_ci95"] = _pair(_ci(samples, f"approach3/L@{name}"))
            extrap.append(row)

    result = {"N": ncol, "C": ccol, "flops_per_param_token": k, "runs": int(len(N)), "budgets": n_budgets,
              "fitted_flops_range": [c_lo, c_hi], "approach1": a1, "approach2": a2, "approach3": a3,
              "kaplan": kap, "verdict": verdicts, "leave_one_budget_out": lobo, "extrapolation": extrap,
              "bootstrap": {"resamples": cfg.bootstrap,
                            "kept": {a: int(len(samples.get(f"{a}/a", []))) for a in ("approach1", "approach2",
                                                                                      "approach3")},
                            "seed": cfg.seed, "strata": "budget"}}
    objects = {"fit1": fit1, "fit2": fit2, "fit3": fit3, "boot": boot, "labels": labels, "N": N, "D": D, "C": C,
               "L": L, "curves": curves, "budgets": budgets_all, "cgrid": cgrid}
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


def curve_extrapolation(study: Study, frac: float) -> dict[str, Any]:
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


def analyze_study(study: Study, cfg: AnalyzeConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit every convention present (or the one asked for); return (fits.json content, figure objects)."""
    with laws.one_blas_thread(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _analyze_study(study, cfg)


def _analyze_study(study: Study, cfg: AnalyzeConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    convs = list(study.conventions)
    if cfg.convention != "both":
        if cfg.convention not in convs:
            raise ConfigError("convention", cfg.convention, "one of " + ", ".join(["both", *convs]) +
                              " for this source (a CSV has one convention: its own columns)")
        convs = [cfg.convention]
    extra = {f"{b:.3g} FLOPs": b for b in parse_budgets(cfg.budgets)}
    results: dict[str, Any] = {"conventions": {}, "verdict": {}}
    objects: dict[str, Any] = {}
    for conv in convs:
        res, obj = fit_convention(study, conv, cfg, extra)
        results["conventions"][conv] = res
        results["verdict"][conv] = res["verdict"]
        objects[conv] = obj
    results["curve_extrapolation"] = curve_extrapolation(study, cfg.curve_frac)
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


# --------------------------------------------------------------------------- quick vs real

OVERLAY_ALLOWED = ("'simulate', an earlier analysis' fits.json (or the report folder holding it), or '' (no "
                   "overlay)")


@dataclass
class Prediction:
    """A law drawn over measured runs: L(N, D) = E + A/N^α + B/D^β, fitted (or chosen) in ``convention``."""

    law: laws.ChinchillaFit
    convention: str
    label: str


def load_prediction(spec: str) -> Prediction:
    """overlay=simulate -> the simulation's law (SIM_LAW, total convention); overlay=PATH -> the Approach 3 fit
    of that fits.json (its total convention when present, else the first with an Approach 3 fit)."""
    if spec == "simulate":
        return Prediction(laws.ChinchillaFit(**SIM_LAW), "total", "simulated law (source=simulate)")
    path = Path(spec)
    if path.is_dir():
        path = path / "fits.json"
    if not path.is_file():
        raise ConfigError("overlay", spec, OVERLAY_ALLOWED)
    try:
        convs = json.loads(path.read_text()).get("conventions") or {}
    except (OSError, ValueError, AttributeError):
        raise ConfigError("overlay", spec, "a fits.json written by analyze (JSON with 'conventions')") from None
    for conv in ("total", *convs):
        a3 = (convs.get(conv) or {}).get("approach3") or {}
        if all(isinstance(a3.get(k), (int, float)) for k in ("E", "A", "B", "alpha", "beta")):
            law = laws.ChinchillaFit(**{k: float(a3[k]) for k in ("E", "A", "B", "alpha", "beta")})
            return Prediction(law, conv, f"Approach 3 of {path} ({conv} convention)")
    raise ConfigError("overlay", spec, "a fits.json with an Approach 3 fit (conventions.<name>.approach3 with E, A, "
                      "B, alpha, beta)")


def overlay_prediction(pred: Prediction, results: dict[str, Any], objects: dict[str, Any]) -> dict[str, Any]:
    """The prediction against the measured runs, in the prediction's convention when the runs have it (else the
    first fitted one): per budget the measured Approach 2 minimum against the predicted N_opt (C = k·N·D with
    the runs' k), the predicted exponent a against the measured ones with their intervals, and the measured
    loss against the predicted loss of every run (log ratio)."""
    conv = pred.convention if pred.convention in objects else next(iter(objects))
    o, r = objects[conv], results["conventions"][conv]
    law = laws.ChinchillaFit(**{k: getattr(pred.law, k) for k in ("E", "A", "B", "alpha", "beta")},
                             k=r["flops_per_param_token"])
    fit2, N, D, L, labels = o["fit2"], o["N"], o["D"], o["L"], o["labels"]
    rows = []
    for c, n, ok, g in zip(fit2.budgets, fit2.n_opt, fit2.inside, fit2.groups):
        n_pred = float(law.n_at(c))
        rows.append({"budget": c, "n_opt_measured": n, "minimum_inside_sampled_range": ok, "n_opt_predicted": n_pred,
                     "ratio": n / n_pred, "loss_best_measured": float(L[labels == g].min()),
                     "loss_at_n_opt_predicted": float(law.loss(n_pred, law.d_at(c)))})
    log_ratio = np.log(L / law.loss(N, D))
    measured = {}
    for a in ("approach2", "approach3"):
        ci = r[a]["ci95"].get("a") or [None, None]
        inside = None if ci[0] is None else bool(ci[0] <= law.a <= ci[1])
        measured[a] = {"a": r[a]["a"], "ci95": ci, "prediction_inside_ci95": inside}
    return {"label": pred.label, "prediction_convention": pred.convention, "measured_convention": conv,
            "law": law.params(), "a_predicted": law.a, "measured": measured, "by_budget": rows,
            "n_opt_log10_ratio_mean": float(np.mean(np.log10([x["ratio"] for x in rows]))),
            "loss_log_ratio_median": float(np.median(log_ratio)),
            "loss_log_ratio_max_abs": float(np.max(np.abs(log_ratio)))}


# --------------------------------------------------------------------------- report


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _g(x: Any, fmt: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, fmt)


def _ci_txt(ci: list | None, fmt: str = ".4g") -> str:
    if not ci or ci[0] is None:
        return "n/a"
    return f"[{_g(ci[0], fmt)}, {_g(ci[1], fmt)}]"


def make_figures(results: dict[str, Any], objects: dict[str, Any], study: Study, folder: Path) -> dict[str, list]:
    """Every figure of every convention, PNG + SVG under ``folder``; returns {name: [paths]}."""
    from scaling_lab import figures as F

    out: dict[str, list] = {}
    for conv, o in objects.items():
        t = f"({conv} convention)"
        fits = {"approach1": o["fit1"], "approach2": o["fit2"], "approach3": o["fit3"]}
        out[f"isoflop_{conv}"] = F.isoflop(o["N"], o["L"], o["labels"], o["fit2"], folder, f"isoflop_{conv}",
                                           f"IsoFLOP curves, Approach 2 {t}")
        out[f"optimal_{conv}"] = F.optimal_vs_compute(fits, o["boot"], folder, f"optimal_{conv}",
                                                      f"Compute-optimal N and D {t}")
        out[f"contours_{conv}"] = F.contours(o["fit3"], o["N"], o["D"], o["fit2"].budgets, folder,
                                             f"contours_{conv}", f"Approach 3 loss over (N, D) {t}")
        curves = [c for c in o["curves"] if len(c.flops) > 1]
        out[f"curves_{conv}"] = F.training_curves(curves, {"N": o["N"], "D": o["D"], "L": o["L"]}, folder,
                                                  f"curves_{conv}", f"Training curves {t}")
        out[f"residuals_{conv}"] = F.fitted_vs_observed(o["fit3"], o["N"], o["D"], o["L"], folder,
                                                        f"residuals_{conv}", f"Approach 3 fit against runs {t}")
        rng = tuple(results["conventions"][conv]["fitted_flops_range"])
        out[f"extrapolation_{conv}"] = F.extrapolation(fits, o["boot"], rng, o["budgets"], folder,
                                                       f"extrapolation_{conv}", f"Extrapolation {t}")
    ov = results.get("overlay")
    if ov:
        o = objects[ov["measured_convention"]]
        law = laws.ChinchillaFit(**{k: ov["law"][k] for k in ("E", "A", "B", "alpha", "beta")},
                                 k=results["conventions"][ov["measured_convention"]]["flops_per_param_token"])
        out["overlay"] = F.overlay(o["N"], o["L"], o["labels"], o["fit2"], law, ov["label"], folder, "overlay",
                                   f"Quick vs real: prediction over measured runs ({ov['measured_convention']})")
    ce = results.get("curve_extrapolation", {})
    if ce.get("runs"):
        out["curve_extrapolation"] = F.curve_extrapolation(ce["per_run"], folder, "curve_extrapolation")
    return out


def report_blocks(results: dict[str, Any], figs: dict[str, list]) -> list[tuple]:
    """The report as blocks ('h1'|'h2'|'h3'|'p'|'pre', text) | ('table', header, rows) | ('img', file, caption);
    rendered to Markdown and to HTML."""
    B: list[tuple] = [("h1", "Scaling-law analysis")]
    prov = results["provenance"]
    B.append(("h2", "Verdict"))
    lines = []
    for conv, vs in results["verdict"].items():
        for name, v in vs.items():
            if v.get("a") is None:
                continue
            lines.append(laws.verdict_sentence(f"{conv} / {name}", v))
    B.append(("pre", "\n".join(lines)))
    B.append(("p", f"References: Kaplan et al. 2020 (arXiv:2001.08361) N_opt ∝ C^{laws.KAPLAN_A}; Hoffmann et al. "
                   f"2022 (arXiv:2203.15556) N_opt ∝ C^{laws.CHINCHILLA_A}. Intervals: percentile bootstrap over "
                   f"runs resampled within each budget; SE = bootstrap standard deviation."))
    sim = results.get("simulation")
    if sim:
        B.append(("h2", "Simulation: true against recovered (Approach 3)"))
        rows = [[k, _g(sim["truth"][k]), _g(sim["recovered"][k]), _ci_txt(sim["ci95"].get(k))]
                for k in ("E", "A", "B", "alpha", "beta", "a", "b")]
        B.append(("table", ["parameter", "true", "recovered", "95% interval"], rows))
        B.append(("p", f"Approach 2 recovered a = {_g(sim['approach2_a'])} (true {_g(sim['truth']['a'])})."))
    for conv, r in results["conventions"].items():
        B.append(("h2", f"Convention: {conv} (N = {r['N']}, C = {r['C']})"))
        B.append(("p", f"{r['runs']} runs in {r['budgets']} budgets, C from {r['fitted_flops_range'][0]:.3g} to "
                       f"{r['fitted_flops_range'][1]:.3g} FLOPs; C/(N·D) = {r['flops_per_param_token']:.3g}; "
                       f"bootstrap resamples kept of {r['bootstrap']['resamples']}: "
                       + ", ".join(f"{a} {n}" for a, n in r["bootstrap"]["kept"].items())
                       + f" (seed {r['bootstrap']['seed']})."))
        a3, a2, a1 = r["approach3"], r["approach2"], r["approach1"]
        rows = [[f"Approach 3 {p}", _g(a3[p]), _ci_txt(a3["ci95"].get(p))]
                for p in ("E", "A", "B", "alpha", "beta", "a", "b")]
        rows += [[f"Approach 2 {p}", _g(a2[p]), _ci_txt(a2["ci95"].get(p))] for p in ("a", "b")]
        rows += [[f"Approach 1 {p}", _g(a1[p]), _ci_txt(a1["ci95"].get(p))] for p in ("a", "b")]
        kl = r["kaplan"].get("L_ND", {})
        for p in ("alpha_N", "alpha_D", "a"):
            rows.append([f"Kaplan Eq. 1.5 {p}", _g(kl.get(p)), _ci_txt(kl.get("ci95", {}).get(p))])
        for key in ("L_N", "L_D", "L_C"):
            for suffix in ("", "_irreducible"):
                v = r["kaplan"].get(key + suffix, {})
                if "alpha" in v:
                    extra = f" (E = {_g(v['E'])})" if suffix else ""
                    rows.append([f"Kaplan {key}{suffix} alpha", _g(v["alpha"]) + extra,
                                 _ci_txt(v.get("ci95", {}).get("alpha"))])
        B.append(("table", ["parameter", "fit", "95% interval"], rows))
        if a3.get("at_bounds"):
            B.append(("p", f"Warning: Approach 3 left {', '.join(a3['at_bounds'])} on a bound of its search box "
                           "(e.g. E -> 0): the data do not pin that parameter down."))
        B.append(("p", f"Approach 3 RMS relative residual {100 * a3['rms_rel_residual']:.2f}%; Approach 1 from "
                       f"{'training curves' if a1['from_curves'] else 'final losses only'} ({a1['runs']} runs)."))
        rows = [[_g(b["budget"], ".3g"), _g(b["n_opt"], ".4g"), _ci_txt(b["n_opt_ci95"]), _g(b["d_opt"], ".4g"),
                 "yes" if b["minimum_inside_sampled_range"] else "NO (edge)"] for b in a2["n_opt_by_budget"]]
        B.append(("h3", "Approach 2: N_opt by budget"))
        B.append(("table", ["budget C", "N_opt", "95% interval", "D_opt", "minimum inside sampled N"], rows))
        if r["leave_one_budget_out"]:
            B.append(("h3", "Leave one budget out"))
            rows = [[_g(x["budget"], ".3g"), x["runs"], _g(x.get("n_opt_observed")), _g(x.get("n_opt_predicted")),
                     _g(x.get("a2_log10_ratio"), "+.3f"), _g(100 * x["a3_loss_rel_err"], ".2f") + "%"
                     if "a3_loss_rel_err" in x else "n/a"] for x in r["leave_one_budget_out"]]
            B.append(("table", ["held-out C", "runs", "N_opt (its parabola)", "N_opt (A2 on the rest)",
                                "log10 ratio", "A3 loss error"], rows))
        B.append(("h3", "Extrapolation (beyond the fitted range by the stated factor)"))
        rows = [[x["budget"], _g(x["flops"], ".3g"), x["approach"], f"{x['factor']:.2g}x",
                 _g(x["n_opt"], ".3g"), _ci_txt(x["n_opt_ci95"], ".3g"), _g(x["d_opt"], ".3g"),
                 _ci_txt(x["d_opt_ci95"], ".3g"), _g(x.get("loss"), ".4g"), _ci_txt(x.get("loss_ci95"))]
                for x in r["extrapolation"]]
        B.append(("table", ["budget", "C", "approach", "beyond fit", "N_opt", "95%", "D_opt", "95%", "loss", "95%"],
                  rows))
        for name, cap in (("isoflop", "IsoFLOP curves, parabolas and minima"),
                          ("optimal", "N_opt and D_opt against C, fitted lines with 95% bands, reference slopes"),
                          ("contours", "Approach 3 loss contours, iso-FLOP lines, compute-optimal frontier"),
                          ("curves", "Training curves"), ("residuals", "Fitted against observed, residuals"),
                          ("extrapolation", "Extrapolation to named budgets")):
            key = f"{name}_{conv}"
            if key in figs:
                B.append(("img", Path(figs[key][0]).name, f"{cap} ({conv})"))
    ov = results.get("overlay")
    if ov:
        B.append(("h2", "Quick vs real: prediction over the measured runs"))
        law = ov["law"]
        B.append(("p", f"Prediction: {ov['label']}, L = {_g(law['E'])} + {_g(law['A'])}/N^{_g(law['alpha'], '.3g')}"
                       f" + {_g(law['B'])}/D^{_g(law['beta'], '.3g')} ({ov['prediction_convention']} convention), "
                       f"drawn over the runs in the {ov['measured_convention']} convention. Predicted a = "
                       f"{_g(ov['a_predicted'], '.3f')}; measured "
                       + "; ".join(f"{a} a = {_g(m['a'], '.3f')} {_ci_txt(m['ci95'], '.3f')}"
                                   + ("" if m["prediction_inside_ci95"] is None else
                                      " (prediction inside)" if m["prediction_inside_ci95"] else
                                      " (prediction outside)") for a, m in ov["measured"].items())
                       + f". Measured N_opt / predicted N_opt: mean log10 ratio {_g(ov['n_opt_log10_ratio_mean'], '+.3f')}"
                       f"; measured / predicted loss per run: median log ratio "
                       f"{_g(ov['loss_log_ratio_median'], '+.3f')}, largest |log ratio| "
                       f"{_g(ov['loss_log_ratio_max_abs'], '.3f')}."))
        rows = [[_g(x["budget"], ".3g"), _g(x["n_opt_measured"], ".4g") + ("" if x["minimum_inside_sampled_range"]
                                                                          else " (edge)"),
                 _g(x["n_opt_predicted"], ".4g"), _g(x["ratio"], ".3g"), _g(x["loss_best_measured"], ".4g"),
                 _g(x["loss_at_n_opt_predicted"], ".4g")] for x in ov["by_budget"]]
        B.append(("table", ["budget C", "N_opt measured (Approach 2)", "N_opt predicted", "measured / predicted",
                            "best loss measured", "loss predicted at its N_opt"], rows))
        if "overlay" in figs:
            B.append(("img", "overlay.png", "Measured isoFLOP points and minima (markers) against the prediction "
                                            "(dashed curves, crosses)"))
    ce = results.get("curve_extrapolation", {})
    B.append(("h2", "Learning-curve extrapolation"))
    if ce.get("runs"):
        B.append(("p", f"L(step) = a·step^-b + c fitted on the first {100 * ce['frac']:.0f}% of each validation "
                       f"curve, predicting its last value, over {ce['runs']} runs: median |error| "
                       f"{100 * ce['median_abs_rel_err']:.2f}%, mean {100 * ce['mean_abs_rel_err']:.2f}%, max "
                       f"{100 * ce['max_abs_rel_err']:.2f}%, mean signed {100 * ce['mean_rel_err']:+.2f}%; "
                       f"{100 * ce['within_5pct']:.0f}% of runs within 5%."))
        if "curve_extrapolation" in figs:
            B.append(("img", "curve_extrapolation.png", "Predicted against actual final loss"))
    else:
        B.append(("p", ce.get("note", "no curves")))
    B.append(("h2", "Provenance"))
    p_rows = [[k, json.dumps(_jsonable(v)) if not isinstance(v, str) else v] for k, v in prov.items()
              if k != "run_ids"]
    if "run_ids" in prov:
        p_rows.append(["runs", f"{len(prov['run_ids'])} run ids (fits.json: provenance.run_ids)"])
    B.append(("table", ["item", "value"], p_rows))
    return B


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "pre":
            out.append("```\n" + b[1] + "\n```")
        elif kind == "table":
            out.append("| " + " | ".join(map(str, b[1])) + " |\n|" + "---|" * len(b[1]))
            out[-1] += "".join("\n| " + " | ".join(map(str, r)) + " |" for r in b[2])
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})")
    return "\n\n".join(out) + "\n"


def render_html(blocks: list[tuple], folder: Path) -> str:
    """One self-contained page: PNGs inlined as data URIs."""
    esc = html.escape
    body = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{esc(b[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{esc(b[1])}</p>")
        elif kind == "pre":
            body.append(f"<pre>{esc(b[1])}</pre>")
        elif kind == "table":
            head = "".join(f"<th>{esc(str(h))}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((folder / b[1]).read_bytes()).decode()
            body.append(f'<figure><img alt="{esc(b[2])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{esc(b[2])}</figcaption></figure>")
    css = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:.85em}td,th{border:1px solid #ccc;"
           "padding:3px 7px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
           "img{max-width:100%}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}"
           "pre{background:#f6f6f6;padding:.7em;white-space:pre-wrap;font-size:.85em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Scaling-law analysis</title>"
            f"<style>{css}</style></head><body>{''.join(body)}</body></html>\n")


def default_out() -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("reports") / f"analyze-{stamp}"


def write_report(results: dict[str, Any], objects: dict[str, Any], study: Study, out: str | Path) -> Path:
    """fits.json, figures (PNG + SVG), runs.csv (the fitted table), report.md and report.html under ``out``."""
    folder = Path(out) if out else default_out()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fits.json").write_text(json.dumps(_jsonable(results), indent=2))
    study.runs.to_csv(folder / "runs.csv", index=False)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # wild bootstrap lines -> inf, not noise
        figs = make_figures(results, objects, study, folder)
    blocks = report_blocks(results, figs)
    (folder / "report.md").write_text(render_markdown(blocks))
    (folder / "report.html").write_text(render_html(blocks, folder))
    return folder


# --------------------------------------------------------------------------- entry point


def _metrics(results: dict[str, Any]) -> dict[str, float]:
    out = {}
    for conv, r in results["conventions"].items():
        for a in ("approach1", "approach2", "approach3"):
            for p in ("a", "b"):
                out[f"{conv}/{a}/{p}"] = r[a][p]
                ci = r[a]["ci95"].get(p) or [None, None]
                if ci[0] is not None:
                    out[f"{conv}/{a}/{p}_lo"], out[f"{conv}/{a}/{p}_hi"] = ci
        for p in ("E", "A", "B", "alpha", "beta"):
            out[f"{conv}/approach3/{p}"] = r["approach3"][p]
    ov = results.get("overlay")
    if ov:
        out["overlay/a_predicted"] = ov["a_predicted"]
        out["overlay/n_opt_log10_ratio_mean"] = ov["n_opt_log10_ratio_mean"]
        out["overlay/loss_log_ratio_median"] = ov["loss_log_ratio_median"]
    ce = results.get("curve_extrapolation", {})
    if ce.get("runs"):
        out["curve_extrapolation/median_abs_rel_err"] = ce["median_abs_rel_err"]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def run_analysis(cfg: AnalyzeConfig) -> tuple[dict[str, Any], Path]:
    """Load, fit, write the report folder (no MLflow logging); returns (results, folder)."""
    study = load(cfg)
    results, objects = analyze_study(study, cfg)
    folder = write_report(results, objects, study, cfg.out)
    return results, folder


def main(argv: list[str]) -> int:
    """The ``analyze`` entry point: fit, print the verdict, write the report and log it to MLflow."""
    from scaling_lab import cli, tracking

    launched = os.environ.get("MLFLOW_RUN_ID")
    t0 = time.perf_counter()
    try:
        cfg = parse_config(cli.parse(argv, field_names(), "Fit scaling laws to stored runs, a CSV or a simulation; "
                                                          "write a report and log it to MLflow."))
        study = load(cfg)
        results, objects = analyze_study(study, cfg)
    except ConfigError as exc:
        cli.error(str(exc))
        if launched:
            tracking.fail_run(launched, str(exc))
        return 2
    folder = write_report(results, objects, study, cfg.out)
    for conv, vs in results["verdict"].items():
        for name, v in vs.items():
            if v.get("a") is not None:
                print(laws.verdict_sentence(f"{conv} / {name}", v))
    ov = results.get("overlay")
    if ov:
        m = ov["measured"]["approach3"]
        print(f"quick vs real ({ov['label']}): predicted a = {ov['a_predicted']:.3f}, measured approach3 a = "
              f"{m['a']:.3f} {_ci_txt(m['ci95'], '.3f')}; measured / predicted N_opt by budget: "
              + ", ".join(f"{x['budget']:.2g}: {x['ratio']:.2f}" for x in ov["by_budget"]))
    ce = results["curve_extrapolation"]
    if ce.get("runs"):
        print(f"learning-curve extrapolation ({ce['runs']} runs, first {100 * cfg.curve_frac:.0f}%): median |error| "
              f"{100 * ce['median_abs_rel_err']:.2f}%, max {100 * ce['max_abs_rel_err']:.2f}%")
    run_id = ""
    if cfg.log:
        experiment = cfg.experiment.split(",")[0].strip() or "scaling-lab"
        tags = {"scaling_lab.kind": "analyze", "source": cfg.source}
        with tracking.run(experiment, f"analyze-{cfg.source}", tags=tags, system_metrics=False) as log:
            log.log_params({**{k: v for k, v in results["config"].items()},
                            "runs": sum(r["runs"] for r in results["conventions"].values()),
                            **({"csv_sha256": study.provenance["sha256"]} if "sha256" in study.provenance else {})})
            log.log_metrics(_metrics(results), step=0)
            log.flush()
            tracking.log_report(log.run_id, folder)
            run_id = log.run_id
    took = time.perf_counter() - t0
    print(f"report: {folder / 'report.html'} (fits.json, report.md, figures) in {took:.1f} s"
          + (f"; logged to MLflow run {run_id}" if run_id else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
