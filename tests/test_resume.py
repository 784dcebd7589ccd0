"""Kill a real training process (SIGKILL, SIGTERM), then resume it: the run ends FINISHED with a continuous
per-step history (every step once, none missing), from the local checkpoint or, when that is gone, from the copy
in the run's artifacts; the interruption stays on record. The entry script runs as a subprocess against a
temporary SQLite store, exactly as a user would launch it. And the final model as an MLflow LoggedModel."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from servers import assert_complete, falls, finish, launch, steps_of, wait_for

from scaling_lab import config, data, tracking
from scaling_lab.train import train


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
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert_complete_history(client, run_id)
    assert int(run.data.tags["interrupted_at_step"]) >= at and "RUNNING" in run.data.tags["interrupted_by"]
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
    assert "checkpoint/last.pt" in {a.path for a in client.list_artifacts(run_id, "checkpoint")}

    shutil.rmtree(tmp_path / "ck")  # another machine: only the tracking store has the checkpoint
    proc = launch({"resume": run_id, "checkpoint_dir": str(tmp_path / "ck")}, tmp_path)
    rc, out = finish(proc)
    assert rc == 0, out[-3000:]
    assert "downloaded from the tracking store" in out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert_complete_history(client, run_id)
    # the stale kill reason is gone from the FINISHED run; the history says where and why it stopped
    assert "killed_by" not in run.data.tags and "error" not in run.data.tags
    assert run.data.tags["interrupted_at_step"] == str(at) and "Interrupted" in run.data.tags["interrupted_by"]


def test_resume_of_a_run_without_any_checkpoint_is_one_clear_error(tiny, store, capsys):
    from scaling_lab.cli import main_train

    with tracking.run("resume", "no-checkpoint", system_metrics=False) as log:
        pass  # a real run, but nothing was ever checkpointed (locally or as an artifact)
    code = main_train(["--resume", log.run_id, "--checkpoint_dir", str(store / "ck")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(err) == 1 and "parameter 'resume'" in err[0], err
    assert not (store / "ck" / log.run_id).exists()  # the failed download left no folder behind


def test_save_checkpoint_logs_a_loadable_model_linked_to_the_run_and_its_final_metrics(tiny, store):
    cfg = config.resolve({**tiny, "save_checkpoint": "true", "checkpoint_dir": str(store / "ck")})
    with tracking.run(cfg.experiment, "model-run", system_metrics=False) as log:
        result = train(cfg, log, progress=False)
    client = MlflowClient()
    run = client.get_run(result.run_id)
    (model,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert model.source_run_id == result.run_id and model.name == "model"
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]  # the UI's Models column
    linked = {m.key: m.value for m in model.metrics}
    assert linked["final/val_loss"] == pytest.approx(run.data.metrics["final/val_loss"], rel=1e-9)
    assert "final/val_bpb" in linked
    assert len(client.get_metric_history(result.run_id, "final/val_loss")) == 1  # linking added no second value
    assert "checkpoint/last.pt" in {a.path for a in client.list_artifacts(result.run_id, "checkpoint")}
    # the loaded model scores the validation windows exactly as training's last evaluation did
    net = mlflow.pytorch.load_model(f"models:/{model.model_id}", map_location="cpu").eval()
    val = data.load_tokens(cfg.data, cfg.data.val_split, max_tokens=cfg.train.eval_tokens * 4)
    x, y = data.eval_windows(val.ids, cfg.model.block_size, cfg.train.eval_tokens)
    with torch.no_grad():
        _, loss = net(x, y)
    assert float(loss) == pytest.approx(result.val_loss, rel=1e-4)
