"""Dry runs and time estimates: a dry run creates nothing, its N, D, C equal what the real run logs,
and the measured-throughput estimate of a short real run is within a factor of 2 of its wall time."""

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from scaling_lab import config, estimate, isoflop, search
from scaling_lab.cli import main_train

ROOT = Path(__file__).resolve().parents[1]
COUNT_KEYS = ("n_params", "n_params_total", "tokens_trained", "steps")


def _args(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k}", str(v))]


def _all_runs(store: Path):
    """Every run in the store, deleted ones included."""
    if not (store / "mlflow.db").exists():
        return []
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exps = client.search_experiments(view_type=ViewType.ALL)
    return client.search_runs([e.experiment_id for e in exps], run_view_type=ViewType.ALL) if exps else []


def parse_plan(text: str) -> dict[str, float]:
    """N, D, steps and C under each rule from the printed dry-run plan."""
    out = {}
    for key in ("n_params", "n_params_total", "tokens_trained"):
        out[key] = int(re.search(rf"\b{key} ([\d,]+)", text).group(1).replace(",", ""))
    out["steps"] = int(re.search(r"([\d,]+) steps x", text).group(1).replace(",", ""))
    for rule in config.FLOPS_RULES:
        out[f"flops_{rule}"] = float(re.search(rf"\b{rule} [^:]+: ([0-9.e+\-]+)", text).group(1))
    return out


def test_dry_run_creates_nothing_and_matches_the_real_run(tiny, store, capsys):
    ck = store / "ck"
    tiny = {**tiny, "tokens": 10240}  # 20 steps of 8 x 64 tokens
    code = main_train(_args({**tiny, "dry_run": "true", "checkpoint_dir": ck}))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "dry run" in out and "estimated" in out
    assert _all_runs(store) == []  # no MLflow run (not even a deleted one)
    assert not (store / "optuna.db").exists() and not ck.exists()
    plan = parse_plan(out)

    code = main_train(_args({**tiny, "checkpoint_dir": ck}))
    out = capsys.readouterr().out
    assert code == 0
    runs = _all_runs(store)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    params, metrics = runs[0].data.params, runs[0].data.metrics
    for key in COUNT_KEYS:
        assert int(params[key]) == plan[key], key
    for rule in config.FLOPS_RULES:
        assert float(params[f"flops_{rule}"]) == pytest.approx(plan[f"flops_{rule}"], rel=1e-6), rule
    # the run compares itself with its estimate: metric and summary line agree
    err = metrics["estimate/error"]
    assert math.isfinite(err) and metrics["estimate/seconds"] > 0
    shown = int(re.search(r"estimate_error ([+-]\d+)%", out).group(1))
    assert shown == round(100 * err)


def test_search_plan_creates_no_study_and_costs_every_budget(data_dir, tmp_path, monkeypatch):

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "optuna.db"
    scfg = isoflop.resolve_search({"mode": "tiny", "dataset": str(data_dir), "train_split": "test",
                                  "storage": f"sqlite:///{db}"})
    budgets = search.plan_search(scfg)
    text = search.format_search_plan(scfg, budgets)
    assert not db.exists()  # no Optuna storage, study or trial
    assert [b.plan.budget for b in budgets] == scfg.budget_list()
    for b in budgets:
        assert f"C={b.plan.budget:.3g}" in text
        rungs = [t.rung for t in b.trials]
        assert rungs == list(range(b.plan.lo, b.plan.hi + 1))
        assert {b.plan.kaplan_rung, b.plan.chinchilla_rung} <= set(rungs)
        # every trial spends the budget (D rounded down to whole steps), so the FLOPs add up to about n * C
        assert b.flops <= b.plan.budget * len(b.trials) and b.flops > 0.5 * b.plan.budget * len(b.trials)
        assert b.total_s == pytest.approx(sum(t.est.total_s for t in b.trials))
    assert f"{sum(b.n_trials for b in budgets)} trials" in text


def _env(store: Path, **extra) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", **extra}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_mlflow_run_dry_run_leaves_no_live_run(tiny, store):
    params = [x for k, v in {**tiny, "dry_run": "true"}.items() for x in ("-P", f"{k}={v}")]
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local",
                           "--experiment-name", "dry", *params],
                          cwd=store, env=_env(store), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run (tiny)" in proc.stdout
    runs = _all_runs(store)
    assert runs, "mlflow run creates a run before the script starts"
    for _ in range(100):  # deleted by a detached helper once `mlflow run` has exited (see tracking.end_stray_run)
        if all(r.info.lifecycle_stage == "deleted" for r in runs):
            break
        time.sleep(0.2)
        runs = _all_runs(store)
    assert all(r.info.lifecycle_stage == "deleted" for r in runs)  # nothing left among the experiment's runs
    assert all(r.data.params.get("n_params") is None for r in runs)  # and nothing was trained into it
    assert all("dry run" in r.data.tags.get("scaling_lab.note", "") for r in runs)


@pytest.mark.slow
def test_estimate_within_factor_two_of_a_short_real_run(data_dir, store):
    """About 10 s of training (quick shape, 80 steps) from a cold token and calibration cache.

    OMP_WAIT_POLICY=PASSIVE: on a CPU shared with other jobs, OpenMP threads that spin-wait stall for
    ~0.7 s per step at random (docs/estimate-and-doctor.md); no estimate can predict that."""
    args = {"mode": "quick", "dataset": str(data_dir), "train_split": "test", "tokens": 163840,
            "eval_tokens": 4096, "checkpoint_dir": str(store / "ck"), "cache_dir": str(store / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "mlproject" / "main.py"), *_args(args)], cwd=store,
                          env=_env(store, OMP_WAIT_POLICY="PASSIVE"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _all_runs(store)
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    wall = float(re.search(r"tokens in ([\d.]+) s", proc.stdout).group(1))
    est = metrics["estimate/seconds"]
    assert metrics["estimate/error"] == pytest.approx(est / wall - 1, abs=0.02)  # wall printed to 0.1 s
    assert 0.5 <= est / wall <= 2.0, proc.stdout
    assert (store / "cache" / estimate.CALIBRATION_FILE).exists()
