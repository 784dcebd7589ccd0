"""Optuna and SQL plumbing of a search: storages (RDB with heartbeats, or a journal file), the study lock,
creating and loading studies, queueing sizes (anchors first), the study's figure in Optuna's artifact store,
and the trials a dead or failed worker left behind.

A trial's ladder position is its Optuna parameter ``rung``; its size is the derived parameter
``n_params_total`` (see ``record_size``); its MLflow run id, worker and allocation are user attributes. Only
``tracking`` touches MLflow (closing the runs of failed trials).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from scaling_lab import tracking
from scaling_lab.errors import ConfigError
from scaling_lab.isoflop import BudgetPlan, SearchConfig, key_of, replica_of, rung_of, trial_config

# Optuna trial heartbeat period (s); a trial silent for GRACE_S is failed and retried once. The environment
# may shorten both (tests of killed workers, see docs/scaling-out.md).
HEARTBEAT_S = int(os.environ.get("SCALING_LAB_HEARTBEAT_S", "30"))
GRACE_S = int(os.environ.get("SCALING_LAB_GRACE_S", "120"))
ACTIVE = ("COMPLETE", "PRUNED", "WAITING", "RUNNING")
JOURNAL = "journal:///"  # journal:///optuna.log (relative) or journal:////abs/optuna.log, as sqlite:/// URLs
ARTIFACTS_ENV = "SCALING_LAB_OPTUNA_ARTIFACTS"  # the Optuna artifact store's folder, for any storage


def journal_path(url: str) -> str | None:
    """The log file of a ``journal:///<file>`` storage URL, None for any other URL."""
    return url[len(JOURNAL):] if url.startswith(JOURNAL) else None


def storage_url(url: str) -> str:
    """``url`` with a driver SQLAlchemy can load: a plain ``postgresql://`` means psycopg 3 to SQLAlchemy 2.1;
    when only psycopg2 is installed it becomes ``postgresql+psycopg2://``."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


class StudyLock:
    """A lock every process that opens the study shares, for the few storage steps that must not interleave:
    find-or-create the study's parent run and enqueue its sizes; see that a trial waits and take it. A
    PostgreSQL (or MySQL) storage gives a session lock in the study's own database, so workers on several
    machines share it and a dead worker's lock ends with its connection; a SQLite storage gives an flock on
    ``<file>.lock`` beside the database, a journal storage on ``<log>.studylock`` (``<log>.lock`` is Optuna's
    own lock) (one lock per file, for the processes of one machine). Held for milliseconds, never while
    training. ``release`` may be called more than once."""

    def __init__(self, url: str, name: str):
        self.url, self.name = storage_url(url), name
        journal = journal_path(self.url)
        self.backend = "journal" if journal is not None else make_url(self.url).get_backend_name()
        self._flock = f"{journal}.studylock" if journal is not None else (
            f"{make_url(self.url).database}.lock" if self.backend == "sqlite" else "")
        # 64-bit key of the study name (pg_advisory_lock takes a bigint)
        self.key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        self._conn = None
        self._file = None

    def acquire(self) -> StudyLock:
        if self.backend in ("postgresql", "mysql"):
            self._conn = create_engine(self.url, poolclass=NullPool).connect()
            sql = ("SELECT pg_advisory_lock(:k)" if self.backend == "postgresql"
                   else "SELECT GET_LOCK(:n, 600)")
            self._conn.execute(text(sql), {"k": self.key, "n": f"scaling-lab:{self.name}"[:64]})
        elif self._flock:
            self._file = open(self._flock, "a")  # noqa: SIM115 (held until release)
            fcntl.flock(self._file, fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()  # a session lock ends with its session
            finally:
                self._conn = None
        if self._file is not None:
            try:
                self._file.close()  # closing the file drops the flock
            finally:
                self._file = None

    def __enter__(self) -> StudyLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """RDBStorage with heartbeats: a trial whose process died is marked FAIL after the grace period and
    retried once (RetryHeartbeatStaleTrialCallback), so several workers can share one study. ``journal:///<log>``:
    Optuna's JournalStorage on a JournalFileBackend (its default symlink lock, the one optuna-dashboard and plain
    Optuna scripts take too), for several workers on one machine; it has no heartbeats, so ``fail_dead_workers``
    fails the trials of this machine's dead workers instead."""
    journal = journal_path(url)
    if journal is not None:
        try:
            return JournalStorage(JournalFileBackend(journal))
        except OSError as exc:  # a missing or unwritable folder: one line
            raise ConfigError("storage", url, f"journal:///<file> in a writable folder ({type(exc).__name__}: "
                              f"{exc.strerror or exc})") from None
    url = storage_url(url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}
    try:
        # under a lock: two commands opening an empty database at once would both create Optuna's tables
        with warnings.catch_warnings(), StudyLock(url, "optuna-schema"):
            warnings.simplefilter("ignore")  # heartbeats are "experimental" in Optuna 5
            return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    except Exception as exc:  # bad driver, unreachable server, wrong password: one line
        raise ConfigError("storage", tracking.masked(url), f"a reachable Optuna RDB storage ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]})") from None


def has_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    """Whether Optuna fails a dead worker's trial itself (RDB heartbeats); a journal file does not. A study's RDB
    storage comes wrapped in Optuna's cache (``_backend`` is the RDBStorage)."""
    return isinstance(getattr(storage, "_backend", storage), RDBStorage)


def make_sampler(scfg: SearchConfig) -> optuna.samplers.BaseSampler:
    if scfg.sampler == "tpe":
        # constant liar: other workers' RUNNING trials count as bad results, so parallel workers do not all sample
        # the same promising size. On with several workers, and with a journal or server storage that other search
        # commands may share (Optuna 5's default, passed explicitly); off for one worker on SQLite, where nothing
        # else runs and the lie would only count a killed search's zombie trials.
        return optuna.samplers.TPESampler(seed=scfg.seed, n_startup_trials=3,
                                          constant_liar=scfg.workers > 1 or not scfg.storage.startswith("sqlite"))
    return optuna.samplers.RandomSampler(seed=scfg.seed)  # grid: every size is enqueued; random fills gaps only


def record_size(trial: optuna.Trial, n_params_total: int) -> None:
    """The trial's size as an Optuna parameter, so optuna-dashboard's slice, parallel-coordinate and importance
    plots read in N rather than the ladder index. ``rung`` stays the searched parameter: grid queues, retries
    and existing studies are keyed on it, and TPE/random sample it. ``n_params_total`` is a derived parameter
    with a one-value distribution (low = high = the size; log scale for the plots): Optuna records it without
    asking the sampler, its range may differ per trial as widening changes ``rung``'s (ints are compatible when
    the log flag agrees), and studies made before it simply lack it on their older trials."""
    trial.suggest_int("n_params_total", n_params_total, n_params_total, log=True)


class BracketPruner(optuna.pruners.BasePruner):
    """``base`` (e.g. MedianPruner) restricted to trials that cannot make the bracket: it never stops a seeded
    anchor, a seed replica, a size trained again for the bracket (``rerun``), or a size within ``bracket`` family
    positions of the best COMPLETE size so far, so the sizes the isoFLOP fit uses around each minimum finish."""

    def __init__(self, base: optuna.pruners.BasePruner, bracket: int):
        self.base, self.bracket = base, bracket

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if trial.user_attrs.get("allocation", "search") != "search" or replica_of(trial) or trial.user_attrs.get("rerun"):
            return False
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
        rung = rung_of(trial)
        if done and rung is not None and abs(rung - rung_of(min(done, key=lambda t: t.value))) <= self.bracket:
            return False
        return self.base.prune(study, trial)


def make_pruner(scfg: SearchConfig) -> optuna.pruners.BasePruner:
    if scfg.pruner == "none":
        return optuna.pruners.NopPruner()
    median = optuna.pruners.MedianPruner(n_startup_trials=scfg.prune_startup, n_warmup_steps=scfg.prune_warmup)
    return BracketPruner(median, scfg.bracket)


class AnchorsFirst(optuna.Study):
    """A study whose queue hands out seeded anchors (allocation kaplan or chinchilla) before any other WAITING
    trial. Optuna pops WAITING trials in trial-number order, so an anchor queued again after a crash (killed
    search re-run, dead worker, retry) would run last, after the pruner and the bracket were settled without it;
    here it runs first. Same storage, same states; only the order of the queue differs (Optuna's own
    ``_pop_waiting_trial_id`` with the WAITING trials sorted)."""

    def _pop_waiting_trial_id(self) -> int | None:
        waiting = self._storage.get_all_trials(self._study_id, deepcopy=False, states=(TrialState.WAITING,))
        for t in sorted(waiting, key=lambda t: (t.user_attrs.get("allocation", "search") == "search", t.number)):
            try:
                if self._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                    return t._trial_id
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker finished it meanwhile
                continue
        return None


def load_study(scfg: SearchConfig, name: str, storage, pruner=None) -> AnchorsFirst:
    """The study ``name`` (created by ``open_study``) with the search's sampler and pruner, anchors first."""
    return AnchorsFirst(study_name=name, storage=storage, sampler=make_sampler(scfg),
                        pruner=pruner or make_pruner(scfg))


def open_study(scfg: SearchConfig, plan: BudgetPlan, storage, pruner=None):
    """Create or load the budget's study (load_if_exists) and record its budget and range."""
    study = optuna.create_study(study_name=plan.study_name, storage=storage, sampler=make_sampler(scfg),
                                pruner=pruner or make_pruner(scfg), direction="minimize", load_if_exists=True)
    attrs = study.user_attrs
    check_ladder(study, plan, scfg)
    check_recipe(study, plan, scfg)
    lo = min(plan.lo, attrs.get("range_lo", plan.lo))
    hi = max(plan.hi, attrs.get("range_hi", plan.hi))
    plan.lo, plan.hi = lo, min(hi, plan.cap)
    for k, v in {"budget": plan.budget, "flops_rule": scfg.flops_rule, "range_lo": plan.lo, "range_hi": plan.hi,
                 "vocab_size": scfg.data.vocab_size, "block_size": scfg.block_size,
                 "ladder": ladder_of(plan)}.items():
        if attrs.get(k) != v:
            study.set_user_attr(k, v)
    return study


def ladder_of(plan: BudgetPlan) -> str:
    """The family's widths by rung, as stored on a study: a trial's ``rung`` means nothing without it."""
    return ",".join(map(str, plan.widths))


def check_ladder(study, plan: BudgetPlan, scfg: SearchConfig) -> None:
    """Refuse to resume a study whose rungs index another model ladder (an older family version)."""
    stored = study.user_attrs.get("ladder")
    clash = stored is not None and stored != ladder_of(plan)
    if stored is None:  # studies from before the attribute: compare each trial's recorded width
        for t in study.get_trials(deepcopy=False):
            rung, width = t.params.get("rung"), t.user_attrs.get("n_embd")
            if rung is not None and width is not None and (rung >= len(plan.widths) or plan.widths[rung] != width):
                clash = True
                break
    if clash:
        raise ConfigError("study_prefix", scfg.study_prefix,
                          f"a prefix (or storage) without the study {plan.study_name}: it was made with another "
                          f"model ladder, so its rungs would mean other sizes here")


def check_recipe(study, plan: BudgetPlan, scfg: SearchConfig) -> None:
    """Refuse to resume a study whose trials trained with another lr or batch than this search gives the same
    size (another hparams, batch_round, steps_target, batch bound or lr): one isoFLOP curve, one rule."""
    for t in study.get_trials(deepcopy=False):
        rung, batch, lr = t.params.get("rung"), t.user_attrs.get("batch_size"), t.user_attrs.get("lr")
        if rung is None or batch is None or lr is None or rung >= len(plan.widths):
            continue
        want = trial_config(scfg, plan.budget, rung).train
        if want.batch_size != batch or abs(want.lr - lr) > 1e-9 * abs(lr):
            raise ConfigError("study_prefix", scfg.study_prefix,
                              f"a prefix (or storage) without the study {plan.study_name}: its trial {t.number} "
                              f"(n_embd {plan.widths[rung]}) trained with batch {batch} and lr {lr:g}, where this "
                              f"search's rule (hparams, batch_round, steps_target, batch_min/batch_max, lr) gives "
                              f"batch {want.batch_size} and lr {want.lr:g}; one study holds one rule's trials (to "
                              f"resume it, pass the settings it was made with: quick studies from before 2026-12-03 "
                              f"need batch_round=pow2)")


def enqueue_missing(study, plan: BudgetPlan, grid: bool) -> int:
    """Enqueue the seeded trials (and with grid, every size in range) not yet finished, waiting or running.
    Returns how many were enqueued; a re-run never enqueues a finished one twice."""
    trials = study.get_trials(deepcopy=False)
    active = [t for t in trials if t.state.name in ACTIVE]
    added = 0
    for alloc, rung in plan.seeds:
        if not any(t.user_attrs.get("allocation") == alloc for t in active):
            study.enqueue_trial({"rung": rung}, user_attrs={"allocation": alloc})
            added += 1
    if grid:
        taken = {rung_of(t) for t in active if not replica_of(t)} | {r for _, r in plan.seeds}
        for rung in range(plan.lo, plan.hi + 1):
            if rung not in taken:
                study.enqueue_trial({"rung": rung}, user_attrs={"allocation": "search"})
                added += 1
    return added


def artifact_dir(url: str) -> Path:
    """Folder of the study's Optuna artifact store: $SCALING_LAB_OPTUNA_ARTIFACTS when set, else
    ``optuna-artifacts`` beside the SQLite file or journal log, else (a server storage) in the current folder."""
    if os.environ.get(ARTIFACTS_ENV):
        return Path(os.environ[ARTIFACTS_ENV])
    journal = journal_path(url)
    if journal is not None:
        return Path(journal).parent / "optuna-artifacts"
    parsed = make_url(storage_url(url))
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        return Path(parsed.database).parent / "optuna-artifacts"
    return Path.cwd() / "optuna-artifacts"


def upload_figure(study: optuna.Study, url: str, path: Path) -> str:
    """Put ``path`` (the study's loss_vs_n.png) in the study's Optuna artifact store, shown by
    ``optuna-dashboard <storage> --artifact-dir <folder>``. One artifact per file name and study: a re-run
    overwrites the one it uploaded before (its id is the study's user attribute ``artifact:<name>``)."""
    store_dir = artifact_dir(url)
    store_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(store_dir))
    key = f"artifact:{path.name}"
    old = study.user_attrs.get(key)
    if old and any(m.artifact_id == old for m in get_all_artifact_meta(study)):
        with open(path, "rb") as f:
            store.write(old, f)
        return old
    artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study)
    study.set_user_attr(key, artifact_id)
    return artifact_id


def _dead_here(worker: str) -> bool:
    """True when ``worker`` ('host:pid', set by the objective) names a process of this machine that is gone."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    try:  # a killed worker its parent has not reaped yet is a zombie: gone, though kill(pid, 0) succeeds
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def fail_stale_running(study, reason: str) -> dict[int, str]:
    """Mark FAIL the RUNNING trials whose worker process on this machine is gone (a killed search being
    re-run), at once rather than after the heartbeat grace period. Trials of live workers, or of other
    machines, are left to the heartbeat. Returns {trial number: its MLflow run id ('' if none)}."""
    stale = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _dead_here(str(t.user_attrs.get("worker", ""))):
            study._storage.set_trial_system_attr(t._trial_id, "fail_reason", reason)
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            stale[t.number] = t.user_attrs.get("mlflow_run_id", "")
    return stale


def fail_dead_workers(study, lock: StudyLock) -> list[int]:
    """For a storage without heartbeats (journal): fail the RUNNING trials whose worker on this machine died
    while the search runs, and queue each size once more (``retry_failed_once``), as heartbeats do for an RDB
    storage. Under the study's lock, so a worker that has just taken a queued copy is not taken for dead.
    Returns the failed trial numbers. A dead worker of another machine is not seen: use PostgreSQL there."""
    if has_heartbeat(study._storage):
        return []
    with lock:
        stale = fail_stale_running(study, "worker process died during the trial (found by another worker)")
    for number in sorted(stale):
        retry_failed_once(study, number, lock)
    return sorted(stale)


def target_trials(scfg: SearchConfig, plan: BudgetPlan, study) -> int:
    """Finished trials (COMPLETE or PRUNED) this study should have: with grid every size in range, the seeded
    sizes, and every queued, running or finished (size, replica) once."""
    trials = study.get_trials(deepcopy=False)
    replicas = {key_of(t) for t in trials if t.state.name in ACTIVE and replica_of(t)}
    reruns = sum(t.state.name in ACTIVE and bool(t.user_attrs.get("rerun")) for t in trials)  # a pruned size again
    if scfg.sampler == "grid":
        rungs = set(range(plan.lo, plan.hi + 1)) | {r for _, r in plan.seeds}
        extra = {rung_of(t) for t in trials if t.state.name in ("COMPLETE", "PRUNED") and not replica_of(t)}
        return len(rungs | extra) + len(replicas) + plan.twin_anchors + reruns
    return max(scfg.trials, 2) + len(replicas) + reruns


def enqueue_replicas(study, res_rung: int, replicas: int) -> int:
    """Queue ``replicas`` extra seeds of the best size and of its nearest COMPLETE neighbour on each side, unless
    queued, running or done. Returns how many were queued."""
    trials = study.get_trials(deepcopy=False)
    done = sorted({rung_of(t) for t in trials if t.state.name == "COMPLETE" and not replica_of(t)})
    if res_rung not in done:
        return 0
    i = done.index(res_rung)
    have = {key_of(t) for t in trials if t.state.name in ACTIVE}
    added = 0
    for rung in done[max(0, i - 1): i + 2]:
        for k in range(1, replicas + 1):
            if (rung, k) not in have:
                study.enqueue_trial({"rung": rung}, user_attrs={"allocation": "search", "replica": k})
                added += 1
    return added


def count(study, states: tuple[str, ...]) -> int:
    return sum(t.state.name in states for t in study.get_trials(deepcopy=False))


def close_failed_trials(study, seen: set[int] | None = None) -> list[int]:
    """Fail trials whose worker stopped beating (Optuna heartbeat; the retry callback queues them again) and
    end the MLflow runs of FAIL trials still RUNNING: KILLED, trial_state=FAIL, with the reason. ``seen``:
    FAIL trial numbers already handled by this worker (a finished trial's attributes cannot be changed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental in Optuna 5
        optuna.storages.fail_stale_trials(study)
    closed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id and (seen is None or t.number not in seen):
            reason = t.user_attrs.get("error") or t.system_attrs.get("fail_reason") or (
                f"worker {t.user_attrs.get('worker', '?')} stopped sending heartbeats (killed or lost) during the trial")
            if tracking.close_trial_run(run_id, reason):
                closed.append(t.number)
            if seen is not None:
                seen.add(t.number)
    return closed


def retry_failed_once(study, number: int, lock: StudyLock) -> bool:
    """A grid trial that raised (a transient error such as a locked database, or a real bug) would leave a hole in
    its isoFLOP curve: queue its size once more, unless it is itself such a retry or the size is queued, running or
    done for the same allocation (twin anchors on one size each need their own trial). The failed trial keeps its
    error (user attribute ``error``, its run FAILED); the copy names it in ``retry_of``. Returns whether a copy
    was queued."""
    t = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if t is None or t.state.name != "FAIL" or "retry_of" in t.user_attrs or "failed_trial" in t.system_attrs:
        return False
    rung = rung_of(t)
    if rung is None:
        return False
    with lock:
        alloc = t.user_attrs.get("allocation", "search")
        if (key_of(t), alloc) in {(key_of(x), x.user_attrs.get("allocation", "search"))
                                  for x in study.get_trials(deepcopy=False) if x.state.name in ACTIVE}:
            return False
        attrs = {"allocation": alloc, "retry_of": number}
        study.enqueue_trial({"rung": rung}, user_attrs=attrs | ({"replica": replica_of(t)} if replica_of(t) else {}))
    why = t.user_attrs.get("error") or t.system_attrs.get("fail_reason") or "see the log above"
    print(f"  {study.study_name}: trial {number} (n_embd {t.user_attrs.get('n_embd', '?')}) failed "
          f"({why}); its size is queued once more", file=sys.stderr)
    return True
