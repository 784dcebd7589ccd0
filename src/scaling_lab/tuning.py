"""The tuning stage: fair hyper-parameters per size. For every (size, budget) cell of the model family, one
resumable Optuna study (TPE) over the peak learning rate and the batch; then power laws lr*(N_total) and
batch*(D) fitted over the cells and written as the JSON a search reads (``hparams=<path>``, read by
``isoflop.HyperRule.from_json``).

Why: Porian et al. 2024 ("Resolving discrepancies in compute-optimal scaling of language models", NeurIPS)
showed that a learning rate and batch not tuned per size move the compute-optimal exponent a lot. This module
measures them on this family, at this context length, vocabulary and data, instead of assuming them.

Each trial trains family size ``rung`` at budget C (D from C under flops_rule, as ``isoflop.trial_config``) with
the trial's lr and batch, as a child MLflow run (``scaling_lab.kind=tune_trial``) of one parent run
(``scaling_lab.kind=tune``); its value is final/val_loss. A trial whose loss turns non-finite (diverged) is
COMPLETE with value inf, so TPE learns to avoid that region, and its run ends FAILED.

The fit (see ``cell_optimum`` and ``fit_rule``): per cell a parabola in ln lr with one offset per batch over the
trials near the best one, else the best trial; then least squares in log space over the cells.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import matplotlib

matplotlib.use("Agg")
import optuna  # noqa: E402
import torch  # noqa: E402

from scaling_lab import config, counting, data, figures, isoflop, studies, tracking  # noqa: E402
from scaling_lab.config import DataConfig, RunConfig, TrainConfig  # noqa: E402
from scaling_lab.counting import make_plan  # noqa: E402
from scaling_lab.errors import ConfigError, Interrupted, NonFiniteLoss  # noqa: E402
from scaling_lab.estimate import estimate_run, fmt_seconds  # noqa: E402
from scaling_lab.isoflop import MIN_STEPS, HyperRule  # noqa: E402
from scaling_lab.studies import StudyLock  # noqa: E402
from scaling_lab.train import train  # noqa: E402
from scaling_lab.tunefit import by_budget, cell_optimum, clean, fit_rule, num  # noqa: E402

FINAL_ONLY = 2**31 - 1  # eval_every of a trial: score val/loss once, at the end (no pruner needs the tenths)
TIMED_SECONDS = 0.3  # dry run: calibration per (shape, batch), cached (s)

# --------------------------------------------------------------------------- configuration

# Set per trial by the design or the sampler, so not tuning parameters.
PER_TRIAL = (*isoflop.PER_TRIAL, "lr")


@dataclass
class TuneConfig:
    """One tuning: cells (sizes x budgets), the search space, study storage, output, and the data and training
    settings every trial shares (the ``data`` and ``train`` parts; their fields are tuning parameters too)."""

    mode: str = "quick"
    """Tuning preset (tiny, quick); also the training mode of each trial."""
    experiment: str = "scaling-lab"
    """MLflow experiment of the tuning and trial runs."""
    budgets: str = ""
    """Comma-separated training FLOP budgets C, at least 2, e.g. 1e10,1e11 ('' = the mode's)."""
    sizes: str = ""
    """Comma-separated family positions (scaling_lab.family), at least 3, e.g. 1,4,6,9 ('' = the mode's)."""
    trials: int = 0
    """Finished trials per (size, budget) cell (0 = the mode's)."""
    lr_min: float = 1e-3
    """Smallest peak learning rate sampled (log-uniform)."""
    lr_max: float = 3e-2
    """Largest peak learning rate sampled."""
    batches: str = "2,4,8,16,32,64"
    """Comma-separated batches in sequences per step, powers of two (a cell drops those under 10 steps)."""
    storage: str = "sqlite:///optuna.db"
    """Optuna RDB storage URL (sqlite:///optuna.db, postgresql://user:pw@host/db)."""
    study_prefix: str = "tune"
    """Study name = <study_prefix>-r<position>-N<N_total>-C<budget>-<flops_rule>."""
    block_size: int = 64
    """Context length of every trial."""
    out: str = "tuning.json"
    """Where the fitted rule is written (JSON for hparams=<path>; also logged to MLflow)."""
    dry_run: bool = False
    """Print the cells and their trials (sizes, tokens, batches, estimated time) and exit; no study, no run."""
    data: DataConfig = field(default_factory=DataConfig)
    """Text, tokenizer and vocabulary of every trial."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Schedule, device, dtype, seed (also the sampler's), flops_rule (defines the budget) of every trial; its
    per-trial fields (PER_TRIAL: lr, batch, budget) are set by the sampler and the design."""

    def __post_init__(self) -> None:
        config.choice("mode", self.mode, tuple(TUNE_MODES))
        preset = TUNE_MODES[self.mode]
        self.budgets = str(self.budgets) if not config.is_unset(self.budgets) else preset["budgets"]
        self.sizes = str(self.sizes) if not config.is_unset(self.sizes) else preset["sizes"]
        self.trials = self.trials or preset["trials"]
        self.budget_list()  # validates
        if not (isinstance(self.trials, int) and not isinstance(self.trials, bool) and self.trials >= 3):
            raise ConfigError("trials", self.trials, "an integer >= 3 (0 = the mode's)")
        config.positive_float("lr_min", self.lr_min)
        config.positive_float("lr_max", self.lr_max)
        if self.lr_max <= self.lr_min:
            raise ConfigError("lr_max", self.lr_max, f"a learning rate > lr_min={self.lr_min:g}")
        self.batch_list()
        isoflop.validate_storage_url(self.storage)
        if not self.study_prefix or any(c.isspace() for c in self.study_prefix):
            raise ConfigError("study_prefix", self.study_prefix, "a non-empty name without spaces")
        config.positive_int("block_size", self.block_size)
        if not isinstance(self.out, str) or not self.out.strip():
            raise ConfigError("out", self.out, "a file path for the tuning JSON, e.g. tuning.json")
        self.size_list()

    @property
    def flops_rule(self) -> str:
        """FLOPs per token rule that defines the budget (the trials' flops_rule)."""
        return self.train.flops_rule

    @property
    def seed(self) -> int:
        """Seed of the samplers and of every trial's training (same init and data order for every trial)."""
        return self.train.seed

    def budget_list(self) -> list[float]:
        """The budgets as floats, validated: positive, finite, distinct, at least 2."""
        allowed = "at least 2 distinct positive FLOP counts, comma-separated, e.g. 1e10,1e11"
        try:
            out = [float(p) for p in str(self.budgets).split(",")]
        except ValueError:
            raise ConfigError("budgets", self.budgets, allowed) from None
        if len(out) < 2 or len(set(out)) != len(out) or not all(math.isfinite(c) and c > 0 for c in out):
            raise ConfigError("budgets", self.budgets, allowed)
        return sorted(out)

    def size_list(self) -> list[int]:
        """The family positions as ints, validated: distinct, at least 3, inside the family."""
        n = len(isoflop.shapes(self.data.vocab_size, self.block_size))
        allowed = f"at least 3 distinct family positions 0..{n - 1}, comma-separated, e.g. 1,4,6,9"
        try:
            out = [int(p) for p in str(self.sizes).split(",")]
        except ValueError:
            raise ConfigError("sizes", self.sizes, allowed) from None
        if len(out) < 3 or len(set(out)) != len(out) or not all(0 <= r < n for r in out):
            raise ConfigError("sizes", self.sizes, allowed)
        return sorted(out)

    def batch_list(self) -> list[int]:
        """The batches as ints, validated: distinct powers of two (sequences per step)."""
        allowed = "distinct powers of two (sequences per step), comma-separated, e.g. 2,4,8,16,32,64"
        try:
            out = [int(p) for p in str(self.batches).split(",")]
        except ValueError:
            raise ConfigError("batches", self.batches, allowed) from None
        if not out or len(set(out)) != len(out) or not all(b > 0 and b & (b - 1) == 0 for b in out):
            raise ConfigError("batches", self.batches, allowed)
        return sorted(out)


# Presets. tiny: seconds per trial, for tests. quick: this CPU (2 cores), about 10 minutes (docs/tuning.md).
TUNE_MODES: dict[str, dict[str, Any]] = {
    "tiny": dict(budgets="5e8,1.5e9", sizes="0,1,2", trials=3, lr_min=1e-3, lr_max=3e-2, batches="4,8,16",
                 block_size=64, vocab_size=256, eval_tokens=2048, dtype="fp32"),
    "quick": dict(budgets="1e10,3e10", sizes="1,3,5,7,9", trials=10, lr_min=1e-3, lr_max=3e-2,
                  batches="2,4,8,16,32,64", block_size=64, vocab_size=512, eval_tokens=16384, dtype="fp32"),
}
_TYPES = {k: t for k, t in config.types_of(TuneConfig).items() if k not in PER_TRIAL}
TUNE_FIELDS = list(_TYPES)


def resolve_tune(overrides: dict[str, Any] | None = None) -> TuneConfig:
    """Defaults < mode preset < explicit overrides ('' / None unset). Raises ConfigError naming the field."""
    return config.resolve_preset(TuneConfig, TUNE_MODES, _TYPES, overrides, text=("budgets", "sizes", "batches"))


# --------------------------------------------------------------------------- the cells


@dataclass
class Cell:
    """One (size, budget) cell: its study and what its trials train."""

    rung: int
    budget: float
    study_name: str
    n_layer: int
    n_embd: int
    n_params: int
    """Non-embedding parameters."""
    n_params_total: int
    """All parameters (the rule's N)."""
    tokens: int
    """D = C / flops_per_token under flops_rule, before rounding to whole batches (the rule's D)."""
    batches: list[int]
    """The configured batches that give this cell at least MIN_STEPS optimizer steps."""

    def steps(self, batch: int, block_size: int) -> int:
        return self.tokens // (batch * block_size)


def tune_name(tcfg: TuneConfig) -> str:
    """Name of the tuning (its parent run's name and ``tune`` tag)."""
    return f"{tcfg.study_prefix}-{tcfg.flops_rule}-V{tcfg.data.vocab_size}-T{tcfg.block_size}"


def plan_cells(tcfg: TuneConfig) -> list[Cell]:
    """Every (size, budget) cell, budgets outer; ConfigError when a cell affords no batch MIN_STEPS steps."""
    cells = []
    for budget in tcfg.budget_list():
        for rung in tcfg.size_list():
            m = isoflop.model_at(rung, tcfg.data.vocab_size, tcfg.block_size)
            n_total = counting.n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size)
            tokens = counting.tokens_for_flops(m, budget, tcfg.flops_rule)
            ok = [b for b in tcfg.batch_list() if tokens // (b * tcfg.block_size) >= MIN_STEPS]
            if not ok:
                need = MIN_STEPS * min(tcfg.batch_list()) * tcfg.block_size * counting.flops_per_token(m, tcfg.flops_rule)
                raise ConfigError("budgets", f"{budget:g}", f"budgets >= {need:.3g} FLOPs for size {rung} (N_total "
                                  f"{n_total:,}): {MIN_STEPS} steps of the smallest batch, {min(tcfg.batch_list())}"
                                  f"x{tcfg.block_size} tokens")
            name = f"{tcfg.study_prefix}-r{rung}-N{n_total}-C{budget:.3g}-{tcfg.flops_rule}".replace("+", "")
            cells.append(Cell(rung, budget, name, m.n_layer, m.n_embd, counting.n_params_nonembed(m.n_layer, m.n_embd),
                              n_total, tokens, ok))
    return cells


def trial_config(tcfg: TuneConfig, cell: Cell, lr: float, batch: int, run_name: str = "") -> RunConfig:
    """The training configuration of one trial: the cell's family shape and budget (D from C under flops_rule,
    as ``isoflop.trial_config``), the tuning's data and training settings, the trial's lr and batch, and one
    validation pass at the end."""
    m = isoflop.model_at(cell.rung, tcfg.data.vocab_size, tcfg.block_size)
    tr = dataclasses.replace(tcfg.train, tokens=0, flops=cell.budget, batch_size=batch, micro_batch=batch,
                             eval_every=FINAL_ONLY, resume="", lr=float(lr))
    return RunConfig(mode=tcfg.mode, experiment=tcfg.experiment, run_name=run_name, data=tcfg.data, model=m,
                     train=tr)


# --------------------------------------------------------------------------- one cell's study


def make_sampler(tcfg: TuneConfig, cell: Cell) -> optuna.samplers.TPESampler:
    """Seeded TPE: the first 4 trials random (2 when trials = 3: points spread for the parabola), then TPE. The seed
    is the tuning's seed plus a stable number of the cell, so cells sample different points (a shared sequence
    would quantize every cell's best lr to the same few values)."""
    offset = int.from_bytes(hashlib.sha256(cell.study_name.encode()).digest()[:4], "big")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multivariate TPE is "experimental" in Optuna 5
        return optuna.samplers.TPESampler(seed=(tcfg.seed + offset) % 2**32,
                                          n_startup_trials=min(4, tcfg.trials - 1), multivariate=True)


def _space(tcfg: TuneConfig, cell: Cell) -> dict[str, Any]:
    """What a study was created for: a re-run with another search space needs another study_prefix."""
    return {"lr_min": tcfg.lr_min, "lr_max": tcfg.lr_max, "batches": ",".join(map(str, cell.batches)),
            "dataset": tcfg.data.dataset, "train_split": tcfg.data.train_split, "val_split": tcfg.data.val_split,
            "vocab_size": tcfg.data.vocab_size, "block_size": tcfg.block_size, "seed": tcfg.seed}


def open_cell_study(tcfg: TuneConfig, cell: Cell, storage: Any) -> optuna.Study:
    """Create or load the cell's study (load_if_exists); ConfigError if it was made for another search space."""
    study = optuna.create_study(study_name=cell.study_name, storage=storage, sampler=make_sampler(tcfg, cell),
                                direction="minimize", load_if_exists=True)
    want = _space(tcfg, cell) | {"budget": cell.budget, "rung": cell.rung, "n_params_total": cell.n_params_total,
                                 "tokens": cell.tokens, "flops_rule": tcfg.flops_rule}
    have = study.user_attrs
    diff = [k for k in want if k in have and have[k] != want[k]]
    if diff:
        raise ConfigError("study_prefix", tcfg.study_prefix, f"a new prefix: study {cell.study_name} was tuned with "
                          + ", ".join(f"{k}={have[k]!r}" for k in diff) + " (this command: "
                          + ", ".join(f"{k}={want[k]!r}" for k in diff) + ")")
    for k, v in want.items():
        if k not in have:
            study.set_user_attr(k, v)
    return study


class TuneObjective:
    """objective(trial): sample lr and batch, train the cell's size at its budget, return final val/loss."""

    def __init__(self, tcfg: TuneConfig, cell: Cell, parent_run_id: str):
        self.tcfg, self.cell, self.parent_run_id = tcfg, cell, parent_run_id

    def __call__(self, trial: optuna.Trial) -> float:
        tcfg, cell = self.tcfg, self.cell
        lr = trial.suggest_float("lr", tcfg.lr_min, tcfg.lr_max, log=True)
        batch = int(trial.suggest_categorical("batch", cell.batches))
        cfg = trial_config(tcfg, cell, lr, batch, f"{cell.study_name}-t{trial.number}-lr{lr:.2e}-b{batch}")
        plan = make_plan(cfg)
        info = {"n_layer": cell.n_layer, "n_embd": cell.n_embd, "n_params": cell.n_params,
                "n_params_total": cell.n_params_total, "tokens_trained": plan.tokens_trained, "steps": plan.steps,
                "batch_size": batch, "lr": lr, "seed": cfg.train.seed, "worker": f"{socket.gethostname()}:{os.getpid()}"}
        for k, v in info.items():
            trial.set_user_attr(k, v)
        tags = {"scaling_lab.kind": "tune_trial", "tune": tune_name(tcfg), "study": cell.study_name,
                "budget": f"{cell.budget:g}", "n_params_total": cell.n_params_total, "lr": f"{lr:.6g}",
                "batch_size": batch, "flops_rule": tcfg.flops_rule, "trial_number": trial.number,
                "storage": tracking.masked(tcfg.storage), "seed": cfg.train.seed}
        log = None
        try:
            with tracking.run(tcfg.experiment, cfg.run_name, parent_run_id=self.parent_run_id, tags=tags,
                              system_metrics=False) as log:
                trial.set_user_attr("mlflow_run_id", log.run_id)
                result = train(cfg, log, progress=False)
                trial.set_user_attr("epochs", result.epochs)
                log.set_tags({"trial_state": "COMPLETE"})
        except NonFiniteLoss as exc:  # diverged: a (bad) result of this lr, not a broken trial
            trial.set_user_attr("diverged", str(exc)[:200])
            if log is not None:
                log.set_tags({"trial_state": "DIVERGED"})
            return math.inf
        except Interrupted as exc:
            raise KeyboardInterrupt(str(exc)) from exc
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
            if log is not None:
                log.set_tags({"trial_state": "FAIL"})
            raise
        return result.val_loss


def tune_cell(tcfg: TuneConfig, cell: Cell, study: optuna.Study, parent_run_id: str, out: TextIO) -> None:
    """Run the cell's trials until it has ``trials`` COMPLETE ones (at most 2 x trials started here)."""
    stale = studies.fail_stale_running(study, "process died (found RUNNING when the tuning restarted)")
    for run_id in filter(None, stale.values()):
        tracking.close_trial_run(run_id, "process died before the trial finished")
    objective = TuneObjective(tcfg, cell, parent_run_id)

    def report(st: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        done = _complete(st)
        best = min((x.value for x in done), default=math.nan)
        took = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else math.nan
        value = f"{t.value:.4f}" if t.value is not None and math.isfinite(t.value) else t.state.name.lower() + (
            " (diverged)" if "diverged" in t.user_attrs else "")
        print(f"  {cell.study_name}: trial {t.number} ({len(done)}/{tcfg.trials}) lr {t.params.get('lr', 0):.3g} "
              f"batch {t.params.get('batch', '?')} -> {value} in {took:.1f} s; best {best:.4f}", file=out, flush=True)

    started = 0
    while len(_complete(study)) < tcfg.trials and started < 2 * tcfg.trials:
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True, callbacks=[report])
        started += 1
    studies.close_failed_trials(study)


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.value is not None]


def cell_record(cell: Cell, study: optuna.Study) -> dict[str, Any]:
    """One cell of the JSON: what it trains, its trials, its optimum (``cell_optimum``) and edge flags."""
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name not in ("COMPLETE", "FAIL") or "lr" not in t.params:
            continue
        ua = t.user_attrs
        trials.append({"number": t.number, "state": t.state.name, "lr": t.params["lr"], "batch": t.params["batch"],
                       "loss": num(t.value), "diverged": "diverged" in ua, "steps": ua.get("steps"),
                       "tokens_trained": ua.get("tokens_trained"), "epochs": ua.get("epochs"),
                       "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                       if t.datetime_complete and t.datetime_start else None,
                       "mlflow_run_id": ua.get("mlflow_run_id")})
    points = [(t["lr"], t["batch"], t["loss"] if t["loss"] is not None else math.inf)
              for t in trials if t["state"] == "COMPLETE"]
    opt = cell_optimum(points)
    rec: dict[str, Any] = {k: v for k, v in dataclasses.asdict(cell).items()}
    rec["tokens_per_param"] = cell.tokens / cell.n_params_total
    rec["optimum"] = opt
    rec["trials"] = trials
    if opt:
        lr_lo, lr_hi = min(t["lr"] for t in trials), max(t["lr"] for t in trials)
        best = next(t for t in trials if t["loss"] == opt["best_loss"])
        rec["best_trial"] = best["number"]
        rec["best_run_id"] = best["mlflow_run_id"]
        rec["edge"] = [e for e, hit in (("lr_low", opt["best_lr"] <= lr_lo and opt["method"] == "best"),
                                         ("lr_high", opt["best_lr"] >= lr_hi and opt["method"] == "best"),
                                         ("batch_small", len(cell.batches) > 1 and opt["batch"] <= cell.batches[0]),
                                         ("batch_large", len(cell.batches) > 1 and opt["batch"] >= cell.batches[-1]))
                       if hit]
    return rec


# --------------------------------------------------------------------------- the whole tuning


@dataclass
class TuneResult:
    rule: HyperRule
    doc: dict[str, Any]
    """The JSON written to ``out``."""
    path: Path
    parent_run_id: str


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else platform)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _find_parent(tcfg: TuneConfig) -> str | None:
    """The tuning's parent run from an earlier command (tags kind=tune, tune, storage), or None."""
    tracking.setup(tcfg.experiment)
    frame = tracking.runs_frame([tcfg.experiment], tags={"scaling_lab.kind": "tune", "tune": tune_name(tcfg),
                                                         "storage": tracking.masked(tcfg.storage)})
    if frame.empty:
        return None
    return str(frame.sort_values("start_time")["run_id"].iloc[0])


def run_tune(tcfg: TuneConfig, out: TextIO | None = None, launched: str | None = None,
             command: str = "") -> TuneResult:
    """Every cell's study, then the fit, the JSON at ``tcfg.out``, the figures: the library behind the ``tune``
    entry point. A re-run of the same command reuses the finished trials and the parent run (found by its tags
    in ``experiment``, like a search's study parents). ``launched``, the run ``mlflow run`` made, becomes a record
    of this invocation (kind tune_invocation, tag tune_run, the JSON)."""
    out = out or sys.stdout
    t0 = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cells = plan_cells(tcfg)  # ConfigError before anything is created
    data.validate_source(tcfg.data)
    storage = studies.make_storage(tcfg.storage)
    opened = [open_cell_study(tcfg, c, storage) for c in cells]
    name = tune_name(tcfg)
    tags = {"scaling_lab.kind": "tune", "tune": name, "storage": tracking.masked(tcfg.storage),
            "flops_rule": tcfg.flops_rule, "vocab_size": tcfg.data.vocab_size, "block_size": tcfg.block_size}
    print(f"tune {tcfg.mode}: {len(cells)} cells x {tcfg.trials} trials in {tracking.masked(tcfg.storage)}; lr "
          f"log-uniform [{tcfg.lr_min:g}, {tcfg.lr_max:g}], batch in {{{tcfg.batches}}}; TPE seed {tcfg.seed}",
          file=out, flush=True)
    lock = StudyLock(tcfg.storage, name).acquire()  # several commands at once make one parent run
    try:
        found = _find_parent(tcfg)
        with tracking.run(tcfg.experiment, name, run_id=found, tags=tags, system_metrics=False) as plog:
            lock.release()
            plog.log_params({k: v for k, v in config.flat(tcfg).items() if k != "storage"})
            for cell, study in zip(cells, opened):
                tune_cell(tcfg, cell, study, plog.run_id, out)
            records = [cell_record(c, s) for c, s in zip(cells, opened)]
            date = datetime.date.today().isoformat()
            rule, fits = fit_rule(records, f"tune {tcfg.mode} {date}")
            trained_s = sum(t["seconds"] or 0.0 for r in records for t in r["trials"])
            doc = {"rule": {f.name: getattr(rule, f.name) for f in dataclasses.fields(rule)}, "fit": fits,
                   "cells": records, "by_budget": by_budget(records),
                   "provenance": {"command": command or " ".join([Path(sys.executable).name, *sys.argv]),
                                  "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
                                  "date": date, "torch": torch.__version__, "optuna": optuna.__version__,
                                  "python": platform.python_version(), "git_commit": tracking.git_commit(),
                                  "seed": tcfg.seed, "budgets": tcfg.budget_list(), "sizes": tcfg.size_list(),
                                  "n_params_total": sorted({c.n_params_total for c in cells}),
                                  "trials_per_cell": tcfg.trials, "lr_range": [tcfg.lr_min, tcfg.lr_max],
                                  "batches": tcfg.batch_list(), "block_size": tcfg.block_size,
                                  "flops_rule": tcfg.flops_rule, "data": dataclasses.asdict(tcfg.data),
                                  "dtype": tcfg.train.dtype, "device": tcfg.train.device,
                                  "storage": tracking.masked(tcfg.storage), "study_prefix": tcfg.study_prefix,
                                  "mlflow_run_id": plog.run_id,
                                  # seconds: every trial of every command (trained_s), and the command that wrote
                                  # this file (a re-run that reuses every trial takes seconds)
                                  "trained_s": trained_s, "command_wall_s": time.perf_counter() - t0}}
            path = Path(tcfg.out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(clean(doc), indent=2, allow_nan=False) + "\n")
            HyperRule.from_json(str(path))  # the search must be able to read what was written
            _log_parent(plog, doc, rule, path)
            parent_id = plog.run_id
    finally:
        lock.release()
    if launched:  # the run `mlflow run` made records this invocation: its parent run and the JSON it wrote
        with tracking.run(tcfg.experiment, f"{name}-invocation", run_id=launched, system_metrics=False,
                          tags={"scaling_lab.kind": "tune_invocation", "tune_run": parent_id}) as ilog:
            ilog.log_artifact(path)
    print("\n" + format_result(doc), file=out)
    print(f"rule written to {path} (use it: search hparams={path}); parent run {parent_id}; Runs: mlflow ui "
          f"--backend-store-uri {tracking.tracking_uri()}", file=out)
    return TuneResult(rule, doc, path, parent_id)


def _log_parent(plog: tracking.RunLogger, doc: dict[str, Any], rule: HyperRule, path: Path) -> None:
    """The rule (coefficients and SEs) as metrics, the JSON and the figures as artifacts of the parent run."""
    fits = doc["fit"]
    lr_f, b_f = fits["lr"][fits["lr"]["chosen"]], fits["batch"][fits["batch"]["chosen"]]
    metrics = {"rule/lr_coef": rule.lr_coef, "rule/lr_exp": rule.lr_exp, "rule/batch_coef": rule.batch_coef,
               "rule/batch_exp": rule.batch_exp, "rule/lr_coef_se": lr_f["coef_se"], "rule/lr_exp_se": lr_f["exp_se"],
               "rule/batch_coef_se": b_f["coef_se"], "rule/batch_exp_se": b_f["exp_se"],
               "fit/lr_exp_n": fits["lr"]["N_total"]["exp"], "fit/batch_exp_d": fits["batch"]["D"]["exp"],
               "cells": len(doc["cells"]), "trials/complete": sum(t["state"] == "COMPLETE" for c in doc["cells"]
                                                                  for t in c["trials"])}
    plog.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}, step=0)
    plog.set_tags({"rule_source": rule.source, "lr_predictor": fits["lr"]["chosen"],
                   "batch_predictor": fits["batch"]["chosen"]})
    plog.flush()
    plog.log_artifact(path)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for p in figures.tune_cells(doc["cells"], folder) + figures.tune_rule(doc["cells"], rule, fits, folder):
            plog.log_artifact(p, "figures")


# --------------------------------------------------------------------------- printing


def _k(n: float) -> str:
    return f"{n / 1e3:.3g}k" if n >= 1e3 else f"{n:.0f}"


def format_result(doc: dict[str, Any]) -> str:
    """The closing table (one row per cell), the per-budget spread, and the rule with its SEs."""
    lines = [f"{'budget C':>9} {'N_total':>8} {'D':>8} {'D/N':>6} {'best lr':>8} {'best b':>6} {'best loss':>9} "
             f"{'opt lr':>8} {'opt b':>6} {'method':>10} {'trials':>6}  edge"]
    for c in doc["cells"]:
        o = c.get("optimum") or {}
        if not o:
            lines.append(f"{c['budget']:>9.3g} {_k(c['n_params_total']):>8}  no finished trial")
            continue
        lines.append(f"{c['budget']:>9.3g} {_k(c['n_params_total']):>8} {_k(c['tokens']):>8} "
                     f"{c['tokens_per_param']:>6.1f} {o['best_lr']:>8.2e} {o['best_batch']:>6} {o['best_loss']:>9.4f} "
                     f"{o['lr']:>8.2e} {o['batch']:>6.0f} {o['method']:>10} "
                     f"{sum(t['state'] == 'COMPLETE' for t in c['trials']):>6}  {','.join(c.get('edge', [])) or '-'}")
    for b in doc["by_budget"]:
        lines.append(f"C={b['budget']:.3g}: best size N_total {_k(b['best_n_params_total'])} (loss {b['best_loss']:.4f}); "
                     f"spread of the sizes' best losses {b['spread']:.3f} nats: "
                     + ", ".join(f"{_k(float(n))} {v:.3f}" for n, v in b["losses"].items()))
    r, f = doc["rule"], doc["fit"]
    lf, bf = f["lr"]["N_total"], f["batch"]["D"]
    lines.append(f"fit: lr* = {lf['coef']:.3g} ± {lf['coef_se']:.2g} x (N_total/1e5)^({lf['exp']:+.3f} ± {lf['exp_se']:.3f})"
                 f", resid sd {lf['resid_sd']:.3f}; batch* = {bf['coef']:.3g} ± {bf['coef_se']:.2g} x (D/1e6)^"
                 f"({bf['exp']:+.3f} ± {bf['exp_se']:.3f}), resid sd {bf['resid_sd']:.3f} (ln units)")
    for key in ("N_total", "C"):
        g = f["batch"][key]
        lines.append(f"     batch on {key}: exp {g['exp']:+.3f} ± {g['exp_se']:.3f}, R^2 {g['r2']:.2f}, "
                     f"resid sd {g['resid_sd']:.3f}")
    nd = f["lr"]["N_total_and_D"]
    lines.append(f"     lr on N_total and D: exp_N {nd['exp_n']:+.3f} ± {nd['exp_n_se']:.3f}, "
                 f"exp_D {nd['exp_d']:+.3f} ± {nd['exp_d_se']:.3f}")
    lines.append(f"rule ({r['source']}): lr = {r['lr_coef']:.4g} (N_total/1e5)^{r['lr_exp']:.4g}, "
                 f"batch = {r['batch_coef']:.4g} (D/1e6)^{r['batch_exp']:.4g} sequences")
    lines += [f"note: {n}" for n in f["notes"]]
    return "\n".join(lines)


def format_tune_plan(tcfg: TuneConfig, timed_seconds: float = TIMED_SECONDS) -> str:
    """The dry-run report: every cell (size, tokens, feasible batches and their steps) and its trials, with
    the estimated time (calibrated per shape and batch; a cell's trials are costed at the mean over its
    batches, since the sampler spreads them)."""
    cells = plan_cells(tcfg)
    lines = [f"dry run (tune {tcfg.mode}): nothing trained, no MLflow run, no Optuna study or trial",
             f"  {len(cells)} cells ({len(tcfg.size_list())} sizes x {len(tcfg.budget_list())} budgets) x "
             f"{tcfg.trials} trials = {len(cells) * tcfg.trials} trials; lr log-uniform [{tcfg.lr_min:g}, "
             f"{tcfg.lr_max:g}], batch in {{{tcfg.batches}}} (per cell: those with >= {MIN_STEPS} steps); TPE seed "
             f"{tcfg.seed}; flops_rule {tcfg.flops_rule}; storage {tracking.masked(tcfg.storage)}; out {tcfg.out}",
             f"  {'study':<34} {'L':>2} {'d':>4} {'N_total':>9} {'budget':>7} {'D':>10} {'D/N':>6}  batches (steps)"
             f"{'':<30} {'est./trial':>11}"]
    total = 0.0
    lr = math.sqrt(tcfg.lr_min * tcfg.lr_max)
    for c in cells:
        # time(b) = A + B / b (per-step overhead x steps ~ 1/b, compute ~ fixed), through the two end batches;
        # calibrations are cached per shape and batch, so the budgets of one size share them
        lo, hi = c.batches[0], c.batches[-1]
        s_lo = estimate_run(trial_config(tcfg, c, lr, lo), timed_seconds=timed_seconds).total_s
        s_hi = estimate_run(trial_config(tcfg, c, lr, hi), timed_seconds=timed_seconds).total_s if hi != lo else s_lo
        slope = (s_lo - s_hi) / (1 / lo - 1 / hi) if hi != lo else 0.0
        secs = [s_hi + slope * (1 / b - 1 / hi) for b in c.batches]
        mean = sum(secs) / len(secs)
        total += mean * tcfg.trials
        bs = " ".join(f"{b}({c.steps(b, tcfg.block_size)})" for b in c.batches)
        lines.append(f"  {c.study_name:<34} {c.n_layer:>2} {c.n_embd:>4} {c.n_params_total:>9,} {c.budget:>7.2g} "
                     f"{c.tokens:>10,} {c.tokens / c.n_params_total:>6.1f}  {bs:<45} {fmt_seconds(mean):>11}")
    lines.append(f"  total: about {fmt_seconds(total)} of training for {len(cells) * tcfg.trials} trials "
                 "(estimated; plus ~1 s of run bookkeeping per trial)")
    return "\n".join(lines)
