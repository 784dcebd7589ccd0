"""Command-line plumbing shared by the entry scripts: flags named exactly like the config fields."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from scaling_lab import config


def parser_for(names: list[str], description: str) -> argparse.ArgumentParser:
    """One ``--name`` flag per field name (for --help); values stay strings (config.parse_value types them)."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    for name in names:
        p.add_argument(f"--{name}", default=None, metavar=name.upper())
    return p


def parse(argv: list[str], names: list[str], description: str) -> dict[str, Any]:
    """``--name value`` or ``--name=value`` pairs -> {name: value}. Values may start with '-' (e.g. -1e12),
    so they are paired by position rather than by argparse; an unknown name raises ConfigError."""
    if any(a in ("-h", "--help") for a in argv):
        parser_for(names, description).print_help()
        raise SystemExit(0)
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise config.ConfigError("arguments", tok, "--name value pairs with names from " + ", ".join(names))
        if "=" in tok:
            name, value = tok[2:].split("=", 1)
            i += 1
        else:
            name, value = tok[2:], argv[i + 1] if i + 1 < len(argv) else None
            i += 2
        if name not in names:
            raise config.ConfigError(name, value, "one of " + ", ".join(names))
        if value is None:
            raise config.ConfigError(name, value, "a value after --" + name)
        out[name] = value
    return out


def error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def run_name(cfg: config.RunConfig) -> str:
    m, t = cfg.model, cfg.train
    budget = f"C{t.flops:.0e}" if t.flops else f"D{t.tokens:.0e}"
    return cfg.run_name or f"{cfg.mode}-L{m.n_layer}-d{m.n_embd}-V{cfg.data.vocab_size}-{budget}".replace("+", "")


def main_train(argv: list[str]) -> int:
    """The ``main`` entry point: resolve the config, train one run, print the summary line."""
    from scaling_lab import tracking
    from scaling_lab.data import DataUnavailable, validate_source
    from scaling_lab.errors import Interrupted, NonFiniteLoss, TrackingUnavailable
    from scaling_lab.train import NullLogger, dist_setup, dist_teardown, make_plan, pick_device, resume_config, train

    launched = os.environ.get("MLFLOW_RUN_ID")  # the run `mlflow run` created and logged params into
    try:
        args = parse(argv, config.field_names(), "Train one GPT configuration, every step logged to MLflow.")
        if args.get("resume"):
            ckdir = args.get("checkpoint_dir") or config.TrainConfig.checkpoint_dir
            cfg = resume_config(args["resume"], ckdir)
            cfg.dry_run = config.parse_value("dry_run", args.get("dry_run") or "false")  # not stored in checkpoints
        else:
            cfg = config.resolve(args)
        make_plan(cfg)  # a budget below one optimizer step fails here, before any run exists
        pick_device(cfg.train.device)
        validate_source(cfg.data)
    except config.ConfigError as exc:
        error(str(exc))
        if launched:
            tracking.fail_run(launched, str(exc))
        return 2
    from scaling_lab import estimate

    if cfg.dry_run:  # plan and estimated cost only: no training, no MLflow run left
        return estimate.dry_run(cfg, launched)
    rank, world = dist_setup(cfg.train.device)  # torchrun: one process per rank; only rank 0 talks to MLflow
    # calibrated throughput (cached per device+shape) -> predicted wall time; single-process runs only
    est = estimate.estimate_or_none(cfg) if world == 1 else None

    run_id = None
    if cfg.train.resume:
        run_id = cfg.train.resume
        if launched and launched != run_id:
            tracking.end_stray_run(launched, f"resume of {run_id}: training continued in that run")
    try:
        if rank > 0:  # the other ranks train their share and log nothing
            log = NullLogger(run_id=f"rank{rank}")
            train(cfg, log, progress=False)
            return 0
        with tracking.run(cfg.experiment, run_name(cfg), run_id=run_id, tags={"scaling_lab.kind": "train"}) as log:
            if world > 1:
                log.set_tags({"world_size": world})
            result = train(cfg, log)
            if est is not None:
                log.log_metrics({"estimate_error": estimate.estimate_error(est.total_s, result.wall_s),
                                 "estimate_s": est.total_s}, step=result.steps)
    except (config.ConfigError, DataUnavailable, NonFiniteLoss) as exc:
        error(str(exc))
        return 2 if isinstance(exc, (config.ConfigError, DataUnavailable)) else 1
    except Interrupted as exc:
        error(f"interrupted: {exc}; continue with resume={log.run_id}")
        return 130
    except TrackingUnavailable as exc:
        error(f"{exc}; they are kept in the checkpoint under {cfg.train.checkpoint_dir}: run again with "
              f"resume={log.run_id} when the store answers to send them and finish the run")
        return 75  # EX_TEMPFAIL
    finally:
        dist_teardown()
    overhead = 100 * result.log_seconds / result.wall_s if result.wall_s else 0.0
    print(
        f"run {result.run_id} FINISHED: val/loss {result.val_loss:.4f} ({result.val_bpb:.4f} bits/byte) after "
        f"{result.steps} steps, {result.tokens_trained:,} tokens in {result.wall_s:.1f} s "
        f"({result.tokens_per_s:,.0f} tokens/s, metric logging {overhead:.2f}% of wall time). "
        f"{estimate.summary(est, result.wall_s)}"
        f"Open the UI: mlflow ui --backend-store-uri {tracking.tracking_uri()}"
    )
    return 0
