"""The analysis report: fits.json, figures (PNG + SVG), runs.csv, report.md and report.html, one function per
section; and the MLflow metrics of a result (``metrics_of``). No fitting here, no MLflow import.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from scaling_lab import figures, laws
from scaling_lab.sources import RunTable


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
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


def ci_txt(ci: list | None, fmt: str = ".4g") -> str:
    if not ci or ci[0] is None:
        return "n/a"
    return f"[{_g(ci[0], fmt)}, {_g(ci[1], fmt)}]"


def make_figures(results: dict[str, Any], objects: dict[str, Any], study: RunTable, folder: Path) -> dict[str, list]:
    """Every figure of every convention, PNG + SVG under ``folder``; returns {name: [paths]}."""
    F = figures
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
    rendered to Markdown and to HTML. One function per section, in reading order."""
    B: list[tuple] = [("h1", "Scaling-law analysis")]
    B += verdict_section(results)
    B += simulation_section(results)
    for conv, r in results["conventions"].items():
        B += convention_section(conv, r, figs)
    B += overlay_section(results, figs)
    B += curve_extrapolation_section(results, figs)
    B += provenance_section(results)
    return B


def verdict_section(results: dict[str, Any]) -> list[tuple]:
    """The verdict sentences of every convention and approach, and the references they compare with."""
    lines = [laws.verdict_sentence(f"{conv} / {name}", v) for conv, vs in results["verdict"].items()
             for name, v in vs.items() if v.get("a") is not None]
    convs = results["conventions"]
    rows = [[name] + [f"{_g(convs[c][name]['a'], '.3f')} {ci_txt(convs[c][name]['ci95'].get('a'), '.3f')}"
                      for c in convs] for name in ("approach1", "approach2", "approach3")]
    B: list[tuple] = [("h2", "Verdict"), ("pre", "\n".join(lines + shape_warnings(results))),
                      ("p", "The exponent a (N_opt ∝ C^a) and its 95% interval under each counting convention:"),
                      ("table", ["approach", *convs], rows)]
    epochs = results.get("epochs_by_budget") or []
    if epochs:
        B.append(("p", "Most passes over the train split per budget (data repetition; up to ~4 costs almost nothing, "
                       "Muennighoff et al. 2023): " + ", ".join(f"C = {x['budget']:.3g}: {x['max_epochs']:.1f}"
                                                                 for x in epochs) + "."))
    B.append(("p", f"References: Kaplan et al. 2020 (arXiv:2001.08361) N_opt ∝ C^{laws.KAPLAN_A}; Hoffmann et al. "
                   f"2022 (arXiv:2203.15556) N_opt ∝ C^{laws.CHINCHILLA_A}. Intervals: Approach 2, a parametric "
                   "bootstrap redrawing each size's loss from its measured seed noise; Approaches 1 and 3, percentile "
                   "bootstrap over runs resampled within each budget (with a3_interval=residual, Approach 3's is "
                   "a residual bootstrap that keeps every run's N and D, the pairs one beside it); SE = bootstrap "
                   "standard deviation."))
    return B


def simulation_section(results: dict[str, Any]) -> list[tuple]:
    """source=simulate: the true law against the recovered one."""
    sim = results.get("simulation")
    if not sim:
        return []
    rows = [[k, _g(sim["truth"][k]), _g(sim["recovered"][k]), ci_txt(sim["ci95"].get(k))]
            for k in ("E", "A", "B", "alpha", "beta", "a", "b")]
    return [("h2", "Simulation: true against recovered (Approach 3)"),
            ("table", ["parameter", "true", "recovered", "95% interval"], rows),
            ("p", f"Approach 2 recovered a = {_g(sim['approach2_a'])} (true {_g(sim['truth']['a'])}).")]


def convention_section(conv: str, r: dict[str, Any], figs: dict[str, list]) -> list[tuple]:
    """One counting convention: every fit with its interval, Approach 2's minima, leave-one-budget-out,
    extrapolation, figures."""
    B: list[tuple] = []
    B.append(("h2", f"Convention: {conv} (N = {r['N']}, C = {r['C']})"))
    B.append(("p", f"{r['runs']} runs in {r['budgets']} budgets, C from {r['fitted_flops_range'][0]:.3g} to "
                   f"{r['fitted_flops_range'][1]:.3g} FLOPs; C/(N·D) = {r['flops_per_param_token']:.3g}; "
                   f"bootstrap resamples kept of {r['bootstrap']['resamples']}: "
                   + ", ".join(f"{a} {n}" for a, n in r["bootstrap"]["kept"].items())
                   + f" (seed {r['bootstrap']['seed']})."))
    a3, a2, a1 = r["approach3"], r["approach2"], r["approach1"]
    rows = [[f"Approach 3 {p}", _g(a3[p]), ci_txt(a3["ci95"].get(p))]
            for p in ("E", "A", "B", "alpha", "beta", "a", "b")]
    if a3.get("interval", "").startswith("residual") and a3.get("pairs_ci95"):
        rows.append(["Approach 3 a, pairs bootstrap (runs resampled)", _g(a3["a"]), ci_txt(a3["pairs_ci95"].get("a"))])
    rows += [[f"Approach 2 {p}", _g(a2[p]), ci_txt(a2["ci95"].get(p))] for p in ("a", "b")]
    rows += [[f"Approach 1 {p}", _g(a1[p]), ci_txt(a1["ci95"].get(p))] for p in ("a", "b")]
    kl = r["kaplan"].get("L_ND", {})
    for p in ("alpha_N", "alpha_D", "a"):
        label = ("Kaplan Eq. 1.5 L(N, D): a implied by its fit (not Kaplan's compute-optimal 0.73)" if p == "a"
                 else f"Kaplan Eq. 1.5 L(N, D) {p}")
        rows.append([label, _g(kl.get(p)), ci_txt(kl.get("ci95", {}).get(p))])
    for key in ("L_N", "L_D", "L_C"):
        for suffix in ("", "_irreducible"):
            v = r["kaplan"].get(key + suffix, {})
            if "alpha" in v:
                extra = f" (E = {_g(v['E'])})" if suffix else ""
                rows.append([f"Kaplan {key}{suffix} alpha", _g(v["alpha"]) + extra,
                             ci_txt(v.get("ci95", {}).get("alpha"))])
    B.append(("table", ["parameter", "fit", "95% interval"], rows))
    if a3.get("at_bounds"):
        B.append(("p", f"Warning: Approach 3 left {', '.join(a3['at_bounds'])} on a bound of its search box "
                       "(e.g. E -> 0): the data do not pin that parameter down."))
    B.append(("p", f"Approach 3 RMS relative residual {100 * a3['rms_rel_residual']:.2f}%; Approach 1 from "
                   f"{'training curves' if a1['from_curves'] else 'final losses only'} ({a1['runs']} runs)."))
    if a3.get("curvature_ratio_median") is not None:
        B.append(("p", curvature_text(a3)))
    rows = [[_g(b["budget"], ".3g"), _g(b["n_opt"], ".4g"), ci_txt(b["n_opt_ci95"]), _g(b["d_opt"], ".4g"),
             f"{_g(b['window'][0], '.3g')}..{_g(b['window'][1], '.3g')}" if b.get("window") else "-",
             _g(b.get("weight"), ".3g")] for b in a2["n_opt_by_budget"]]
    B.append(("h3", "Approach 2: N_opt by budget"))
    B.append(("p", f"{a2.get('method', 'one parabola per budget')}; noise: {a2.get('noise_source', '?')}"
                   + (f" (seed-to-seed sd {_g(a2.get('seed_std'), '.4f')} nats over {a2.get('seed_sizes')} sizes "
                      "with 2+ seeds)" if a2.get("seed_sizes") else "")
                   + f"; {a2.get('draws', 0)} parametric draws."))
    B.append(("table", ["budget C", "N_opt", "95% interval", "D_opt", "window (N)", "weight"], rows))
    if a2.get("dropped"):
        B.append(("p", "Dropped from the N_opt(C) fit: " + "; ".join(f"C = {_g(x['budget'], '.3g')}: {x['reason']}"
                                                                     for x in a2["dropped"]) + "."))
    if r["leave_one_budget_out"]:
        B.append(("h3", "Leave one budget out"))
        rows = [[_g(x["budget"], ".3g"), x["runs"], _g(x.get("n_opt_observed")), _g(x.get("n_opt_predicted")),
                 _g(x.get("a2_log10_ratio"), "+.3f"), _g(100 * x["a3_loss_rel_err"], ".2f") + "%"
                 if "a3_loss_rel_err" in x else "n/a"] for x in r["leave_one_budget_out"]]
        B.append(("table", ["held-out C", "runs", "N_opt (its parabola)", "N_opt (A2 on the rest)",
                            "log10 ratio", "A3 loss error"], rows))
    B.append(("h3", "Extrapolation (beyond the fitted range by the stated factor)"))
    B.append(("p", "Rows more than 100x beyond the fitted compute are illustrative: no interval, nothing measured here "
                   "supports them; losses are nats per token of this vocabulary and text."))
    rows = [[x["budget"] + (" (illustrative)" if x.get("illustrative") else ""), _g(x["flops"], ".3g"),
             x["approach"], f"{x['factor']:.2g}x",
             _g(x["n_opt"], ".3g"), ci_txt(x["n_opt_ci95"], ".3g"), _g(x["d_opt"], ".3g"),
             ci_txt(x["d_opt_ci95"], ".3g"), _g(x.get("loss"), ".4g"), ci_txt(x.get("loss_ci95"))]
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
    return B


def overlay_section(results: dict[str, Any], figs: dict[str, list]) -> list[tuple]:
    """Quick vs real: the predicted law against the measured runs."""
    B: list[tuple] = []
    ov = results.get("overlay")
    if ov:
        B.append(("h2", "Quick vs real: prediction over the measured runs"))
        law = ov["law"]
        B.append(("p", f"Prediction: {ov['label']}, L = {_g(law['E'])} + {_g(law['A'])}/N^{_g(law['alpha'], '.3g')}"
                       f" + {_g(law['B'])}/D^{_g(law['beta'], '.3g')} ({ov['prediction_convention']} convention), "
                       f"drawn over the runs in the {ov['measured_convention']} convention. Predicted a = "
                       f"{_g(ov['a_predicted'], '.3f')}; measured "
                       + "; ".join(f"{a} a = {_g(m['a'], '.3f')} {ci_txt(m['ci95'], '.3f')}"
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
    return B


def curve_extrapolation_section(results: dict[str, Any], figs: dict[str, list]) -> list[tuple]:
    """How well the first part of each validation curve predicts its end."""
    B: list[tuple] = []
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
    return B


def provenance_section(results: dict[str, Any]) -> list[tuple]:
    """Where the runs came from."""
    B: list[tuple] = []
    prov = results["provenance"]
    B.append(("h2", "Provenance"))
    p_rows = [[k, json.dumps(jsonable(v)) if not isinstance(v, str) else v] for k, v in prov.items()
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


def write_report(results: dict[str, Any], objects: dict[str, Any], study: RunTable, out: str | Path) -> Path:
    """fits.json, figures (PNG + SVG), runs.csv (the fitted table), report.md and report.html under ``out``."""
    folder = Path(out) if out else default_out()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fits.json").write_text(json.dumps(jsonable(results), indent=2))
    study.runs.to_csv(folder / "runs.csv", index=False)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # wild bootstrap lines -> inf, not noise
        figs = make_figures(results, objects, study, folder)
    blocks = report_blocks(results, figs)
    (folder / "report.md").write_text(render_markdown(blocks))
    (folder / "report.html").write_text(render_html(blocks, folder))
    return folder


def shape_warnings(results: dict[str, Any]) -> list[str]:
    """One line per convention whose Approach 3 law does not bend like its isoFLOP curves (analyze.curvature_check),
    printed under the verdict: that approach's a and interval then say more about the law than about the runs."""
    out = []
    for conv, r in results["conventions"].items():
        a3 = r["approach3"]
        if a3.get("curvature_consistent") is False:
            out.append(f"{conv} / approach3: the isoFLOP curves are {_g(a3['curvature_ratio_median'], '.2g')}x as "
                       "curved (median) as its fitted law implies: the law misses these runs' shape, so its a reflects "
                       "that misfit; Approach 2 reads the minima from the curves themselves")
    return out


def curvature_text(a3: dict[str, Any]) -> str:
    """One sentence on whether Approach 3's law bends like the measured isoFLOP curves (analyze.curvature_check)."""
    per = ", ".join(f"{_g(r['ratio'], '.2g')}" for r in a3["isoflop_curvature"])
    head = (f"IsoFLOP curvature, measured / Approach 3's law at each Approach 2 minimum: median "
            f"{_g(a3['curvature_ratio_median'], '.3g')} (per budget {per}). ")
    if a3.get("curvature_consistent"):
        return head + "The law's curvature matches the curves' within a factor of 2."
    return head + ("The law fitted through all budgets does not bend like the curves it is fitted to: as fitted, its "
                   "form misses these runs, so its a reflects that misfit as much as the minima, and its interval "
                   "measures more than the seed noise. Approach 2 reads each budget's minimum from its own curve.")


def metrics_of(results: dict[str, Any]) -> dict[str, float]:
    out = {}
    for conv, r in results["conventions"].items():
        for a in ("approach1", "approach2", "approach3"):
            for p in ("a", "b"):
                out[f"{conv}/{a}/{p}"] = r[a][p]
                ci = r[a]["ci95"].get(p) or [None, None]
                if ci[0] is not None:
                    out[f"{conv}/{a}/{p}_lo"], out[f"{conv}/{a}/{p}_hi"] = ci
        for p in ("E", "A", "B", "alpha", "beta", "curvature_ratio_median"):
            out[f"{conv}/approach3/{p}"] = r["approach3"].get(p)
    ov = results.get("overlay")
    if ov:
        out["overlay/a_predicted"] = ov["a_predicted"]
        out["overlay/n_opt_log10_ratio_mean"] = ov["n_opt_log10_ratio_mean"]
        out["overlay/loss_log_ratio_median"] = ov["loss_log_ratio_median"]
    ce = results.get("curve_extrapolation", {})
    if ce.get("runs"):
        out["curve_extrapolation/median_abs_rel_err"] = ce["median_abs_rel_err"]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}
