"""\"Quick vs real\": a predicted law drawn over measured runs (the simulation's law, or an earlier analysis'
Approach 3 fit): per budget the measured minimum against the predicted N_opt, the predicted exponent against the
measured intervals, and each run's measured loss against the predicted one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scaling_lab import laws
from scaling_lab.errors import ConfigError
from scaling_lab.sources import SIM_LAW

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
