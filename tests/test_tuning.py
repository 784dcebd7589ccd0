"""The `tune` entry point: real Optuna studies (SQLite), a real MLflow store and real training on the offline text
(tiny mode); then a tiny search that reads the fitted rule from the JSON (hparams=<path>)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from servers import store_client as _client
from servers import store_runs as _runs

from scaling_lab import counting, projectspec, tunefit, tuning
from scaling_lab.cli import main_tune
from scaling_lab.config import ModelConfig
from scaling_lab.isoflop import HyperRule, resolve_search
from scaling_lab.search import run_search

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_tune(data_dir, store) -> dict[str, str]:
    return {"mode": "tiny", "dataset": str(data_dir), "train_split": "test", "val_split": "validation",
            "storage": f"sqlite:///{store / 'optuna.db'}", "experiment": "tune-test", "out": str(store / "tuning.json"),
            "batches": "8,16,32"}  # not tiny's 4: its cells take the most steps, and CI's time


def _args(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k}", str(v))]


def _kind(store: Path, kind: str) -> list:
    return [r for r in _runs(store) if r.data.tags.get("scaling_lab.kind") == kind]


# --------------------------------------------------------------------------- pure parts


def test_flags_mlproject_entry_and_presets():
    assert "lr" not in tuning.TUNE_FIELDS and "batch_size" not in tuning.TUNE_FIELDS  # per trial
    for name in ("mode", "budgets", "sizes", "trials", "lr_min", "lr_max", "batches", "storage", "study_prefix",
                 "block_size", "out", "dry_run", "dataset", "vocab_size", "seed", "flops_rule"):
        assert name in tuning.TUNE_FIELDS
    entry = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["tune"]
    assert list(entry["parameters"]) == list(projectspec.parameters("tune"))  # the rest: extra -P name=value
    assert set(entry["parameters"]) <= set(tuning.TUNE_FIELDS) and "budgets" not in entry["parameters"]
    assert all(p["default"] not in ("", None) for p in entry["parameters"].values())
    assert entry["command"].startswith("PYTHONPATH=src:$PYTHONPATH python mlproject/tune.py")
    for name in entry["parameters"]:
        assert f"--{name} {{{name}}}" in entry["command"]
    q = tuning.resolve_tune({"mode": "quick"})
    assert len(q.budget_list()) >= 2 and len(q.size_list()) >= 3 and q.data.vocab_size == 512 and q.block_size == 64
    assert tuning.TuneConfig().trials == tuning.TUNE_MODES["quick"]["trials"]  # unset fields take the mode's


def test_cell_optimum_and_power_fits_recover_known_values():
    rng = np.random.default_rng(0)
    lrs = np.exp(rng.uniform(math.log(1e-3), math.log(3e-2), 12))
    bs = rng.choice([2, 4, 8, 16], 12)
    offset = {2: 0.1, 4: 0.0, 8: 0.05, 16: 0.2}  # batch 4 is best at equal lr
    loss = 3.0 + 0.05 * (np.log(lrs) - math.log(6e-3)) ** 2 + np.array([offset[b] for b in bs])
    opt = tunefit.cell_optimum(list(zip(lrs, bs, loss)))
    assert opt["method"] == "quadratic" and opt["lr"] == pytest.approx(6e-3, rel=1e-6) and opt["batch"] == 4
    assert opt["loss_at_optimum"] == pytest.approx(3.0)
    few = tunefit.cell_optimum([(1e-3, 4, 3.2), (1e-2, 8, 3.1), (3e-2, 8, math.inf)])  # too few: the best trial
    assert (few["lr"], few["batch"], few["method"]) == (1e-2, 8.0, "best")
    n = np.array([1e4, 3e4, 1e5, 3e5])
    exact = tunefit.fit_power(list(n), list(2e-3 * (n / 1e5) ** -0.4), 1e5, "N_total")
    assert exact.coef == pytest.approx(2e-3) and exact.exp == pytest.approx(-0.4) and exact.exp_se < 1e-9
    noisy = 2e-3 * (n / 1e5) ** -0.4 * np.exp([0.1, -0.1, -0.1, 0.1])
    f = tunefit.fit_power(list(n), list(noisy), 1e5, "N_total")
    slope, cov = np.polyfit(np.log(n / 1e5), np.log(noisy), 1, cov="unscaled")
    resid = np.log(noisy) - np.polyval(slope, np.log(n / 1e5))
    assert f.exp == pytest.approx(slope[0]) and f.exp_se == pytest.approx(math.sqrt(cov[0, 0] * resid @ resid / 2))


# --------------------------------------------------------------------------- a real tiny tuning, then a search


def test_tune_writes_a_rule_a_search_uses_and_a_rerun_reuses_trials(tiny_tune, store, capsys):
    tcfg = tuning.resolve_tune(tiny_tune)
    res = tuning.run_tune(tcfg)
    path = store / "tuning.json"
    doc = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    rule = HyperRule.from_json(str(path))
    assert rule == res.rule and rule.source.startswith("tune tiny ")
    assert set(doc["rule"]) == {"lr_coef", "lr_exp", "batch_coef", "batch_exp", "source"}
    assert {"command", "machine", "date", "torch", "seed", "budgets", "sizes"} <= set(doc["provenance"])
    assert {"cpu", "cores"} <= set(doc["provenance"]["machine"])
    cells = tuning.plan_cells(tcfg)
    assert [c["study_name"] for c in doc["cells"]] == [c.study_name for c in cells] and len(cells) == 6
    for c in doc["cells"]:
        assert sum(t["state"] == "COMPLETE" for t in c["trials"]) == tcfg.trials
        assert all(tcfg.lr_min <= t["lr"] <= tcfg.lr_max and t["batch"] in c["batches"] for t in c["trials"])
        assert c["optimum"]["best_loss"] == min(t["loss"] for t in c["trials"] if t["loss"] is not None)
    # MLflow: one parent (kind=tune), one child per trial with its budget, size, lr and batch
    (parent,) = _kind(store, "tune")
    assert parent.info.status == "FINISHED" and parent.info.run_id == res.parent_run_id
    arts = {a.path for a in _client(store).list_artifacts(parent.info.run_id)}
    figs = {a.path for a in _client(store).list_artifacts(parent.info.run_id, "figures")}
    assert "tuning.json" in arts
    assert {f"figures/tune_{n}.{e}" for n in ("loss_vs_lr", "rule") for e in ("png", "svg")} <= figs
    assert parent.data.metrics["rule/lr_exp"] == pytest.approx(rule.lr_exp)
    children = _kind(store, "tune_trial")
    assert len(children) == 6 * tcfg.trials
    by_id = {t["mlflow_run_id"]: (c, t) for c in doc["cells"] for t in c["trials"]}
    for run in children:
        c, t = by_id[run.info.run_id]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["budget"] == f"{c['budget']:g}" and run.data.tags["n_params_total"] == str(c["n_params_total"])
        assert float(run.data.params["lr"]) == pytest.approx(t["lr"], rel=1e-12)
        assert float(run.data.tags["lr"]) == pytest.approx(t["lr"], rel=1e-5)  # tag: 6 significant digits
        assert int(run.data.params["batch_size"]) == t["batch"] == int(run.data.tags["batch_size"])
        assert run.data.metrics["final/val_loss"] == pytest.approx(t["loss"])
    out = capsys.readouterr().out
    assert "rule (tune tiny" in out and "spread" in out

    # a re-run of the same command trains nothing and reuses the parent run
    before = {r.info.run_id for r in _runs(store)}
    res2 = tuning.run_tune(tcfg)
    assert {r.info.run_id for r in _runs(store)} == before and res2.parent_run_id == res.parent_run_id
    assert res2.rule == rule
    for s in optuna.get_all_study_summaries(tiny_tune["storage"]):
        assert s.n_trials == tcfg.trials

    # a tiny search reads the rule: each trial's lr and batch are the rule's for its size and tokens
    scfg = resolve_search({"mode": "tiny", "dataset": tiny_tune["dataset"], "train_split": "test",
                           "val_split": "validation", "storage": tiny_tune["storage"], "experiment": "search-test",
                           "budgets": "2e9", "pad": "0", "widen": "0", "hparams": str(path)})
    assert scfg.hyper_rule() == rule
    run_search(scfg)
    trials = [r for r in _kind(store, "trial") if "duplicate_of" not in r.data.tags]  # a twin reuses a result
    assert trials
    for run in trials:
        p = run.data.params
        m = ModelConfig(n_layer=int(p["n_layer"]), n_head=int(p["n_head"]),
                        n_embd=int(p["n_embd"]), block_size=int(p["block_size"]),
                        n_vocab=int(p["n_vocab"]))
        n_total = counting.n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size)
        assert float(p["n_params_total"]) == n_total
        assert float(p["lr"]) == pytest.approx(rule.lr_for(n_total), rel=1e-12)
        tokens = counting.tokens_for_flops(m, float(run.data.tags["budget"]), scfg.flops_rule)
        assert int(p["batch_size"]) == rule.batch_for(tokens, scfg.batch_min, scfg.batch_max)
        assert run.data.tags["hparams"] == rule.source


# --------------------------------------------------------------------------- bad input, dry run

BAD = [
    ({"budgets": "1e9"}, "budgets"),  # one budget
    ({"sizes": "0,1"}, "sizes"),  # two sizes
    ({"sizes": "0,1,99"}, "sizes"),  # not in the family
    ({"lr_min": "0.01", "lr_max": "0.01"}, "lr_max"),
    ({"batches": "4,6"}, "batches"),  # 6 is not a power of two
    ({"trials": "2"}, "trials"),
    ({"budgets": "1e3,1e9"}, "budgets"),  # too small for 10 steps
    ({"lr": "1e-3"}, "lr"),  # per trial: not a flag
    ({"mode": "huge"}, "mode"),
]


def test_bad_tune_input_one_clear_error_and_the_launched_run_failed(tiny_tune, store, capsys, monkeypatch):
    client = _client(store)
    exp = client.create_experiment("launch")
    for bad, param in BAD:  # one store for every case (creating an MLflow store takes seconds)
        launched = client.create_run(exp).info.run_id  # as `mlflow run` would
        monkeypatch.setenv("MLFLOW_RUN_ID", launched)
        code = main_tune(_args({**tiny_tune, **bad}))
        err = capsys.readouterr().err
        assert code == 2, bad
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"error: parameter '{param}': got ") and "allowed: " in lines[0], lines[0]
        assert client.get_run(launched).info.status == "FAILED"
        assert not (store / "optuna.db").exists()


def test_tune_dry_run_prints_cells_and_creates_nothing(tiny_tune, store, capsys):
    code = main_tune(_args({**tiny_tune, "dry_run": "true"}))
    out = capsys.readouterr().out
    assert code == 0
    tcfg = tuning.resolve_tune(tiny_tune)
    for c in tuning.plan_cells(tcfg):
        assert c.study_name in out
    assert f"x {tcfg.trials} trials" in out and "total:" in out
    assert not (store / "optuna.db").exists() and _runs(store) == []
    assert not (store / "tuning.json").exists()
