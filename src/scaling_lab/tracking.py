"""The only library module that imports mlflow: runs, batched metric logging, tags, queries; also the one reader
of ``MLFLOW_RUN_ID`` (``launched_run_id``) and the one masker of passwords in URLs (``masked``).

Metrics are buffered and written with ``log_batch`` (one SQLite commit per batch, not per value);
a flush that fails (server away) keeps the buffer and is retried, so nothing logged is lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags

import scaling_lab
from scaling_lab.errors import ConfigError, Interrupted, TrackingUnavailable
from scaling_lab.links import masked, tracking_uri  # noqa: F401  (tracking.masked, tracking.tracking_uri)

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"  # the UI opens its model-training view
MAX_PARAMS_PER_BATCH = 100
PARAM_VALUE_LIMIT = 6000


def launched_run_id() -> str | None:
    """The run ``mlflow run`` created and logged this invocation's parameters into (MLFLOW_RUN_ID), or None.

    Each entry point calls this once, at its start. It removes the variable from the environment, so neither a
    later ``run()`` nor a process this one starts (search workers) continues that run by accident: the entry point
    decides what becomes of it (continued by the training run, failed on bad input, closed by a search)."""
    return os.environ.pop("MLFLOW_RUN_ID", None) or None


_OPENED: set[str] = set()  # stores this process has opened (created if new) already


def open_store(uri: str) -> None:
    """First use of a store in this process. A SQLite file is opened (its tables created when it is new) under an
    exclusive lock on ``<file>.lock`` (fcntl), so several processes starting at once on a fresh store create it
    once; MLflow's table creation is not safe to run twice at the same time."""
    if uri in _OPENED:
        return
    if uri.startswith("sqlite:") and ":///" in uri:
        path = Path(uri.split(":///", 1)[1])
        with open(path.with_name(path.name + ".lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                MlflowClient(uri).search_experiments(max_results=1)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    _OPENED.add(uri)


def setup(experiment: str) -> str:
    """Point mlflow at the store, create the experiment if needed; return its id.

    With the default SQLite store, artifacts go to ``<cwd>/mlruns`` so ``mlflow ui`` in the project
    root shows everything.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    open_store(uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:"):
            location = (Path.cwd() / "mlruns").resolve().as_uri()
        try:
            client.create_experiment(experiment, artifact_location=location, tags={KIND_TAG: KIND})
        except mlflow.exceptions.MlflowException:  # created by a concurrent worker
            pass
        exp = client.get_experiment_by_name(experiment)
    if exp.tags.get(KIND_TAG) != KIND:
        client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    return exp.experiment_id


def run_experiment(run_id: str) -> str:
    """The name of the experiment a run lives in."""
    client = MlflowClient()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def git_commit() -> str:
    """The package's git commit (provenance, and mlflow.source.git.commit where MLflow found none), or unknown."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def standard_tags() -> dict[str, str]:
    """Tags of every run besides MLflow's own (mlflow.user, mlflow.source.name/type/git.commit)."""
    return {"scaling_lab.version": scaling_lab.__version__}


def param_text(value: Any) -> str:
    """How a param value is stored: booleans as true/false (as MLproject passes them), the rest as str()."""
    text = ("true" if value else "false") if isinstance(value, bool) else "" if value is None else str(value)
    return text[:PARAM_VALUE_LIMIT]


def same_param(stored: str, text: str) -> bool:
    """Do two param strings mean the same value? ``mlflow run`` logs shell-quoted values ('a b'), and numbers may
    be written differently (2e6 and 2000000, 1 and 1.0)."""
    with contextlib.suppress(ValueError):
        parts = shlex.split(stored)
        stored = parts[0] if len(parts) == 1 else stored
    if stored == text:
        return True
    with contextlib.suppress(ValueError):
        return float(stored) == float(text)
    words = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
    return stored.lower() in words and words.get(stored.lower()) == words.get(text.lower())


class RunLogger:
    """The logging callback ``train()`` takes, writing to one MLflow run in batches.

    ``last_step`` is the highest step already stored (resume skips steps at or below it, so a
    resumed run's history never holds a step twice).
    """

    def __init__(self, run_id: str, flush_secs: float = 10.0, client: MlflowClient | None = None,
                 experiment_id: str = ""):
        self.run_id = run_id
        self.experiment_id = experiment_id  # where the run lives (the UI link)
        self.client = client or MlflowClient()
        self.flush_secs = flush_secs
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()
        self._stored = self._stored_last_steps()  # {key: last stored step} of a continued training run
        self._latest: dict[str, int] = {}  # {key: step} last buffered in this process (drops exact repeats)
        self._sent: dict[str, Metric] = {}  # {key: its last Metric} (log_model links the final ones)
        self.last_step = self._stored.get("train/loss", 0)
        self.flush_seconds_total = 0.0  # wall time spent writing metrics (for the overhead figure)
        self.flush_failures = 0
        self.unreachable_since: float | None = None  # monotonic time of the first failed flush of an outage

    def _stored_last_steps(self) -> dict[str, int]:
        """Last stored step per metric key, for a training run being continued (it has ``train/loss``)."""
        try:
            keys = list(self.client.get_run(self.run_id).data.metrics)
            if "train/loss" not in keys:
                return {}
            return {k: max((m.step for m in self.client.get_metric_history(self.run_id, k)), default=0)
                    for k in keys}
        except mlflow.exceptions.MlflowException:
            return {}

    # -- the callback protocol used by train() --------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Each value once under its field name: booleans as true/false, '' and None left out (no param is ever
        ''); a key already stored (``mlflow run`` logs its declared parameters first) is skipped when the value
        means the same (2e6 = 2000000, quoted = unquoted), noted on stderr when it does not (MLflow refuses to
        change a param)."""
        have = self.client.get_run(self.run_id).data.params
        items = []
        for k, v in params.items():
            text = param_text(v)
            if not text:
                continue
            if k in have:
                if not same_param(have[k], text):
                    print(f"tracking: param {k} was logged as {have[k]!r} before; the value used is {text!r}",
                          file=sys.stderr)
                continue
            items.append(Param(k, text))
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in tags.items()]
        self.client.log_batch(self.run_id, tags=items)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # flush between steps, never inside one, so a kill leaves whole steps stored
        if self._buffer and step != self._buffer[-1].step and (
                len(self._buffer) >= MAX_METRICS_PER_BATCH or time.monotonic() - self._last_flush > self.flush_secs):
            self.flush(raise_on_error=False)
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if (0 < step <= self._stored.get(k, 0)) or self._latest.get(k) == step:
                continue  # stored before an interruption (resume), or already buffered at this step
            self._latest[k] = step
            v = float(v)
            self._buffer.append(Metric(k, v if math.isfinite(v) else float("nan"), ts, step))
            self._sent[k] = self._buffer[-1]

    def unsent(self) -> list[tuple[int, str, float]]:
        """(step, key, value) of the metrics not yet written (checkpoints keep them; resume sends them)."""
        return [(m.step, m.key, m.value) for m in self._buffer]

    def flush(self, raise_on_error: bool = True, retries: int = 1, wait: float = 2.0) -> None:
        """Write buffered metrics. On failure keep them for the next call, or raise TrackingUnavailable when
        asked. Over HTTP one attempt is a single request (MLflow's minutes of retries off, 30 s timeout) so an
        absent server does not stall training; the metrics wait in memory (and in checkpoints) meanwhile."""
        t0 = time.monotonic()
        attempt = 0
        while self._buffer:
            chunk = self._buffer[:MAX_METRICS_PER_BATCH]
            try:
                with _single_http_attempt():
                    self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
                del self._buffer[: len(chunk)]
                if self.unreachable_since is not None:
                    print(f"tracking: store answers again after {time.monotonic() - self.unreachable_since:.0f} s; "
                          f"kept metrics sent", file=sys.stderr)
                    self.unreachable_since = None
            except Exception as exc:  # server unreachable, lock timeout: keep the metrics
                attempt += 1
                self.flush_failures += 1
                if self.unreachable_since is None:
                    self.unreachable_since = time.monotonic()
                    print(f"tracking: cannot write metrics to {tracking_uri()} ({type(exc).__name__}); training goes "
                          f"on and keeps them ({len(self._buffer)} values so far) until it answers", file=sys.stderr)
                if attempt >= retries:
                    if raise_on_error:
                        raise TrackingUnavailable(
                            f"tracking store {tracking_uri()} unreachable: {len(self._buffer)} metric values of run "
                            f"{self.run_id} not written ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                        ) from exc
                    break
                time.sleep(wait)
        self._last_flush = time.monotonic()
        self.flush_seconds_total += time.monotonic() - t0

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        with _single_http_attempt(300):  # a server that is away fails this upload, it does not stall for minutes
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, model: Any, name: str, metrics: tuple[str, ...] = ()) -> str:
        """``mlflow.pytorch.log_model``: an MLflow LoggedModel of this (active) run, loadable with
        ``mlflow.pytorch.load_model(f"models:/{model_id}")`` (the package's code travels with it), linked to the
        last values of ``metrics`` this logger wrote. Returns the model id."""
        import mlflow.pytorch

        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise RuntimeError(f"log_model needs run {self.run_id} active in this thread (tracking.run)")
        info = mlflow.pytorch.log_model(model, name=name, serialization_format="pickle",  # the module, forward(x, y)
                                        pip_requirements=[f"torch=={version('torch')}"],
                                        code_paths=[str(Path(scaling_lab.__file__).parent)])
        linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=info.model_id)
                  for k in metrics if (m := self._sent.get(k)) is not None]
        if linked:  # the same values again, now naming the model: the store keeps one copy in the run's history
            self.client.log_batch(self.run_id, metrics=linked, synchronous=True)
        return info.model_id

    def log_dataset(self, name: str, source: dict[str, str], digest: str, context: str) -> None:
        """A dataset input of the run (the UI's Dataset column): ``source`` from data.dataset_source, ``digest``
        the content hash, ``context`` train or validation."""
        if source["kind"] == "hub":
            src = HuggingFaceDatasetSource(source["path"], config_name=source["config"] or None,
                                           split=source["split"])
        else:
            src = LocalArtifactDatasetSource(source["uri"])
        entity = MetaDataset(src, name=name, digest=digest or None)._to_mlflow_entity()
        self.client.log_inputs(self.run_id, [DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])

    @property
    def pending(self) -> int:
        return len(self._buffer)


@contextlib.contextmanager
def _one_http_attempt_env(timeout_s: int):
    """MLflow HTTP requests in this block: one attempt, ``timeout_s`` at most (env vars MLflow reads per call);
    the previous values come back afterwards."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _single_http_attempt(timeout_s: int = 30) -> contextlib.AbstractContextManager:
    """MLflow HTTP requests in this block: one attempt, ``timeout_s`` at most (only for an http:// store)."""
    return _one_http_attempt_env(timeout_s) if tracking_uri().startswith("http") else contextlib.nullcontext()


@contextlib.contextmanager
def run(
    experiment: str,
    run_name: str = "",
    run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    system_metrics: bool = True,
) -> Iterator[RunLogger]:
    """Open (or continue) a run through ``mlflow.start_run``; end it FINISHED, FAILED (tag ``error``) or KILLED
    (tag ``killed_by``).

    ``run_id`` continues an existing run (resume, or the run ``mlflow run`` created: ``launched_run_id()``); one
    that was interrupted before gets ``interrupted_at_step`` (comma-separated, one per interruption) and
    ``interrupted_by``, and its stale ``error`` / ``killed_by`` tags are removed once it finishes. New runs get
    MLflow's standard tags (mlflow.user, mlflow.source.*). System metrics: on for ``system_metrics`` unless
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says otherwise. Safe in threads (MLflow's active run is per thread)."""
    exp_id = setup(experiment)
    client = MlflowClient()
    all_tags = {k: str(v) for k, v in {**standard_tags(), **(tags or {})}.items()}
    before = client.get_run(run_id) if run_id else None
    run_id = _start(client, exp_id, run_name, run_id, parent_run_id, all_tags, system_metrics)
    logger = RunLogger(run_id, client=client, experiment_id=exp_id)
    if before is not None:
        _note_interruption(logger, before)
    status = RunStatus.to_string(RunStatus.FINISHED)
    try:
        yield logger
    except BaseException as exc:
        killed = isinstance(exc, (KeyboardInterrupt, Interrupted))
        status = RunStatus.to_string(RunStatus.KILLED if killed else RunStatus.FAILED)
        with contextlib.suppress(Exception):
            logger.flush(retries=3)
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, TrackingUnavailable) and not logger.pending:
            reason = (f"{type(exc).__name__}: the store did not answer at the end of training; a retry then wrote "
                      "every metric value, but the final artifacts were not logged (resume the run to add them)")
        with contextlib.suppress(Exception):
            logger.set_tags({"killed_by" if killed else "error": reason[:PARAM_VALUE_LIMIT]})
        raise
    finally:
        with contextlib.suppress(Exception):
            logger.flush(retries=5)
        if logger.pending:
            status = RunStatus.to_string(RunStatus.FAILED)
            with contextlib.suppress(Exception):
                logger.set_tags({"error": f"{logger.pending} metric values could not be written"})
        if status == "FINISHED" and before is not None:
            with contextlib.suppress(Exception):
                for key in ("error", "killed_by"):  # superseded: the run finished after all
                    if key in before.data.tags:
                        client.delete_tag(run_id, key)
        _end(client, run_id, status)


def _system_metrics_flag(wanted: bool) -> bool | None:
    """``log_system_metrics`` for mlflow.start_run: None (MLflow reads MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING, which
    ``mlflow.enable_system_metrics_logging()`` sets) when the variable is set, else ``wanted``."""
    return None if wanted and os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING") else wanted


def _start(client: MlflowClient, exp_id: str, run_name: str, run_id: str | None, parent_run_id: str | None,
           tags: dict[str, str], system_metrics: bool) -> str:
    """Start the run with ``mlflow.start_run`` and return its id. It nests under this thread's active run only
    when that run is the parent asked for; otherwise the run is created with MLflow's standard tags resolved
    and then started by id (so an unrelated active run never becomes its parent)."""
    active = mlflow.active_run()
    kw: dict[str, Any] = {"run_name": run_name or None, "nested": active is not None, "tags": tags,
                          "log_system_metrics": _system_metrics_flag(system_metrics)}
    if run_id is None and active is not None and active.info.run_id != parent_run_id:
        parent = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
        run_id = client.create_run(exp_id, tags=resolve_tags({**tags, **parent}), run_name=run_name or None).info.run_id
    if run_id is None:
        started = mlflow.start_run(experiment_id=exp_id, parent_run_id=parent_run_id, **kw)
    else:
        started = mlflow.start_run(run_id=run_id, **kw)
    if "mlflow.source.git.commit" not in started.data.tags and (commit := git_commit()) != "unknown":
        client.set_tag(started.info.run_id, "mlflow.source.git.commit", commit)  # console script, tests
    return started.info.run_id


def _end(client: MlflowClient, run_id: str, status: str) -> None:
    """End the run: ``mlflow.end_run`` when it is this thread's active run (it also stops the system-metrics
    monitor), else set_terminated. A store that does not answer leaves the run as it is."""
    with contextlib.suppress(Exception):
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status)
        else:
            client.set_terminated(run_id, status)


def _note_interruption(logger: RunLogger, before: Any) -> None:
    """A continued run that stopped before its end (killed, failed, or left RUNNING by kill -9 with steps stored):
    record where (``interrupted_at_step``) and why (``interrupted_by``)."""
    tags = before.data.tags
    reason = tags.get("error") or tags.get("killed_by") or ""
    if before.info.status == "FINISHED" or not (logger.last_step or reason):
        return
    if before.info.status == "RUNNING" and not logger.last_step:
        return  # the run `mlflow run` just created: nothing happened yet
    note = {"interrupted_by": reason or f"the process ended while the run was {before.info.status}"}
    if logger.last_step:
        steps = [s for s in tags.get("interrupted_at_step", "").split(",") if s]
        note["interrupted_at_step"] = ",".join([*steps, str(logger.last_step)])
    logger.set_tags(note)


def end_stray_run(run_id: str, reason: str) -> None:
    """Close and delete a run ``mlflow run`` created that the script will not use (resume, dry run).

    ``mlflow run`` sets the status of its run once more after the script exits, and that fails on a
    deleted run (exit code 1). So under ``mlflow run`` the run is ended now and deleted by a small
    detached process as soon as the ``mlflow run`` process is gone.
    """
    client = MlflowClient()
    client.set_tag(run_id, "scaling_lab.note", reason)
    client.set_terminated(run_id, "FINISHED")
    launcher = _mlflow_run_pid()
    if launcher is None:
        client.delete_run(run_id)
        return
    code = "import sys; from scaling_lab.tracking import _delete_when_gone; _delete_when_gone(*sys.argv[1:])"
    subprocess.Popen([sys.executable, "-c", code, run_id, str(launcher), tracking_uri()], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def _mlflow_run_pid() -> int | None:
    """Process id of the ``mlflow run`` that launched this script (an ancestor), or None."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process().parents():
            cmd = proc.cmdline()
            if any(Path(a).name == "mlflow" and cmd[i + 1 : i + 2] == ["run"] for i, a in enumerate(cmd[:3])):
                return proc.pid
    return None


def _delete_when_gone(run_id: str, pid: str, uri: str, timeout_s: float = 3600) -> None:
    """Wait for process ``pid`` (``mlflow run``) to exit, then delete the run."""
    import psutil

    with contextlib.suppress(psutil.Error):
        psutil.Process(int(pid)).wait(timeout=timeout_s)
    MlflowClient(uri).delete_run(run_id)


def fetch_checkpoint(run_id: str, path: Path, artifact: str = "checkpoint/last.pt") -> bool:
    """``resume`` on a machine without the local checkpoint: download the run's ``checkpoint/last.pt`` artifact to
    ``path`` (atomically). False when the store or the run has none (a missing SQLite file is not created)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:") and not Path(uri.split(":///", 1)[-1]).exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        open_store(uri)
        with _single_http_attempt(300), tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            os.replace(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=tmp,
                                                           tracking_uri=uri), path)
    except Exception:  # no such run or artifact, unreachable store: the caller names the missing checkpoint
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only when empty
        return False
    print(f"resume: checkpoint of run {run_id} downloaded from the tracking store to {path}", file=sys.stderr)
    return True


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


# --- queries (analysis) ---


def _client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(uri or tracking_uri())


def _descendants(frame, root: str) -> set[str]:
    """Run ids below ``root`` through mlflow.parentRunId links (a search parent -> study parents -> trials)."""
    col = "tags.mlflow.parentRunId"
    if col not in frame.columns:
        return set()
    children: dict[str, list[str]] = {}
    for rid, parent in zip(frame["run_id"], frame[col]):
        if isinstance(parent, str) and parent:
            children.setdefault(parent, []).append(rid)
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def runs_frame(experiments: list[str] | None = None, filter_string: str = "", parent_run_id: str = "",
               tags: dict[str, str] | None = None, uri: str | None = None):
    """Runs as a pandas DataFrame (one row per run): run_id, status, experiment_id, ``params.<k>``,
    ``metrics.<k>`` (last value) and ``tags.<k>`` columns, as ``mlflow.search_runs`` returns them.

    ``experiments`` are names (default: every experiment); ``tags`` adds ``tags.`k` = 'v'`` terms to
    ``filter_string``; ``parent_run_id`` keeps the runs below that run at any depth. Deleted runs are left out.
    """
    import pandas as pd

    client = _client(uri)
    if experiments:
        exps = []
        for name in experiments:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                known = [e.name for e in client.search_experiments()]
                raise ConfigError("experiment", name, "an experiment in the store: " + ", ".join(known))
            exps.append(exp.experiment_id)
    else:
        exps = [e.experiment_id for e in client.search_experiments()]
    terms = [filter_string] if filter_string else []
    for k, v in (tags or {}).items():
        terms.append(f"tags.`{k}` = '{v}'")
    rows = []
    token = None
    while True:
        page = client.search_runs(exps, " and ".join(terms), max_results=50000, page_token=token)
        for r in page:
            row: dict[str, Any] = {"run_id": r.info.run_id, "status": r.info.status,
                                   "experiment_id": r.info.experiment_id, "start_time": r.info.start_time}
            row.update({f"params.{k}": v for k, v in r.data.params.items()})
            row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
            row.update({f"tags.{k}": v for k, v in r.data.tags.items()})
            rows.append(row)
        token = page.token
        if not token:
            break
    frame = pd.DataFrame(rows)
    if parent_run_id and not frame.empty:
        frame = frame[frame["run_id"].isin(_descendants(frame, parent_run_id))]
    return frame.reset_index(drop=True)


def metric_histories(run_ids: list[str], keys: list[str], uri: str | None = None,
                     workers: int = 4) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Full histories of ``keys`` for many runs: {run_id: {key: [(step, value), ...] sorted by step}}.
    Requests go out on a few threads (a remote server answers them in parallel; SQLite serializes them)."""
    from concurrent.futures import ThreadPoolExecutor

    client = _client(uri)

    def one(rid: str) -> tuple[str, dict[str, list[tuple[int, float]]]]:
        return rid, {k: sorted((m.step, m.value) for m in client.get_metric_history(rid, k)) for k in keys}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return dict(pool.map(one, run_ids))


def log_report(run_id: str, folder: str | Path, artifact_path: str = "report") -> None:
    """Log every file of a report folder as artifacts of ``run_id``."""
    MlflowClient().log_artifacts(run_id, str(folder), artifact_path)


# --- studies (search) ---


def find_study_run(experiment: str, study: str, storage: str) -> str | None:
    """The parent run of an Optuna study (tags scaling_lab.kind=study, study, storage), so a re-run of a
    search reuses it; None when there is none yet. Deleted runs are ignored."""
    exp_id = setup(experiment)
    flt = (f"tags.`scaling_lab.kind` = 'study' and tags.study = '{study}' and tags.storage = '{storage}'")
    runs = MlflowClient().search_runs([exp_id], flt, max_results=10, order_by=["attributes.start_time ASC"])
    return runs[0].info.run_id if runs else None


def close_trial_run(run_id: str, reason: str) -> bool:
    """End KILLED (tags trial_state=FAIL, killed_by=<reason>) one trial run left RUNNING by a worker that died;
    False when the run is already over or gone."""
    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return False
    except mlflow.exceptions.MlflowException:
        return False
    client.log_batch(run_id, tags=[RunTag("trial_state", "FAIL"), RunTag("killed_by", reason[:PARAM_VALUE_LIMIT])])
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
    return True


def end_pruned_run(run_id: str, reason: str) -> None:
    """A pruned trial: status KILLED, tags trial_state=PRUNED and killed_by=<reason>; its partial curve stays."""
    client = MlflowClient()
    client.log_batch(run_id, tags=[RunTag("trial_state", "PRUNED"), RunTag("killed_by", reason[:PARAM_VALUE_LIMIT])])
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


def finish_invocation_run(run_id: str, table: str, study_runs: dict[str, str]) -> None:
    """The run ``mlflow run -e search`` created: tag it kind=search with its studies' parent runs, attach the
    closing table, end FINISHED."""
    client = MlflowClient()
    tags = [RunTag("scaling_lab.kind", "search"), RunTag("study_runs", ",".join(study_runs.values())[:PARAM_VALUE_LIMIT]),
            RunTag("studies", ",".join(study_runs)[:PARAM_VALUE_LIMIT])]
    client.log_batch(run_id, tags=tags)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "search_table.txt"
        path.write_text(table + "\n")
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


STORE_CHECK_S = 10  # require_store: one request, no retries, at most this long (README "Tracking store")


def require_store(timeout_s: int = STORE_CHECK_S) -> None:
    """Before any training: the store MLFLOW_TRACKING_URI names must be one MLflow can parse and must answer one
    request within ``timeout_s`` (MLflow's own retries would wait minutes). Raises ConfigError naming it."""
    uri = tracking_uri()
    ok, detail = check_store(uri=uri, timeout_s=timeout_s, write=False)
    if not ok:
        raise ConfigError("MLFLOW_TRACKING_URI", masked(uri), f"a tracking store MLflow can open that answers "
                          f"within {timeout_s} s (this one: {detail.split(': ', 1)[-1]})")


def check_store(experiment: str = "", uri: str | None = None, timeout_s: int = 5,
                write: bool = True) -> tuple[bool, str]:
    """Doctor check: does the tracking store answer, and does it accept a write? Returns (ok, detail).
    ``write=False``: only open it (an existing writable SQLite file is not even opened) and read once.

    SQLite: a missing file is fine when its folder is writable (it is created on first use); an existing
    one is read and gets an experiment tag ``scaling_lab.doctor`` (the write test). Servers: the same read
    and tag, with MLflow's HTTP retries off and a short timeout so an absent server answers in seconds.
    """
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:"):
        path = Path(uri.split(":///", 1)[-1]) if ":///" in uri else None
        if path is None or not path.exists():
            folder = path.parent if path else Path.cwd()
            if not folder.is_dir() or not os.access(folder, os.W_OK):
                return False, f"{uri}: folder {folder} does not exist or is not writable"
            return True, f"{uri} (not created yet; folder {folder} is writable)"
        if not os.access(path, os.W_OK):
            return False, f"{uri}: file is not writable"
        if not write:
            return True, f"{uri} (writable)"
    try:
        with _one_http_attempt_env(timeout_s):
            client = MlflowClient(uri)
            if not write:
                client.search_experiments(max_results=1)
                return True, f"{masked(uri)} (answers)"
            exp = client.get_experiment_by_name(experiment) if experiment else None
            exps = [exp] if exp is not None else client.search_experiments(max_results=1)
            if not exps:
                return True, f"{uri} (reachable; no experiment yet to test a write)"
            client.set_experiment_tag(exps[0].experiment_id, "scaling_lab.doctor",
                                      time.strftime("%Y-%m-%dT%H:%M:%S"))
            return True, f"{uri} (read and wrote experiment '{exps[0].name}')"
    except Exception as exc:  # unreachable server, bad credentials, locked or corrupt file
        return False, f"{uri}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
