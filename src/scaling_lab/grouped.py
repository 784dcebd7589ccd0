"""The analysis of runs split by a tag (``group_by=protocol``: the steps of an ablation, ``scaling_lab.ablation``):
one full fit per group (``analyze.analyze_study``), a row per group with a (Approaches 2 and 3) and its 95% interval
under each counting convention, how much each group moved a from the one before, the N_opt(C) figure of every group
(Porian et al. 2024, Fig. 1 style), fits.json (one entry per group), report.md and report.html. No MLflow import.

The change in a between two groups is read in each group's own convention (the ablation's kaplan step in the kaplan
convention, the others in total: counting the head is itself a step); its 95% interval is a normal approximation
from the two bootstrap standard errors (the groups are independent studies, so their variances add). A change
"moved a" when that interval excludes 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from scaling_lab import analyze, figures, laws, report, resampling
from scaling_lab.errors import ConfigError
from scaling_lab.sources import RunTable

APPROACHES = ("approach2", "approach3")
Z95 = 1.959964


def split(study: RunTable, key: str, order: tuple[str, ...] = (), keep: tuple[str, ...] | None = None
          ) -> dict[str, RunTable]:
    """{value: the runs whose ``key`` column has it}, in ``order`` (unknown values after it, sorted); runs without
    a value are left out; ``keep`` restricts the values. ConfigError when no run has one."""
    runs = study.runs
    col = runs[key].fillna("").astype(str) if key in runs.columns else None
    if col is None or not (col != "").any():
        raise ConfigError("group_by", key, f"runs tagged {key}=<value> (an ablation's trials); none among the "
                          f"{len(runs)} selected runs")
    values = sorted({v for v in col if v and (keep is None or v in keep)},
                    key=lambda v: (order.index(v) if v in order else len(order), v))
    if not values:
        raise ConfigError("group_by", key, f"runs tagged {key} = one of {', '.join(keep or ())}; the selected runs "
                          f"have {', '.join(sorted(set(col) - {''}))}")
    out = {}
    for v in values:
        sub = runs[col == v].reset_index(drop=True)
        cr = study.curve_runs
        cr = cr[cr[key].fillna("") == v].reset_index(drop=True) if cr is not None and key in cr.columns else None
        ids = set(cr["run_id"]) if cr is not None else set(sub["run_id"])
        prov = {**study.provenance, key: v, "run_ids": sub["run_id"].tolist()}
        out[v] = RunTable(sub, {r: c for r, c in study.curves.items() if r in ids}, cr, prov, study.conventions)
    return out


def _row(name: str, res: dict[str, Any] | None, own: str, error: str = "") -> dict[str, Any]:
    """One group's row: a, 95% interval and SE of Approaches 2 and 3 under each convention."""
    row: dict[str, Any] = {"group": name, "own_convention": own, "error": error, "conventions": {},
                           "approach2_error": (res or {}).get("approach2_error", "")}
    for conv, r in (res or {}).get("conventions", {}).items():
        row["conventions"][conv] = {"runs": r["runs"], "budgets": r["budgets"],
                                    "approach2_dropped": len(r["approach2"].get("dropped", []))}
        for a in APPROACHES:
            row["conventions"][conv][a] = {"a": r[a]["a"], "ci95": r[a]["ci95"].get("a"), "se": r[a]["se"].get("a")}
    return row


def approach3_only(sub: RunTable, cfg: analyze.AnalyzeConfig, reason: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A group the full analysis cannot fit (typically: no isoFLOP minimum bracketed, so no Approach 2): Approach 3
    alone under each convention, its interval from ``cfg.bootstrap`` resamples of the runs within each budget, and
    Approach 2 reported with the reason. ConfigError when no convention has the runs Approach 3 needs."""
    res: dict[str, Any] = {"approach2_error": reason, "conventions": {}, "verdict": {}}
    objects: dict[str, Any] = {}
    for conv in sub.conventions:
        try:
            d = analyze.convention_data(sub, conv, cfg, {})
            fit = laws.approach3(d.N, d.D, d.L, k=d.k)
        except (ConfigError, laws.FitError):
            continue
        starts = laws.a3_starts(d.N, d.D, d.L, fit, n=analyze.A3_STARTS)

        def one(idx: np.ndarray, d: analyze.ConventionData = d, starts: list = starts) -> dict[str, float]:
            return {"a": laws.approach3(d.N[idx], d.D[idx], d.L[idx], k=d.k, starts=0, init=starts).a}

        ci = resampling.interval(resampling.bootstrap(one, len(d.N), cfg.bootstrap, cfg.seed, strata=d.labels).get(
            "a", np.array([]))) if cfg.bootstrap else {"lo": None, "hi": None, "se": None}
        lo, hi = (ci["lo"], ci["hi"]) if ci["lo"] is not None and math.isfinite(ci["lo"]) else (None, None)
        res["conventions"][conv] = {
            "runs": int(len(d.N)), "budgets": d.n_budgets,
            "approach2": {"a": None, "ci95": {"a": [None, None]}, "se": {"a": None}, "error": reason},
            "approach3": {**fit.params(), "ci95": {"a": [lo, hi]}, "se": {"a": ci["se"]}}}
        res["verdict"][conv] = {"approach3": laws.verdict(fit.a, ci)}
        objects[conv] = {"fit2": None, "fit3": fit, "budgets_c": laws.budget_centers(d.C, d.labels)}
    if not res["conventions"]:
        raise ConfigError("group_by", cfg.group_by, f"enough runs for Approach 3 ({reason})")
    return res, objects


def _own(row: dict[str, Any]) -> dict[str, Any] | None:
    """The row's values in its own convention (or the first it has)."""
    convs = row["conventions"]
    return convs.get(row["own_convention"]) or next(iter(convs.values()), None)


def moves(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The change in a from each group to the next, per approach, each in its own convention."""
    out = []
    for prev, cur in zip(rows, rows[1:]):
        p, c = _own(prev), _own(cur)
        if p is None or c is None:
            continue
        for a in APPROACHES:
            a0, a1, s0, s1 = p[a]["a"], c[a]["a"], p[a]["se"], c[a]["se"]
            if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (a0, a1)):
                continue
            delta = a1 - a0
            se = math.hypot(s0, s1) if all(isinstance(x, (int, float)) and math.isfinite(x) for x in (s0, s1)) \
                else float("nan")
            ci = [delta - Z95 * se, delta + Z95 * se] if math.isfinite(se) else [None, None]
            out.append({"from": prev["group"], "to": cur["group"], "approach": a, "from_convention":
                        prev["own_convention"], "to_convention": cur["own_convention"], "a_from": a0, "a_to": a1,
                        "delta": delta, "ci95": ci, "moved": ci[0] is not None and (ci[0] > 0 or ci[1] < 0)})
    return out


def _fmt_move(m: dict[str, Any]) -> str:
    ci = m["ci95"]
    iv = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci[0] is not None else " (no interval)"
    return f"{m['to']} {m['delta']:+.3f}{iv}"


def summary(rows: list[dict[str, Any]], mv: list[dict[str, Any]]) -> str:
    """The sentence: which groups moved a and by how much, with intervals, and from the first group to the last."""
    parts = []
    for a, label in (("approach2", "Approach 2"), ("approach3", "Approach 3")):
        ms = [m for m in mv if m["approach"] == a]
        if not ms:
            continue
        moved = [_fmt_move(m) for m in ms if m["moved"]]
        still = [_fmt_move(m) for m in ms if not m["moved"]]
        parts.append(f"{label}: " + (f"moved a: {'; '.join(moved)}" if moved else "no step moved a beyond its "
                                     "interval") + (f"; within the noise: {'; '.join(still)}" if still else ""))
    first, last = _own(rows[0]) if rows else None, _own(rows[-1]) if rows else None
    ends = ""
    if first and last and len(rows) > 1:
        f2, l2 = first["approach2"], last["approach2"]
        ends = (f" From {rows[0]['group']} to {rows[-1]['group']} (Approach 2): a = {report._g(f2['a'], '.3f')} "
                f"{report.ci_txt(f2['ci95'], '.3f')} -> {report._g(l2['a'], '.3f')} {report.ci_txt(l2['ci95'], '.3f')}"
                f" (Kaplan {laws.KAPLAN_A:.2f}, Chinchilla {laws.CHINCHILLA_A:.2f}).")
    head = ("Change in a from the step before, each step in its own convention (95% interval from the two bootstrap "
            "SEs). ")
    return head + (". ".join(parts) + "." if parts else "No two consecutive steps could both be fitted.") + ends


def _panel(name: str, own: str, obj: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    """What the N_opt(C) figure draws for one group: Approach 2's minima, its line and Approach 3's."""
    fit2, fit3 = obj["fit2"], obj["fit3"]
    cs = np.asarray(fit2.budgets if fit2 is not None else obj["budgets_c"], dtype=float)
    grid = np.exp(np.linspace(math.log(cs.min()) - 0.3, math.log(cs.max()) + 0.3, 50))
    r = res["conventions"][own]
    return {"name": name, "convention": own, "budgets": cs if fit2 is not None else cs[:0],
            "n_opt": np.asarray(fit2.n_opt if fit2 is not None else [], dtype=float), "grid": grid,
            "approach2": fit2.n_at(grid) if fit2 is not None else None, "approach3": fit3.n_at(grid),
            "a2": (r["approach2"]["a"], r["approach2"]["ci95"].get("a")),
            "a3": (r["approach3"]["a"], r["approach3"]["ci95"].get("a")),
            "n_label": "non-embedding N" if own == "kaplan" else "N (all parameters)"}


def analyze_groups(study: RunTable, cfg: analyze.AnalyzeConfig, order: tuple[str, ...] = (),
                   own: dict[str, str] | None = None, keep: tuple[str, ...] | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One fit per group of ``cfg.group_by``; a group that cannot be fitted is reported with its reason. Returns
    (fits.json content, objects for the figure)."""
    groups = split(study, cfg.group_by, order, keep)
    own = own or {}
    results: dict[str, Any] = {"group_by": cfg.group_by, "groups": list(groups), cfg.group_by: {}, "rows": []}
    panels = []
    for name, sub in groups.items():
        try:
            res, objects = analyze.analyze_study(sub, cfg)
        except (ConfigError, laws.FitError) as exc:
            try:
                res, objects = approach3_only(sub, cfg, str(exc))
            except (ConfigError, laws.FitError) as exc2:
                results["rows"].append(_row(name, None, own.get(name, "total"), str(exc2)))
                results[cfg.group_by][name] = {"error": str(exc2), "runs": len(sub.runs)}
                continue
        conv = own.get(name, "total")
        conv = conv if conv in res["conventions"] else next(iter(res["conventions"]))
        res.pop("provenance", None)
        results[cfg.group_by][name] = res
        results["rows"].append(_row(name, res, conv))
        panels.append(_panel(name, conv, objects[conv], res))
    if not panels:
        raise ConfigError("group_by", cfg.group_by, "groups with enough runs to fit; " + "; ".join(
            f"{r['group']}: {r['error']}" for r in results["rows"]))
    results["moves"] = moves([r for r in results["rows"] if not r["error"]])
    results["summary"] = summary([r for r in results["rows"] if not r["error"]], results["moves"])
    results["provenance"] = study.provenance
    results["config"] = {k: v for k, v in vars(cfg).items()}
    return results, {"panels": panels}


# --------------------------------------------------------------------------- the report


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The side-by-side table: one row per group, a and its interval for Approaches 2 and 3 under each convention."""
    known = ("kaplan", "total", "exact")
    convs = sorted({c for r in results["rows"] for c in r["conventions"]},
                   key=lambda c: (known.index(c) if c in known else len(known), c))
    head = ["step", "own convention", "runs", "budgets"] + [f"{a} a ({c})" for c in convs for a in ("A2", "A3")]
    rows = []
    for r in results["rows"]:
        o = _own(r) or {}
        cells = [r["group"], r["own_convention"], str(o.get("runs", "-")), str(o.get("budgets", "-"))]
        for c in convs:
            v = r["conventions"].get(c)
            for a in APPROACHES:
                cells.append(f"{report._g(v[a]['a'], '.3f')} {report.ci_txt(v[a]['ci95'], '.3f')}" if v else
                             (r["error"][:60] or "-"))
        rows.append(cells)
    return head, rows


def report_blocks(results: dict[str, Any], figs: dict[str, list]) -> list[tuple]:
    """The report: the table, the sentence, the figure, each group's verdict lines, provenance."""
    head, rows = table_rows(results)
    B: list[tuple] = [("h1", f"Scaling-law analysis by {results['group_by']}"),
                      ("p", "The exponent a (N_opt ∝ C^a) of each step and its 95% interval, Approach 2 (A2) and "
                            "Approach 3 (A3), under each counting convention (kaplan: non-embedding N, C = 6ND; "
                            "total: all parameters, C = 6 N_total D; exact: C = the matmul FLOPs the model does). "
                            "'own convention' is the counting the step's budgets were set in."),
                      ("table", head, rows), ("p", results["summary"])]
    if results.get("searches"):
        B.append(("p", "Searches of this invocation (studies reused from an earlier one train nothing): " + "; ".join(
            f"{x['step']} {x['trials']} trials in {x['wall_s'] / 60:.1f} min" for x in results["searches"]) + "."))
    if "nopt" in figs:
        B.append(("img", Path(figs["nopt"][0]).name, "N_opt(C) of every step with its fitted lines (Approach 2 "
                                                     "solid, Approach 3 dashed), each in its own convention"))
    for name, res in results[results["group_by"]].items():
        B.append(("h2", f"{results['group_by']} = {name}"))
        if "error" in res:
            B.append(("p", f"Not fitted: {res['error']}"))
            continue
        lines = [laws.verdict_sentence(f"{conv} / {a}", v) for conv, vs in res["verdict"].items()
                 for a, v in vs.items() if v.get("a") is not None and a in APPROACHES]
        B.append(("pre", "\n".join(lines)))
        if res.get("approach2_error"):
            B.append(("p", f"Approach 2 not fitted (Approach 3 alone above): {res['approach2_error']}"))
        for conv, r in res["conventions"].items():
            if r["approach2"].get("dropped"):
                B.append(("p", f"{conv}: dropped from Approach 2's line: " + "; ".join(
                    f"C = {report._g(x['budget'], '.3g')}: {x['reason']}" for x in r["approach2"]["dropped"])))
    B += report.provenance_section(results)
    return B


def write_report(results: dict[str, Any], objects: dict[str, Any], study: RunTable, out: str | Path) -> Path:
    """fits.json (one entry per group), the N_opt(C) figure, runs.csv, report.md and report.html under ``out``."""
    folder = Path(out) if out else report.default_out()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fits.json").write_text(json.dumps(report.jsonable(results), indent=2))
    study.runs.to_csv(folder / "runs.csv", index=False)
    figs = {}
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        figs["nopt"] = figures.protocol_optimal(objects["panels"], folder, "nopt_by_protocol",
                                                f"Compute-optimal N by {results['group_by']}")
    blocks = report_blocks(results, figs)
    (folder / "report.md").write_text(report.render_markdown(blocks))
    (folder / "report.html").write_text(report.render_html(blocks, folder))
    return folder


def metrics_of(results: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics: <group>/<convention>/<approach>/a and its interval ends."""
    out: dict[str, float] = {}
    for r in results["rows"]:
        for conv, v in r["conventions"].items():
            for a in APPROACHES:
                key = f"{r['group']}/{conv}/{a}/a"
                out[key] = v[a]["a"]
                ci = v[a]["ci95"] or [None, None]
                if ci[0] is not None:
                    out[key + "_lo"], out[key + "_hi"] = ci
    for m in results.get("moves", []):
        out[f"{m['to']}/{m['approach']}/delta_a"] = m["delta"]
    for x in results.get("searches", []):
        out[f"{x['step']}/search_wall_s"] = x["wall_s"]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def print_lines(results: dict[str, Any]) -> list[str]:
    """What the entry point prints: the table and the sentence."""
    head, rows = table_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [fmt(head), *(fmt(r) for r in rows), results["summary"]]
