"""The only library module that imports mlflow: runs, batched metric logging, tags, queries.

Metrics are buffered and written with ``log_batch`` (one SQLite commit per batch, not per value);
a flush that fails (server away) keeps the buffer and is retried, so nothing logged is lost.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

import scaling_lab
from scaling_lab.errors import Interrupted

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_BATCH = 100
PARAM_VALUE_LIMIT = 6000


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else ``sqlite:///<cwd>/mlflow.db`` (the project root under mlflow run)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri else f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def setup(experiment: str) -> str:
    """Point mlflow at the store, create the experiment if needed; return its id.

    With the default SQLite store, artifacts go to ``<cwd>/mlruns`` so ``mlflow ui`` in the project
    root shows everything.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (Path.cwd() / "mlruns").resolve().as_uri()
    try:
        return client.create_experiment(experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created by a concurrent worker
        return client.get_experiment_by_name(experiment).experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def standard_tags() -> dict[str, str]:
    return {"scaling_lab.version": scaling_lab.__version__, "git_commit": git_commit()}


class RunLogger:
    """The logging callback ``train()`` takes, writing to one MLflow run in batches.

    ``last_step`` is the highest step already stored (resume skips steps at or below it, so a
    resumed run's history never holds a step twice).
    """

    def __init__(self, run_id: str, flush_secs: float = 10.0, client: MlflowClient | None = None):
        self.run_id = run_id
        self.client = client or MlflowClient()
        self.flush_secs = flush_secs
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()
        self.last_step = self._stored_last_step()
        self.flush_seconds_total = 0.0  # wall time spent writing metrics (for the overhead figure)
        self.flush_failures = 0

    def _stored_last_step(self) -> int:
        try:
            hist = self.client.get_metric_history(self.run_id, "train/loss")
        except mlflow.exceptions.MlflowException:
            return 0
        return max((m.step for m in hist), default=0)

    # -- the callback protocol used by train() --------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        run = self.client.get_run(self.run_id)
        have = run.data.params
        items = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in params.items() if k not in have]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in tags.items()]
        self.client.log_batch(self.run_id, tags=items)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.last_step and step > 0:
            return  # already stored before an interruption
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            v = float(v)
            self._buffer.append(Metric(k, v if math.isfinite(v) else float("nan"), ts, step))
        if len(self._buffer) >= MAX_METRICS_PER_BATCH or time.monotonic() - self._last_flush > self.flush_secs:
            self.flush(raise_on_error=False)

    def flush(self, raise_on_error: bool = True, retries: int = 1, wait: float = 2.0) -> None:
        """Write buffered metrics. On failure keep them for the next call (or raise when asked)."""
        t0 = time.monotonic()
        attempt = 0
        while self._buffer:
            chunk = self._buffer[:MAX_METRICS_PER_BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
                del self._buffer[: len(chunk)]
            except Exception as exc:  # server unreachable, lock timeout: keep the metrics
                attempt += 1
                self.flush_failures += 1
                if attempt >= retries:
                    if raise_on_error:
                        raise
                    warnings.warn(f"metric logging deferred ({type(exc).__name__}): {len(self._buffer)} values kept",
                                  stacklevel=2)
                    break
                time.sleep(wait)
        self._last_flush = time.monotonic()
        self.flush_seconds_total += time.monotonic() - t0

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @property
    def pending(self) -> int:
        return len(self._buffer)


@contextlib.contextmanager
def run(
    experiment: str,
    run_name: str = "",
    run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    system_metrics: bool = True,
) -> Iterator[RunLogger]:
    """Open (or continue) a run; end it FINISHED, FAILED (tag ``error``) or KILLED (tag ``killed_by``).

    ``run_id`` continues an existing run (resume, or the run ``mlflow run`` created: MLFLOW_RUN_ID).
    """
    exp_id = setup(experiment)
    client = MlflowClient()
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or None
    all_tags = {**standard_tags(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if run_id is None:
        created = client.create_run(exp_id, tags={k: str(v) for k, v in all_tags.items()},
                                    run_name=run_name or None)
        run_id = created.info.run_id
    else:
        client.update_run(run_id, status="RUNNING", name=run_name or None)
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
    monitor = _system_metrics(run_id) if system_metrics else None
    logger = RunLogger(run_id, client=client)
    status = RunStatus.to_string(RunStatus.FINISHED)
    try:
        yield logger
    except BaseException as exc:
        killed = isinstance(exc, (KeyboardInterrupt, Interrupted))
        status = RunStatus.to_string(RunStatus.KILLED if killed else RunStatus.FAILED)
        reason = f"{type(exc).__name__}: {exc}"[:PARAM_VALUE_LIMIT]
        with contextlib.suppress(Exception):
            logger.flush(retries=3)
        with contextlib.suppress(Exception):
            logger.set_tags({"killed_by" if killed else "error": reason})
        raise
    finally:
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()
        with contextlib.suppress(Exception):
            logger.flush(retries=5)
        if logger.pending:
            status = RunStatus.to_string(RunStatus.FAILED)
            with contextlib.suppress(Exception):
                logger.set_tags({"error": f"{logger.pending} metric values could not be written"})
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status)


def _system_metrics(run_id: str):
    """psutil CPU/memory (and GPU where present) sampled into the run as system/* metrics."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        mon = SystemMetricsMonitor(run_id, sampling_interval=10, samples_before_logging=1)
        mon.start()
        return mon
    except Exception as exc:  # psutil missing or a monitor error must not stop training
        print(f"system metrics off: {exc}", file=sys.stderr)
        return None


def end_stray_run(run_id: str, reason: str) -> None:
    """Close and delete a run ``mlflow run`` created that the script will not use (e.g. on resume)."""
    client = MlflowClient()
    client.set_tag(run_id, "scaling_lab.note", reason)
    client.set_terminated(run_id, "FINISHED")
    client.delete_run(run_id)


def fail_run(run_id: str, reason: str) -> None:
    """Mark a run FAILED with the reason (bad input found after ``mlflow run`` created the run)."""
    client = MlflowClient()
    client.set_tag(run_id, "error", reason[:PARAM_VALUE_LIMIT])
    client.set_terminated(run_id, "FAILED")


def get_run(run_id: str):
    return MlflowClient().get_run(run_id)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric, sorted by step."""
    hist = MlflowClient().get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in hist)
