"""Every entry point's ``main``: argv -> config -> library call -> exit code. Flags are named exactly like the
config fields (``--name value`` or ``--name=value``; a boolean alone, ``--dry_run``, means true); MLproject's
``mlproject/*.py`` and ``analysis/*.py`` call these, and ``main`` is the ``scaling-lab`` console script
(``scaling-lab train|search|analyze|doctor[|tune] ...``). No other library module parses argv.

Exit codes: 0 done; 2 a user mistake (one line naming the parameter, no traceback, the launched run FAILED);
1 training or workers failed; 75 metrics kept in the checkpoint (store away); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextvars
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scaling_lab import (
    ablation,
    analyze,
    config,
    data,
    doctor,
    estimate,
    grouped,
    isoflop,
    laws,
    links,
    report,
    search,
    tracking,
    tuning,
)
from scaling_lab.counting import make_plan
from scaling_lab.errors import (
    ConfigError,
    DataUnavailable,
    Interrupted,
    NonFiniteLoss,
    TrackingUnavailable,
    WorkersDied,
)
from scaling_lab.runtime import configure_threads, dist_setup, dist_teardown, pick_device
from scaling_lab.train import NullLogger, checkpoint_file, resume_config, train

USER_ERRORS = (ConfigError, DataUnavailable)
DAY_S = 86_400.0  # a plan estimated longer than this starts only with yes=true
LONG_PLAN_NOTE = "estimated at more than a day: the real run starts only with --yes (mlflow run: -P yes=true)"


# Allowed values --help lists, by field name (device also takes cuda:N).
CHOICES: dict[str, tuple[str, ...]] = {
    "mode": tuple(config.MODES), "flops_rule": config.FLOPS_RULES, "device": (*config.DEVICES, "cuda:N"),
    "dtype": config.DTYPES, "compile": config.COMPILE_CHOICES, "tokenizer": config.TOKENIZERS,
    "sampler": isoflop.SAMPLERS, "pruner": isoflop.PRUNERS, "batch_round": isoflop.BATCH_ROUNDS,
    "source": analyze.SOURCES,
    "convention": analyze.CONVENTION_CHOICES, "a3_interval": analyze.A3_INTERVALS, "hparams": ("fixed", "tuned", "<tuning JSON path>"),
    "group_by": ("''", *analyze.GROUP_BY[1:]), "steps": ablation.STEP_NAMES,
}
# One line per subcommand of the ``scaling-lab`` script; also each entry point's --help description.
SUMMARIES = {
    "train": "Train one GPT configuration, every step logged to MLflow.",
    "search": "Optuna isoFLOP studies, one per budget: Kaplan against Chinchilla.",
    "analyze": "Fit scaling laws to stored runs, a CSV or a simulation; write a report and log it to MLflow.",
    "doctor": "Check device, memory, stores, tokenizer and data for a mode.",
    "tune": "Tune lr and batch per (size, budget) cell; fit the rule a search uses.",
    "ablation": "Kaplan's protocol to Chinchilla's, one step at a time: one isoFLOP search per step, one analysis.",
}
_PROG: contextvars.ContextVar[str | None] = contextvars.ContextVar("prog", default=None)  # "scaling-lab train"


def _shown(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else repr(v) if v == "" else str(v)


def option_help(name: str, owners: tuple[type, ...], preset: dict[str, Any]) -> str:
    """One option's --help line: the field's docstring, its default (the default mode's preset when it sets one)
    and its allowed values where known."""
    docs: dict[str, str] = {}
    defaults: dict[str, Any] = {}
    for cls in reversed(owners):  # the first owner wins
        docs.update(config.field_docs(cls))
        defaults.update(config.field_defaults(cls))
    text = docs.get(name, "")
    extra = []
    if name in preset:
        extra.append(f"default: {_shown(preset[name])} (mode {defaults.get('mode', 'default')}; each mode sets it)")
    elif name in defaults:
        extra.append(f"default: {_shown(defaults[name])}")
    if name in CHOICES:
        extra.append("one of: " + ", ".join(CHOICES[name]))
    if extra:
        text += f" [{'; '.join(extra)}]"
    return text.replace("%", "%%")  # argparse %-formats help strings


def _types(owners: tuple[type, ...]) -> dict[str, type]:
    out: dict[str, type] = {}
    for cls in reversed(owners):
        out.update(config.types_of(cls))
    return out


def parser_for(names: list[str], description: str, owners: tuple[type, ...] = (),
               preset: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """One ``--name`` flag per field name, for --help: each with its docstring, default and allowed values from
    the ``owners`` dataclasses; values stay strings (config.parse_fields types them)."""
    p = argparse.ArgumentParser(prog=_PROG.get(), description=description, allow_abbrev=False,
                                epilog="Flags: --name value or --name=value; a boolean flag given alone means true.")
    types = _types(owners)
    for name in names:
        meta = {bool: "true|false", int: "INT", float: "NUMBER"}.get(types.get(name), "TEXT")
        p.add_argument(f"--{name}", default=None, metavar=meta, nargs="?" if types.get(name) is bool else None,
                       help=option_help(name, owners, preset or {}))
    return p


def parse(argv: list[str], names: list[str], description: str, owners: tuple[type, ...] = (),
          preset: dict[str, Any] | None = None) -> dict[str, Any]:
    """``--name value`` or ``--name=value`` pairs -> {name: value}. Values may start with '-' (e.g. -1e12),
    so they are paired by position rather than by argparse; a boolean field of ``owners`` given alone (followed
    by another ``--name`` or nothing) means 'true'; an unknown name raises ConfigError. ``owners`` and
    ``preset`` (the default mode's values) feed --help."""
    if any(a in ("-h", "--help") for a in argv):
        parser_for(names, description, owners, preset).print_help()
        raise SystemExit(0)
    bools = {n for n, t in _types(owners).items() if t is bool}
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError("arguments", tok, "--name value pairs with names from " + ", ".join(names))
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if "=" in tok:
            name, value = tok[2:].split("=", 1)
            i += 1
        elif tok[2:] in bools and (nxt is None or nxt.startswith("--")):
            name, value = tok[2:], "true"  # a bare boolean flag
            i += 1
        else:
            name, value = tok[2:], nxt
            i += 2
        if name not in names:
            raise ConfigError(name, value, "one of " + ", ".join(names))
        if value is None:
            raise ConfigError(name, value, "a value after --" + name)
        out[name] = value
    return out


def _commands() -> dict[str, Callable[[list[str]], int]]:
    """The subcommands that exist now: main_<name> of this module (tune only once cli.main_tune is defined)."""
    return {n: globals()[f"main_{n}"] for n in SUMMARIES if callable(globals().get(f"main_{n}"))}


def _summary(name: str, fn: Callable) -> str:
    return SUMMARIES.get(name) or (fn.__doc__ or "").strip().split("\n")[0]


def usage() -> str:
    """``scaling-lab --help``: the subcommands, one line each."""
    cmds = _commands()
    width = max(map(len, cmds))
    return "\n".join(["usage: scaling-lab <command> [--name value ...]   (scaling-lab <command> --help for its flags)",
                      "", "MLflow-tracked GPT training and Optuna isoFLOP search for measuring LM scaling laws.", "",
                      "commands:", *(f"  {n:<{width}}  {_summary(n, f)}" for n, f in cmds.items())])


def main(argv: list[str] | None = None) -> int:
    """The ``scaling-lab`` console script: ``scaling-lab <command> [--name value ...]`` runs cli.main_<command>
    (the same entry points as MLproject's), flags named like the config fields."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    cmds = _commands()
    if argv[0] not in cmds:
        error(f"unknown command '{argv[0]}': use one of {', '.join(cmds)} (scaling-lab --help)")
        return 2
    token = _PROG.set(f"scaling-lab {argv[0]}")
    try:
        return cmds[argv[0]](argv[1:])
    finally:
        _PROG.reset(token)


def error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def refuse(exc: BaseException, launched: str | None, code: int = 2) -> int:
    """The one way an entry point gives up: one line on stderr, the run ``mlflow run`` made ended FAILED with
    the reason, the exit code returned."""
    error(str(exc))
    if launched:
        tracking.fail_run(launched, str(exc))
    return code


def guarded(launched: str | None, work: Callable[[], Any]) -> tuple[Any, int | None]:
    """Run ``work``; a user mistake becomes (None, 2) after ``refuse``; else (its result, None). Anything else
    (a bug) propagates: its traceback is shown and the exit code is 1."""
    try:
        return work(), None
    except USER_ERRORS as exc:
        return None, refuse(exc, launched)


def guarded_search(launched: str | None, work: Callable[[], Any]) -> tuple[Any, int | None]:
    """``guarded`` for work that trains studies, plus its two other ways to stop: a worker died (exit 1), or
    Ctrl-C (exit 130; the same command continues the studies)."""
    try:
        return guarded(launched, work)
    except WorkersDied as exc:
        return None, refuse(exc, launched, 1)
    except KeyboardInterrupt:
        return None, refuse(KeyboardInterrupt("interrupted; re-run the same command to continue the studies"),
                            launched, 130)


def check_writable_dir(param: str, path: str) -> None:
    """Fail before any run exists when folder ``path`` cannot be created or written: the nearest existing path at
    or above it must be a writable folder. Creates nothing (a dry run leaves no folder behind)."""
    q = Path(path).expanduser().absolute()
    while not q.exists() and q != q.parent:
        q = q.parent
    if not q.is_dir():
        raise ConfigError(param, path, f"a folder that can be created ('{q}' is a file, not a folder)")
    if not os.access(q, os.W_OK | os.X_OK):
        raise ConfigError(param, path, f"a folder this user can write ('{q}' is not writable)")


def confirm_long_plan(total_s: float, what: str, yes: bool) -> None:
    """A plan estimated at more than a day needs ``yes=true`` (a typo in tokens/flops/budgets is caught here)."""
    if total_s > DAY_S and not yes:
        shown = estimate.fmt_seconds(total_s) if total_s < 1000 * DAY_S else f"{total_s / DAY_S:.2g} days"
        raise ConfigError("yes", "false", f"true to start {what} estimated at {shown} at the "
                          "calibrated speed (more than a day): pass --yes (mlflow run: -P yes=true), or a smaller "
                          "budget")


# --------------------------------------------------------------------------- main: train one configuration


def run_name(cfg: config.RunConfig) -> str:
    m, t = cfg.model, cfg.train
    budget = f"C{t.flops:.0e}" if t.flops else f"D{t.tokens:.0e}"
    return cfg.run_name or f"{cfg.mode}-L{m.n_layer}-d{m.n_embd}-V{cfg.data.vocab_size}-{budget}".replace("+", "")


def _train_config(argv: list[str], launched: str | None = None) -> config.RunConfig:
    """Flags -> a validated RunConfig whose budget, device and data are checked before any run exists. Under
    ``mlflow run`` the run already lives in the experiment ``--experiment-name`` chose: an unset ``experiment`` is
    that one, a different one is refused (the run cannot move, and an empty experiment would be left behind)."""
    args = parse(argv, config.field_names(), SUMMARIES["train"], (config.RunConfig,),
                 config.MODES["quick"])
    tracking.require_store()  # a bad URI or a silent server: one line now, not minutes of MLflow's retries
    if launched and not args.get("resume"):
        where = tracking.run_experiment(launched)
        if config.is_unset(args.get("experiment")):
            args["experiment"] = where
        elif args["experiment"].strip() != where:
            raise ConfigError("experiment", args["experiment"], f"the experiment mlflow run created this run in "
                              f"('{where}'): pass --experiment-name {args['experiment'].strip()} to mlflow run "
                              "instead of -P experiment")
    if not config.is_unset(args.get("resume")):
        rid = args["resume"].strip()
        folder = args.get("checkpoint_dir") or config.TrainConfig.checkpoint_dir
        local = checkpoint_file(folder, rid)
        valid_id = Path(rid).name == rid and rid not in (".", "..")
        if valid_id and not local.exists():  # another machine: the copy in the run's artifacts
            tracking.fetch_checkpoint(rid, local)
        if not valid_id or not local.is_file():
            raise ConfigError("resume", args["resume"], f"the id of a run with a checkpoint under checkpoint_dir "
                              f"'{folder}' ({folder}/<run id>/last.pt) or in its artifacts (checkpoint/last.pt)")
        cfg = resume_config(rid, folder)
        cfg.dry_run = config.parse_value("dry_run", args.get("dry_run") or "false")  # not stored in checkpoints
    else:
        cfg = config.resolve(args)
    make_plan(cfg)  # a budget below one optimizer step fails here, before any run exists
    pick_device(cfg.train.device)
    data.validate_source(cfg.data)
    check_writable_dir("checkpoint_dir", cfg.train.checkpoint_dir)
    return cfg


def dry_run_train(cfg: config.RunConfig, launched: str | None) -> int:
    """``dry_run=true``: print the plan and its estimated cost; train nothing, leave no MLflow run (the run
    ``mlflow run`` made is ended and deleted; ``mlflow gc`` removes deleted runs for good)."""
    if launched:
        tracking.end_stray_run(launched, "dry run: nothing trained")
    est = estimate.estimate_run(cfg)
    print(estimate.format_plan(cfg, est))
    if est.total_s > DAY_S and not cfg.train.yes:
        print(f"  warning     {LONG_PLAN_NOTE}")
    if not data.is_local(cfg.data.dataset) and not data.hub_reachable():
        print(f"  warning     dataset '{cfg.data.dataset}' needs the Hugging Face hub, which cannot be reached: "
              f"{data.OFFLINE_HINT} (check everything with the doctor entry point)")
    return 0


def _store_lost(log: tracking.RunLogger, cfg: config.RunConfig) -> int:
    """Exit 75 with what really became of the metrics once tracking.run had retried: all written, or how many
    wait in the checkpoint."""
    uri, rid = tracking.masked(tracking.tracking_uri()), log.run_id
    if log.pending:
        error(f"tracking store {uri} did not answer: {log.pending} metric values of run {rid} are not written; "
              f"they are kept in the checkpoint under {cfg.train.checkpoint_dir}: run again with resume={rid} when "
              "the store answers to send them and finish the run")
    else:
        error(f"tracking store {uri} did not answer at the end of training; a retry then wrote every metric value "
              f"of run {rid}, but its final artifacts were not logged: run again with resume={rid} to add them and "
              "finish the run")
    return 75  # EX_TEMPFAIL


def main_train(argv: list[str]) -> int:
    """The ``main`` entry point: resolve the config, train one run, print the summary line."""
    configure_threads()  # torch threads = physical cores here (OMP_NUM_THREADS wins), docs/scaling-out.md
    launched = tracking.launched_run_id()  # the run `mlflow run` created and logged params into
    cfg, code = guarded(launched, lambda: _train_config(argv, launched))
    if code is not None:
        return code
    if cfg.dry_run:
        return dry_run_train(cfg, launched)
    if not cfg.train.resume:  # data shorter than one block fails here, before any run exists
        _, code = guarded(launched, lambda: data.check_length(cfg.data, cfg.model.block_size))
        if code is not None:
            return code
    cfg.run_name = run_name(cfg)  # logged as the run_name param: the value used, never ''
    rank, world = dist_setup(cfg.train.device)  # torchrun: one process per rank; only rank 0 talks to MLflow
    # calibrated throughput (cached per device+shape) -> predicted wall time; single-process runs only
    est = estimate.estimate_or_none(cfg) if world == 1 else None
    if est is not None:
        _, code = guarded(launched, lambda: confirm_long_plan(est.total_s, "a run", cfg.train.yes))
        if code is not None:
            return code
    run_id = cfg.train.resume or launched
    if cfg.train.resume and launched and launched != cfg.train.resume:
        tracking.end_stray_run(launched, f"resume of {cfg.train.resume}: training continued in that run")
    try:
        if rank > 0:  # the other ranks train their share and log nothing
            log = NullLogger(run_id=f"rank{rank}")  # named: an Interrupted on this rank reports log.run_id too
            train(cfg, log, progress=False)
            return 0
        with tracking.run(cfg.experiment, cfg.run_name, run_id=run_id, tags={"scaling_lab.kind": "train"}) as log:
            if world > 1:
                log.set_tags({"world_size": world})
            result = train(cfg, log)
            if est is not None:
                log.log_metrics({"estimate/error": estimate.estimate_error(est.total_s, result.wall_s),
                                 "estimate/seconds": est.total_s}, step=result.steps)
    except (*USER_ERRORS, NonFiniteLoss) as exc:
        error(str(exc))
        return 2 if isinstance(exc, USER_ERRORS) else 1
    except Interrupted as exc:
        error(f"interrupted: {exc}; continue with resume={log.run_id}")
        return 130
    except TrackingUnavailable:
        return _store_lost(log, cfg)
    finally:
        dist_teardown()
    if log.pending:  # written nowhere but the checkpoint: the run is FAILED, whatever train() returned
        return _store_lost(log, cfg)
    overhead = 100 * result.log_seconds / result.wall_s if result.wall_s else 0.0
    print(f"run {result.run_id} FINISHED: val/loss {result.val_loss:.4f} ({result.val_bpb:.4f} bits/byte) after "
          f"{result.steps} steps, {result.tokens_trained:,} tokens in {result.wall_s:.1f} s "
          f"({result.tokens_per_s:,.0f} tokens/s, metric logging {overhead:.2f}% of wall time). "
          f"{estimate.summary(est, result.wall_s)}"
          f"Open the UI: {links.ui_hint(log.experiment_id, result.run_id)}")
    return 0


# --------------------------------------------------------------------------- search


def _search_config(argv: list[str]) -> isoflop.SearchConfig:
    args = parse(argv, isoflop.SEARCH_FIELDS, SUMMARIES["search"], (isoflop.SearchConfig,),
                 isoflop.SEARCH_MODES["quick"])
    scfg = isoflop.resolve_search(args)
    tracking.require_store()
    for c in scfg.budget_list():
        isoflop.plan_budget(scfg, c)
    data.validate_source(scfg.data)
    check_writable_dir("checkpoint_dir", scfg.train.checkpoint_dir)
    return scfg


def _search_checks(scfg: isoflop.SearchConfig) -> None:
    """What a real search checks before any study or run exists: data at least one block long, and a plan
    longer than a day only with yes=true."""
    data.check_length(scfg.data, scfg.block_size)
    if not scfg.train.yes:
        confirm_long_plan(sum(b.total_s for b in search.plan_search(scfg)), "a search", False)


def main_search(argv: list[str]) -> int:
    """The ``search`` entry point: parse flags named like SearchConfig fields, run, print the table."""
    configure_threads()  # torch threads = physical cores here (OMP_NUM_THREADS wins), docs/scaling-out.md
    launched = tracking.launched_run_id()  # the run `mlflow run` made: it records this invocation
    scfg, code = guarded(launched, lambda: _search_config(argv))
    if code is not None:
        return code
    if scfg.dry_run:
        if launched:
            tracking.end_stray_run(launched, "dry run: nothing trained")
        plans = search.plan_search(scfg)
        print(search.format_search_plan(scfg, plans))
        if sum(b.total_s for b in plans) > DAY_S and not scfg.train.yes:
            print(f"  warning     {LONG_PLAN_NOTE}")
        return 0
    _, code = guarded(launched, lambda: _search_checks(scfg))
    if code is not None:
        return code
    results, code = guarded_search(launched, lambda: search.run_search(scfg))
    if code is not None:
        return code
    if launched:
        tracking.finish_invocation_run(launched, isoflop.table(results, scfg.flops_rule),
                                       {r.study_name: r.parent_run_id for r in results})
    return 0


# --------------------------------------------------------------------------- analyze


def _print_analysis(results: dict[str, Any], cfg: analyze.AnalyzeConfig) -> None:
    for conv, vs in results["verdict"].items():
        for name, v in vs.items():
            if v.get("a") is not None:
                print(laws.verdict_sentence(f"{conv} / {name}", v))
    for line in report.shape_warnings(results):
        print(line)
    ov = results.get("overlay")
    if ov:
        m = ov["measured"]["approach3"]
        print(f"quick vs real ({ov['label']}): predicted a = {ov['a_predicted']:.3f}, measured approach3 a = "
              f"{m['a']:.3f} {report.ci_txt(m['ci95'], '.3f')}; measured / predicted N_opt by budget: "
              + ", ".join(f"{x['budget']:.2g}: {x['ratio']:.2f}" for x in ov["by_budget"]))
    ce = results["curve_extrapolation"]
    if ce.get("runs"):
        print(f"learning-curve extrapolation ({ce['runs']} runs, first {100 * cfg.curve_frac:.0f}%): median |error| "
              f"{100 * ce['median_abs_rel_err']:.2f}%, max {100 * ce['max_abs_rel_err']:.2f}%")


def _fit(cfg: analyze.AnalyzeConfig, keep: tuple[str, ...] | None = None) -> tuple:
    """Load and fit: one analysis, or one per group (group_by=protocol, the ablation's steps in their order)."""
    study = analyze.load(cfg)
    if cfg.group_by:
        return study, *grouped.analyze_groups(study, cfg, ablation.STEP_NAMES, ablation.CONVENTION, keep)
    return study, *analyze.analyze_study(study, cfg)


def _report(cfg: analyze.AnalyzeConfig, out: tuple, launched: str | None, t0: float) -> int:
    """Write the report, print the verdict, log the analysis run (``launched``, or a new one) with the report."""
    study, results, objects = out
    if cfg.group_by:
        folder = grouped.write_report(results, objects, study, cfg.out)
        print("\n".join(grouped.print_lines(results)))
        metrics = grouped.metrics_of(results)
    else:
        folder = report.write_report(results, objects, study, cfg.out)
        _print_analysis(results, cfg)
        metrics = report.metrics_of(results)
    run_id = ""
    if cfg.log:
        experiment = next((e.strip() for e in cfg.experiment.split(",") if e.strip() not in ("", "*")), "scaling-lab")
        tags = {"scaling_lab.kind": "analyze", "source": cfg.source} | ({"group_by": cfg.group_by} if cfg.group_by
                                                                        else {})
        runs = len(study.runs) if cfg.group_by else sum(r["runs"] for r in results["conventions"].values())
        with tracking.run(experiment, f"analyze-{cfg.source}", run_id=launched, tags=tags,
                          system_metrics=False) as log:
            log.log_params({**results["config"], "runs": runs,
                            **({"csv_sha256": study.provenance["sha256"]} if "sha256" in study.provenance else {})})
            log.log_metrics(metrics, step=0)
            log.flush()
            tracking.log_report(log.run_id, folder)
            run_id = log.run_id
    print(f"report: {folder / 'report.html'} (fits.json, report.md, figures) in {time.perf_counter() - t0:.1f} s"
          + (f"; logged to MLflow run {run_id}" if run_id else ""))
    return 0


def main_analyze(argv: list[str]) -> int:
    """The ``analyze`` entry point: fit, print the verdict, write the report and log it to MLflow."""
    launched = tracking.launched_run_id()
    t0 = time.perf_counter()

    def fit() -> tuple:
        cfg = analyze.parse_config(parse(argv, analyze.field_names(), SUMMARIES["analyze"], (analyze.AnalyzeConfig,)))
        if cfg.log or cfg.source == "mlflow":
            tracking.require_store()
        return cfg, _fit(cfg)

    out, code = guarded(launched, fit)
    if code is not None:
        return code
    return _report(out[0], out[1], launched, t0)


# --------------------------------------------------------------------------- doctor


def main_doctor(argv: list[str]) -> int:
    """The ``doctor`` entry point. Exit 0 when ready, 1 when a check the mode needs fails, 2 on bad flags."""
    launched = tracking.launched_run_id()  # `mlflow run -e doctor` made a run: it records this check
    try:
        args = parse(argv, doctor.DOCTOR_FIELDS, SUMMARIES["doctor"], (config.RunConfig, isoflop.SearchConfig),
                     config.MODES["quick"])
        args = {k: v for k, v in args.items() if not config.is_unset(v)}
        config.resolve({k: v for k, v in args.items() if k != "storage"})  # a bad value is a bad flag: exit 2
    except ConfigError as exc:
        return refuse(exc, launched)
    checks = doctor.run_checks(dict(args))
    text = doctor.report(checks, args.get("mode", "quick"))
    print(text)
    failed = any(c.status == "FAIL" for c in checks)
    if launched and failed:  # FAILED with the problems when not ready
        problems = [ln for ln in text.splitlines() if ln.startswith("doctor:")]
        tracking.fail_run(launched, problems[-1] if problems else "doctor found problems")
    elif launched:  # a check trains nothing and should not sit among the experiment's runs
        tracking.end_stray_run(launched, "doctor: environment check, nothing trained")
    return 1 if failed else 0


# --------------------------------------------------------------------------- tune


def _tune_config(argv: list[str]) -> tuning.TuneConfig:
    args = parse(argv, tuning.TUNE_FIELDS, SUMMARIES["tune"], (tuning.TuneConfig,), tuning.TUNE_MODES["quick"])
    tcfg = tuning.resolve_tune(args)
    tracking.require_store()
    tuning.plan_cells(tcfg)  # a budget too small for a size fails here, before any run exists
    data.validate_source(tcfg.data)
    check_writable_dir("checkpoint_dir", tcfg.train.checkpoint_dir)
    return tcfg


def main_tune(argv: list[str]) -> int:
    """The ``tune`` entry point: parse flags named like TuneConfig fields, tune every cell, fit and write the rule
    (``out``, for a search's ``hparams=<path>``), print the table."""
    configure_threads()  # torch threads = physical cores here (OMP_NUM_THREADS wins), docs/scaling-out.md
    launched = tracking.launched_run_id()  # the run `mlflow run` made: the tuning's parent run, or a record
    tcfg, code = guarded(launched, lambda: _tune_config(argv))
    if code is not None:
        return code
    if tcfg.dry_run:
        if launched:
            tracking.end_stray_run(launched, "dry run: nothing trained")
        print(tuning.format_tune_plan(tcfg))
        return 0
    _, code = guarded(launched, lambda: data.check_length(tcfg.data, tcfg.block_size))
    if code is not None:
        return code
    import shlex

    given = {k: v for k, v in parse(argv, tuning.TUNE_FIELDS, "").items() if not config.is_unset(v)}
    command = " ".join(["python mlproject/tune.py", *(f"--{k} {shlex.quote(str(v))}" for k, v in given.items())])
    try:
        tuning.run_tune(tcfg, launched=launched, command=command)
    except USER_ERRORS as exc:
        return refuse(exc, launched)
    except RuntimeError as exc:  # too few cells finished to fit a rule
        return refuse(exc, launched, 1)
    except KeyboardInterrupt:
        return refuse(KeyboardInterrupt("interrupted; re-run the same command to continue the studies"), launched,
                      130)
    return 0


# --------------------------------------------------------------------------- ablation


def _ablation_config(argv: list[str]) -> ablation.AblationConfig:
    args = parse(argv, ablation.ABLATION_FIELDS, SUMMARIES["ablation"], (ablation.AblationConfig,),
                 {**isoflop.SEARCH_MODES["quick"], **ablation.ABLATION_MODES["quick"]})
    acfg = ablation.resolve_ablation(args)
    for scfg in ablation.step_configs(acfg).values():  # a budget too small for a step fails before anything runs
        for c in scfg.budget_list():
            isoflop.plan_budget(scfg, c)
    data.validate_source(acfg.search.data)
    return acfg


def main_ablation(argv: list[str]) -> int:
    """The ``ablation`` entry point: one isoFLOP search per protocol step (finished studies are reused), then one
    analysis of all of them (group_by=protocol) logged to the run ``mlflow run`` made (or a new one)."""
    launched = tracking.launched_run_id()
    t0 = time.perf_counter()
    acfg, code = guarded(launched, lambda: _ablation_config(argv))
    if code is not None:
        return code
    if acfg.search.dry_run:
        if launched:
            tracking.end_stray_run(launched, "dry run: nothing trained")
        print(ablation.format_ablation_plan(acfg))
        return 0
    done, code = guarded_search(launched, lambda: ablation.run_ablation(acfg))
    if code is not None:
        return code
    if not acfg.analyze:
        if launched:
            tracking.finish_invocation_run(launched, "\n\n".join(isoflop.table(d.results, d.scfg.flops_rule)
                                                                  for d in done),
                                           {r.study_name: r.parent_run_id for d in done for r in d.results})
        return 0
    out = acfg.out or str(report.default_out()).replace("analyze-", "ablation-")
    cfg = analyze.AnalyzeConfig(experiment=acfg.search.experiment, tags="scaling_lab.kind=trial",
                                filter_string=f"tags.study LIKE '{acfg.search.study_prefix}-%'", out=out,
                                bootstrap=acfg.bootstrap, group_by="protocol")
    fitted, code = guarded(launched, lambda: _fit(cfg, keep=acfg.step_list()))
    if code is not None:
        return code
    fitted[1]["searches"] = [{"step": d.step, "trials": sum(sum(b.trials.values()) for b in d.results),
                              "wall_s": d.wall_s} for d in done]  # this invocation's time per step
    return _report(cfg, fitted, launched, t0)


if __name__ == "__main__":  # python -m scaling_lab.cli <command> ...: the scaling-lab console script
    sys.exit(main())
