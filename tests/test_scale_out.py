"""Scaling out on real engines: torchrun (DDP, gloo on CPU), an `mlflow server` over HTTP (with an outage
mid-run), and Optuna studies shared by several search workers through a private PostgreSQL cluster or, on one
machine, an Optuna journal file."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from servers import (
    SEARCH,
    MlflowServer,
    Postgres,
    all_runs,
    assert_complete,
    falls,
    finish,
    free_port,
    launch,
    postgres_bindir,
    steps_of,
    wait_for,
)

from scaling_lab import config, doctor
from scaling_lab.isoflop import plan_budget, resolve_search
from scaling_lab.studies import (
    StudyLock,
    fail_dead_workers,
    make_storage,
    storage_url,
    target_trials,
)
from scaling_lab.train import MemoryLogger, train

# --------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_torchrun_two_processes_one_run_same_losses_sigterm_and_resume(tiny, tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", str(Path(__file__).resolve().parents[1] / "mlproject" / "main.py")]
    over = {**tiny, "checkpoint_every": "10", "checkpoint_dir": str(tmp_path / "ck"), "experiment": "ddp"}
    proc = launch(over, tmp_path, cmd=torchrun, name="torchrun")
    run_id = wait_for(lambda: (rs := all_runs(client)) and rs[0].info.run_id, proc, what="the run")
    ckpt = tmp_path / "ck" / run_id / "last.pt"
    wait_for(lambda: ckpt.exists() and steps_of(client, run_id, "train/loss"), proc, what="a checkpoint")
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks; they agree on the step to stop at
    rc, out = finish(proc)
    assert rc != 0
    run = client.get_run(run_id)
    assert run.info.status == "KILLED", out[-3000:]
    at = int(torch.load(ckpt, weights_only=False)["step"])
    assert 0 < at < int(run.data.params["steps"])

    torchrun[5] = f"--master_port={free_port()}"
    rc, out = finish(launch({"resume": run_id, "checkpoint_dir": str(tmp_path / "ck")}, tmp_path, cmd=torchrun,
                            name="torchrun-resume"))
    assert rc == 0, out[-3000:]
    runs = all_runs(client)
    assert len(runs) == 1  # only rank 0 talked to MLflow
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    losses = assert_complete(client, run_id)
    assert falls(losses)
    # the same global batch as one process: the same losses as a single-process run with that micro-batch
    micro = int(run.data.params["micro_batch_used"])
    assert int(run.data.params["grad_accum"]) % 2 == 0
    single = MemoryLogger()
    train(config.resolve({**tiny, "micro_batch": str(micro), "checkpoint_dir": str(tmp_path / "ck1")}), single,
          progress=False)
    ref = [v for _, v in single.history("train/loss")]
    assert losses == pytest.approx(ref, rel=2e-3)


# --------------------------------------------------------------------------- mlflow server


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path).start()
    yield server
    server.stop()


@pytest.mark.slow
def test_training_over_http_survives_server_outage(tiny, tmp_path, mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    over = {**tiny, "tokens": "81920", "checkpoint_every": "10", "checkpoint_dir": str(tmp_path / "ck"),
            "experiment": "http"}
    proc = launch(over, tmp_path, uri=mlflow_server.uri, name="train-http")
    run_id = wait_for(lambda: (rs := all_runs(client)) and rs[0].info.run_id, proc, what="the run")
    wait_for(lambda: len(steps_of(client, run_id, "train/loss")) >= 5, proc, what="stored steps")
    mlflow_server.stop()  # the store goes away mid-run ...
    time.sleep(4)
    outage_ok = proc.poll() is None  # ... and training goes on meanwhile
    mlflow_server.start()  # ... and comes back on the same port and database
    rc, out = finish(proc)
    assert outage_ok, out[-3000:]
    assert "cannot write metrics" in out  # the outage was noticed, not silent
    if rc == 75:  # the run ended while the server was still starting: metrics kept in the checkpoint
        assert f"resume={run_id}" in out
        rc, out = finish(launch({"resume": run_id, "checkpoint_dir": str(tmp_path / "ck")}, tmp_path,
                                uri=mlflow_server.uri, name="resend"))
    else:
        assert "answers again" in out
    assert rc == 0, out[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert falls(assert_complete(client, run_id))
    assert {"config.json", "loss_curve.png"} <= {a.path for a in client.list_artifacts(run_id)}


@pytest.mark.slow
def test_tiny_search_over_http(data_dir, tmp_path, mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    over = {"mode": "tiny", "dataset": str(data_dir), "train_split": "test", "val_split": "validation",
            "budgets": "6e9", "pad": "0", "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "experiment": "s-http"}
    rc, out = finish(launch(over, tmp_path, uri=mlflow_server.uri, cmd=[sys.executable, str(SEARCH)],
                            name="search-http"), timeout=300)
    assert rc == 0, out[-3000:]
    runs = all_runs(client)
    trials = [r for r in runs if r.data.tags.get("scaling_lab.kind") == "trial"]
    parents = [r for r in runs if r.data.tags.get("scaling_lab.kind") == "study"]
    assert len(parents) == 1 and len(trials) >= 2
    for r in trials:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        if r.data.tags["trial_state"] == "COMPLETE":
            assert r.info.status == "FINISHED"
            assert steps_of(client, r.info.run_id, "train/loss") == list(range(1, int(r.data.params["steps"]) + 1))


# --------------------------------------------------------------------------- PostgreSQL: parallel workers


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A private PostgreSQL cluster on a free loopback port for this module's tests."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    pg = Postgres(tmp_path_factory.mktemp("pg"), bindir).start()
    yield pg
    pg.stop()


def search_args(data_dir: Path, storage: str, **kw: str) -> dict[str, str]:
    return {"mode": "tiny", "dataset": str(data_dir), "train_split": "test", "val_split": "validation",
            "budgets": "2e9", "storage": storage, **kw}


@pytest.mark.slow
def test_four_workers_share_one_study_on_postgresql(data_dir, tmp_path, postgres):
    import optuna

    url = postgres.create_db("four")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    rc, out = finish(launch(search_args(data_dir, url, workers="4", experiment="pg"), tmp_path,
                            cmd=[sys.executable, str(SEARCH)], name="search-pg"), timeout=500)
    assert rc == 0, out[-3000:]
    (summary,) = optuna.get_all_study_summaries(url)
    trials = optuna.load_study(study_name=summary.study_name, storage=url).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))  # no trial number twice
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]

    scfg = resolve_search(search_args(data_dir, url, workers="4"))
    study = optuna.load_study(study_name=summary.study_name, storage=url)
    target = target_trials(scfg, plan_budget(scfg, 2e9), study)
    assert len(finished) == target, [(t.number, t.state.name, t.params, t.user_attrs, t.system_attrs)
                                     for t in trials]  # no extra sampled trial: the queue is taken under the lock
    rungs = [t.params["rung"] for t in finished if t.user_attrs["allocation"] == "search"]
    assert len(rungs) == len(set(rungs))  # each searched size once
    retried = {t.user_attrs.get("retry_of") for t in finished}  # a trial that raised is run once more
    assert all(t.number in retried for t in trials if t.state.name == "FAIL"), [
        (t.number, t.user_attrs) for t in trials if t.state.name == "FAIL"]
    runs = all_runs(client)
    parents = [r for r in runs if r.data.tags.get("scaling_lab.kind") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("scaling_lab.kind") == "trial"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == sorted(numbers)  # one run per trial
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in children}
    assert not [r for r in children if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_worker_killed_mid_trial_is_failed_by_heartbeat_and_retried(data_dir, tmp_path, postgres):
    import optuna

    url = postgres.create_db("killed")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    beat = {"SCALING_LAB_HEARTBEAT_S": "1", "SCALING_LAB_GRACE_S": "6"}  # a dead worker's trial fails after 6 s
    proc = launch(search_args(data_dir, url, workers="2", pad="0", experiment="kill"), tmp_path,
                  cmd=[sys.executable, str(SEARCH)], name="search-kill", env=beat)

    def running_trial():  # a trial some worker has been training for a few steps
        try:
            (s,) = optuna.get_all_study_summaries(url)
        except ValueError:
            return None
        for t in optuna.load_study(study_name=s.study_name, storage=url).get_trials():
            run_id = t.user_attrs.get("mlflow_run_id")
            if t.state.name == "RUNNING" and run_id and steps_of(client, run_id, "train/loss"):
                return t
        return None

    victim = wait_for(running_trial, proc, what="a running trial")
    pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)  # the worker dies mid-trial: no Optuna state change, no MLflow end
    rc, out = finish(proc, timeout=300)
    assert rc == 0, out[-3000:]
    assert "workers died" in out and f"exit code {-signal.SIGKILL}" in out  # reported, not hidden

    (s,) = optuna.get_all_study_summaries(url)
    trials = optuna.load_study(study_name=s.study_name, storage=url).get_trials()
    by_number = {t.number: t for t in trials}
    assert by_number[victim.number].state.name == "FAIL"  # failed by the heartbeat ...
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state.name in ("COMPLETE", "PRUNED")  # ... and run again
    assert retries[0].params["rung"] == victim.params["rung"]
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]

    scfg = resolve_search(search_args(data_dir, url, pad="0"))
    study = optuna.load_study(study_name=s.study_name, storage=url)
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == target_trials(
        scfg, plan_budget(scfg, 2e9), study)  # the study completed

    children = [r for r in all_runs(client) if r.data.tags.get("scaling_lab.kind") == "trial"]
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == sorted(by_number)  # one run per trial
    assert not [r for r in children if r.info.status == "RUNNING"]
    killed = client.get_run(victim.user_attrs["mlflow_run_id"])
    assert killed.info.status == "KILLED" and killed.data.tags["trial_state"] == "FAIL"
    assert "heartbeat" in killed.data.tags["killed_by"]


def test_plain_postgresql_url_uses_the_installed_driver(postgres):
    import importlib.util

    import optuna


    url = postgres.create_db("plain").replace("postgresql+psycopg2://", "postgresql://")
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        assert storage_url(url).startswith("postgresql+psycopg2://")
    assert storage_url("sqlite:///x.db") == "sqlite:///x.db"
    study = optuna.create_study(study_name="plain", storage=make_storage(url))
    study.enqueue_trial({"x": 1.0})
    study.optimize(lambda t: t.suggest_float("x", 0, 2) ** 2, n_trials=1)
    assert optuna.load_study(study_name="plain", storage=storage_url(url)).best_value == 1.0


@pytest.mark.slow
def test_two_search_commands_started_together_share_one_study_and_one_parent_run(data_dir, tmp_path, postgres):
    """Two `search` commands (as on two machines) with one PostgreSQL storage and one tracking store: one parent
    run per study, each size enqueued once, each trial run once with exactly one child run under that parent."""
    import optuna

    url = postgres.create_db("two")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = search_args(data_dir, url, experiment="two", pad="2")
    procs = [launch(args, tmp_path, cmd=[sys.executable, str(SEARCH)], name=f"search-{i}") for i in range(2)]
    for proc in procs:
        rc, out = finish(proc, timeout=400)
        assert rc == 0, out[-3000:]
    (summary,) = optuna.get_all_study_summaries(url)
    study = optuna.load_study(study_name=summary.study_name, storage=url)
    trials = study.get_trials()
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING", "FAIL")]

    scfg = resolve_search(args)
    plan = plan_budget(scfg, 2e9)
    assert len(trials) == target_trials(scfg, plan, study)  # each size queued once, nothing sampled extra
    search_rungs = [t.params["rung"] for t in trials if t.user_attrs["allocation"] == "search"]
    assert sorted(search_rungs) == sorted(set(search_rungs))
    parents = [r for r in all_runs(client) if r.data.tags.get("scaling_lab.kind") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in all_runs(client) if r.data.tags.get("scaling_lab.kind") == "trial"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == sorted(t.number for t in trials)
    assert {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials} <= {str(p.pid) for p in procs}


_HOLD = """
import sys, time
from scaling_lab.studies import StudyLock
with StudyLock(sys.argv[1], "contended"):
    print(repr(time.time()), flush=True)
"""


@pytest.mark.parametrize("backend", ["sqlite", "journal", "postgresql"])
def test_study_lock_excludes_another_process_until_released(backend, tmp_path, request):
    import subprocess


    url = {"sqlite": f"sqlite:///{tmp_path / 'optuna.db'}", "journal": f"journal:///{tmp_path / 'optuna.log'}"}.get(
        backend) or request.getfixturevalue("postgres").create_db("lock")
    with StudyLock(url, "contended"):
        other = subprocess.Popen([sys.executable, "-c", _HOLD, url], stdout=subprocess.PIPE, text=True)
        time.sleep(4.0)  # long enough for the other process to import and ask for the lock
        assert other.poll() is None  # still waiting: it cannot take the lock we hold
        released = time.time()
    out, _ = other.communicate(timeout=60)
    assert other.returncode == 0 and float(out) >= released
    if backend == "postgresql":  # one lock per study name (SQLite: one per database file)
        with StudyLock(url, "another study"), StudyLock(url, "contended"):
            pass


# --------------------------------------------------------------------------- journal file: workers on one machine


@pytest.mark.slow
def test_two_workers_share_a_journal_study_and_a_rerun_reuses_it(data_dir, tmp_path):
    """storage=journal:///<file>: Optuna's JournalStorage on a file, no database server; two workers of one
    command finish the study with each trial once, and the same command again continues it (nothing new)."""
    import optuna

    log = tmp_path / "optuna.log"
    url = f"journal:///{log}"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = search_args(data_dir, url, workers="2", experiment="journal")
    rc, out = finish(launch(args, tmp_path, cmd=[sys.executable, str(SEARCH)], name="search-journal"), timeout=500)
    assert rc == 0, out[-3000:]
    assert f"optuna-dashboard {log} --artifact-dir {tmp_path / 'optuna-artifacts'}" in out
    storage = make_storage(url)
    assert isinstance(storage, optuna.storages.JournalStorage)
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    trials = study.get_trials()
    assert len({t.number for t in trials}) == len(trials)
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    scfg = resolve_search(args)
    assert len(finished) == target_trials(scfg, plan_budget(scfg, 2e9), study)  # no extra sampled trial
    assert sorted(t.user_attrs["allocation"] for t in finished if t.user_attrs["allocation"] != "search") == [
        "chinchilla", "kaplan"]
    assert all(t.params["n_params_total"] == t.user_attrs["n_params_total"] for t in finished)
    (meta,) = optuna.artifacts.get_all_artifact_meta(study)  # the figure beside the log file
    assert (tmp_path / "optuna-artifacts" / meta.artifact_id).exists()
    children = [r for r in all_runs(client) if r.data.tags.get("scaling_lab.kind") == "trial"]
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == sorted(t.number for t in trials)

    rc, out = finish(launch(args, tmp_path, cmd=[sys.executable, str(SEARCH)], name="search-journal-2"), timeout=300)
    assert rc == 0, out[-3000:]
    again = optuna.load_study(study_name=summary.study_name, storage=make_storage(url))
    assert [(t.number, t.state) for t in again.get_trials()] == [(t.number, t.state) for t in trials]
    parents = [r for r in all_runs(client) if r.data.tags.get("scaling_lab.kind") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the re-run reused the study's parent run


def test_journal_worker_that_died_mid_trial_is_failed_and_its_size_queued_once(tmp_path):
    """No heartbeats on a journal file: a worker loop fails the RUNNING trials of this machine's dead processes
    and queues their size once; a live worker's trial is left alone."""
    import socket
    import subprocess

    import optuna

    url = f"journal:///{tmp_path / 'optuna.log'}"
    study = optuna.create_study(study_name="dead", storage=make_storage(url))
    for rung in (2, 3):
        study.enqueue_trial({"rung": rung}, user_attrs={"allocation": "search"})
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead, alive = study.ask(), study.ask()
    dead.set_user_attr("worker", f"{socket.gethostname()}:{gone.pid}")
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    lock = StudyLock(url, "dead")
    assert fail_dead_workers(study, lock) == [dead.number]
    assert fail_dead_workers(study, lock) == []  # once
    trials = {t.number: t for t in optuna.load_study(study_name="dead", storage=make_storage(url)).get_trials()}
    assert trials[dead.number].state.name == "FAIL" and trials[alive.number].state.name == "RUNNING"
    (copy,) = [t for t in trials.values() if t.state.name == "WAITING"]
    assert copy.system_attrs["fixed_params"] == {"rung": 2} and copy.user_attrs["retry_of"] == dead.number
    rdb = optuna.create_study(study_name="rdb", storage=make_storage(f"sqlite:///{tmp_path / 'o.db'}"))
    assert fail_dead_workers(rdb, StudyLock(f"sqlite:///{tmp_path / 'o.db'}", "rdb")) == []  # heartbeats do it


def test_doctor_checks_a_journal_storage(tmp_path):
    assert doctor.check_storage(f"journal:///{tmp_path / 'optuna.log'}").status == "ok"  # not created yet
    make_storage(f"journal:///{tmp_path / 'optuna.log'}")
    check = doctor.check_storage(f"journal:///{tmp_path / 'optuna.log'}")
    assert check.status == "ok" and "journal log" in check.detail
    bad = doctor.check_storage(f"journal:///{tmp_path / 'no' / 'optuna.log'}")
    assert bad.status == "FAIL" and "journal:///" in bad.fix


@pytest.mark.slow
def test_journal_worker_killed_mid_trial_the_other_finishes_the_study(data_dir, tmp_path):
    """kill -9 one of two workers on a journal storage mid-trial: no heartbeat will fail its trial, so the other
    worker does (the pid is gone), runs the size again and completes the study instead of waiting forever."""
    import optuna

    url = f"journal:///{tmp_path / 'optuna.log'}"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = launch(search_args(data_dir, url, workers="2", pad="0", experiment="jkill"), tmp_path,
                  cmd=[sys.executable, str(SEARCH)], name="search-jkill")

    def running_trial():
        try:
            (s,) = optuna.get_all_study_summaries(make_storage(url))
        except ValueError:
            return None
        for t in optuna.load_study(study_name=s.study_name, storage=make_storage(url)).get_trials():
            run_id = t.user_attrs.get("mlflow_run_id")
            if t.state.name == "RUNNING" and run_id and "worker" in t.user_attrs and steps_of(client, run_id, "train/loss"):
                return t
        return None

    victim = wait_for(running_trial, proc, what="a running trial")
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    rc, out = finish(proc, timeout=300)
    assert rc == 0, out[-3000:]
    assert "workers died" in out
    (s,) = optuna.get_all_study_summaries(make_storage(url))
    trials = optuna.load_study(study_name=s.study_name, storage=make_storage(url)).get_trials()
    by_number = {t.number: t for t in trials}
    assert by_number[victim.number].state.name == "FAIL"
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state.name in ("COMPLETE", "PRUNED") and retry.params["rung"] == victim.params["rung"]
    assert retry.user_attrs["allocation"] == victim.user_attrs["allocation"]
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    killed = client.get_run(victim.user_attrs["mlflow_run_id"])
    assert killed.info.status == "KILLED" and killed.data.tags["trial_state"] == "FAIL"
