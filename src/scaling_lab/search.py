"""The search: one resumable Optuna isoFLOP study per FLOP budget, each trial a child MLflow run.

``objective(trial)`` trains the trial's size at the budget and reports validation losses at the same fractions
of the budget (10%, 20%, ... 100%) so a pruner compares trials of different sizes fairly. ``optimize_loop`` is
one worker; ``run_workers`` starts several; ``run_search`` runs every budget, widening a study while its best
size sits at an edge of the range. ``plan_search`` is the dry run's plan.

MLflow: one parent run per study (tags ``scaling_lab.kind=study``), one child run per trial
(``scaling_lab.kind=trial``, ``allocation``, ``trial_state``). Pruned trials end KILLED with
``trial_state=PRUNED`` and keep their partial curves; failed ones end FAILED with the reason.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import optuna
from tqdm import tqdm

from scaling_lab import config, data, figures, groups, runtime, studies, tracking
from scaling_lab.config import RunConfig
from scaling_lab.counting import make_plan
from scaling_lab.errors import Interrupted, StopTraining, WorkersDied
from scaling_lab.estimate import Estimate, estimate_run, fmt_seconds
from scaling_lab.isoflop import (
    FRACTIONS,
    BudgetPlan,
    BudgetResult,
    SearchConfig,
    _fmt_n,
    key_of,
    plan_budget,
    replica_of,
    rung_of,
    summarize,
    table,
    trial_config,
)
from scaling_lab.studies import ACTIVE, HEARTBEAT_S, StudyLock, count
from scaling_lab.train import train

MAX_EPOCHS = 4  # Muennighoff et al. 2023 ("Scaling Data-Constrained LMs"): up to ~4 epochs cost almost nothing
POLL_S = 2.0  # how often an idle worker looks at the study again while other workers' trials run (s)

# --------------------------------------------------------------------------- the objective


class Objective:
    """objective(trial): train the trial's size at the budget, report losses at the budget's tenths."""

    def __init__(self, scfg: SearchConfig, plan: BudgetPlan, parent_run_id: str):
        self.scfg, self.plan, self.parent_run_id = scfg, plan, parent_run_id

    def prepare(self, trial: optuna.Trial) -> tuple[RunConfig, dict, int]:
        """The trial's training config, its run's tags and its family position; its user attributes set."""
        scfg, plan = self.scfg, self.plan
        lo, hi = trial.study.user_attrs.get("range_lo", plan.lo), trial.study.user_attrs.get("range_hi", plan.hi)
        rung = trial.suggest_int("rung", lo, hi)
        allocation, replica = trial.user_attrs.get("allocation", "search"), replica_of(trial)
        cfg = trial_config(scfg, plan.budget, rung, replica=replica)
        m = cfg.model
        cfg.run_name = (f"{plan.study_name}-t{trial.number}-{allocation}-L{m.n_layer}-d{m.n_embd}"
                        + (f"-seed{cfg.train.seed}" if replica else ""))
        tplan = make_plan(cfg)
        studies.record_size(trial, tplan.counts["n_params_total"])  # dashboard plots in N (a derived param)
        info = {"allocation": allocation, "n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head,
                "n_params": tplan.counts["n_params"], "n_params_total": tplan.counts["n_params_total"],
                "tokens_trained": tplan.tokens_trained, "batch_size": cfg.train.batch_size, "steps": tplan.steps,
                "lr": cfg.train.lr, "seed": cfg.train.seed, "replica": replica}
        info["worker"] = f"{socket.gethostname()}:{os.getpid()}"  # who ran it (a killed worker is named)
        for k, v in info.items():
            trial.set_user_attr(k, v)
        tags = {"scaling_lab.kind": "trial", "study": plan.study_name, "budget": f"{plan.budget:g}",
                "flops_rule": scfg.flops_rule, "trial_number": trial.number, "allocation": allocation,
                "storage": tracking.masked(scfg.storage), "replica": replica, "seed": cfg.train.seed,
                "hparams": scfg.hyper_rule().source} | ({"protocol": scfg.protocol} if scfg.protocol else {})
        return cfg, tags, rung

    def __call__(self, trial: optuna.Trial) -> float:
        scfg = self.scfg
        cfg, tags, rung = self.prepare(trial)
        twin = _finished_twin(trial, rung)
        if twin is not None:  # same size already trained (e.g. both seeds at one size): reuse its result
            with tracking.run(scfg.experiment, cfg.run_name, parent_run_id=self.parent_run_id, tags=tags,
                              system_metrics=False) as log:
                trial.set_user_attr("mlflow_run_id", log.run_id)
                log.set_tags({"duplicate_of": twin.number, "trial_state": twin.state.name})
                if twin.state.name == "COMPLETE":
                    log.log_metrics({"final/val_loss": twin.value}, step=0)
            for step, value in sorted(twin.intermediate_values.items()):  # its curve, so pruners compare alike
                trial.report(value, step)
            if twin.state.name != "COMPLETE":
                tracking.end_pruned_run(log.run_id, f"same size as pruned trial {twin.number}")
                raise optuna.TrialPruned(f"same size as pruned trial {twin.number}")
            return twin.value
        state = "FAIL"
        with tracking.run(scfg.experiment, cfg.run_name, parent_run_id=self.parent_run_id, tags=tags,
                          system_metrics=False) as log:
            trial.set_user_attr("mlflow_run_id", log.run_id)
            pruned_at: list[float] = []

            def on_eval(step: int, fraction: float, val_loss: float) -> None:
                trial.report(val_loss, max(1, round(fraction * FRACTIONS)))
                if trial.should_prune():
                    pruned_at.append(fraction)
                    raise StopTraining

            try:
                result = train(cfg, log, on_eval=on_eval, progress=False)
            except Interrupted as exc:
                log.set_tags({"trial_state": "FAIL"})
                raise KeyboardInterrupt(str(exc)) from exc
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"[:500]
                trial.set_user_attr("error", reason)
                log.set_tags({"trial_state": "FAIL"})
                raise
            state = "PRUNED" if result.stopped_early else "COMPLETE"
            trial.set_user_attr("epochs", result.epochs)
            log.set_tags({"trial_state": state})
            run_id = log.run_id
        if state == "PRUNED":
            reason = f"pruned by {scfg.pruner} pruner at {pruned_at[0]:.0%} of the budget (val/loss {result.val_loss:.4f})"
            tracking.end_pruned_run(run_id, reason)
            raise optuna.TrialPruned(reason)
        return result.val_loss


def _finished_twin(trial: optuna.Trial, rung: int) -> optuna.trial.FrozenTrial | None:
    """A finished trial of the same size and replica (e.g. both anchors at one size), or None. A ``rerun`` trains
    a PRUNED size again, so only a COMPLETE twin counts for it."""
    key = (rung, replica_of(trial))
    states = ("COMPLETE",) if trial.user_attrs.get("rerun") else ("COMPLETE", "PRUNED")
    for t in trial.study.get_trials(deepcopy=False):
        if t.number != trial.number and t.state.name in states and key_of(t) == key:
            return t
    return None


# --------------------------------------------------------------------------- workers


def optimize_loop(scfg: SearchConfig, plan: BudgetPlan, parent_run_id: str, target: int, storage=None,
                  pruner=None, on_trial=None) -> None:
    """One worker: run trials one at a time until the study has ``target`` finished trials. With grid a
    worker only takes queued trials; while only other workers' trials are RUNNING it looks again every
    POLL_S instead of stopping, since a dead worker's trial turns FAIL after the grace period and is queued
    again. At most 2 * target trials per call, so trials that keep failing cannot loop forever.

    The look at the study and Optuna's ask() run under the study's lock: without it two workers can both see
    the last queued size, and the one whose ask() finds the queue empty gets a freshly sampled extra trial."""
    storage = storage or studies.make_storage(scfg.storage)
    study = studies.load_study(scfg, plan.study_name, storage, pruner)  # queued anchors are taken first
    objective = Objective(scfg, plan, parent_run_id)
    lock = StudyLock(scfg.storage, plan.study_name)

    taken: list[int] = []

    def take(trial) -> float:  # ask() has given this worker its trial: let the other workers look
        lock.release()
        taken.append(trial.number)
        return objective(trial)

    started, seen = 0, set()
    while started < 2 * target:
        studies.fail_dead_workers(study, lock)  # journal storage: no heartbeats
        before = len(taken)
        studies.close_failed_trials(study, seen)
        with lock:
            states = [t.state.name for t in study.get_trials(deepcopy=False)]
            finished = states.count("COMPLETE") + states.count("PRUNED")
            running, waiting = states.count("RUNNING"), states.count("WAITING")
            if finished >= target:
                action = "stop"
            elif (waiting > 0) if scfg.sampler == "grid" else (finished + running < target):
                action = "run"
                group = groups.waiting_group(study) if scfg.stack_replicas else []
                if group:  # seed replicas of one size: trained together as one stacked model
                    taken += groups.run_group(study, objective, group, lock)
                else:
                    study.optimize(take, n_trials=1, catch=(Exception,), gc_after_trial=True)
            else:  # other workers' trials: they finish, or turn FAIL (heartbeat) and are queued again
                action = "wait" if running else "stop"
        if action == "stop":
            break
        if action == "wait":
            time.sleep(min(HEARTBEAT_S, POLL_S))
            continue
        started += 1
        for number in taken[before:] if scfg.sampler == "grid" else ():
            studies.retry_failed_once(study, number, lock)
        for _ in taken[before:] or [None]:
            if on_trial is not None:
                on_trial(study)
    studies.close_failed_trials(study, seen)


def _worker_main(scfg: SearchConfig, plan: BudgetPlan, parent_run_id: str, target: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runtime.configure_threads(scfg.workers)  # share the cores: N workers x all cores would oversubscribe them
    optimize_loop(scfg, plan, parent_run_id, target)


def run_workers(scfg: SearchConfig, plan: BudgetPlan, parent_run_id: str, target: int, study, bar,
                out=None) -> None:
    """workers=N: N spawned processes, each a loop of study.optimize against the shared storage."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(scfg, plan, parent_run_id, target), name=f"search-worker-{i}")
             for i in range(scfg.workers)]
    for p in procs:
        p.start()
    seen = count(study, ("COMPLETE", "PRUNED"))
    while any([p.is_alive() for p in procs]):  # every one asked: is_alive() reaps a dead worker (no zombie)
        time.sleep(2.0)
        now = count(study, ("COMPLETE", "PRUNED"))
        bar.update(max(0, now - seen))
        seen = now
    bad = [f"{p.name} (exit code {p.exitcode})" for p in procs if p.exitcode]
    if not bad:
        return
    if count(study, ("COMPLETE", "PRUNED")) >= target:  # the others took over its trial: say so, go on
        print(f"\n  {plan.study_name}: {len(bad)} of {len(procs)} workers died: {', '.join(bad)}; their trials "
              "were failed by heartbeat and run again, the study is complete", file=out or sys.stdout)
        return
    raise WorkersDied(f"{len(bad)} of {len(procs)} search workers died ({', '.join(bad)}) and the study "
                       f"{plan.study_name} is incomplete; re-run the same command to finish it")


# --------------------------------------------------------------------------- the whole search


def plot_study(study: optuna.Study, plan: BudgetPlan, res: BudgetResult, path: Path) -> bool:
    """The study's loss_vs_n.png: COMPLETE trials (seeded ones marked), PRUNED ones at their last report."""
    trials = study.get_trials(deepcopy=False)
    pts = [(t.user_attrs["n_params_total"], t.value, t.user_attrs.get("allocation", "search"))
           for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    pruned = [(t.user_attrs["n_params_total"], t.intermediate_values[max(t.intermediate_values)])
              for t in trials if t.state.name == "PRUNED" and t.intermediate_values and "n_params_total" in t.user_attrs]
    best = (res.n_opt, res.best_loss) if math.isfinite(res.best_loss) else None
    title = f"isoFLOP C = {plan.budget:.3g} ({study.user_attrs.get('flops_rule', '')} rule)"
    return figures.study_loss_vs_n(pts, pruned, best, path, title)


def log_parent(plog: tracking.RunLogger, study: optuna.Study, plan: BudgetPlan, res: BudgetResult,
               storage: str = "") -> None:
    """Best N, D, D/N, loss, the seeded losses and the loss-vs-N PNG on the study's parent run; the PNG also in
    the study's Optuna artifact store (``studies.artifact_dir``) when ``storage`` is given."""
    finished = res.trials.get("COMPLETE", 0) + res.trials.get("PRUNED", 0)
    metrics = {"best/n_params_total": res.n_opt, "best/n_params": res.n_opt_nonembed, "best/tokens": res.d_opt,
               "best/tokens_per_param": res.tokens_per_param, "best/val_loss": res.best_loss,
               "kaplan/val_loss": res.kaplan_loss, "chinchilla/val_loss": res.chinchilla_loss,
               "trials/complete": res.trials.get("COMPLETE", 0), "trials/pruned": res.trials.get("PRUNED", 0),
               "trials/failed": res.trials.get("FAIL", 0), "best/sizes_below": res.below,
               "best/sizes_above": res.above, "seed_noise/std": res.seed_std, "data/max_epochs": res.max_epochs}
    plog.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
                     step=finished)
    plog.set_tags({"winner": res.winner or "none", "best_allocation": res.best_allocation or "none",
                   "edge": res.edge, "range_n_embd": f"{plan.widths[plan.lo]}-{plan.widths[plan.hi]}"})
    plog.flush()
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "loss_vs_n.png"
        if plot_study(study, plan, res, png):
            plog.log_artifact(png)
            if storage:
                _upload_figure(study, storage, png)


def _upload_figure(study: optuna.Study, storage: str, png: Path) -> None:
    try:
        studies.upload_figure(study, storage, png)
    except OSError as exc:  # the figure is on the MLflow run already: say so, lose no result
        print(f"  {study.study_name}: loss_vs_n.png not put in the Optuna artifact store "
              f"{studies.artifact_dir(storage)} ({type(exc).__name__}: {exc})", file=sys.stderr)


# --------------------------------------------------------------------------- the whole search


def widen_once(study: optuna.Study, plan: BudgetPlan, res: BudgetResult) -> bool:
    """Complete the short side of the best (fewer than ``bracket`` COMPLETE sizes there) by one size: a size on
    that side that was PRUNED (when the best was elsewhere: the seeds' mean can move it) trains again, unpruned,
    once; else the range grows by one size, queued unless another search command already did. False when
    neither can. Call under the study's lock."""
    trials = study.get_trials(deepcopy=False)
    done = {rung_of(t) for t in trials if t.state.name == "COMPLETE"}
    pruned = {rung_of(t) for t in trials if t.state.name == "PRUNED"} - done
    pruned -= {rung_of(t) for t in trials if t.user_attrs.get("rerun") and t.state.name in ("COMPLETE", "WAITING",
                                                                                            "RUNNING")}  # once
    up = res.edge == "largest"
    side = range(res.best_rung + 1, plan.hi + 1) if up else range(res.best_rung - 1, plan.lo - 1, -1)
    for rung in side:  # nearest first
        if rung in pruned and res.edge in ("largest", "smallest"):
            study.enqueue_trial({"rung": rung}, user_attrs={"allocation": "search", "rerun": True})
            return True
    attrs = study.user_attrs  # another command may have widened first
    old_lo, old_hi = plan.lo, plan.hi
    plan.lo, plan.hi = min(plan.lo, attrs.get("range_lo", plan.lo)), max(plan.hi, attrs.get("range_hi", plan.hi))
    if (res.edge == "smallest" and plan.lo < old_lo) or (res.edge == "largest" and plan.hi > old_hi):
        return True  # widened by another command: its new size is queued, running or done
    if res.edge == "smallest" and plan.lo > 0:
        plan.lo -= 1
        new = plan.lo
    elif res.edge == "largest" and plan.hi < plan.cap:
        plan.hi += 1
        new = plan.hi
    else:
        return False
    study.set_user_attr("range_lo", plan.lo)
    study.set_user_attr("range_hi", plan.hi)
    if (new, 0) not in {key_of(t) for t in study.get_trials(deepcopy=False) if t.state.name in ACTIVE}:
        study.enqueue_trial({"rung": new}, user_attrs={"allocation": "search", "widened": True})
    return True


def _trials_until(scfg: SearchConfig, plan: BudgetPlan, study: optuna.Study, plog: tracking.RunLogger, target: int,
                  bar: tqdm, out: TextIO, pruner: optuna.pruners.BasePruner | None) -> None:
    """Run the study's queued trials until it has ``target`` finished ones (here, or in ``workers`` processes)."""

    def tick(st: optuna.Study) -> None:
        bar.update(1)
        b = [t for t in st.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        if b:
            t = min(b, key=lambda t: t.value)
            bar.set_postfix_str(f"C={plan.budget:.0e} best {t.value:.3f} @ d={t.user_attrs['n_embd']}")

    if scfg.workers == 1:
        optimize_loop(scfg, plan, plog.run_id, target, study._storage, pruner, on_trial=tick)
    else:
        run_workers(scfg, plan, plog.run_id, target, study, bar, out)


def _retarget(scfg: SearchConfig, plan: BudgetPlan, study: optuna.Study, bar: tqdm, target: int,
              queued: int = 1) -> int:
    """The study's new target after ``queued`` more trials were queued (grid: recounted from the study)."""
    new_target = studies.target_trials(scfg, plan, study) if scfg.sampler == "grid" else target + queued
    bar.total += max(0, new_target - target)
    bar.refresh()
    return new_target


def _run_budget(scfg: SearchConfig, plan: BudgetPlan, study: optuna.Study, plog: tracking.RunLogger, target: int,
                bar: tqdm, out: TextIO, pruner: optuna.pruners.BasePruner | None, lock: StudyLock) -> BudgetResult:
    """One budget: its trials; widening, one size at a time (at most ``widen``), until ``bracket`` COMPLETE sizes
    lie on each side of the best; ``replicas`` extra seeds of the best size and its two neighbours; and again,
    because the seeds' mean can move the best next to an edge; then the result on the study's parent run."""
    widened, seeded_for = 0, set()  # best sizes whose neighbourhood was seeded: each once, so the loop ends
    while True:
        _trials_until(scfg, plan, study, plog, target, bar, out, pruner)
        res = summarize(study, plan, plog.run_id, scfg.bracket)
        if res.edge != "none" and widened < scfg.widen:
            with lock:
                grew = widen_once(study, plan, res)
            if grew:
                widened += 1
                target = _retarget(scfg, plan, study, bar, target)
                print(f"  {plan.study_name}: {res.below} COMPLETE size(s) below and {res.above} above the best "
                      f"(want {scfg.bracket}); widening to n_embd {plan.widths[plan.lo]}..{plan.widths[plan.hi]}",
                      file=out)
                continue
        if scfg.replicas and res.best_rung >= 0 and res.best_rung not in seeded_for:
            seeded_for.add(res.best_rung)
            with lock:
                added = studies.enqueue_replicas(study, res.best_rung, scfg.replicas)
            if added:  # train them, then look at the bracket again
                target = _retarget(scfg, plan, study, bar, target, added)
                continue
        break
    log_parent(plog, study, plan, res, scfg.storage)
    return res


def _announce(scfg: SearchConfig, plans: list[BudgetPlan], out: TextIO) -> None:
    print(f"search: {len(plans)} studies in {tracking.masked(scfg.storage)}; sampler {scfg.sampler}, "
          f"{scfg.workers} worker(s)", file=out)
    for p in plans:
        print(f"  {p.study_name}: n_embd {p.widths[p.lo]}..{p.widths[p.hi]}; seeds kaplan N={_fmt_n(p.kaplan_n)} "
              f"(non-embedding) -> d={p.widths[p.kaplan_rung]}, chinchilla N={_fmt_n(p.chinchilla_n)} -> "
              f"d={p.widths[p.chinchilla_rung]}", file=out)


def _study_budget(scfg: SearchConfig, plan: BudgetPlan, study: optuna.Study, bar: tqdm, out: TextIO,
                  pruner: optuna.pruners.BasePruner | None) -> BudgetResult:
    """One budget's study under its parent run. Under the study's lock, so several search commands (machines)
    starting at once find or create ONE parent run and enqueue each size once: the parent run, trials a killed
    process left RUNNING, the queue. Then the trials, without the lock."""
    tags = {"scaling_lab.kind": "study", "study": plan.study_name, "budget": f"{plan.budget:g}",
            "flops_rule": scfg.flops_rule, "storage": tracking.masked(scfg.storage),
            "vocab_size": scfg.data.vocab_size} | ({"protocol": scfg.protocol} if scfg.protocol else {})
    lock = StudyLock(scfg.storage, plan.study_name).acquire()
    try:
        parent_id = tracking.find_study_run(scfg.experiment, plan.study_name, tracking.masked(scfg.storage))
        with tracking.run(scfg.experiment, plan.study_name, run_id=parent_id, tags=tags,
                          system_metrics=False) as plog:
            plog.log_params({k: v for k, v in config.flat(scfg).items() if k != "storage"}
                            | {"budget": plan.budget, "kaplan_n_predicted": round(plan.kaplan_n),
                               "chinchilla_n_predicted": round(plan.chinchilla_n)})
            stale = studies.fail_stale_running(study, "process died (found RUNNING when the search restarted)")
            for run_id in filter(None, stale.values()):
                tracking.close_trial_run(run_id, "process died before the trial finished")
            if stale:
                print(f"  {plan.study_name}: trials {sorted(stale)} were left RUNNING by a killed process "
                      "on this machine: marked FAIL and queued again", file=out)
            studies.enqueue_missing(study, plan, scfg.sampler == "grid")
            target = studies.target_trials(scfg, plan, study)
            lock.release()
            return _run_budget(scfg, plan, study, plog, target, bar, out, pruner, lock)
    finally:
        lock.release()


def _closing_lines(results: list[BudgetResult]) -> list[str]:
    lines = []
    for r in results:
        if r.max_epochs > MAX_EPOCHS:
            lines.append(f"WARNING: at C={r.budget:.3g} a trial passed over its train split {r.max_epochs:.1f} times "
                         f"(more than {MAX_EPOCHS}: repeated data no longer costs almost nothing, Muennighoff et al. "
                         "2023); use more text (a larger dataset or train_split) for budgets this large.")
        if r.edge != "none":
            lines.append(f"WARNING: at C={r.budget:.3g} the best size has {r.below} COMPLETE size(s) below and "
                         f"{r.above} above it (N={_fmt_n(r.n_opt)}); the analysis drops an unbracketed minimum; "
                         "re-run with a larger widen or pad.")
        else:
            lines.append(f"C={r.budget:.3g}: minimum inside the searched range at N={_fmt_n(r.n_opt)} "
                         f"(searched {_fmt_n(min(r.n_searched))}..{_fmt_n(max(r.n_searched))})"
                         + (f"; {r.note}" if r.note else "") + ".")
    return lines


def run_search(scfg: SearchConfig, out: TextIO | None = None,
               pruner: optuna.pruners.BasePruner | None = None) -> list[BudgetResult]:
    """All budgets, one study each: the library behind the ``search`` entry point. ``pruner`` overrides the
    configured one (tests force pruning with it)."""
    out = out or sys.stdout
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plans = [plan_budget(scfg, c) for c in scfg.budget_list()]  # ConfigError before anything is created
    data.validate_source(scfg.data)
    storage = studies.make_storage(scfg.storage)
    opened = [studies.open_study(scfg, p, storage, pruner) for p in plans]
    targets = [studies.target_trials(scfg, p, s) for p, s in zip(plans, opened)]
    already = sum(count(s, ("COMPLETE", "PRUNED")) for s in opened)
    _announce(scfg, plans, out)
    bar = tqdm(total=sum(targets), initial=min(already, sum(targets)), unit="trial", desc="trials",
               dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
    try:
        results = [_study_budget(scfg, plan, study, bar, out, pruner) for plan, study in zip(plans, opened)]
    finally:
        bar.close()
    print("\n" + table(results, scfg.flops_rule), file=out)
    for line in _closing_lines(results):
        print(line, file=out)
    shown = studies.journal_path(scfg.storage) or tracking.masked(scfg.storage)
    print(f"Studies: optuna-dashboard {shown} --artifact-dir {studies.artifact_dir(scfg.storage)}   "
          f"Runs: mlflow ui --backend-store-uri {tracking.tracking_uri()}", file=out)
    return results


# --------------------------------------------------------------------------- the dry run


SEARCH_TIMED_SECONDS = 0.5  # shorter calibrations per trial shape: a search plan times many shapes


@dataclass
class TrialEstimate:
    """One size of one budget's study."""

    rung: int
    allocation: str
    """kaplan, chinchilla (the seeded sizes) or search."""
    cfg: RunConfig
    est: Estimate


@dataclass
class BudgetEstimate:
    """One budget's study: range, seeds, trials and their predicted cost."""

    plan: BudgetPlan
    trials: list[TrialEstimate]
    n_trials: int
    """Finished trials the study will hold (a seed that repeats a size is counted but costs nothing)."""
    widen: int
    """Extra sizes that may be tried when the best is at an edge (not in the totals)."""
    total_s: float
    flops: float
    """Training FLOPs of all trials under the search's flops_rule (what the trials actually train)."""


def plan_search(scfg: SearchConfig, timed_seconds: float = SEARCH_TIMED_SECONDS) -> list[BudgetEstimate]:
    """Every budget of ``scfg``: sizes searched, seeds, trials (seed replicas of the 3 sizes nearest Chinchilla's
    included), time and FLOPs.

    grid: every size in range once (a duplicate seed reuses the first's result). tpe/random: the two seeds
    plus trials-2 sampled sizes, costed at the mean over the range. Pruning can only shorten this.
    """
    out = []
    for budget in scfg.budget_list():
        plan = plan_budget(scfg, budget)
        alloc: dict[int, str] = {}
        for name, rung in plan.seeds:
            alloc[rung] = f"{alloc[rung]}+{name}" if rung in alloc else name
        trials = []
        for rung in sorted(set(range(plan.lo, plan.hi + 1)) | {r for _, r in plan.seeds}):
            cfg = trial_config(scfg, budget, rung)
            trials.append(TrialEstimate(rung, alloc.get(rung, "search"), cfg, estimate_run(cfg, timed_seconds=timed_seconds)))
        seeds = [t for t in trials if t.allocation != "search"]
        if scfg.sampler == "grid":
            n = len(trials) + plan.twin_anchors
            total = sum(t.est.total_s for t in trials)
            flops = sum(t.est.plan.counts[f"flops_{scfg.flops_rule}"] for t in trials)
            middle = sorted(trials, key=lambda t: abs(t.rung - plan.chinchilla_rung))[:3]  # where the best should be
            n += scfg.replicas * len(middle)
            total += scfg.replicas * sum(t.est.total_s for t in middle)
            flops += scfg.replicas * sum(t.est.plan.counts[f"flops_{scfg.flops_rule}"] for t in middle)
        else:
            n = max(scfg.trials, 2)
            mean_s = sum(t.est.total_s for t in trials) / len(trials)
            mean_f = sum(t.est.plan.counts[f"flops_{scfg.flops_rule}"] for t in trials) / len(trials)
            total = sum(t.est.total_s for t in seeds) + max(0, n - 2) * mean_s
            flops = sum(t.est.plan.counts[f"flops_{scfg.flops_rule}"] for t in seeds) + max(0, n - 2) * mean_f
        out.append(BudgetEstimate(plan, trials, n, scfg.widen, total, flops))
    return out


def format_search_plan(scfg: SearchConfig, budgets: list[BudgetEstimate]) -> str:
    """The search dry-run report: per budget the sizes searched, the seeded sizes, trials, time and FLOPs."""
    lines = [f"dry run (search {scfg.mode}): nothing trained, no MLflow run, no Optuna study or trial",
             f"  {len(budgets)} budgets under flops_rule {scfg.flops_rule}; sampler {scfg.sampler}, pruner {scfg.pruner}, "
             f"{scfg.workers} worker(s); storage {tracking.masked(scfg.storage)}"]
    for b in budgets:
        p = b.plan
        lines.append(f"  C={p.budget:.3g} ({p.study_name}): n_embd {p.widths[p.lo]}..{p.widths[p.hi]}; "
                     f"seeds kaplan N={p.kaplan_n:,.0f} (non-embedding) -> d={p.widths[p.kaplan_rung]}, "
                     f"chinchilla N={p.chinchilla_n:,.0f} (total) -> d={p.widths[p.chinchilla_rung]}; "
                     f"{b.n_trials} trials" + (f" (+ up to {b.widen} if the best is at an edge)" if b.widen else ""))
        lines.append(f"      {'n_embd':>6} {'n_layer':>7} {'n_params':>11} {'n_params_total':>14} {'tokens':>12} "
                     f"{'steps':>6} {'batch':>5} {'tokens/s':>9} {'est. time':>12}  allocation")
        for t in b.trials:
            m, pl, e = t.cfg.model, t.est.plan, t.est
            lines.append(f"      {m.n_embd:>6} {m.n_layer:>7} {pl.counts['n_params']:>11,} {pl.counts['n_params_total']:>14,} "
                         f"{pl.tokens_trained:>12,} {pl.steps:>6,} {t.cfg.train.batch_size:>5} {e.tokens_per_s:>9,.0f} "
                         f"{fmt_seconds(e.total_s):>12}  {t.allocation}")
        lines.append(f"      budget total: {fmt_seconds(b.total_s)}, {b.flops:.3e} training FLOPs")
    total_s = sum(b.total_s for b in budgets)
    workers = max(1, scfg.workers)
    lines.append(f"  total: {sum(b.n_trials for b in budgets)} trials, {sum(b.flops for b in budgets):.3e} training FLOPs "
                 f"({scfg.flops_rule}), estimated {fmt_seconds(total_s)}"
                 + (f" on one worker, about {fmt_seconds(total_s / workers)} with {workers} workers sharing the device"
                    if workers > 1 else "")
                 + " without pruning (pruned trials stop early)")
    device = budgets[0].trials[0].est.device if budgets and budgets[0].trials else "?"
    lines.append(f"  device {device}; each trial shape calibrated ({SEARCH_TIMED_SECONDS:g} s timed, cached)")
    return "\n".join(lines)
