"""The `search` entry point: real Optuna studies (SQLite) and a real MLflow store on the offline text."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState
from servers import store_client as _client
from servers import store_runs as _runs
from tqdm import tqdm

from scaling_lab import analyze, config, counting, projectspec, sources
from scaling_lab import search as search_mod
from scaling_lab.cli import main_search as main
from scaling_lab.counting import chinchilla_n, kaplan_n
from scaling_lab.isoflop import (
    SEARCH_FIELDS,
    batch_for,
    model_at,
    plan_budget,
    resolve_search,
    summarize,
    table,
    trial_config,
)
from scaling_lab.search import run_search, widen_once
from scaling_lab.studies import (
    BracketPruner,
    StudyLock,
    artifact_dir,
    enqueue_missing,
    fail_stale_running,
    load_study,
    make_sampler,
    make_storage,
    replica_of,
    retry_failed_once,
    rung_of,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_search(data_dir, store) -> dict[str, str]:
    return {"mode": "tiny", "dataset": str(data_dir), "train_split": "test", "val_split": "validation",
            "storage": f"sqlite:///{store / 'optuna.db'}", "experiment": "search-test"}


def _args(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k}", str(v))]


def _studies(storage: str) -> dict[str, optuna.Study]:
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage)
            for s in optuna.get_all_study_summaries(storage)}


# --------------------------------------------------------------------------- pure parts


def test_published_allocations_and_budget_plan():
    c = 1e12
    assert kaplan_n(c) == pytest.approx(1.3e9 * (c / 8.64e19) ** 0.73)  # Kaplan et al. 2020, Eq. 6.1
    assert 6 * chinchilla_n(c) * 20 * chinchilla_n(c) == pytest.approx(c)  # C = 6ND with D = 20N
    scfg = resolve_search({"mode": "quick", "budgets": "1e11,1e12", "anchors": "kaplan,chinchilla"})
    small, big = plan_budget(scfg, 1e11), plan_budget(scfg, 1e12)
    for p in (small, big):
        assert p.lo <= min(p.kaplan_rung, p.chinchilla_rung) and max(p.kaplan_rung, p.chinchilla_rung) <= p.hi
        m = model_at(p.chinchilla_rung, scfg.data.vocab_size, scfg.block_size)
        n_total = counting.n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size)
        for other in (p.chinchilla_rung - 1, p.chinchilla_rung + 1):  # log-nearest size of the family
            o = model_at(other, scfg.data.vocab_size, scfg.block_size)
            o_total = counting.n_params_total(o.n_layer, o.n_embd, o.n_vocab, o.block_size)
            assert abs(math.log(n_total / p.chinchilla_n)) <= abs(math.log(o_total / p.chinchilla_n))
    assert big.chinchilla_rung > small.chinchilla_rung  # the optimum grows with compute
    for rung in range(big.lo, big.hi + 1):  # D follows from C: every trial spends the budget (to one step)
        cfg = trial_config(scfg, 1e12, rung)
        per_token = counting.flops_per_token(cfg.model, "total")
        step_tokens = cfg.train.batch_size * cfg.model.block_size
        tokens = counting.tokens_for_flops(cfg.model, 1e12, "total")
        assert 1e12 - (step_tokens + 1) * per_token <= (tokens // step_tokens) * step_tokens * per_token <= 1e12
        assert scfg.batch_min <= cfg.train.batch_size == batch_for(tokens, scfg) <= scfg.batch_max
        assert cfg.model.n_embd == model_at(rung, scfg.data.vocab_size, scfg.block_size).n_embd


def test_integer_batch_round_keeps_steps_nearer_the_aim_than_powers_of_two():
    """Over quick's sizes and budgets the batch is the rule's wanted batch rounded: pow2 to a power of two (the
    field's default), integer to a whole number (quick's), whose steps stray less from steps_target once batch >= 4."""
    pow2 = resolve_search({"mode": "quick", "batch_round": "pow2"})
    whole = resolve_search({"mode": "quick"})
    assert whole.batch_round == "integer" and resolve_search({"mode": "tiny"}).batch_round == "pow2"
    worst = {"pow2": 0.0, "integer": 0.0}
    for c in pow2.budget_list():
        p = plan_budget(pow2, c)
        for rung in range(p.lo, p.hi + 1):
            m = model_at(rung, pow2.data.vocab_size, pow2.block_size)
            tokens = counting.tokens_for_flops(m, c, pow2.flops_rule)
            want = tokens / (pow2.steps_target * pow2.block_size)
            b2, bi = batch_for(tokens, pow2), batch_for(tokens, whole)
            assert b2 & (b2 - 1) == 0 and abs(math.log2(b2 / want)) <= 0.5 + 1e-9
            assert bi == max(1, round(want)) and trial_config(whole, c, rung).train.batch_size == bi
            for name, b in (("pow2", b2), ("integer", bi)):
                if want >= 4:
                    steps = tokens / (b * pow2.block_size)
                    worst[name] = max(worst[name], abs(math.log(steps / pow2.steps_target)))
    assert worst["integer"] <= math.log(1 + 0.5 / 3.5) < worst["pow2"]  # |b - want| <= 1/2 at want >= 4


def test_mlproject_search_entry_matches_search_config():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    entry = spec["entry_points"]["search"]
    # declared: the fields whose default no mode changes (projectspec); the rest are extra -P name=value
    assert list(entry["parameters"]) == list(projectspec.parameters("search"))
    assert set(entry["parameters"]) <= set(SEARCH_FIELDS) and "budgets" not in entry["parameters"]
    assert entry["command"].startswith("PYTHONPATH=src:$PYTHONPATH python mlproject/search.py")
    for name in entry["parameters"]:
        assert f"--{name} {{{name}}}" in entry["command"]
    assert set(spec["entry_points"]["main"]["parameters"]) <= set(config.field_names())


# --------------------------------------------------------------------------- a real tiny search


def test_tiny_search_studies_seeds_and_child_runs(tiny_search, store, capsys):
    scfg = resolve_search(tiny_search)
    results = run_search(scfg)
    out = capsys.readouterr().out
    storage = tiny_search["storage"]
    studies = _studies(storage)
    assert len(studies) == 2 and len(results) == 2
    runs = _runs(store)
    parents = [r for r in runs if r.data.tags.get("scaling_lab.kind") == "study"]
    trial_runs = [r for r in runs if r.data.tags.get("scaling_lab.kind") == "trial"]
    assert sorted(r.data.tags["study"] for r in parents) == sorted(studies)
    assert all(r.info.status == "FINISHED" for r in parents)
    for res in results:
        study = studies[res.study_name]
        trials = study.get_trials()
        allocs = [t.user_attrs.get("allocation") for t in trials]
        assert allocs.count("kaplan") == 1 and allocs.count("chinchilla") == 1
        assert trials[0].user_attrs["allocation"] == "kaplan" and trials[1].user_attrs["allocation"] == "chinchilla"
        parent = next(r for r in parents if r.data.tags["study"] == res.study_name)
        assert parent.data.tags["budget"] == f"{res.budget:g}"
        assert parent.data.tags["flops_rule"] == "total" and parent.data.tags["storage"] == storage
        assert parent.data.tags["vocab_size"] == "256"
        children = [r for r in trial_runs if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert len(children) == len(trials)  # one child run per trial
        by_number = {int(r.data.tags["trial_number"]): r for r in children}
        assert sorted(by_number) == [t.number for t in trials]
        complete = [t for t in trials if t.state.name == "COMPLETE"]
        for t in trials:
            run = by_number[t.number]
            assert run.data.tags["study"] == res.study_name and run.data.tags["budget"] == f"{res.budget:g}"
            assert run.data.tags["allocation"] == t.user_attrs["allocation"]
            assert run.data.tags["trial_state"] == t.state.name
            assert run.info.run_id == t.user_attrs["mlflow_run_id"]
        for t in complete:
            assert sorted(t.intermediate_values) == list(range(1, 11))  # the same budget tenths in every trial
            run = by_number[t.number]
            assert run.info.status == "FINISHED"
            assert run.data.metrics["final/val_loss"] == pytest.approx(t.value)
            steps = int(run.data.params["steps"])
            hist = _client(store).get_metric_history(run.info.run_id, "train/loss")
            assert len(hist) == steps  # the same per-step logging as a single training run
            flops = float(run.data.params["flops_total"])
            assert flops <= res.budget and flops > 0.5 * res.budget
        best = min(complete, key=lambda t: t.value)
        assert parent.data.metrics["best/val_loss"] == pytest.approx(best.value)
        assert parent.data.metrics["best/n_params_total"] == best.user_attrs["n_params_total"]
        assert parent.data.metrics["best/tokens"] == best.user_attrs["tokens_trained"]
        k = next(t for t in trials if t.user_attrs["allocation"] == "kaplan")
        if k.state.name == "COMPLETE":
            assert parent.data.metrics["kaplan/val_loss"] == pytest.approx(k.value)
        arts = [a.path for a in _client(store).list_artifacts(parent.info.run_id)]
        assert "loss_vs_n.png" in arts
        assert f"{res.budget:.3g}" in out
        for t in trials:  # the size is a (derived, log-scale) parameter beside the searched rung: plots read in N
            assert t.params["n_params_total"] == t.user_attrs["n_params_total"] > 0 and "rung" in t.params
            assert t.distributions["n_params_total"].log
        (meta,) = optuna.artifacts.get_all_artifact_meta(study)  # the study's figure in Optuna's artifact store
        assert meta.filename == "loss_vs_n.png" and meta.mimetype == "image/png"
        assert (store / "optuna-artifacts" / meta.artifact_id).read_bytes()[:4] == b"\x89PNG"
    assert "kaplan loss" in out and "chinchilla loss" in out and "winner" in out
    assert f"--artifact-dir {store / 'optuna-artifacts'}" in out
    before = {name: (len(s.get_trials()), optuna.artifacts.get_all_artifact_meta(s)) for name, s in studies.items()}
    run_search(scfg)  # a re-run of the finished search trains nothing and replaces each figure, not adds one
    assert {name: (len(s.get_trials()), optuna.artifacts.get_all_artifact_meta(s))
            for name, s in _studies(storage).items()} == before


def test_pruned_trial_recorded_pruned_with_partial_curve(tiny_search, store):
    scfg = resolve_search({**tiny_search, "budgets": "6e9", "pad": "0"})
    run_search(scfg, pruner=optuna.pruners.ThresholdPruner(upper=0.0))  # any positive loss prunes at 10%
    study = next(iter(_studies(tiny_search["storage"]).values()))
    trials = study.get_trials()
    assert trials and all(t.state.name == "PRUNED" for t in trials)
    for t in trials:
        run = _client(store).get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["trial_state"] == "PRUNED"
        assert "pruned" in run.data.tags["killed_by"]
        val = _client(store).get_metric_history(run.info.run_id, "val/loss")
        train_steps = _client(store).get_metric_history(run.info.run_id, "train/loss")
        assert len(val) == 1 and 0 < len(train_steps) < int(run.data.params["steps"])  # partial curve kept


def _wait_for(pred, timeout: float, every: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(every)
    return False


@pytest.mark.slow
def test_rerun_after_sigkill_resumes_without_duplicates(tiny_search, store):
    storage = tiny_search["storage"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "PYTHONPATH": str(ROOT / "src")}
    # 5 sizes (pad 3), so a trial is still RUNNING after two have finished for long enough to be seen
    cmd = [sys.executable, str(ROOT / "mlproject" / "search.py"), *_args({**tiny_search, "budgets": "6e9", "pad": "3"})]
    proc = subprocess.Popen(cmd, cwd=store, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def mid_study() -> bool:
        try:
            studies = _studies(storage)
        except Exception:
            return False
        trials = [t for s in studies.values() for t in s.get_trials(deepcopy=False)]
        states = [t.state.name for t in trials]
        started = [t for t in trials if t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs]
        return states.count("COMPLETE") >= 2 and bool(started)  # its MLflow run exists

    try:
        assert _wait_for(mid_study, 180), "search did not reach a running trial after two finished ones"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    before = {name: [(t.number, t.params.get("rung"), t.user_attrs.get("allocation")) for t in s.get_trials()
                     if t.state.name == "COMPLETE"] for name, s in _studies(storage).items()}
    assert "RUNNING" in [r.info.status for r in _runs(store)]  # the killed trial's run

    rerun = subprocess.run(cmd, cwd=store, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert "left RUNNING by a killed process" in rerun.stdout
    for name, study in _studies(storage).items():
        trials = study.get_trials()
        finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
        for number, _rung, _alloc in before.get(name, []):  # finished trials kept, not repeated
            assert any(t.number == number and t.state.name == "COMPLETE" for t in finished)
        keys = [(t.params["rung"], t.user_attrs["allocation"]) for t in finished]
        assert len(keys) == len(set(keys)), keys
        assert sorted(a for _, a in keys if a != "search") == ["chinchilla", "kaplan"]
        lo, hi = study.user_attrs["range_lo"], study.user_attrs["range_hi"]
        assert {r for r, _ in keys} == set(range(lo, hi + 1))  # every size once
    runs = _runs(store)
    assert "RUNNING" not in [r.info.status for r in runs]
    killed = [r for r in runs if r.data.tags.get("killed_by", "").startswith("process died")]
    assert killed and all(r.data.tags["trial_state"] == "FAIL" for r in killed)
    parents = [r for r in runs if r.data.tags.get("scaling_lab.kind") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the re-run reused the study's parent run



@pytest.mark.slow
def test_anchor_killed_mid_trial_runs_first_on_rerun_and_is_never_pruned(tiny_search, store, capsys):
    """kill -9 while the Kaplan-seeded trial (trial 0) trains. The re-run fails it and queues Kaplan again, behind
    the grid sizes already waiting; the anchors still run before any search trial, and a pruner that would stop
    every trial at its first report (wrapped as the search wraps its pruner) stops neither anchor: the table gives
    both losses and a winner."""
    storage = tiny_search["storage"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "PYTHONPATH": str(ROOT / "src")}
    over = {**tiny_search, "budgets": "6e9", "pad": "3"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "mlproject" / "search.py"), *_args(over)], cwd=store, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def kaplan_training() -> bool:
        try:
            trials = [t for s in _studies(storage).values() for t in s.get_trials(deepcopy=False)]
        except Exception:
            return False
        return any(t.state.name == "RUNNING" and t.user_attrs.get("allocation") == "kaplan"
                   and "mlflow_run_id" in t.user_attrs for t in trials)

    try:
        assert _wait_for(kaplan_training, 180), "the Kaplan-seeded trial was not seen running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    (study,) = _studies(storage).values()
    (killed,) = [t for t in study.get_trials() if t.state.name == "RUNNING"]
    waiting = [t.number for t in study.get_trials() if t.state.name == "WAITING"]
    assert killed.user_attrs["allocation"] == "kaplan" and len(waiting) >= 3

    scfg = resolve_search(over)
    eager = BracketPruner(optuna.pruners.ThresholdPruner(upper=0.0), scfg.bracket)  # any loss prunes, but anchors
    (res,) = run_search(scfg, pruner=eager)
    out = capsys.readouterr().out
    assert "left RUNNING by a killed process" in out
    trials = study.get_trials()
    retry = [t for t in trials if t.user_attrs.get("allocation") == "kaplan" and t.number != killed.number]
    assert len(retry) == 1 and retry[0].number > max(waiting)  # queued behind the waiting sizes ...
    assert retry[0].params["rung"] == killed.params["rung"] and retry[0].state.name == "COMPLETE"
    rerun = sorted((t for t in trials if t.number in waiting or t.number == retry[0].number),
                   key=lambda t: t.datetime_start)
    allocs = [t.user_attrs["allocation"] for t in rerun]
    assert sorted(allocs[:2]) == ["chinchilla", "kaplan"] and set(allocs[2:]) == {"search"}  # ... yet ran first
    assert all(t.state.name == "COMPLETE" for t in rerun[:2])  # never pruned
    assert (res.kaplan_state, res.chinchilla_state) == ("COMPLETE", "COMPLETE") and res.winner
    assert res.kaplan_loss == retry[0].value
    row = next(ln for ln in out.splitlines() if ln.strip().startswith(f"{res.budget:.3g}"))
    assert f"{res.kaplan_loss:.4f}" in row and f"{res.chinchilla_loss:.4f}" in row and res.winner in row
    old = _client(store).get_run(killed.user_attrs["mlflow_run_id"])
    assert old.info.status == "KILLED" and old.data.tags["trial_state"] == "FAIL"
    assert _client(store).get_run(retry[0].user_attrs["mlflow_run_id"]).info.status == "FINISHED"


def test_rerun_fails_only_trials_of_dead_processes_on_this_machine(tmp_path):
    """A re-run on SQLite fails at once the RUNNING trials of a dead process here; trials of live workers or of
    other machines (another `search` command on the same study) are left to the heartbeat."""
    import socket
    import warnings


    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    study = optuna.create_study(study_name="stale", storage=make_storage(f"sqlite:///{tmp_path / 'o.db'}"))
    workers = {"dead": f"{socket.gethostname()}:{gone.pid}", "alive": f"{socket.gethostname()}:{os.getpid()}",
               "elsewhere": f"another-host:{gone.pid}"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ask() outside optimize() with heartbeats on
        trials = {k: study.ask() for k in workers}
    for k, t in trials.items():
        t.set_user_attr("worker", workers[k])
        t.set_user_attr("mlflow_run_id", f"run-{k}")
    assert fail_stale_running(study, "died") == {trials["dead"].number: "run-dead"}
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states == {trials["dead"].number: "FAIL", trials["alive"].number: "RUNNING",
                      trials["elsewhere"].number: "RUNNING"}



def test_a_grid_trial_that_raised_is_queued_once_more(tmp_path):

    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="retry", storage=make_storage(url))
    study.enqueue_trial({"rung": 3}, user_attrs={"allocation": "kaplan"})

    def broken(trial):
        trial.suggest_int("rung", 0, 5)
        raise RuntimeError("database is locked")

    lock = StudyLock(url, "retry")
    study.optimize(broken, n_trials=1, catch=(RuntimeError,))
    assert retry_failed_once(study, 0, lock)
    (copy,) = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert copy.user_attrs == {"allocation": "kaplan", "retry_of": 0}
    assert not retry_failed_once(study, 0, lock)  # its size is queued already
    study.optimize(broken, n_trials=1, catch=(RuntimeError,))  # the copy fails too: no third try
    assert not retry_failed_once(study, copy.number, lock)
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "FAIL"]

BAD = [
    ({"budgets": "-1e12"}, "budgets"),
    ({"budgets": "0"}, "budgets"),
    ({"budgets": "1e3"}, "budgets"),  # too small for the smallest model
    ({"budgets": "1e10,abc"}, "budgets"),
    ({"flops_rule": "palm"}, "flops_rule"),
    ({"sampler": "cmaes"}, "sampler"),
    ({"batch_round": "floor"}, "batch_round"),
    ({"storage": "optuna.db"}, "storage"),
    ({"storage": "nosuchdb://host/x"}, "storage"),
    ({"storage": "postgresql://"}, "storage"),
    ({"workers": "2"}, "workers"),  # SQLite is for one worker
    ({"storage": "journal://optuna.log"}, "storage"),  # journal:///<file>, three slashes as sqlite:///
    ({"storage": "journal:///"}, "storage"),
    ({"storage": "journal:////no/such/folder/optuna.log"}, "storage"),  # found when the storage opens
    ({"trials": "1"}, "trials"),
    ({"mode": "huge"}, "mode"),
    ({"no_such_flag": "1"}, "no_such_flag"),
    ({"dry_run": "maybe"}, "dry_run"),
]


@pytest.mark.parametrize("bad,param", BAD)
def test_bad_search_input_one_clear_error_no_running_parent(bad, param, tiny_search, store, capsys):
    code = main(_args({**tiny_search, **bad}))
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert f"parameter '{param}'" in lines[0] and "allowed" in lines[0]
    statuses = [r.info.status for r in _runs(store)]
    assert "RUNNING" not in statuses and "FINISHED" not in statuses


@pytest.mark.parametrize("flag", ["true", "1", "yes"])
def test_search_dry_run_prints_the_plan_and_creates_nothing(flag, tiny_search, store, capsys):
    code = main(_args({**tiny_search, "dry_run": flag}))
    out = capsys.readouterr().out
    assert code == 0
    scfg = resolve_search(tiny_search)
    for c in scfg.budget_list():
        assert plan_budget(scfg, c).study_name in out  # every budget's plan is printed
    assert not (store / "optuna.db").exists()  # no Optuna storage
    assert _runs(store) == []  # no MLflow run
    assert resolve_search({**tiny_search, "dry_run": "no"}).dry_run is False


@pytest.mark.slow
def test_mlflow_run_search_entry_end_to_end(tiny_search, store):
    params = {**tiny_search, "budgets": "2e9", "pad": "0", "checkpoint_dir": str(store / "ck")}  # mlflow run: cwd = ROOT
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "search", "--env-manager", "local",
                           "--experiment-name", "search-test", *[x for k, v in params.items() for x in ("-P", f"{k}={v}")]],
                          cwd=store, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "winner" in proc.stdout
    runs = _runs(store)
    inv = [r for r in runs if r.data.tags.get("scaling_lab.kind") == "search"]
    assert len(inv) == 1 and inv[0].info.status == "FINISHED"
    assert inv[0].data.tags["mlflow.project.entryPoint"] == "search"
    assert "search_table.txt" in [a.path for a in _client(store).list_artifacts(inv[0].info.run_id)]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_edge_detection_widens_by_one_size_then_says_so():
    from optuna.distributions import IntDistribution
    from optuna.trial import TrialState, create_trial


    scfg = resolve_search({"mode": "quick", "budgets": "1e11"})
    plan = plan_budget(scfg, 1e11)
    study = optuna.create_study(direction="minimize")  # in-memory storage: real Optuna, no training
    dist = {"rung": IntDistribution(plan.lo, plan.hi)}
    for rung in range(plan.lo, plan.hi + 1):  # loss falls with size: the best is the largest searched
        m = model_at(rung, scfg.data.vocab_size, scfg.block_size)
        attrs = {"allocation": "search", "n_embd": m.n_embd, "n_params": 1, "tokens_trained": 10,
                 "n_params_total": counting.n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size)}
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=5.0 - rung, params={"rung": rung},
                                     distributions=dist, user_attrs=attrs))
    res = summarize(study, plan, "run")
    assert res.edge == "largest" and "EDGE (largest)" in table([res], "total")
    hi = plan.hi
    assert widen_once(study, plan, res) and plan.hi == hi + 1 and study.user_attrs["range_hi"] == hi + 1
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"]["rung"] for t in waiting] == [hi + 1]
    other = plan_budget(scfg, 1e11)  # a second search command that saw the same edge: nothing queued twice
    assert widen_once(study, other, res) and other.hi == hi + 1
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1
    for rung in range(hi + 1, plan.cap + 1):  # the larger sizes ran, still better: the best is now the cap
        m = model_at(rung, scfg.data.vocab_size, scfg.block_size)
        attrs = {"allocation": "search", "n_embd": m.n_embd, "n_params": 1, "tokens_trained": 10,
                 "n_params_total": counting.n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size)}
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=5.0 - rung, params={"rung": rung},
                                     distributions={"rung": IntDistribution(plan.lo, plan.cap)}, user_attrs=attrs))
    plan.hi = plan.cap
    res = summarize(study, plan, "run")
    assert res.edge == "largest"  # nothing larger affords MIN_STEPS steps: no widening, the edge stays reported
    assert not widen_once(study, plan, res) and plan.hi == plan.cap
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1


def test_search_widens_until_bracketed_and_trains_seed_replicas(tiny_search, store):
    """A tiny real search started on the two anchors only (pad 0) widens one size at a time until 2 COMPLETE sizes
    lie on each side of the best; an eager pruner never stops those; the best size and its neighbours get 2 more
    seeds each, as their own child runs differing only by seed; the logged seed noise is their pooled sd, the
    same the analysis measures."""
    # quick's shapes and budget 3e10, its batch rule aiming at 500 steps (not 2000, to keep CI short), started on
    # the Chinchilla-seeded size alone: every other size comes from widening, until the bracket holds
    scfg = resolve_search({**tiny_search, "mode": "quick", "budgets": "3e10", "anchors": "chinchilla", "pad": "0",
                           "pad_below": "0", "widen": "8", "bracket": "2", "replicas": "1", "eval_tokens": "4096",
                           "prune_startup": "1", "prune_warmup": "0", "steps_target": "500"})
    (res,) = run_search(scfg)
    assert res.edge == "none" and res.below >= 2 and res.above >= 2
    study = next(iter(_studies(tiny_search["storage"]).values()))
    trials = study.get_trials()
    complete = {t.params["rung"] for t in trials if t.state.name == "COMPLETE"}
    assert all(abs(t.params["rung"] - res.best_rung) > 2 for t in trials if t.state.name == "PRUNED")
    for r in range(res.best_rung - 2, res.best_rung + 3):
        assert r in complete  # the bracket the analysis fits is complete
    runs = {r.info.run_id: r for r in _runs(store) if r.data.tags.get("scaling_lab.kind") == "trial"}
    by_rung: dict[int, list] = {}
    for t in trials:
        if t.state.name == "COMPLETE":
            by_rung.setdefault(t.params["rung"], []).append(runs[t.user_attrs["mlflow_run_id"]])
    seeded = {r: rs for r, rs in by_rung.items() if len(rs) > 1}  # more than 3 when the seeds moved the best
    assert {res.best_rung - 1, res.best_rung, res.best_rung + 1} <= set(seeded)
    assert all(len(rs) == 2 for rs in seeded.values())
    for rs in seeded.values():
        seeds = sorted(int(r.data.params["seed"]) for r in rs)
        assert seeds == [scfg.seed, scfg.seed + 1]
        same = {k: {r.data.params[k] for r in rs} for k in rs[0].data.params if k in config.field_names()}
        assert {k for k, v in same.items() if len(v) > 1} <= {"seed", "run_name"} and "n_embd" in same
    losses = [[r.data.metrics["final/val_loss"] for r in rs] for rs in seeded.values()]
    pooled = math.sqrt(sum(sum((x - sum(g) / 2) ** 2 for x in g) for g in losses) / len(losses))
    parent = next(r for r in _runs(store) if r.data.tags.get("scaling_lab.kind") == "study")
    assert parent.data.metrics["seed_noise/std"] == pytest.approx(pooled, rel=1e-9) and pooled > 0
    table = sources.load_mlflow(analyze.AnalyzeConfig(experiment=tiny_search["experiment"], log=False))
    runs = table.runs
    std, sizes = analyze.seed_noise(np.zeros(len(runs)), runs["n_params_total"].to_numpy(), runs["loss"].to_numpy())
    assert sizes == len(seeded) and std == pytest.approx(pooled, rel=1e-6)  # the analysis averages and measures the same


def test_storage_messages_name_journal_and_workers_may_share_a_journal(tmp_path):
    with pytest.raises(config.ConfigError, match="journal:///optuna.log") as e:
        resolve_search({"mode": "tiny", "workers": "2"})
    assert "postgresql://" in str(e.value)
    with pytest.raises(config.ConfigError, match="journal:///optuna.log"):
        resolve_search({"mode": "tiny", "storage": "nosuchdb://host/x"})
    scfg = resolve_search({"mode": "tiny", "workers": "2", "storage": f"journal:///{tmp_path / 'o.log'}"})
    assert scfg.workers == 2
    assert artifact_dir(scfg.storage) == tmp_path / "optuna-artifacts"  # beside the log, as beside a .db
    assert artifact_dir(f"sqlite:///{tmp_path / 'x' / 'o.db'}") == tmp_path / "x" / "optuna-artifacts"


@pytest.mark.parametrize("workers,storage,liar", [(1, "sqlite:///o.db", False), (2, "journal:///o.log", True),
                                                  (1, "postgresql://u@h/db", True)])
def test_tpe_uses_constant_liar_when_trials_run_in_parallel(workers, storage, liar):
    sampler = make_sampler(resolve_search({"mode": "tiny", "sampler": "tpe", "workers": str(workers),
                                           "storage": storage}))
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._constant_liar is liar


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() outside optimize() with heartbeats on
def test_a_queued_anchor_is_taken_before_earlier_search_trials(tmp_path):
    """Optuna pops WAITING trials by number; an anchor queued again after a crash (here trial 3) must run first."""
    url = f"sqlite:///{tmp_path / 'o.db'}"
    scfg = resolve_search({"mode": "tiny", "storage": url})
    storage = make_storage(url)
    optuna.create_study(study_name="queue", storage=storage)
    plain = optuna.load_study(study_name="queue", storage=storage)
    for rung in (2, 3, 4):
        plain.enqueue_trial({"rung": rung}, user_attrs={"allocation": "search"})
    plain.enqueue_trial({"rung": 1}, user_attrs={"allocation": "chinchilla"})
    study = load_study(scfg, "queue", storage)
    order = []
    for _ in range(4):
        t = study.ask()
        order.append((t.number, t.user_attrs["allocation"], t.suggest_int("rung", 0, 5)))
        study.tell(t, 1.0)
    assert order == [(3, "chinchilla", 1), (0, "search", 2), (1, "search", 3), (2, "search", 4)]


def test_closing_table_says_what_became_of_each_anchor():
    from optuna.distributions import IntDistribution
    from optuna.trial import TrialState, create_trial

    scfg = resolve_search({"mode": "tiny", "budgets": "6e9"})
    plan = plan_budget(scfg, 6e9)

    def study_of(*trials):
        study = optuna.create_study()
        for state, alloc, value in trials:
            m = model_at(1, scfg.data.vocab_size, scfg.block_size)
            attrs = {"allocation": alloc, "n_embd": m.n_embd, "n_params": 1, "tokens_trained": 10, "n_params_total": 100}
            study.add_trial(create_trial(state=state, value=value, params={"rung": 1}, user_attrs=attrs,
                                         distributions={"rung": IntDistribution(0, 5)}))
        return summarize(study, plan, "run")

    # the killed Kaplan trial (FAIL) was retried and the retry pruned; Chinchilla completed
    res = study_of((TrialState.FAIL, "kaplan", None), (TrialState.COMPLETE, "chinchilla", 4.5),
                   (TrialState.PRUNED, "kaplan", None))
    assert (res.kaplan_state, res.chinchilla_state, res.winner) == ("PRUNED", "COMPLETE", "")
    row = table([res], "total").splitlines()[2]
    assert "PRUNED" in row and "4.5000" in row and "fail" not in row.lower()
    res = study_of((TrialState.FAIL, "kaplan", None), (TrialState.COMPLETE, "chinchilla", 4.5))
    assert res.kaplan_state == "FAIL" and "FAIL" in table([res], "total").splitlines()[2]
    res = study_of((TrialState.FAIL, "kaplan", None), (TrialState.COMPLETE, "kaplan", 4.4),
                   (TrialState.COMPLETE, "chinchilla", 4.5))  # the retry completed: its loss, and a winner
    assert (res.kaplan_state, res.kaplan_loss, res.winner) == ("COMPLETE", 4.4, "kaplan")


def test_seed_replicas_that_move_the_best_next_to_an_edge_widen_again(monkeypatch):
    """The best size is read from the mean over seeds, so the extra seeds can move it: here seed 0 puts the best
    2 sizes above the smallest, and the replicas of its lower neighbour make that neighbour the best, with one
    COMPLETE size below it. The study widens again and seeds the new neighbours, until 2 COMPLETE sizes lie below
    the best (seen in a quick ablation: the kaplan step's 3e11 study ended 1|3 before this). Real Optuna study
    (in memory); the trainer is replaced by losses set per (size, seed), and nothing is logged."""
    scfg = resolve_search({"mode": "quick", "budgets": "1e11", "anchors": "chinchilla"})
    plan = plan_budget(scfg, 1e11)
    assert plan.lo >= 1 and plan.hi - plan.lo >= 4 and scfg.replicas >= 1 and scfg.widen >= 1
    b = plan.lo + 2  # seed 0's best: 2 sizes below it, so no widening before the seeds

    def loss(rung: int, replica: int) -> float:
        return 2.9 if (rung == b - 1 and replica) else 3.0 + 0.01 * (rung - b) ** 2

    def train_waiting(scfg_, plan_, study, plog, target, bar, out, pruner) -> None:
        while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            trial = study.ask()
            rung = trial.suggest_int("rung", 0, plan_.cap)
            m = model_at(rung, scfg_.data.vocab_size, scfg_.block_size)
            for k, v in {"n_embd": m.n_embd, "n_params": 1, "tokens_trained": 10, "n_params_total":
                         counting.n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size)}.items():
                trial.set_user_attr(k, v)
            study.tell(trial, loss(rung, int(trial.user_attrs.get("replica", 0))))

    monkeypatch.setattr(search_mod, "_trials_until", train_waiting)
    monkeypatch.setattr(search_mod, "log_parent", lambda *a, **k: None)
    study = optuna.create_study(direction="minimize")
    enqueue_missing(study, plan, grid=True)
    lo = plan.lo

    class Log:
        run_id = "run"

    with open(os.devnull, "w") as out:
        res = search_mod._run_budget(scfg, plan, study, Log(), 0, tqdm(total=0, disable=True), out, None,
                                     contextlib.nullcontext())
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert res.best_rung == b - 1 and res.edge == "none" and res.below >= 2 and res.above >= 2
    assert plan.lo == lo - 1 and lo - 1 in {rung_of(t) for t in done}  # widened after the seeds moved the best
    seeded = {rung_of(t) for t in done if replica_of(t)}
    assert seeded == {b - 2, b - 1, b, b + 1}  # seed 0's best and its neighbours, then the new best's lower one


def test_a_pruned_size_the_bracket_needs_trains_again_unpruned(monkeypatch):
    """A size pruned while the best was elsewhere is needed once the best moves next to it (seen in a quick
    ablation: the decay step's 1e11 study ended 3|1, the sizes above pruned). The study trains it again, unpruned,
    once, rather than widening into sizes the pruner stops too. Real Optuna study (in memory); the trainer is
    replaced by set losses, and it prunes every first trial 2 or more sizes above seed 0's best, as the median
    pruner did there."""
    scfg = resolve_search({"mode": "quick", "budgets": "1e11", "anchors": "chinchilla", "pad": "4"})
    plan = plan_budget(scfg, 1e11)
    b = plan.lo + 2
    assert plan.hi >= b + 3 and scfg.replicas >= 1

    def train_waiting(scfg_, plan_, study, plog, target, bar, out, pruner) -> None:
        while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            trial = study.ask()
            rung = trial.suggest_int("rung", 0, plan_.cap)
            replica, again = int(trial.user_attrs.get("replica", 0)), bool(trial.user_attrs.get("rerun"))
            m = model_at(rung, scfg_.data.vocab_size, scfg_.block_size)
            for k, v in {"n_embd": m.n_embd, "n_params": 1, "tokens_trained": 10, "n_params_total":
                         counting.n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size)}.items():
                trial.set_user_attr(k, v)
            if rung >= b + 2 and not replica and not again:
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, 2.9 if (rung == b + 1 and replica) else 3.0 + 0.01 * (rung - b) ** 2)

    monkeypatch.setattr(search_mod, "_trials_until", train_waiting)
    monkeypatch.setattr(search_mod, "log_parent", lambda *a, **k: None)
    study = optuna.create_study(direction="minimize")
    enqueue_missing(study, plan, grid=True)
    lo, hi = plan.lo, plan.hi

    class Log:
        run_id = "run"

    with open(os.devnull, "w") as out:
        res = search_mod._run_budget(scfg, plan, study, Log(), 0, tqdm(total=0, disable=True), out, None,
                                     contextlib.nullcontext())
    assert res.best_rung == b + 1 and res.edge == "none" and res.above >= 2 and res.below >= 2
    again = [t for t in study.get_trials() if t.user_attrs.get("rerun")]
    assert sorted(rung_of(t) for t in again) == [b + 2, b + 3] and {t.state.name for t in again} == {"COMPLETE"}
    assert (plan.lo, plan.hi) == (lo, hi)  # completed from inside the range: nothing widened
    assert not studies_bracket_prunes(scfg, study, again[0])


def studies_bracket_prunes(scfg, study, trial) -> bool:
    """Would the search's pruner stop this trial? (A median pruner that always prunes, behind the bracket rule.)"""
    class Always(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return True

    return BracketPruner(Always(), scfg.bracket).prune(study, trial)


def test_a_rerun_is_not_answered_by_the_pruned_trial_it_repeats():
    """The objective reuses a finished trial of the same size and seed (two anchors at one size); a bracket rerun
    of a PRUNED size must train, not copy the pruned result back."""
    from optuna.distributions import IntDistribution
    from optuna.trial import create_trial

    study = optuna.create_study(direction="minimize")
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"rung": 3}, distributions={"rung": IntDistribution(0, 9)},
                                 user_attrs={"allocation": "search"}, intermediate_values={1: 4.4}))
    study.enqueue_trial({"rung": 3}, user_attrs={"allocation": "search"})
    study.enqueue_trial({"rung": 3}, user_attrs={"allocation": "search", "rerun": True})
    dup, again = study.ask(), study.ask()
    assert dup.suggest_int("rung", 0, 9) == 3 and again.suggest_int("rung", 0, 9) == 3
    assert search_mod._finished_twin(dup, 3).state == TrialState.PRUNED  # a plain duplicate: reused
    assert search_mod._finished_twin(again, 3) is None  # the rerun trains
