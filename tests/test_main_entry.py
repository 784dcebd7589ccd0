"""The `main` entry point: parameters in step with the config, bad inputs, and `mlflow run` end to end."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from scaling_lab import config
from scaling_lab.cli import main_train

ROOT = Path(__file__).resolve().parents[1]


def _args(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k}", str(v))]


def _runs(store_dir: Path):
    if not (store_dir / "mlflow.db").exists():
        return []
    client = MlflowClient(f"sqlite:///{store_dir / 'mlflow.db'}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_mlproject_main_parameters_match_config_and_cli():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    main = spec["entry_points"]["main"]
    assert list(main["parameters"]) == config.field_names()
    for name in config.field_names():
        assert f"--{name} {{{name}}}" in main["command"]
    assert spec["python_env"] == "python_env.yaml" and (ROOT / "python_env.yaml").exists()


BAD = [
    ({"mode": "huge"}, "mode"),
    ({"dataset": "/no/such/dir"}, "dataset"),
    ({"dataset": "wikitext-2"}, None),  # named dataset offline: DataUnavailable (checked below)
    ({"device": "tpu"}, "device"),
    ({"device": "cuda"}, "device"),  # no CUDA here
    ({"flops_rule": "palm"}, "flops_rule"),
    ({"n_layer": "-2"}, "n_layer"),
    ({"n_embd": "12.5"}, "n_embd"),
    ({"batch_size": "abc"}, "batch_size"),
    ({"tokens": "-5"}, "tokens"),
    ({"flops": "-1e12"}, "flops"),
    ({"n_embd": "30", "n_head": "4"}, "n_embd"),
    ({"tokens": "100"}, "tokens"),  # below one optimizer step
    ({"flops": "1e3"}, "flops"),
    ({"tokens": "40960", "flops": "1e12"}, "tokens/flops"),
    ({"val_split": "dev"}, "val_split"),
    ({"vocab_size": "70000"}, "vocab_size"),
    ({"resume": "0123456789abcdef"}, "resume"),
    ({"no_such_flag": "1"}, "no_such_flag"),
]


@pytest.mark.parametrize("bad,param", BAD)
def test_bad_input_one_clear_error_and_no_run_left(bad, param, tiny, store, capsys):
    code = main_train(_args({**tiny, **bad}))
    err = capsys.readouterr().err.strip()
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    if param:
        assert f"parameter '{param}'" in lines[0] and "allowed" in lines[0]
    else:
        assert "TIKTOKEN_CACHE_DIR" in lines[0] and "dataset=" in lines[0]
    statuses = [r.info.status for r in _runs(store)]
    assert "RUNNING" not in statuses and "FINISHED" not in statuses


def _mlflow_run(args: list[str], store: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
           "SCALING_LAB_CHECKPOINTS": str(store / "ck")}
    return subprocess.run([sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", *args],
                          cwd=store, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_mlflow_run_tiny_end_to_end(tiny, store):
    params = [x for k, v in {**tiny, "checkpoint_dir": str(store / "ck")}.items() for x in ("-P", f"{k}={v}")]
    proc = _mlflow_run(["--experiment-name", "e2e", *params], store)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FINISHED: val/loss" in proc.stdout
    runs = _runs(store)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(1, int(run.data.params["steps"]) + 1))
    assert run.data.params["mode"] == "tiny" and run.data.params["n_embd"] in ("", "''")  # as passed (mlflow logs the shell-quoted empty default)
    assert run.data.params["resolved.n_embd"] == "32"  # as used
    assert run.data.tags["mlflow.project.entryPoint"] == "main"
    assert run.data.tags["scaling_lab.kind"] == "train"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "e2e" and exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert [e.name for e in client.search_experiments()] in (["e2e", "Default"], ["Default", "e2e"])  # none empty


@pytest.mark.slow
def test_mlflow_run_experiment_param_that_mlflow_did_not_use_is_refused(tiny, store):
    params = [x for k, v in {**tiny, "experiment": "lab"}.items() for x in ("-P", f"{k}={v}")]
    proc = _mlflow_run(params, store)
    assert proc.returncode != 0  # the script's 2; mlflow run itself exits 1
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "parameter 'experiment'" in line and "--experiment-name lab" in line and "Traceback" not in proc.stderr
    assert [r.info.status for r in _runs(store)] == ["FAILED"]


@pytest.mark.slow
def test_mlflow_run_bad_input_marks_run_failed_with_reason(tiny, store):
    params = [x for k, v in {**tiny, "n_head": "3"}.items() for x in ("-P", f"{k}={v}")]
    proc = _mlflow_run(params, store)
    assert proc.returncode != 0
    assert "parameter 'n_embd'" in proc.stderr
    runs = _runs(store)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "n_embd" in runs[0].data.tags["error"]


ZEROS = {"seed": "0", "grad_clip": "0", "weight_decay": "0", "warmup_frac": "0"}


def test_explicit_zero_is_a_value_not_unset():
    """One parser for every entry point: '' or absent is unset, 0 is zero (seed 0, clipping off, no decay, no warmup)."""
    cfg = config.resolve({"mode": "tiny", **ZEROS})
    assert (cfg.train.seed, cfg.train.grad_clip, cfg.train.weight_decay, cfg.train.warmup_frac) == (0, 0.0, 0.0, 0.0)
    unset = config.resolve({"mode": "tiny", **{k: "" for k in ZEROS}})
    assert (unset.train.seed, unset.train.grad_clip, unset.train.weight_decay) == (1337, 1.0, 0.1)


@pytest.mark.slow
def test_mlflow_run_logs_explicit_zeros_as_zero(tiny, store):
    params = [x for k, v in {**tiny, **ZEROS, "checkpoint_dir": str(store / "ck")}.items() for x in ("-P", f"{k}={v}")]
    proc = _mlflow_run(params, store)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = _runs(store)
    for name in ZEROS:
        assert float(run.data.params[f"resolved.{name}"]) == 0.0, (name, run.data.params[f"resolved.{name}"])
