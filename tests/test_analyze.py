"""The analyze entry point on a real SQLite MLflow store and on CSV files: same fit from both, bad inputs with
one clear error, the report folder and the analyze run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from servers import store_client as _client
from servers import store_runs as _runs

from scaling_lab import analyze, cli, config, laws, overlay, report, sources, tracking
from scaling_lab.train import train

ROOT = Path(__file__).resolve().parents[1]
EXP = "lab"


def _use_store(mp: pytest.MonkeyPatch, folder: Path) -> None:
    import mlflow

    mp.chdir(folder)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")


@pytest.fixture(scope="module")
def logged_store(tmp_path_factory):
    """A simulated isoFLOP study (4 budgets x 8 sizes, 1% noise) written once per module as a study parent +
    trial runs, 2 of them PRUNED, plus a stray run of another study that the tag filter must leave out."""
    folder = tmp_path_factory.mktemp("logged")
    mp = pytest.MonkeyPatch()
    _use_store(mp, folder)
    sim = sources.simulate(seed=7, noise=0.01)
    parent = sources.log_study(sim, EXP, "s1", pruned=2)
    other = sources.simulate(seed=8, noise=0.01, budgets=[1e12])
    other.runs = other.runs.iloc[:1]
    sources.log_study(other, EXP, "s2")
    mp.undo()
    return folder, sim, parent


@pytest.fixture
def logged(logged_store, monkeypatch):
    folder, sim, parent = logged_store
    _use_store(monkeypatch, folder)
    return sim, parent


def test_mlflow_selection_by_tags_and_parent(logged):
    sim, parent = logged
    cfg = analyze.AnalyzeConfig(experiment=EXP, tags="study=s1", log=False)
    by_tag = sources.load_mlflow(cfg)
    by_parent = sources.load_mlflow(analyze.AnalyzeConfig(experiment=EXP, parent_run=parent, log=False))
    assert len(by_tag.runs) == len(sim.runs) - 2  # PRUNED trials give curves only
    assert sorted(by_tag.runs["run_id"]) == sorted(by_parent.runs["run_id"])
    assert len(by_tag.curve_runs) == len(sim.runs)
    assert by_tag.runs["group"].nunique() == 4
    assert set(by_tag.provenance["run_ids"]) == set(by_tag.runs["run_id"])


def test_csv_and_mlflow_give_the_same_fit(logged, tmp_path):
    cfg = analyze.AnalyzeConfig(experiment=EXP, tags="study=s1", bootstrap=0, log=False, convention="total")
    study = sources.load_mlflow(cfg)
    ml, _ = analyze.analyze_study(study, cfg)
    path = tmp_path / "runs.csv"
    study.runs.rename(columns={"n_params_total": "N", "tokens": "D", "loss": "L"})[["N", "D", "L"]].to_csv(
        path, index=False)
    cs = sources.load_csv(path, "params=N,tokens=D,loss=L")  # flops absent: C = 6ND, grouped by tolerance
    cv, _ = analyze.analyze_study(cs, analyze.AnalyzeConfig(source="csv", csv=str(path), bootstrap=0, log=False))
    a, b = ml["conventions"]["total"], cv["conventions"]["csv"]
    for k in ("E", "A", "B", "alpha", "beta", "a"):
        assert b["approach3"][k] == pytest.approx(a["approach3"][k], rel=1e-6)
    assert b["approach2"]["a"] == pytest.approx(a["approach2"]["a"], rel=1e-9)
    assert [x["n_opt"] for x in b["approach2"]["n_opt_by_budget"]] == pytest.approx(
        [x["n_opt"] for x in a["approach2"]["n_opt_by_budget"]], rel=1e-9)
    assert cv["provenance"]["sha256"] and cv["provenance"]["csv"] == str(path.resolve())


def test_simulation_recovers_its_law():
    study = sources.simulate(seed=3, noise=0.002)
    res, _ = analyze.analyze_study(study, analyze.AnalyzeConfig(source="simulate", bootstrap=0, log=False,
                                                                convention="total"))
    got, truth = res["simulation"]["recovered"], res["simulation"]["truth"]
    assert got["alpha"] == pytest.approx(truth["alpha"], abs=0.05)  # ±0.05 at 0.2% noise, 32 runs
    assert got["beta"] == pytest.approx(truth["beta"], abs=0.05)
    assert res["conventions"]["total"]["approach2"]["a"] == pytest.approx(truth["a"], abs=0.06)


def test_bootstrap_intervals_do_not_depend_on_the_refit_processes():
    """fit_workers=2 runs Approach 3's bootstrap refits in two processes; every interval equals the one-process one."""
    study = sources.simulate(seed=4, noise=0.01)
    out = []
    for workers in (1, 2):
        cfg = analyze.AnalyzeConfig(source="simulate", bootstrap=40, log=False, convention="total", fit_workers=workers)
        res, _ = analyze.analyze_study(study, cfg)
        out.append(res["conventions"]["total"])
    for approach in ("approach1", "approach2", "approach3"):
        assert out[0][approach]["ci95"] == out[1][approach]["ci95"], approach
    lo, hi = out[0]["approach3"]["ci95"]["a"]
    assert lo < hi  # a real interval, from resamples that differ


def _csv(tmp_path, frame: pd.DataFrame) -> str:
    p = tmp_path / "in.csv"
    frame.to_csv(p, index=False)
    return str(p)


def _sim_frame() -> pd.DataFrame:
    r = sources.simulate(seed=1).runs
    return pd.DataFrame({"N": r["n_params_total"], "D": r["tokens"], "C": r["flops_total"], "L": r["loss"]})


BAD = [
    ("missing column", lambda f: f.drop(columns=["L"]), "params=N,tokens=D,loss=L", "columns", "L"),
    ("no mapping", lambda f: f, "params=N,tokens=D", "columns", "a mapping for loss"),
    ("nan loss", lambda f: f.assign(L=f["L"].where(f.index != 3)), "params=N,tokens=D,loss=L", "loss",
     "NaN/invalid at CSV lines [5]"),
    ("single budget", lambda f: f[f["C"].between(0.9e12, 1.1e12)], "params=N,flops=C,loss=L", "budgets",
     "2 or more FLOP budgets"),
    ("too few", lambda f: f.iloc[:4], "params=N,tokens=D,loss=L", "runs", "at least 6"),
]


@pytest.mark.parametrize("name,edit,columns,param,text", BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_clear_error_no_run(name, edit, columns, param, text, store, tmp_path, capsys):
    path = _csv(tmp_path, edit(_sim_frame()))
    code = cli.main_analyze(["--source", "csv", "--csv", path, "--columns", columns, "--experiment", EXP,
                         "--bootstrap", "0"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    assert f"parameter '{param}'" in lines[0] and text in lines[0], lines[0]
    assert not [r for r in _runs(store) if r.info.status in ("RUNNING", "FINISHED")]


def test_bad_flags_and_empty_selection(store, capsys):
    assert cli.main_analyze(["--source", "mlflow", "--experiment", "nope"]) == 2
    assert "parameter 'experiment'" in capsys.readouterr().err
    assert cli.main_analyze(["--convention", "chinchilla"]) == 2
    assert "parameter 'convention'" in capsys.readouterr().err
    assert cli.main_analyze(["--bootstrap", "x"]) == 2
    assert "parameter 'bootstrap'" in capsys.readouterr().err
    assert cli.main_analyze(["--a3_interval", "wild"]) == 2
    assert "parameter 'a3_interval'" in capsys.readouterr().err
    assert not _runs(store)


def test_residual_interval_for_approach3_keeps_the_pairs_one_beside_it(tmp_path, capsys):
    """a3_interval=residual: Approach 3's interval comes from refits on residual-bootstrap data (every draw
    refits, so all 30 are kept), the pairs interval is reported beside it, and the report says so."""
    out = tmp_path / "report"
    code = cli.main_analyze(["--source", "simulate", "--convention", "total", "--bootstrap", "30", "--out", str(out),
                             "--a3_interval", "residual", "--log", "false"])
    assert code == 0, capsys.readouterr()
    c = json.loads((out / "fits.json").read_text())["conventions"]["total"]
    assert c["bootstrap"]["kept"]["approach3"] == 30 and 0 < c["bootstrap"]["kept"]["approach3_pairs"] <= 30
    assert c["approach3"]["interval"].startswith("residual") and c["approach3"]["ci95"]["a"] != c["approach3"]["pairs_ci95"]["a"]
    lo, hi = c["approach3"]["ci95"]["a"]
    assert lo < c["approach3"]["a"] < hi
    assert "pairs bootstrap (runs resampled)" in (out / "report.md").read_text()


def test_end_to_end_report_and_analyze_run(logged, tmp_path, capsys):
    out = tmp_path / "report"
    code = cli.main_analyze(["--experiment", EXP, "--tags", "study=s1", "--out", str(out), "--bootstrap", "30",
                         "--budgets", "1e21"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "total / approach3: a = " in printed and "Kaplan 0.73" in printed
    fits = json.loads((out / "fits.json").read_text())
    for conv in ("kaplan", "total"):
        c = fits["conventions"][conv]
        assert {"E", "A", "B", "alpha", "beta", "a", "b", "ci95"} <= set(c["approach3"])
        assert {"a", "b", "ci95", "n_opt_by_budget"} <= set(c["approach2"]) and len(c["approach2"]["n_opt_by_budget"]) == 4
        assert {"a", "b", "ci95"} <= set(c["approach1"]) and c["approach1"]["from_curves"]
        lo, hi = c["approach3"]["ci95"]["alpha"]
        assert lo <= c["approach3"]["alpha"] <= hi
        # a3_interval=pairs (the default): Approach 3's interval is the pairs bootstrap's
        assert 0 < c["bootstrap"]["kept"]["approach3"] == c["bootstrap"]["kept"]["approach3_pairs"] <= 30
        assert c["approach3"]["ci95"]["a"] == c["approach3"]["pairs_ci95"]["a"]
        assert {"L_N", "L_D", "L_C", "L_N_irreducible", "L_ND"} <= set(c["kaplan"])
        assert {x["budget"] for x in c["extrapolation"]} == {"GPT-3", "Chinchilla", "1e+21 FLOPs"}
        assert all(x["factor"] > 1e7 for x in c["extrapolation"] if x["budget"] == "GPT-3")
        assert set(fits["verdict"][conv]) == {"approach1", "approach2", "approach3", "kaplan_eq1.5"}
    assert len(fits["provenance"]["run_ids"]) == len(logged[0].runs) - 2  # every simulated run but the 2 PRUNED
    names = {p.name for p in out.iterdir()}
    for fig in ("isoflop", "optimal", "contours", "curves", "residuals", "extrapolation"):
        assert {f"{fig}_total.png", f"{fig}_total.svg", f"{fig}_kaplan.png"} <= names
    assert {"report.md", "report.html", "fits.json"} <= names
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<img" in html and 'src="isoflop' not in html
    ana = [r for r in _runs(Path.cwd()) if r.data.tags.get("scaling_lab.kind") == "analyze"]
    assert len(ana) == 1 and ana[0].info.status == "FINISHED"
    client = _client(Path.cwd())
    arts = {a.path for a in client.list_artifacts(ana[0].info.run_id, "report")}
    assert {"report/fits.json", "report/report.html", "report/isoflop_total.png"} <= arts
    assert ana[0].data.metrics["total/approach3/a"] == pytest.approx(fits["conventions"]["total"]["approach3"]["a"])
    # the analyze run is not itself read as data by the next analysis
    again = sources.load_mlflow(analyze.AnalyzeConfig(experiment=EXP, log=False))
    assert len(again.runs) == len(logged[0].runs) - 2 + 1  # s1 less its 2 PRUNED, plus the one s2 run


@pytest.mark.slow
def test_mlflow_run_analyze_entry_point_on_csv(store, tmp_path):
    path = _csv(tmp_path, _sim_frame())
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    out = tmp_path / "rep"
    p = subprocess.run([sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "analyze", "--env-manager", "local",
                        "--experiment-name", EXP, "-P", "source=csv", "-P", f"csv={path}", "-P",
                        "columns=params=N,flops=C,loss=L", "-P", f"out={out}", "-P", "bootstrap=10"],
                       cwd=store, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "fits.json").exists() and (out / "report.html").exists()
    runs = [r for r in _runs(store) if r.data.tags.get("scaling_lab.kind") == "analyze"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["csv_sha256"] == json.loads((out / "fits.json").read_text())["provenance"]["sha256"]


@pytest.mark.slow
def test_curve_extrapolation_on_real_tiny_runs(store, tiny):
    """Two real tiny training runs logged to MLflow; their stored validation curves feed the learning-curve
    extrapolation (the error is measured, not asserted small: see docs/analysis.md for numbers)."""

    for n_embd in (32, 48):
        cfg = config.resolve({**tiny, "n_embd": str(n_embd), "n_head": "2", "experiment": EXP})
        with tracking.run(EXP, f"tiny-{n_embd}", system_metrics=False) as log:
            train(cfg, log)
    study = sources.load_mlflow(analyze.AnalyzeConfig(experiment=EXP, log=False))
    assert len(study.runs) == 2 and len(study.curves) == 2
    r = analyze.curve_extrapolation(study, 0.5)
    assert r["runs"] == 2
    for row in r["per_run"]:
        assert math.isfinite(row["rel_err"]) and row["actual"] == pytest.approx(
            study.runs.set_index("run_id").loc[row["run_id"], "loss"])
    assert np.isfinite(r["median_abs_rel_err"])
    assert laws.FitError  # module import kept for the error type used by the library


def test_nan_final_loss_in_store_is_named(store, capsys):
    sim = sources.simulate(seed=2, budgets=[1e12, 3e12], shapes=[(1, 16), (2, 32), (3, 64)])
    bad = sim.runs["run_id"].iloc[1]
    sim.curves[bad].loc[sim.curves[bad].index[-1], "loss"] = float("nan")
    sources.log_study(sim, EXP, "nan")
    code = cli.main_analyze(["--experiment", EXP, "--tags", "study=nan", "--bootstrap", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "parameter 'final/val_loss'" in err and "1 run(s)" in err, err
    assert not [r for r in _runs(store) if r.data.tags.get("scaling_lab.kind") == "analyze"]


def test_mlproject_analyze_parameters_match_config():
    import yaml

    from scaling_lab import projectspec

    entry = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["analyze"]
    # declared: the fields with a real default (projectspec's rule); the rest are extra -P name=value
    assert list(entry["parameters"]) == list(projectspec.parameters("analyze"))
    assert set(entry["parameters"]) <= set(analyze.field_names()) and "csv" not in entry["parameters"]
    for name in entry["parameters"]:
        assert f"--{name} {{{name}}}" in entry["command"]


# --------------------------------------------------------------------------- quick vs real overlay

OTHER_LAW = {"E": 1.6, "A": 30.0, "B": 90.0, "alpha": 0.26, "beta": 0.36}  # a = 0.58, not the simulation's 0.45


def test_overlay_simulate_predicts_from_the_simulation_law_over_measured_runs(tmp_path, store, capsys):
    """'Measured' runs drawn from another law: the overlay's predicted N_opt and a are the simulation law's own
    (Hoffmann et al. 2022 Eq. 4), the measured ones differ from them, and the report, figure and MLflow run
    carry the comparison."""
    measured = sources.simulate(seed=5, noise=0.003, law=OTHER_LAW)
    cfg = analyze.AnalyzeConfig(source="simulate", bootstrap=20, log=False, convention="total", overlay="simulate")
    res, objects = analyze.analyze_study(measured, cfg)
    ov = res["overlay"]
    sim = laws.ChinchillaFit(**sources.SIM_LAW)
    assert ov["a_predicted"] == pytest.approx(sim.a) and ov["measured_convention"] == "total"
    assert len(ov["by_budget"]) == 4
    for row in ov["by_budget"]:
        assert row["n_opt_predicted"] == pytest.approx(float(sim.n_at(row["budget"])), rel=1e-6)
    true_other = laws.ChinchillaFit(**OTHER_LAW)
    assert ov["measured"]["approach3"]["a"] == pytest.approx(true_other.a, abs=0.05)
    assert ov["measured"]["approach3"]["prediction_inside_ci95"] is False  # 0.45 vs a measured ~0.58
    assert ov["n_opt_log10_ratio_mean"] > 0.1  # larger exponent, larger N_opt in this range
    assert ov["loss_log_ratio_max_abs"] > 0.1  # another law: losses up to >10% off the predicted ones

    folder = report.write_report(res, objects, measured, tmp_path / "rep")
    assert {"overlay.png", "overlay.svg"} <= {p.name for p in folder.iterdir()}
    md = (folder / "report.md").read_text()
    assert "Quick vs real" in md and "(prediction outside)" in md and "overlay.png" in md


def test_overlay_from_an_earlier_fits_json_of_the_same_law_agrees(tmp_path, store):
    """A prediction fitted on one simulated study (its fits.json) over another study of the same law: the
    measured minima and losses agree with it within the noise."""
    first = tmp_path / "first"
    res, objects = analyze.analyze_study(sources.simulate(seed=11, noise=0.002),
                                         analyze.AnalyzeConfig(source="simulate", bootstrap=0, log=False))
    report.write_report(res, objects, sources.simulate(seed=11, noise=0.002), first)
    pred = overlay.load_prediction(str(first))  # the folder: its fits.json
    assert pred.convention == "total" and pred.law.alpha == pytest.approx(res["conventions"]["total"]["approach3"]["alpha"])
    measured = sources.simulate(seed=12, noise=0.002)
    res2, _ = analyze.analyze_study(measured, analyze.AnalyzeConfig(source="simulate", bootstrap=0, log=False,
                                                                    overlay=str(first / "fits.json")))
    ov = res2["overlay"]
    assert abs(ov["n_opt_log10_ratio_mean"]) < 0.15  # within 1.4x of each other on average
    assert abs(ov["loss_log_ratio_median"]) < 0.005 and ov["loss_log_ratio_max_abs"] < 0.03


def test_overlay_logged_by_the_entry_point(logged, tmp_path, capsys):
    out = tmp_path / "ov"
    code = cli.main_analyze(["--experiment", EXP, "--tags", "study=s1", "--out", str(out), "--bootstrap", "0",
                         "--overlay", "simulate"])
    assert code == 0, capsys.readouterr().out
    ana = [r for r in _runs(Path.cwd()) if r.data.tags.get("scaling_lab.kind") == "analyze"
           and r.data.params.get("out") == str(out)]
    assert len(ana) == 1 and ana[0].data.params["overlay"] == "simulate"
    assert ana[0].data.metrics["overlay/a_predicted"] == pytest.approx(laws.ChinchillaFit(**sources.SIM_LAW).a)
    arts = {a.path for a in _client(Path.cwd()).list_artifacts(ana[0].info.run_id, "report")}
    assert "report/overlay.png" in arts


@pytest.mark.parametrize("content,text", [(None, "'simulate', an earlier analysis' fits.json"),
                                          ("not json", "a fits.json written by analyze"),
                                          ('{"conventions": {"total": {"approach3": {"E": 1}}}}',
                                           "a fits.json with an Approach 3 fit")])
def test_bad_overlay_one_clear_error_no_run(content, text, store, tmp_path, capsys):
    path = tmp_path / "fits.json"
    if content is not None:
        path.write_text(content)
    code = cli.main_analyze(["--source", "simulate", "--experiment", EXP, "--bootstrap", "0", "--overlay", str(path)])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "parameter 'overlay'" in lines[0] and text in lines[0], lines
    assert not _runs(store)
