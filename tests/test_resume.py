"""Kill a real training process (SIGKILL, SIGTERM), then resume it: the run ends FINISHED with a continuous
per-step history (every step once, none missing). The entry script runs as a subprocess against a
temporary SQLite store, exactly as a user would launch it."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from servers import assert_complete, falls, finish, launch, steps_of, wait_for


def only_run(client: MlflowClient):
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return runs[0] if len(runs) == 1 else None


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["step"])


def assert_complete_history(client: MlflowClient, run_id: str) -> None:
    """Every per-step metric has exactly steps 1..N (N = the run's planned steps); evaluations once each."""
    losses = assert_complete(client, run_id)
    assert len(client.get_metric_history(run_id, "final/val_loss")) == 1
    assert falls(losses)  # it trained through the interruption


def kill_then_resume(tiny, tmp_path: Path, sig: int) -> tuple[MlflowClient, str, int, str]:
    """Start a run, send ``sig`` once a checkpoint exists and steps are stored, return (client, run_id, rc, log)."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    over = {**tiny, "checkpoint_every": "10", "checkpoint_dir": str(tmp_path / "ck"),
            "experiment": "resume"}
    proc = launch(over, tmp_path)
    run_id = wait_for(lambda: (r := only_run(client)) and r.info.run_id, proc, what="the run to exist")
    ckpt = tmp_path / "ck" / run_id / "last.pt"
    wait_for(lambda: ckpt.exists() and steps_of(client, run_id, "train/loss"), proc,
             what="a checkpoint and stored steps")
    proc.send_signal(sig)
    rc, out = finish(proc)
    return client, run_id, rc, out


@pytest.mark.slow
def test_sigkill_then_resume_history_continuous(tiny, tmp_path):
    client, run_id, rc, out = kill_then_resume(tiny, tmp_path, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert client.get_run(run_id).info.status == "RUNNING"  # the dead process could not close it
    ckpt = tmp_path / "ck" / run_id / "last.pt"
    at = checkpoint_step(ckpt)
    n = int(client.get_run(run_id).data.params["steps"])
    assert 0 < at < n
    # kill -9 loses at most the steps after the checkpoint: everything up to it is stored
    stored = steps_of(client, run_id, "train/loss")
    assert stored[: at] == list(range(1, at + 1))

    proc = launch({"resume": run_id, "checkpoint_dir": str(tmp_path / "ck")}, tmp_path)
    rc, out = finish(proc)
    assert rc == 0, out[-3000:]
    assert f"run {run_id} FINISHED" in out
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_complete_history(client, run_id)
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1  # resumed in place


@pytest.mark.slow
def test_sigterm_checkpoints_killed_then_resume_finishes(tiny, tmp_path):
    client, run_id, rc, out = kill_then_resume(tiny, tmp_path, signal.SIGTERM)
    assert rc != 0, out[-3000:]
    assert f"resume={run_id}" in out  # the message says how to continue
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert "Interrupted" in run.data.tags["killed_by"]
    at = checkpoint_step(tmp_path / "ck" / run_id / "last.pt")
    n = int(run.data.params["steps"])
    assert 0 < at < n
    assert steps_of(client, run_id, "train/loss") == list(range(1, at + 1))  # flushed up to the checkpoint

    proc = launch({"resume": run_id, "checkpoint_dir": str(tmp_path / "ck")}, tmp_path)
    rc, out = finish(proc)
    assert rc == 0, out[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert_complete_history(client, run_id)
