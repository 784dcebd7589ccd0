"""Every figure in scaling_lab.figures, drawn on small synthetic inputs: no two visible tick labels on one axis
overlap (log axes below a decade used to read '2×10³3×10³4×10³'), every axis keeps labels, legends sit off
the data, and each function still writes its files."""

import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from scaling_lab import analyze, figures, grouped, report, sources
from scaling_lab.isoflop import HyperRule

HELPERS = {"log_ticks", "tidy_ticks"}  # public, but not figures
FIGURES = {n for n, f in inspect.getmembers(figures, inspect.isfunction)
           if f.__module__ == figures.__name__ and not n.startswith("_")} - HELPERS

ROOT = Path(__file__).resolve().parents[1]


def _tick_labels(axis) -> list:
    """The tick labels a draw shows on ``axis``: ticks inside the view, label visible and not empty."""
    lo, hi = sorted(axis.get_transform().transform(np.array(axis.get_view_interval())))
    tol = 1e-6 * max(hi - lo, 1e-12)
    out = []
    for ticks, locs in ((axis.get_major_ticks, axis.get_majorticklocs()),
                        (axis.get_minor_ticks, axis.get_minorticklocs())):
        for tick in ticks(len(locs)):
            x = float(axis.get_transform().transform(np.array([tick.get_loc()]))[0])
            if lo - tol <= x <= hi + tol:
                out += [lab for lab in (tick.label1, tick.label2) if lab.get_visible() and lab.get_text().strip()]
    return out


def check_figure(fig, name: str) -> list[str]:
    """Problems of one drawn figure: overlapping tick labels, axes without labels, legends over many points."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    problems = []
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        for which, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            labels = _tick_labels(axis)
            boxes = [(lab.get_text(), lab.get_window_extent(r)) for lab in labels]
            clash = [(a, b) for j, (a, ba) in enumerate(boxes) for b, bb in boxes[j + 1:] if ba.overlaps(bb)]
            if clash:
                problems.append(f"{name} axes {i} {which}: overlapping tick labels {clash[:3]}")
            if not labels and axis.get_ticklocs().size:
                problems.append(f"{name} axes {i} {which}: no tick labels")
        leg = ax.get_legend()
        if leg is not None:
            box = leg.get_window_extent(r)
            pts = np.concatenate([c.get_offset_transform().transform(c.get_offsets()) for c in ax.collections
                                  if len(c.get_offsets()) and c.get_offsets().ndim == 2] or [np.empty((0, 2))])
            covered = int(sum(box.contains(x, y) for x, y in pts))
            if covered > max(1, 0.1 * len(pts)):
                problems.append(f"{name} axes {i}: legend covers {covered} of {len(pts)} points")
    return problems


@pytest.fixture
def drawn(monkeypatch):
    """Collect the problems of every figure saved, and which figure functions ran."""
    problems: list[str] = []
    called: set[str] = set()
    monkeypatch.setattr(figures, "ON_FIGURE", lambda fig, name: problems.extend(check_figure(fig, name)))
    for name in FIGURES:
        fn = getattr(figures, name)

        def spy(*a, _fn=fn, _name=name, **k):
            called.add(_name)
            return _fn(*a, **k)

        monkeypatch.setattr(figures, name, spy)
    return problems, called


def _study_points(n_lo: float, n_hi: float, k: int = 6) -> list[tuple[float, float, str]]:
    ns = np.geomspace(n_lo, n_hi, k)
    return [(float(n), 3.0 + 0.3 * np.log(n / np.sqrt(n_lo * n_hi)) ** 2, "search") for n in ns]


def test_every_figure_has_readable_ticks_and_legends(drawn, tmp_path):
    problems, called = drawn
    study = sources.simulate(seed=0, noise=0.01)
    cfg = analyze.AnalyzeConfig(source="simulate", bootstrap=20, log=False, overlay="simulate")
    results, objects = analyze.analyze_study(study, cfg)
    figs = report.make_figures(results, objects, study, tmp_path / "figs")
    for name, paths in figs.items():
        assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size for p in paths), name
    assert figures.loss_curve(list(np.linspace(5.5, 3.1, 300)), tmp_path / "loss_curve.png", "tiny")
    pts = _study_points(2.1e3, 9e3)  # under a decade: the case that printed '2×10³3×10³4×10³'
    assert figures.study_loss_vs_n(pts[1:], [(pts[0][0], 4.0)], pts[3][:2], tmp_path / "loss_vs_n.png", "C = 1e12")
    assert (tmp_path / "loss_curve.png").stat().st_size and (tmp_path / "loss_vs_n.png").stat().st_size
    tuned = json.loads((ROOT / "docs" / "tuning-quick.json").read_text())  # the shipped quick tuning's cells
    rule = HyperRule.from_json(str(ROOT / "docs" / "tuning-quick.json"))
    assert figures.tune_cells(tuned["cells"], tmp_path / "tune") and figures.tune_rule(tuned["cells"], rule,
                                                                                         tuned["fit"], tmp_path / "tune")
    no_a2 = {**objects["total"], "fit2": None, "budgets_c": np.array(objects["total"]["fit2"].budgets)}
    panels = [grouped._panel("kaplan", "total", objects["total"], results), grouped._panel("tuned", "total", no_a2,
                                                                                          results)]
    assert figures.protocol_optimal(panels, tmp_path / "protocol", "nopt_by_protocol", "by protocol")
    assert called == FIGURES, f"figure functions not drawn by this test: {sorted(FIGURES - called)}"
    assert not problems, "\n".join(problems)


# spans a little over a decade and well under one: matplotlib labels minor ticks there, and they collide
SPANS = [(2.15e3, 4.3e4), (1.47e3, 2.9e4), (3.16e3, 4.7e3), (1.47e3, 2.2e3), (2.1e3, 9e3), (1.2e4, 1.5e4),
         (3.3e4, 1.1e5), (5e3, 4e6), (1e9, 1e24), (0.4, 3.0)]


@pytest.mark.parametrize("n_lo,n_hi", SPANS)
def test_log_axes_of_any_span_get_separate_labels(n_lo, n_hi, drawn, tmp_path):
    problems, _ = drawn
    labels: list[list[str]] = []
    check = figures.ON_FIGURE

    def record(fig, name):
        check(fig, name)
        labels.append([lab.get_text() for lab in _tick_labels(fig.axes[0].xaxis)])

    figures.ON_FIGURE = record
    assert figures.study_loss_vs_n(_study_points(n_lo, n_hi), [], None, tmp_path / "s.png", "span")
    assert not problems, "\n".join(problems)
    nice = [m * 10.0 ** e for e in range(-2, 26) for m in (1, 2, 3, 5) if n_lo <= m * 10.0 ** e <= n_hi]
    assert len(labels[0]) >= min(2, max(1, len(nice))), labels


def test_figures_keep_their_outputs(tmp_path):
    assert not figures.loss_curve([], tmp_path / "none.png", "empty")
    assert not figures.study_loss_vs_n([], [], None, tmp_path / "none.png", "empty")
    assert not (tmp_path / "none.png").exists()
    paths = figures.curve_extrapolation([{"actual": 3.0, "predicted": 3.1}, {"actual": 2.5, "predicted": 2.45}],
                                        tmp_path, "ce")
    assert paths == [tmp_path / "ce.png", tmp_path / "ce.svg"] and all(Path(p).exists() for p in paths)
