"""The tuning stage's fit, pure numpy: per cell the optimum (lr, batch) from its trials, then power laws
lr*(N_total) and batch*(D) over the cells, each exponent kept only when resolved (|exp| / SE >= 2); and the
JSON-safe helpers of its output. ``tuning.py`` runs the cells; ``figures.py`` draws them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from scaling_lab.isoflop import D_REF, N_REF, HyperRule

C_REF = 1e11  # reference budget of the batch-against-C comparison fit (FLOPs)
NEAR_NATS = 0.5  # trials within this many nats of a cell's best enter its quadratic (the valley, not the cliff)
RESOLVED_T = 2.0  # |exponent| / SE below this: the exponent is not resolved and the rule uses 0


def cell_optimum(points: list[tuple[float, int, float]]) -> dict[str, Any]:
    """The cell's optimum from its trials ``points`` = (lr, batch, final loss).

    The best trial alone is a noisy argmin: the loss is flat in lr near the optimum, so among 8-10 points sampled
    over two dimensions the lowest one can sit a factor 3 or more in lr from the bottom of the valley, and it
    mixes the lr and batch effects (a batch tried only at a poor lr looks bad). So the trials within NEAR_NATS of
    the best are fitted with L = c0 + c1 x + c2 x^2 + delta_batch, x = ln lr: one parabola in ln lr shared by
    the batches (only batches with two or more trials inform its shape) and one offset per batch. When it has a
    residual degree of freedom, is convex (c2 > 0) and its vertex lies inside the fitted trials' lr range, the
    optimum is lr = exp(vertex) and the batch with the lowest offset (its level at equal lr); otherwise the best
    trial's lr and batch (``method`` says which)."""
    finite = [(float(lr), int(b), float(v)) for lr, b, v in points if math.isfinite(v)]
    if not finite:
        return {}
    best = min(finite, key=lambda p: p[2])
    out: dict[str, Any] = {"best_lr": best[0], "best_batch": best[1], "best_loss": best[2], "lr": best[0],
                           "batch": float(best[1]), "method": "best", "n_fit": 0}
    near = [p for p in finite if p[2] <= best[2] + NEAR_NATS]
    batches = sorted({p[1] for p in near})
    x = np.log([p[0] for p in near])
    loss = np.array([p[2] for p in near])
    cols = [np.ones_like(x), x, x * x] + [np.array([float(p[1] == b) for p in near]) for b in batches[1:]]
    a = np.stack(cols, axis=1)
    if len(near) < a.shape[1] + 1 or np.linalg.matrix_rank(a) < a.shape[1]:
        return out
    c, *_ = np.linalg.lstsq(a, loss, rcond=None)
    offsets = {batches[0]: 0.0} | {b: float(v) for b, v in zip(batches[1:], c[3:])}
    out["n_fit"] = len(near)
    out["fit"] = {"c": [float(v) for v in c[:3]], "offsets": {str(b): v for b, v in offsets.items()},
                  "resid_sd": float(np.sqrt(np.sum((a @ c - loss) ** 2) / (len(near) - a.shape[1])))}
    shaped = [float(v) for p, v in zip(near, x) if sum(q[1] == p[1] for q in near) >= 2]  # lr of informative trials
    vertex = -c[1] / (2 * c[2]) if c[2] > 0 else math.nan
    if math.isfinite(vertex) and min(shaped) <= vertex <= max(shaped):
        b_opt = min(offsets, key=offsets.get)
        out.update(lr=float(math.exp(vertex)), batch=float(b_opt), method="quadratic",
                   loss_at_optimum=float(c[0] + c[1] * vertex + c[2] * vertex**2 + offsets[b_opt]))
    return out


@dataclass
class PowerFit:
    """y = coef (x / ref)^exp by least squares on ln y; SEs from the residuals (n - 2 degrees of freedom)."""

    predictor: str
    """What x is: N_total, D, C, or constant (exp fixed at 0)."""
    ref: float
    coef: float
    coef_se: float
    exp: float
    exp_se: float
    r2: float
    resid_sd: float
    """Residual standard deviation of ln y (0.1 = about 10%)."""
    n: int

    @property
    def t(self) -> float:
        """|exp| / SE: how well the data resolve the exponent."""
        if not math.isfinite(self.exp_se) or self.exp_se <= 0:
            return 0.0  # no residual degrees of freedom (or exp fixed at 0): nothing resolved
        return abs(self.exp) / self.exp_se

    def at(self, x: np.ndarray | float) -> np.ndarray:
        return self.coef * (np.asarray(x, dtype=float) / self.ref) ** self.exp


def fit_power(x: list[float], y: list[float], ref: float, predictor: str) -> PowerFit:
    """Least squares of ln y on ln(x / ref): coef and exp with standard errors (coef's by the delta method)."""
    lx, ly = np.log(np.asarray(x, float) / ref), np.log(np.asarray(y, float))
    n = len(ly)
    a = np.stack([np.ones(n), lx], axis=1)
    beta, *_ = np.linalg.lstsq(a, ly, rcond=None)
    resid = ly - a @ beta
    dof = n - 2
    s2 = float(resid @ resid / dof) if dof > 0 else math.nan
    cov = s2 * np.linalg.pinv(a.T @ a)
    tss = float(((ly - ly.mean()) ** 2).sum())
    coef = float(math.exp(beta[0]))
    return PowerFit(predictor, ref, coef, coef * math.sqrt(cov[0, 0]), float(beta[1]), math.sqrt(cov[1, 1]),
                    1 - float(resid @ resid) / tss if tss > 0 else math.nan, math.sqrt(s2), n)


def fit_constant(y: list[float], ref: float, predictor: str) -> PowerFit:
    """y = coef (exp 0): the geometric mean, SE from the spread (n - 1 degrees of freedom)."""
    ly = np.log(np.asarray(y, float))
    sd = float(ly.std(ddof=1)) if len(ly) > 1 else math.nan
    coef = float(math.exp(ly.mean()))
    return PowerFit(predictor, ref, coef, coef * sd / math.sqrt(len(ly)), 0.0, 0.0, 0.0, sd, len(ly))


def fit_rule(cells: list[dict[str, Any]], source: str) -> tuple[HyperRule, dict[str, Any]]:
    """The rule over the cells' optima: lr*(N_total) and batch*(D) power laws, each exponent kept only when
    resolved (|exp| / SE >= RESOLVED_T; else 0 with the geometric mean), and the comparison fits (lr on N and D
    together; batch on N, on C, constant) that say whether N_total and D are the right predictors."""
    done = [c for c in cells if c.get("optimum")]
    if len(done) < 3:
        raise RuntimeError(f"only {len(done)} cell(s) have a finished trial: a rule needs at least 3")
    n = [c["n_params_total"] for c in done]
    d = [c["tokens"] for c in done]
    cs = [c["budget"] for c in done]
    lr = [c["optimum"]["lr"] for c in done]
    b = [c["optimum"]["batch"] for c in done]
    lr_n, lr_const = fit_power(n, lr, N_REF, "N_total"), fit_constant(lr, N_REF, "constant")
    b_d, b_n, b_c = fit_power(d, b, D_REF, "D"), fit_power(n, b, N_REF, "N_total"), fit_power(cs, b, C_REF, "C")
    b_const = fit_constant(b, D_REF, "constant")
    lr_use = lr_n if lr_n.t >= RESOLVED_T else lr_const
    b_use = b_d if b_d.t >= RESOLVED_T else b_const
    notes = []
    if lr_use is lr_const:
        notes.append(f"lr exponent {lr_n.exp:+.3f} +- {lr_n.exp_se:.3f} not resolved (|t| = {lr_n.t:.1f} < "
                     f"{RESOLVED_T:g}): the rule uses one lr for every size (geometric mean of the cells' optima)")
    if b_use is b_const:
        notes.append(f"batch exponent in D {b_d.exp:+.3f} +- {b_d.exp_se:.3f} not resolved (|t| = {b_d.t:.1f}): "
                     "the rule uses one batch for every run")
    better = [f for f in (b_n, b_c) if math.isfinite(f.resid_sd) and f.resid_sd < b_d.resid_sd]
    for f in better:
        notes.append(f"batch is explained better by {f.predictor} (residual sd {f.resid_sd:.3f} in ln batch, "
                     f"R^2 {f.r2:.2f}) than by D ({b_d.resid_sd:.3f}, R^2 {b_d.r2:.2f}); HyperRule.batch_for takes D only")
    # lr on N and D together: does the optimum also move with the run length (budget) at a fixed size?
    a = np.stack([np.ones(len(lr)), np.log(np.asarray(n) / N_REF), np.log(np.asarray(d) / D_REF)], axis=1)
    beta, *_ = np.linalg.lstsq(a, np.log(lr), rcond=None)
    resid = np.log(lr) - a @ beta
    dof = len(lr) - 3
    cov = (float(resid @ resid) / dof if dof > 0 else math.nan) * np.linalg.pinv(a.T @ a)
    lr_nd = {"lr_coef": float(math.exp(beta[0])), "exp_n": float(beta[1]), "exp_n_se": float(math.sqrt(cov[1, 1])),
             "exp_d": float(beta[2]), "exp_d_se": float(math.sqrt(cov[2, 2])), "n": len(lr)}
    rule = HyperRule(lr_use.coef, lr_use.exp, b_use.coef, b_use.exp, source)
    fits = {"lr": {"N_total": _fit_dict(lr_n), "constant": _fit_dict(lr_const), "N_total_and_D": lr_nd,
                   "chosen": lr_use.predictor},
            "batch": {"D": _fit_dict(b_d), "N_total": _fit_dict(b_n), "C": _fit_dict(b_c),
                      "constant": _fit_dict(b_const), "chosen": b_use.predictor},
            "resolved_t": RESOLVED_T, "notes": notes,
            "method": "per cell: L = c0 + c1 ln lr + c2 ln^2 lr + offset(batch) over the trials within "
                      f"{NEAR_NATS} nats of the best (convex, vertex inside their lr range, >= 1 residual dof), else "
                      "the best trial; then least squares of ln lr* on ln(N_total/1e5) and of ln batch* on ln(D/1e6)"}
    return rule, fits


def _fit_dict(f: PowerFit) -> dict[str, Any]:
    return dataclasses.asdict(f)


def clean(obj: Any) -> Any:
    """``obj`` with every non-finite float as None (strict JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def num(v: float | None) -> float | None:
    """A JSON-safe number: None for inf / NaN."""
    return v if v is not None and math.isfinite(v) else None


def by_budget(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per budget: each size's best loss, the best size, and the spread of the best losses across sizes."""
    out = []
    for budget in sorted({c["budget"] for c in cells}):
        row = [c for c in cells if c["budget"] == budget and c.get("optimum")]
        if not row:
            continue
        best = min(row, key=lambda c: c["optimum"]["best_loss"])
        losses = [c["optimum"]["best_loss"] for c in row]
        out.append({"budget": budget, "best_rung": best["rung"], "best_n_params_total": best["n_params_total"],
                    "best_loss": best["optimum"]["best_loss"], "spread": max(losses) - min(losses),
                    "losses": {str(c["n_params_total"]): c["optimum"]["best_loss"] for c in row}})
    return out
