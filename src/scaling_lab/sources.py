"""The analysis' inputs: a table of runs (final values, loss curves, provenance) from the MLflow store, a CSV,
or a simulation drawn from a known law; and ``log_study``, which writes a simulated study into MLflow the way a
search stores one (for demos, tests and benchmarks). Runs are selected by tags, never by names.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from scaling_lab import counting, family, laws, tracking
from scaling_lab.errors import ConfigError

# convention -> (N column, C column). kaplan: non-embedding N with C = 6N·D (Kaplan et al. 2020, Sec. 2.1);
# total: all parameters with C = 6·N_total·D (as Hoffmann et al. 2022 count N); csv: the CSV's own columns.
# exact: all parameters with C = the forward+backward matmul FLOPs the model does (counting.flops_per_token_exact:
# output head and attention scores included; Porian et al. 2024 count the head this way).
CONVENTIONS = {"kaplan": ("n_params", "flops_kaplan"), "total": ("n_params_total", "flops_total"),
               "exact": ("n_params_total", "flops_exact"), "csv": ("n_params", "flops")}
CSV_KEYS_REQUIRED = ("params", "loss")
CSV_KEYS = ("params", "tokens", "flops", "loss", "budget", "run")
HISTORY_KEYS = ("val/loss",)


def parse_tags(spec: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise ConfigError("tags", spec, "comma-separated key=value pairs, e.g. study=quick,flops_rule=total")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out




@dataclass
class RunTable:
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
               provenance: dict[str, Any] | None = None) -> RunTable:
    """An MLflow runs frame (``tracking.runs_frame``) -> RunTable. Keeps FINISHED train/trial runs with N and a final
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
        "flops_exact": _num(base, "params.flops_exact").values,
        "epochs": _num(base, "params.epochs").values,
        "seed": _num(base, "params.seed").fillna(_num(base, "params.resolved.seed")).values,  # older stores: resolved.*
        "loss": _num(base, "metrics.final/val_loss").values,
        "tokens_per_step": _num(base, "params.tokens_per_step").values,
        "status": base["status"].values,
        "state": state[base.index].values,
        "budget": _num(base, "tags.budget").values,
        "flops_rule": base.get("tags.flops_rule", pd.Series("", index=base.index)).fillna("").values,
        "protocol": base.get("tags.protocol", pd.Series("", index=base.index)).fillna("").values,  # an ablation step
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
    convs = ("kaplan", "total") + (("exact",) if final["flops_exact"].notna().all() and len(final) else ())
    return RunTable(final.reset_index(drop=True), curves, curve_runs.reset_index(drop=True), prov, convs)


class RunQuery(Protocol):
    """Which stored runs to read (AnalyzeConfig has these fields)."""

    experiment: str
    """Experiment names, comma-separated ('*' = every experiment)."""
    filter_string: str
    parent_run: str
    tags: str


def load_mlflow(cfg: RunQuery, with_histories: bool = True) -> RunTable:
    """The selected runs of the tracking store with their val/loss histories."""
    exps = [e.strip() for e in cfg.experiment.split(",") if e.strip() and e.strip() != "*"] or None
    frame = tracking.runs_frame(exps, cfg.filter_string, cfg.parent_run, parse_tags(cfg.tags))
    hist = None
    if with_histories and not frame.empty and "params.n_params" in frame.columns:
        ids = frame.loc[frame["params.n_params"].notna(), "run_id"].tolist()
        hist = tracking.metric_histories(ids, list(HISTORY_KEYS))
    prov = {"tracking_uri": tracking.masked(tracking.tracking_uri()), "experiment": cfg.experiment,
            "parent_run": cfg.parent_run, "tags": cfg.tags, "filter_string": cfg.filter_string}
    return from_frame(frame, hist, prov)


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


def load_csv(path: str | Path, columns: str = "", rtol: float = 0.05) -> RunTable:
    """A CSV of results -> RunTable (convention 'csv': N, D, C as the file gives them). tokens or flops may be
    absent: D = C/(6N) or C = 6ND."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("csv", str(path), "an existing CSV file")
    raw = p.read_bytes()
    need = "a CSV with a header line (params, loss, tokens or flops, ...) and one row per run"
    if not raw.strip():
        raise ConfigError("csv", str(path), f"{need} (the file is empty)")
    try:
        df = pd.read_csv(io.BytesIO(raw))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        why = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ConfigError("csv", str(path), f"{need} ({type(exc).__name__}: {why})") from None
    if df.empty:
        raise ConfigError("csv", str(path), f"{need} (it has the header only: {', '.join(map(str, df.columns))})")
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
    return RunTable(runs, {}, None, prov, ("csv",))


# Simulation: an illustrative law in total N (not a published fit): Hoffmann et al.'s exponents with A, B, E
# chosen so that the minimum at C = 1e12 lands near the N_total ≈ 44k measured on CPU (design/PROBES.md).
SIM_LAW = {"E": 1.8, "A": 40.0, "B": 60.0, "alpha": 0.34, "beta": 0.28}
SIM_SHAPES = [(f.n_layer, f.n_embd) for f in family.family(513, 128)  # the search's family, 18 sizes 6.9k..2.2M N_total
              if f.n_params_total >= 6_000][:18]
SIM_BUDGETS = [3e11, 1e12, 3e12, 1e13]  # FLOPs under the total rule
SIM_VOCAB, SIM_BLOCK, SIM_TOKENS_PER_STEP = 513, 128, 2048  # quick mode: vocab_size 512 (+ end-of-text), 16 x 128


def simulate(seed: int = 0, noise: float = 0.01, law: dict[str, float] | None = None,
             shapes=SIM_SHAPES, budgets=SIM_BUDGETS, evals: int = 10) -> RunTable:
    """A quick-mode isoFLOP study drawn from ``law`` (in total N, C = 6 N_total D) with log-normal noise:
    each shape at each budget, validation loss at 10%, 20%, ... 100% of its tokens."""
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
    return RunTable(runs, curves, runs.copy(), prov, ("kaplan", "total"), truth)


def log_study(study: RunTable, experiment: str, study_name: str = "simulated", train_points: int = 0,
              pruned: int = 0) -> str:
    """Write a (simulated) study to MLflow the way a search stores one: a study parent run and one trial child
    per run with the agreed params, tags and metrics (val/loss history, final/val_loss). ``train_points`` > 0 also
    logs about that many train/loss values per run (every step when the run has fewer). The last ``pruned`` runs
    are stored as PRUNED trials (curve cut at half). Returns the parent run id. For demos, tests, benchmarks."""
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
