"""Report figures (matplotlib, one style), each saved as PNG and SVG. No torch, no mlflow.

Every function takes the analysis' data and fit results (see ``scaling_lab.analyze``) and returns the paths it
wrote. Inputs are plain numpy/pandas objects so the figures can be redrawn from ``fits.json`` and a runs table.
Before saving, ``tidy_ticks`` keeps tick labels apart (log axes labelled at decades or a few 1-2-5 values);
``ON_FIGURE`` lets tests look at each finished figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from scaling_lab import laws  # noqa: E402
from scaling_lab.isoflop import D_REF, N_REF  # noqa: E402

STYLE = {
    "figure.dpi": 110, "savefig.dpi": 150, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
    "legend.fontsize": 7.5, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
    "axes.spines.right": False, "lines.linewidth": 1.4, "svg.hashsalt": "scaling-lab",
}
CMAP = "viridis"
KAPLAN_COLOR, CHINCHILLA_COLOR, FIT_COLOR = "#d62728", "#1f77b4", "#222222"
# Published reference points: GPT-3 175B on 300B tokens (Brown et al. 2020), Chinchilla 70B on 1.4T tokens
# (Hoffmann et al. 2022, Table 1); FLOPs as in Hoffmann et al. 2022, Table 3 footnote (GPT-3 3.14e23).
REFERENCE_MODELS = {"GPT-3": (3.14e23, 175e9, 300e9), "Chinchilla": (5.76e23, 70e9, 1.4e12)}


# Called with each finished figure and its name just before it is saved (tests check the layout with it).
ON_FIGURE: Callable[[Figure, str], None] | None = None
GAP_PX = 2.0  # tick labels on one axis keep at least this far apart


def _save(fig: Figure, folder: Path, name: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.svg"]
    return _write(fig, paths, name)


def _write(fig: Figure, paths: list[Path], name: str, dpi: float | None = None) -> list[Path]:
    """Lay out (readable ticks on every axis), save to each path, close."""
    tidy_ticks(fig)
    if ON_FIGURE is not None:
        ON_FIGURE(fig, name)
    for p in paths:
        fig.savefig(p, dpi=dpi, metadata={"Date": None} if p.suffix == ".svg" else None)
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------- readable ticks


def _sci(x: float, _pos: Any = None) -> str:
    """2×10³ style (10³ for a decade)."""
    k = math.floor(math.log10(x) + 1e-9)
    m = x / 10.0**k
    return f"$10^{{{k}}}$" if abs(m - 1) < 1e-6 else f"${m:.2g}\\times10^{{{k}}}$"


def log_ticks(axis: Any) -> None:
    """A log axis labelled only at decades when it spans two or more, else at a few 1-2-5 (then 1-2-3-5) values;
    minor ticks unlabelled (matplotlib labels them all below a decade: '2×10³3×10³4×10³')."""
    lo, hi = sorted(axis.get_view_interval())
    if not (lo > 0 and math.isfinite(hi) and hi > lo):
        return
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    near = lambda v: lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)
    if sum(near(10.0**k) for k in range(k0, k1 + 1)) >= 2:
        axis.set_major_locator(ticker.LogLocator(base=10, numticks=8))
        axis.set_major_formatter(ticker.LogFormatterSciNotation(labelOnlyBase=True))
    else:
        ticks: list[float] = []
        for subs in ((1, 2, 5), (1, 2, 3, 5), tuple(range(1, 10))):
            ticks = [m * 10.0**k for k in range(k0, k1 + 1) for m in subs if near(m * 10.0**k)]
            if len(ticks) >= 2:
                break
        axis.set_major_locator(ticker.FixedLocator(ticks or [math.sqrt(lo * hi)]))
        axis.set_major_formatter(ticker.FuncFormatter(_sci))
    axis.set_minor_locator(ticker.LogLocator(base=10, subs=tuple(range(2, 10)), numticks=12))
    axis.set_minor_formatter(ticker.NullFormatter())


class _EveryK(ticker.Formatter):
    """Another formatter's labels on every k-th tick only."""

    def __init__(self, base: ticker.Formatter, k: int):
        self.base, self.k = base, k

    def set_locs(self, locs: Any) -> None:
        self.base.set_locs(locs)
        super().set_locs(locs)

    def __call__(self, x: float, pos: int | None = None) -> str:
        return self.base(x, pos) if pos is None or pos % self.k == 0 else ""

    def get_offset(self) -> str:
        return self.base.get_offset()


def _crowded(axis: Any, renderer: Any) -> bool:
    """Do two drawn tick labels of ``axis`` come closer than GAP_PX? (_update_ticks: the ticks a draw shows.)"""
    boxes = [t.label1.get_window_extent(renderer) for t in axis._update_ticks()
             if t.label1.get_visible() and t.label1.get_text()]
    return any(a.padded(GAP_PX / 2).overlaps(b.padded(GAP_PX / 2)) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def tidy_ticks(fig: Figure) -> None:
    """Every log axis gets ``log_ticks``; the layout is tightened; then, on any axis whose labels still touch,
    minor labels go and major labels are thinned to every 2nd, 3rd, ... tick until none do."""
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                log_ticks(axis)
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            base, k = axis.get_major_formatter(), 1
            while _crowded(axis, renderer) and k < 12:
                k += 1
                axis.set_minor_formatter(ticker.NullFormatter())
                axis.set_major_formatter(_EveryK(base, k))
                fig.canvas.draw()


def _colors(n: int) -> list:
    return [plt.get_cmap(CMAP)(x) for x in np.linspace(0.05, 0.9, max(n, 1))]


def isoflop(N: np.ndarray, L: np.ndarray, labels: np.ndarray, fit: laws.IsoFlopFit, folder: Path, name: str,
            title: str) -> list[Path]:
    """Loss against N for each budget, with the Approach 2 parabola (over the sizes it was fitted on) and its
    minimum."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 3.8))
        groups = np.unique(labels)
        cols = _colors(len(groups))
        for g, col in zip(groups, cols):
            m = labels == g
            ax.scatter(N[m], L[m], s=14, color=col, zorder=3)
        windows = getattr(fit, "windows", None) or [None] * len(fit.budgets)
        for b, p, n_opt, ok, g, win in zip(fit.budgets, fit.parabolas, fit.n_opt, fit.inside, fit.groups, windows):
            col = cols[list(groups).index(g)]
            ng = N[labels == g]
            lo, hi = (ng.min(), ng.max()) if win is None else win  # the parabola only where it was fitted
            x = np.linspace(np.log(lo) - 0.1, np.log(hi) + 0.1, 200)
            ax.plot(np.exp(x), np.polyval(p, x), color=col, alpha=0.8, label=f"C = {b:.2g}")
            ax.plot([n_opt], [np.polyval(p, math.log(n_opt))], marker="*" if ok else "x", ms=10, color=col,
                    markeredgecolor="k", zorder=4)
        ax.set_xscale("log")
        ax.set_xlabel("parameters N")
        ax.set_ylabel("validation loss (nats/token)")
        lo, hi = np.nanmin(L), np.nanmax(L)
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        ax.set_title(title)
        ax.legend(title="budget (FLOPs); * = minimum", loc="best")
        return _save(fig, folder, name)


def optimal_vs_compute(fits: dict[str, Any], boot: dict[str, np.ndarray], folder: Path, name: str,
                       title: str) -> list[Path]:
    """N_opt and D_opt against C: Approach 1/2 points, fitted lines with 95% bands, Kaplan (0.73) and
    Chinchilla (0.50) reference slopes through the middle of the fitted range."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.8))
        for ax, what, ref in ((axes[0], "n", (laws.KAPLAN_A, laws.CHINCHILLA_A)),
                              (axes[1], "d", (1 - laws.KAPLAN_A, 1 - laws.CHINCHILLA_A))):
            cs_all = []
            for key, marker, color in (("approach1", "o", "#2ca02c"), ("approach2", "s", "#9467bd"),
                                       ("approach3", None, "#ff7f0e")):
                f = fits.get(key)
                if f is None:
                    continue
                if key != "approach3":
                    cs = np.asarray(f.flops if key == "approach1" else f.budgets)
                    ys = np.asarray(f.n_opt if what == "n" else f.d_opt)
                    ax.scatter(cs, ys, marker=marker, s=18, color=color, zorder=3, label=f"{key} points")
                    cs_all += list(cs)
            if not cs_all:
                continue
            grid = np.exp(np.linspace(math.log(min(cs_all)) - 0.3, math.log(max(cs_all)) + 0.3, 100))
            for key, color in (("approach1", "#2ca02c"), ("approach2", "#9467bd"), ("approach3", "#ff7f0e")):
                f = fits.get(key)
                if f is None:
                    continue
                y = f.n_at(grid) if what == "n" else f.d_at(grid)
                exp_ = f.a if what == "n" else f.b
                ax.plot(grid, y, color=color, label=f"{key}: {'a' if what == 'n' else 'b'} = {exp_:.3f}")
                band = boot.get(f"{key}/{what}_grid")
                if band is not None and len(band) > 1:
                    ax.fill_between(grid, np.quantile(band, 0.025, axis=0), np.quantile(band, 0.975, axis=0),
                                    color=color, alpha=0.15, lw=0)
            mid_c = math.exp(np.mean(np.log(grid)))
            main = fits.get("approach2") or fits.get("approach3") or fits.get("approach1")
            mid_y = float(main.n_at(mid_c) if what == "n" else main.d_at(mid_c))
            for slope, color, lab in ((ref[0], KAPLAN_COLOR, "Kaplan"), (ref[1], CHINCHILLA_COLOR, "Chinchilla")):
                ax.plot(grid, mid_y * (grid / mid_c) ** slope, ls="--", color=color, lw=1,
                        label=f"{lab} slope {slope:.2f}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("compute C (FLOPs)")
            ax.set_ylabel("N_opt (parameters)" if what == "n" else "D_opt (tokens)")
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below the axes: off the data
        fig.suptitle(title)
        return _save(fig, folder, name)


def contours(fit: laws.ChinchillaFit, N: np.ndarray, D: np.ndarray, budgets: Sequence[float], folder: Path,
             name: str, title: str) -> list[Path]:
    """Approach 3 loss contours over (N, D) with iso-FLOP lines C = kND and the compute-optimal frontier."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 4.2))
        n = np.exp(np.linspace(np.log(N.min()) - 1, np.log(N.max()) + 1, 120))
        d = np.exp(np.linspace(np.log(D.min()) - 1, np.log(D.max()) + 1, 120))
        NN, DD = np.meshgrid(n, d)
        Z = fit.loss(NN, DD)
        cs = ax.contourf(NN, DD, Z, levels=20, cmap=CMAP)
        cs.set_rasterized(True)  # keeps the SVG small
        fig.colorbar(cs, ax=ax, label="predicted loss")
        ax.scatter(N, D, s=8, color="w", edgecolor="k", lw=0.4, zorder=3, label="runs")
        for c in budgets:
            ax.plot(n, c / (fit.k * n), color="w", lw=0.8, ls=":")
        cgrid = fit.k * NN.min() * DD.min() * np.logspace(0, np.log10(NN.max() * DD.max() / (NN.min() * DD.min())),
                                                          60)
        ax.plot(fit.n_at(cgrid), fit.d_at(cgrid), color="r", lw=1.6, label=f"frontier N ∝ C^{fit.a:.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(n.min(), n.max())
        ax.set_ylim(d.min(), d.max())
        ax.set_xlabel("parameters N")
        ax.set_ylabel("tokens D")
        ax.set_title(title)
        ax.legend(loc="best")
        return _save(fig, folder, name)


def training_curves(curves: Sequence[laws.Curve], finals: dict[str, np.ndarray], folder: Path, name: str,
                    title: str, max_curves: int = 100) -> list[Path]:
    """2x2: curves against tokens and against FLOPs coloured by N; final loss against N coloured by D and
    against D coloured by N. At most ``max_curves`` curves are drawn (evenly over N), so the SVG stays light."""
    if len(curves) > max_curves:
        order = sorted(range(len(curves)), key=lambda i: curves[i].N)
        keep = np.linspace(0, len(order) - 1, max_curves).round().astype(int)
        title = f"{title}: {max_curves} of {len(curves)} curves drawn"
        curves = [curves[order[i]] for i in keep]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
        if curves:
            ns = np.array([c.N for c in curves], dtype=float)
            norm = matplotlib.colors.LogNorm(ns.min(), ns.max() * (1 + 1e-9))
            cmap = plt.get_cmap(CMAP)
            for c in curves:
                axes[0, 0].plot(c.tokens, c.loss, color=cmap(norm(c.N)), lw=0.9, alpha=0.8, rasterized=True)
                axes[0, 1].plot(c.flops, c.loss, color=cmap(norm(c.N)), lw=0.9, alpha=0.8, rasterized=True)
            fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes[0, 1], label="N")
        for ax, xl in ((axes[0, 0], "tokens seen"), (axes[0, 1], "FLOPs spent")):
            ax.set_xscale("log")
            ax.set_xlabel(xl)
            ax.set_ylabel("validation loss")
        N, D, L = finals["N"], finals["D"], finals["L"]
        many = len(N) > 200  # rasterize dense scatters so the SVG stays light
        s1 = axes[1, 0].scatter(N, L, c=np.log10(D), cmap=CMAP, s=14, rasterized=many)
        fig.colorbar(s1, ax=axes[1, 0], label="log10 D")
        s2 = axes[1, 1].scatter(D, L, c=np.log10(N), cmap=CMAP, s=14, rasterized=many)
        fig.colorbar(s2, ax=axes[1, 1], label="log10 N")
        for ax, xl in ((axes[1, 0], "parameters N"), (axes[1, 1], "tokens D")):
            ax.set_xscale("log")
            ax.set_xlabel(xl)
            ax.set_ylabel("final validation loss")
        axes[0, 0].set_title("by N, against tokens")
        axes[0, 1].set_title("by N, against FLOPs")
        axes[1, 0].set_title("final loss by N (colour D)")
        axes[1, 1].set_title("final loss by D (colour N)")
        fig.suptitle(title)
        return _save(fig, folder, name)


def fitted_vs_observed(fit: laws.ChinchillaFit, N: np.ndarray, D: np.ndarray, L: np.ndarray, folder: Path,
                       name: str, title: str) -> list[Path]:
    """Approach 3 prediction against observed loss, and the relative residuals against C."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        pred = fit.loss(N, D)
        axes[0].scatter(L, pred, s=12, c=np.log10(N), cmap=CMAP)
        lo, hi = min(L.min(), pred.min()), max(L.max(), pred.max())
        axes[0].plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--")
        axes[0].set_xlabel("observed loss")
        axes[0].set_ylabel("Approach 3 fit")
        res = (pred - L) / L * 100
        axes[1].scatter(fit.k * N * D, res, s=12, c=np.log10(N), cmap=CMAP)
        axes[1].axhline(0, color="k", lw=0.8)
        axes[1].set_xscale("log")
        axes[1].set_xlabel("compute C (FLOPs)")
        axes[1].set_ylabel("residual (fit - observed) / observed, %")
        axes[1].set_title(f"RMS {np.sqrt(np.mean(res**2)):.2f}%")
        fig.suptitle(title)
        return _save(fig, folder, name)


def extrapolation(fits: dict[str, Any], boot: dict[str, np.ndarray], fitted_range: tuple[float, float],
                  budgets: dict[str, float], folder: Path, name: str, title: str) -> list[Path]:
    """N_opt(C) of each approach from the fitted range out to the named budgets, with 95% bands, the fitted range
    shaded, and GPT-3 / Chinchilla as published points."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6, 4))
        c_hi = max([fitted_range[1], *budgets.values()]) * 3
        grid = np.exp(np.linspace(math.log(fitted_range[0]), math.log(c_hi), 120))
        for key, color in (("approach1", "#2ca02c"), ("approach2", "#9467bd"), ("approach3", "#ff7f0e")):
            f = fits.get(key)
            if f is None:
                continue
            ax.plot(grid, f.n_at(grid), color=color, label=f"{key} (a = {f.a:.3f})")
            samples = boot.get(f"{key}/params")
            if samples is not None and len(samples) > 1:
                ys = np.array([s_k * grid**s_a for s_a, s_k in samples])
                ax.fill_between(grid, np.quantile(ys, 0.025, axis=0), np.quantile(ys, 0.975, axis=0), color=color,
                                alpha=0.15, lw=0)
        ax.axvspan(*fitted_range, color="grey", alpha=0.15, label="fitted range")
        for lab, (c, n, _d) in REFERENCE_MODELS.items():
            ax.scatter([c], [n], marker="D", color="k", zorder=4)
            ax.annotate(lab, (c, n), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for lab, c in budgets.items():
            if lab not in REFERENCE_MODELS:
                ax.axvline(c, color="k", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C (FLOPs)")
        ax.set_ylabel("compute-optimal N")
        ax.set_title(title)
        ax.legend(loc="best")
        return _save(fig, folder, name)


def curve_extrapolation(rows: Sequence[dict[str, Any]], folder: Path, name: str) -> list[Path]:
    """Predicted against actual final loss of each run, from a power-law fit on the first part of its curve."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(4.6, 3.8))
        act = np.array([r["actual"] for r in rows])
        pred = np.array([r["predicted"] for r in rows])
        ax.scatter(act, pred, s=14)
        lo, hi = min(act.min(), pred.min()), max(act.max(), pred.max())
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--")
        ax.set_xlabel("actual final validation loss")
        ax.set_ylabel("predicted from first part of curve")
        err = np.abs(pred / act - 1) * 100
        ax.set_title(f"median |error| {np.median(err):.1f}%, max {err.max():.1f}%")
        return _save(fig, folder, name)


def overlay(N: np.ndarray, L: np.ndarray, labels: np.ndarray, fit: laws.IsoFlopFit, law: laws.ChinchillaFit,
            label: str, folder: Path, name: str, title: str) -> list[Path]:
    """"Quick vs real": left, each budget's measured losses (dots) and Approach 2 minimum (star) against the
    predicted isoFLOP curve L(N, C/(kN)) (dashed) and its minimum (cross); right, measured N_opt against C with
    the predicted N_opt(C) line and the measured Approach 2 line."""
    with plt.rc_context(STYLE):
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(9.5, 3.8))
        groups = np.unique(labels)
        cols = _colors(len(groups))
        for c, n_opt, p, g in zip(fit.budgets, fit.n_opt, fit.parabolas, fit.groups):
            col = cols[list(groups).index(g)]
            m = labels == g
            ax.scatter(N[m], L[m], s=14, color=col, zorder=3)
            ax.plot([n_opt], [np.polyval(p, math.log(n_opt))], marker="*", ms=10, color=col, markeredgecolor="k",
                    zorder=4)
            n = np.exp(np.linspace(math.log(N[m].min()) - 0.3, math.log(N[m].max()) + 0.3, 200))
            ax.plot(n, law.loss(n, c / (law.k * n)), "--", color=col, label=f"C = {c:.2g}")
            n_p = float(law.n_at(c))
            ax.plot([n_p], [float(law.loss(n_p, law.d_at(c)))], marker="x", ms=9, mew=2, color=col, zorder=4)
        ax.set_xscale("log")
        ax.set_xlabel("parameters N")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(title)
        ax.legend(title="dots/star measured; dashed/x predicted", loc="best")
        C = np.array(fit.budgets)
        cg = np.exp(np.linspace(math.log(C.min()) - 0.3, math.log(C.max()) + 0.3, 100))
        bx.scatter(C, fit.n_opt, color=FIT_COLOR, zorder=3, label=f"measured minima (Approach 2, a = {fit.a:.2f})")
        bx.plot(cg, fit.n_at(cg), color=FIT_COLOR, alpha=0.6)
        bx.plot(cg, law.n_at(cg), "--", color=CHINCHILLA_COLOR, label=f"predicted: {label} (a = {law.a:.2f})")
        bx.set_xscale("log")
        bx.set_yscale("log")
        bx.set_xlabel("training FLOPs C")
        bx.set_ylabel("compute-optimal N")
        bx.set_title("N_opt: measured against predicted")
        bx.legend(loc="best")
        return _save(fig, folder, name)


def loss_curve(history: Sequence[float], path: Path, title: str) -> bool:
    """One run's train/loss per optimizer step (the run's loss_curve.png); False when there is nothing to draw."""
    if not history:
        return False
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(range(1, len(history) + 1), history, lw=1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("train loss (nats/token)")
        ax.set_title(title)
        _write(fig, [Path(path)], "loss_curve", dpi=100)
    return True


def study_loss_vs_n(points: Sequence[tuple[float, float, str]], pruned: Sequence[tuple[float, float]],
                    best: tuple[float, float] | None, path: Path, title: str) -> bool:
    """A search study's final val/loss against N_total: ``points`` (N, loss, allocation) of COMPLETE trials,
    seeded ones marked; ``pruned`` (N, last reported loss) as open circles; ``best`` circled."""
    if not points and not pruned:
        return False
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6, 4))
        style = {"search": ("o", "tab:gray"), "kaplan": ("s", "tab:red"), "chinchilla": ("D", "tab:blue")}
        for alloc, (marker, color) in style.items():
            xs = [(n, v) for n, v, a in points if a == alloc]
            if xs:
                ax.scatter(*zip(*xs), marker=marker, color=color, label=f"{alloc}", zorder=3)
        if pruned:
            ax.scatter(*zip(*pruned), facecolors="none", edgecolors="k", label="pruned (last report)", zorder=2)
        if points:
            ax.plot(*zip(*sorted((n, v) for n, v, _ in points)), color="k", lw=0.8, alpha=0.5)
        if best is not None:
            ax.scatter([best[0]], [best[1]], marker="o", s=260, facecolors="none", edgecolors="goldenrod",
                       linewidths=2, zorder=4, label="best")
        ax.set_xscale("log")
        ax.set_xlabel("parameters N (total)")
        ax.set_ylabel("final val/loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="best")
        _write(fig, [Path(path)], "loss_vs_n", dpi=100)
    return True


# --------------------------------------------------------------------------- the tuning stage


def tune_cells(cells: list[dict[str, Any]], folder: Path, name: str = "tune_loss_vs_lr") -> list[Path]:
    """Final val/loss against lr, one panel per cell (rows: budgets, columns: sizes), points coloured by batch;
    the best trial ringed, the chosen optimum lr as a dashed line (and the quadratic's slice at its batch)."""
    budgets = sorted({c["budget"] for c in cells})
    sizes = sorted({c["n_params_total"] for c in cells})
    all_b = sorted({t["batch"] for c in cells for t in c["trials"]})
    norm = matplotlib.colors.LogNorm(min(all_b), max(all_b) * (1 + 1e-9))
    lrs = [t["lr"] for c in cells for t in c["trials"]]
    xlim = (min(lrs) / 1.25, max(lrs) * 1.25)  # one lr axis for every panel
    cmap = plt.get_cmap(CMAP)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(budgets), len(sizes), figsize=(2.4 * len(sizes) + 0.8, 2.5 * len(budgets)),
                                 squeeze=False, gridspec_kw={"hspace": 0.45})
        for c in cells:
            i, j = budgets.index(c["budget"]), sizes.index(c["n_params_total"])
            ax = axes[i][j]
            ok = [t for t in c["trials"] if t["loss"] is not None]
            bad = [t for t in c["trials"] if t["loss"] is None]
            if ok:
                ax.scatter([t["lr"] for t in ok], [t["loss"] for t in ok], c=[t["batch"] for t in ok], cmap=cmap,
                           norm=norm, s=16, zorder=3)
            opt = c.get("optimum") or {}
            if opt:
                lo = opt["best_loss"]
                hi = max([t["loss"] for t in ok if t["loss"] <= lo + 1.0] + [lo + 0.05])
                for t in bad:
                    ax.scatter([t["lr"]], [hi], marker="x", color="k", s=18, zorder=3)
                ax.scatter([opt["best_lr"]], [lo], s=90, facecolors="none", edgecolors="goldenrod", linewidths=1.5,
                           zorder=4)
                ax.axvline(opt["lr"], color=FIT_COLOR, ls="--", lw=0.9)
                if opt["method"] == "quadratic":  # the fitted parabola at the chosen batch
                    q, off = opt["fit"]["c"], opt["fit"]["offsets"][str(int(opt["batch"]))]
                    xs = np.linspace(math.log(min(t["lr"] for t in ok)), math.log(max(t["lr"] for t in ok)), 60)
                    ax.plot(np.exp(xs), q[0] + q[1] * xs + q[2] * xs**2 + off, color=FIT_COLOR, lw=0.8,
                            alpha=0.7)
                ax.set_ylim(lo - 0.05 * (hi - lo) - 0.01, hi + 0.08 * (hi - lo) + 0.01)
            ax.set_xscale("log")
            ax.set_xlim(*xlim)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"N={c['n_params_total'] / 1e3:.3g}k C={c['budget']:.2g}", fontsize=8)
            if i == len(budgets) - 1:
                ax.set_xlabel("peak lr")
            if j == 0:
                ax.set_ylabel("final val/loss")
        bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="batch (sequences)", shrink=0.8)
        bar.set_ticks(all_b, labels=[str(b) for b in all_b])
        bar.ax.minorticks_off()
        fig.suptitle("tuning: loss against lr per cell (ring = best trial, dashed = chosen lr, x = diverged)")
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{name}.png", folder / f"{name}.svg"]
        for p in paths:  # no tight_layout: it does not know the shared colorbar
            fig.savefig(p, metadata={"Date": None} if p.suffix == ".svg" else None, bbox_inches="tight")
        plt.close(fig)
        return paths


def tune_rule(cells: list[dict[str, Any]], rule: Any, fits: dict[str, Any], folder: Path,
              name: str = "tune_rule") -> list[Path]:
    """lr*(N_total) and batch*(D): the cells' optima (colour = budget; open = best trial), the least-squares
    power laws and the rule chosen."""
    done = [c for c in cells if c.get("optimum")]
    budgets = sorted({c["budget"] for c in done})
    cols = [plt.get_cmap(CMAP)(x) for x in np.linspace(0.05, 0.9, max(len(budgets), 1))]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for key, ax, xkey, xlab, ref in (("lr", axes[0], "n_params_total", "parameters N_total", N_REF),
                                         ("batch", axes[1], "tokens", "training tokens D", D_REF)):
            for b, col in zip(budgets, cols):
                cs = [c for c in done if c["budget"] == b]
                ax.scatter([c[xkey] for c in cs], [c["optimum"][key] for c in cs], color=col, s=22, zorder=3,
                           label=f"C = {b:.2g} (optimum)")
                ax.scatter([c[xkey] for c in cs], [c["optimum"][f"best_{key}"] for c in cs], facecolors="none",
                           edgecolors=col, s=22, zorder=2)
            xs = np.exp(np.linspace(math.log(min(c[xkey] for c in done)) - 0.2,
                                    math.log(max(c[xkey] for c in done)) + 0.2, 50))
            f = fits[key]["N_total" if key == "lr" else "D"]
            if f["exp_se"] is not None and math.isfinite(f["exp_se"]):
                ax.plot(xs, f["coef"] * (xs / ref) ** f["exp"], color=FIT_COLOR, lw=1,
                        label=f"fit: exp {f['exp']:+.2f} ± {f['exp_se']:.2f}")
            ys = [rule.lr_for(x) for x in xs] if key == "lr" else \
                [rule.batch_coef * (x / D_REF) ** rule.batch_exp for x in xs]
            ax.plot(xs, ys, color="tab:red", lw=1.2, ls="--", label=f"rule ({fits[key]['chosen']})")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlab)
            ax.set_ylabel("optimal peak lr" if key == "lr" else "optimal batch (sequences)")
            ax.legend(loc="best")
        axes[0].set_title("lr*(N_total) (open = best trial)")
        axes[1].set_title("batch*(D) (open = best trial)")
        return _save(fig, folder, name)


# --------------------------------------------------------------------------- the protocol ablation


def protocol_optimal(panels: list[dict[str, Any]], folder: Path, name: str, title: str) -> list[Path]:
    """N_opt against C, one panel per protocol step (Porian et al. 2024, Fig. 1 style): Approach 2's minima, its
    fitted line (solid) and Approach 3's (dashed), Kaplan (0.73) and Chinchilla (0.50) slopes through the middle,
    each step in its own convention (see ``grouped._panel`` for the keys)."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(2.9 * max(1, len(panels)) + 0.6, 3.6),
                                 squeeze=False)
        for ax, p in zip(axes[0], panels):
            grid = p["grid"]
            ax.scatter(p["budgets"], p["n_opt"], marker="s", s=20, color="#9467bd", zorder=3, label="A2 minima")
            for key, ls, color in (("approach2", "-", "#9467bd"), ("approach3", "--", "#ff7f0e")):
                a, ci = p["a2" if key == "approach2" else "a3"]
                if p[key] is None or a is None:  # Approach 2 not fitted (no bracketed minimum)
                    continue
                iv = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and ci[0] is not None else ""
                ax.plot(grid, p[key], ls=ls, color=color, label=f"{'A2' if key == 'approach2' else 'A3'} a = "
                        f"{a:.2f}{iv}")
            mid_c = math.exp(float(np.mean(np.log(grid))))
            line = p["approach2"] if p["approach2"] is not None else p["approach3"]
            mid_n = float(np.exp(np.interp(math.log(mid_c), np.log(grid), np.log(line))))
            for slope, color, lab in ((laws.KAPLAN_A, KAPLAN_COLOR, "Kaplan"), (laws.CHINCHILLA_A, CHINCHILLA_COLOR,
                                                                                "Chinchilla")):
                ax.plot(grid, mid_n * (grid / mid_c) ** slope, ls=":", color=color, lw=1,
                        label=f"{lab} {slope:.2f}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{p['name']} ({p['convention']})")
            ax.set_xlabel("compute C (FLOPs)")
            ax.set_ylabel(f"N_opt ({p['n_label']})")
            ax.legend(loc="upper left", fontsize=6.5)
        fig.suptitle(title)
        return _save(fig, folder, name)
