"""The search's seed-replica groups: a worker asks Optuna for the WAITING seed replicas of one size together,
trains them as one stacked model (``stacked.train_stacked``) and tells each trial its own result.

The replicas ``studies.enqueue_replicas`` queues are separate trials, one MLflow child run each, with the tags,
parameters and metrics a trial trained alone gets (plus the param ``stacked_replicas``). Each asked trial sends
its own heartbeats, so a killed worker's trials turn FAIL and are queued again, as single trials are; a re-run
of a killed search fails them at once (``studies.fail_stale_running``) and stacks the re-queued ones again.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Any

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread  # what study.optimize runs around each trial
from optuna.trial import TrialState

from scaling_lab import stacked, tracking
from scaling_lab.errors import Interrupted, StopTraining
from scaling_lab.isoflop import FRACTIONS, replica_of, rung_of
from scaling_lab.studies import StudyLock


def waiting_group(study: optuna.Study) -> list[int]:
    """Numbers of the WAITING trials at the head of the queue (the next ``ask`` takes them in this order) that are
    seed replicas of one size, when there are 2 or more; else []. Call under the study's lock."""
    group: list[int] = []
    rung = None
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)), key=lambda t: t.number):
        if not replica_of(t) or (group and rung_of(t) != rung):
            break
        group.append(t.number)
        rung = rung_of(t)
    return group if len(group) > 1 else []


def run_group(study: optuna.Study, objective: Any, group: list[int], lock: StudyLock) -> list[int]:
    """Ask the ``group``'s trials (under ``lock``, then released), train them stacked, tell each its result.
    ``objective`` is the search's Objective (``prepare(trial)``, ``parent_run_id``, ``scfg``). A trial that is not
    one of the group (another worker took one first) or whose size and seed already trained alone runs through
    ``objective`` as usual. Returns the numbers of the trials it ran. KeyboardInterrupt on a signal."""
    with warnings.catch_warnings():  # "Heartbeat ... with Study.optimize": each asked trial gets its own below
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        trials = [study.ask() for _ in group]
    lock.release()
    with contextlib.ExitStack() as beats:
        for t in trials:
            beats.enter_context(get_heartbeat_thread(t._trial_id, study._storage))
        prepared = [(t, *objective.prepare(t)) for t in trials]
        solo = {t.number for t, *_, rung in prepared if t.number not in group or _has_twin(study, t, rung)}
        alone = [p for p in prepared if p[0].number in solo]
        together = [p for p in prepared if p[0].number not in solo]
        for t, *_ in alone:
            _tell_alone(study, objective, t)
        if len(together) == 1:
            _tell_alone(study, objective, together[0][0])
        elif together:
            _train_together(study, objective, together)
    return [t.number for t in trials]


def _has_twin(study: optuna.Study, trial: optuna.Trial, rung: int) -> bool:
    return any(t.number != trial.number and t.state.name in ("COMPLETE", "PRUNED") and rung_of(t) == rung
               and replica_of(t) == replica_of(trial) for t in study.get_trials(deepcopy=False))


def _tell_alone(study: optuna.Study, objective: Any, trial: optuna.Trial) -> None:
    """The trial through the objective, told as study.optimize would (an exception: FAIL, as with catch)."""
    try:
        study.tell(trial, objective(trial))
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
    except KeyboardInterrupt:
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as exc:
        print(f"  trial {trial.number} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        study.tell(trial, state=TrialState.FAIL)


def _train_together(study: optuna.Study, objective: Any, prepared: list[tuple]) -> None:
    """One MLflow child run per trial, the stacked training, then each run ended and each trial told."""
    scfg = objective.scfg
    runs, logs, pruned_at = [], [], {}
    for trial, cfg, tags, _ in prepared:
        cm = tracking.run(scfg.experiment, cfg.run_name, parent_run_id=objective.parent_run_id, tags=tags,
                          system_metrics=False)
        log = cm.__enter__()
        trial.set_user_attr("mlflow_run_id", log.run_id)
        runs.append(cm)
        logs.append(log)

    def on_eval_of(trial: optuna.Trial):
        def on_eval(step: int, fraction: float, val_loss: float) -> None:
            trial.report(val_loss, max(1, round(fraction * FRACTIONS)))
            if trial.should_prune():
                pruned_at[trial.number] = fraction
                raise StopTraining
        return on_eval

    try:
        outcome = stacked.train_stacked([p[1] for p in prepared], logs, [on_eval_of(p[0]) for p in prepared])
    except BaseException as exc:  # a signal, or a failure before training (every replica alike)
        for (trial, *_), cm, log in zip(prepared, runs, logs):
            log.set_tags({"trial_state": "FAIL"})
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
            cm.__exit__(type(exc), exc, exc.__traceback__)  # the run ends KILLED or FAILED with the reason
            study.tell(trial, state=TrialState.FAIL)
        if isinstance(exc, (Interrupted, KeyboardInterrupt)):
            raise KeyboardInterrupt(str(exc)) from exc
        print(f"  stacked trials {[p[0].number for p in prepared]} failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return
    for (trial, *_), cm, log, res in zip(prepared, runs, logs, outcome):
        _tell_one(study, scfg, trial, cm, log, res, pruned_at.get(trial.number))


def _tell_one(study: optuna.Study, scfg: Any, trial: optuna.Trial, cm: Any, log: Any, res: Any,
              pruned_at: float | None) -> None:
    """End one replica's run and tell its trial: COMPLETE, PRUNED (its run KILLED with the reason) or FAIL."""
    if isinstance(res, BaseException):
        trial.set_user_attr("error", f"{type(res).__name__}: {res}"[:500])
        log.set_tags({"trial_state": "FAIL"})
        cm.__exit__(type(res), res, res.__traceback__)
        study.tell(trial, state=TrialState.FAIL)
        return
    state = "PRUNED" if res.stopped_early else "COMPLETE"
    trial.set_user_attr("epochs", res.epochs)
    log.set_tags({"trial_state": state})
    cm.__exit__(None, None, None)
    if state == "PRUNED":
        tracking.end_pruned_run(log.run_id, f"pruned by {scfg.pruner} pruner at {pruned_at or 0:.0%} of the budget "
                                f"(val/loss {res.val_loss:.4f})")
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, res.val_loss)
