"""The `main` entry point: parameters in step with the config, bad inputs, and `mlflow run` end to end."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from servers import free_port

from scaling_lab import config, isoflop, projectspec, tracking
from scaling_lab.cli import main_train

ROOT = Path(__file__).resolve().parents[1]


def _args(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k}", str(v))]


def _runs(store_dir: Path):
    if not (store_dir / "mlflow.db").exists():
        return []
    client = MlflowClient(f"sqlite:///{store_dir / 'mlflow.db'}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_mlproject_is_generated_from_the_dataclasses():
    """MLproject = projectspec's text (tools/gen_mlproject.py writes it); MLflow reads it as we mean it."""
    from mlflow.projects._project_spec import load_project

    assert (ROOT / "MLproject").read_text() == projectspec.mlproject_text(), "run: python tools/gen_mlproject.py"
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    assert spec["python_env"] == "python_env.yaml" and (ROOT / "python_env.yaml").exists()
    project = load_project(str(ROOT))
    for entry, ep in projectspec.ENTRY_POINTS.items():
        declared = spec["entry_points"][entry]["parameters"]
        assert set(declared) <= set(ep.names)
        for name, p in declared.items():
            assert p["type"] in ("string", "int", "float", "path") and p["default"] not in ("", None), (entry, name)
            assert f"--{name} {{{name}}}" in spec["entry_points"][entry]["command"]
        # mlflow run logs what it substitutes: never '' for a declared parameter
        params, extra = project.get_entry_point(entry).compute_parameters({}, storage_dir=None)
        assert extra == {} and "" not in params.values() and "''" not in params.values()


def test_declared_parameters_are_exactly_the_mode_independent_fields():
    main = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["main"]["parameters"]
    defaults = config.field_defaults(config.RunConfig)
    for name in config.field_names():
        varies = any(name in preset and preset[name] != defaults[name] for preset in config.MODES.values())
        automatic = defaults[name] == ""
        assert (name in main) == (not varies and not automatic and name not in ("experiment", "flops", *projectspec.CONFIRMATIONS)), name
    assert {"n_embd", "tokens", "lr", "dataset", "resume", "run_name", "cache_dir"}.isdisjoint(main)
    assert main["seed"] == {"type": "int", "default": 1337} and main["grad_clip"] == {"type": "float", "default": 1.0}
    search = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["search"]
    assert set(search["parameters"]) == set(projectspec.parameters("search")) <= set(isoflop.SEARCH_FIELDS)
    assert "budgets" not in search["parameters"] and search["parameters"]["storage"]["default"] == "sqlite:///optuna.db"
    analyze = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["analyze"]["parameters"]
    assert "source" not in analyze and "csv" not in analyze  # csv= alone selects CSV input


def test_param_values_that_mean_the_same_are_not_logged_twice():
    assert tracking.same_param("2e6", "2000000") and tracking.same_param("1", "1.0")
    assert tracking.same_param("'/a b'", "/a b") and tracking.same_param("false", "false")
    assert tracking.same_param("0", "false") and not tracking.same_param("0.1", "0.2")
    assert not tracking.same_param("quick", "tiny")
    assert tracking.param_text(True) == "true" and tracking.param_text(None) == ""


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
    # the link opens the UI's model-training view (3.17 opens GenAI's otherwise) on this run
    assert f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning" in proc.stdout
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(1, int(run.data.params["steps"]) + 1))
    params = run.data.params
    assert params["mode"] == "tiny" and params["n_embd"] == "32"  # the value used, once, under the field name
    assert "" not in params.values() and "''" not in params.values(), {k: v for k, v in params.items() if v in ("", "''")}
    assert not [k for k in params if k.startswith("resolved.")]
    assert params["seed"] == "1337" and params["dataset"] == tiny["dataset"] and params["run_name"] == run.info.run_name
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40  # mlflow run's source tags
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
        assert float(run.data.params[name]) == 0.0, (name, run.data.params[name])


def _main_py(tiny: dict, cwd: Path, uri: str, extra: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT / "src")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "mlproject" / "main.py"), *_args({**tiny, **(extra or {})})],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["closed port", "silent server", "malformed"])
def test_unusable_tracking_store_fails_at_once_naming_the_variable(kind, tiny, tmp_path):
    """A store MLflow cannot parse, or a server that refuses or never answers: one line naming
    MLFLOW_TRACKING_URI, exit 2, well within 60 s, before anything is trained (no checkpoint written)."""
    with socket.socket() as silent:
        if kind == "silent server":  # accepts connections (the kernel's backlog) and never answers
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        else:
            uri = f"http://127.0.0.1:{free_port()}" if kind == "closed port" else "htp:/nowhere::"
        proc, took = _main_py(tiny, tmp_path, uri, {"checkpoint_dir": str(tmp_path / "ck")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "MLFLOW_TRACKING_URI" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and took < 60
    assert f"within {tracking.STORE_CHECK_S} s" in lines[0]
    assert not (tmp_path / "ck").exists() and not list(tmp_path.glob("*.db"))


@pytest.mark.slow
def test_two_first_runs_on_a_fresh_sqlite_store_both_finish(tiny, tmp_path):
    """Both processes open the store that does not exist yet at the same moment: it is created once, under a lock."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    (tmp_path / "fresh").mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT / "src"),
           "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    cmd = [sys.executable, str(ROOT / "mlproject" / "main.py"), *_args({**tiny, "tokens": "8192"})]
    procs = [subprocess.Popen([*cmd, "--checkpoint_dir", str(tmp_path / f"ck{i}")], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    runs = _runs(tmp_path / "fresh")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
