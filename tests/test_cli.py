"""The ``scaling-lab`` console script: subcommands, --help built from the dataclass docstrings, bare boolean
flags; and analyze's ``csv=PATH`` selecting CSV input."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

from scaling_lab import analyze, cli, config, doctor, isoflop
from scaling_lab.errors import ConfigError
from scaling_lab.links import ui_hint

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "search", "analyze", "doctor")
# (names, dataclasses whose docstrings document them) of each subcommand
FLAGS = {
    "train": (config.field_names(), (config.RunConfig,)),
    "search": (isoflop.SEARCH_FIELDS, (isoflop.SearchConfig,)),
    "analyze": (analyze.field_names(), (analyze.AnalyzeConfig,)),
    "doctor": (doctor.DOCTOR_FIELDS, (config.RunConfig, isoflop.SearchConfig)),
}
CHOICES = {"train": [config.FLOPS_RULES, config.DEVICES, config.DTYPES, config.COMPILE_CHOICES],
           "search": [isoflop.SAMPLERS, isoflop.PRUNERS, config.FLOPS_RULES],
           "analyze": [analyze.SOURCES, analyze.CONVENTION_CHOICES], "doctor": [config.DEVICES, config.DTYPES]}


def _squash(text: str) -> str:
    return "".join(text.split())  # argparse wraps lines (and at hyphens): compare without whitespace


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_console_script_is_declared_and_points_at_cli_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["scaling-lab"].split(":")
    assert module == "scaling_lab.cli" and getattr(cli, func) is cli.main


def test_top_level_help_lists_each_subcommand_on_one_line(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        lines = [ln for ln in out.splitlines() if ln.split()[:1] == [name]]
        assert len(lines) == 1 and cli.SUMMARIES[name] in lines[0], out
    assert cli.main([]) == 2 and "commands:" in capsys.readouterr().err
    assert cli.main(["fly"]) == 2 and "unknown command 'fly'" in capsys.readouterr().err


def test_tune_is_a_subcommand_once_cli_defines_main_tune(monkeypatch, capsys):
    if not hasattr(cli, "main_tune"):  # the tuning stage adds it; until then a stand-in checks the dispatch
        def main_tune(argv: list[str]) -> int:
            """Fit the learning-rate and batch rule per size."""
            print("tuned", argv)
            return 0

        monkeypatch.setattr(cli, "main_tune", main_tune, raising=False)
    assert cli.main(["--help"]) == 0
    assert any(ln.split()[:1] == ["tune"] for ln in capsys.readouterr().out.splitlines())
    if cli.main_tune.__module__ == __name__:
        assert cli.main(["tune", "--mode", "tiny"]) == 0
        assert "tuned ['--mode', 'tiny']" in capsys.readouterr().out
    monkeypatch.delattr(cli, "main_tune")
    assert cli.main(["tune"]) == 2 and "unknown command 'tune'" in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help_shows_docstring_default_and_choices_of_every_flag(command, capsys):
    out = _help([command, "--help"], capsys)
    assert out.startswith(f"usage: scaling-lab {command}")
    names, owners = FLAGS[command]
    docs: dict[str, str] = {}
    for cls in reversed(owners):
        docs.update(config.field_docs(cls))
    flat = _squash(out)
    documented = [n for n in names if docs.get(n) and _squash(docs[n]) in flat]
    assert len(documented) >= 0.9 * len(names), sorted(set(names) - set(documented))
    assert all(f"--{n}" in out for n in names)
    for allowed in CHOICES[command]:
        assert _squash("one of: " + ", ".join(allowed)) in flat, allowed
    # defaults: the default mode's preset where it sets the field, else the dataclass default
    if command == "train":
        assert _squash("[default: 2000000 (mode quick") in flat and _squash("[default: total;") in flat
    if command == "analyze":
        assert "95%" in out and _squash("[default: true]") in flat  # % survives argparse; log's default


def test_field_docs_read_every_field_of_the_configs():
    for cls in (config.RunConfig, isoflop.SearchConfig, analyze.AnalyzeConfig):
        docs = config.field_docs(cls)
        assert set(config.types_of(cls)) <= set(docs), cls
    assert config.field_docs(config.TrainConfig)["lr"] == "Peak learning rate of AdamW."
    assert config.field_docs(isoflop.SearchConfig)["mode"].startswith("Search preset")  # its own, not RunConfig's


TRAIN = config.field_names()
OWNERS = (config.RunConfig,)


@pytest.mark.parametrize("argv,want", [
    (["--dry_run"], {"dry_run": "true"}),
    (["--dry_run", "--mode", "tiny"], {"dry_run": "true", "mode": "tiny"}),
    (["--mode", "tiny", "--dry_run", "--save_checkpoint"], {"mode": "tiny", "dry_run": "true",
                                                            "save_checkpoint": "true"}),
    (["--dry_run", "false", "--seed", "0"], {"dry_run": "false", "seed": "0"}),  # MLproject's --dry_run {dry_run}
    (["--dry_run", "", "--save_checkpoint", ""], {"dry_run": "", "save_checkpoint": ""}),  # empty = unset
    (["--dry_run=yes"], {"dry_run": "yes"}),
    (["--flops", "-1e12", "--dry_run"], {"flops": "-1e12", "dry_run": "true"}),  # negative values stay paired
    (["--save_checkpoint", "-1"], {"save_checkpoint": "-1"}),
])
def test_bare_boolean_flags_mean_true_and_values_stay_paired(argv, want):
    assert cli.parse(argv, TRAIN, "", OWNERS) == want


def test_a_non_boolean_flag_still_needs_its_value():
    with pytest.raises(ConfigError, match="parameter 'mode'"):
        cli.parse(["--mode"], TRAIN, "", OWNERS)
    assert cli.parse(["--flops", "--dry_run"], TRAIN, "", OWNERS) == {"flops": "--dry_run"}  # typed later: error


def test_negative_flops_after_a_bare_flag_gives_the_clear_error(tiny, store, capsys):
    argv = ["train", "--dry_run", *[x for k, v in tiny.items() for x in (f"--{k}", v)], "--flops", "-1e12"]
    assert cli.main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "parameter 'flops'" in err[0] and "allowed" in err[0]


def test_bare_dry_run_through_the_console_script_prints_the_plan(data_dir, store, capsys):
    code = cli.main(["train", "--mode", "tiny", "--dataset", str(data_dir), "--train_split", "test", "--dry_run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "dry run (tiny): nothing trained" in out and "n_layer 2" in out
    assert not (store / "mlruns").exists() or not any((store / "mlruns").rglob("meta.yaml"))


# --------------------------------------------------------------------------- analyze: csv= selects CSV input


@pytest.fixture
def small_csv(tmp_path) -> Path:
    """15 runs on 3 isoFLOP budgets drawn from a known Chinchilla-form law (1% noise)."""
    rng = np.random.default_rng(0)
    rows = []
    for c in (1e15, 1e16, 1e17):
        for n in np.geomspace(c ** 0.5 / 30, c ** 0.5 / 3, 5):
            d = c / (6 * n)
            loss = 1.7 + 400 / n ** 0.34 + 410 / d ** 0.28
            rows.append({"params": n, "tokens": d, "flops": c, "loss": loss * (1 + 0.01 * rng.standard_normal())})
    path = tmp_path / "runs.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_csv_alone_selects_csv_input(small_csv, tmp_path, store, capsys):
    assert analyze.parse_config({"csv": str(small_csv)}).source == "csv"
    assert analyze.parse_config({"csv": "", "source": ""}).source == "mlflow"
    out = tmp_path / "report"
    code = cli.main_analyze(["--csv", str(small_csv), "--log", "false", "--bootstrap", "0", "--out", str(out)])
    text = capsys.readouterr()
    assert code == 0, text.err
    fits = json.loads((out / "fits.json").read_text())
    assert fits["config"]["source"] == "csv" and "csv" in fits["conventions"]
    assert fits["provenance"]["csv"] == str(small_csv.resolve())


def test_csv_with_a_conflicting_source_is_one_error_naming_source(small_csv, store, capsys):
    code = cli.main_analyze(["--csv", str(small_csv), "--source", "simulate", "--log", "false"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(err) == 1 and "parameter 'source'" in err[0], err
    assert analyze.parse_config({"csv": str(small_csv), "source": "csv"}).source == "csv"



# --------------------------------------------------------------------------- MLproject: declared and extra -P


def test_mlflow_run_command_line_reaches_the_one_parser_with_extras(tmp_path):
    """What `mlflow run -P ...` executes: declared parameters (defaults filled in) then undeclared ones appended as
    --name value; the entry point's parser takes both, and the resolved config uses them."""
    import shlex
    import subprocess
    import sys

    from mlflow.projects._project_spec import load_project

    entry = load_project(str(ROOT)).get_entry_point("main")
    command = entry.compute_command({"mode": "tiny", "n_embd": "48", "n_head": "3", "run_name": "my run"}, str(tmp_path))
    argv = shlex.split(command)[argv_start(shlex.split(command)):]
    args = cli.parse(argv, config.field_names(), "", (config.RunConfig,))
    assert args["n_embd"] == "48" and args["run_name"] == "my run" and args["seed"] == "1337"
    cfg = config.resolve(args)
    assert (cfg.model.n_embd, cfg.model.n_head, cfg.train.grad_clip, cfg.mode) == (48, 3, 1.0, "tiny")
    gen = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_mlproject.py"), "--check"], capture_output=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""}, text=True)
    assert gen.returncode == 0, gen.stderr  # MLproject is what the generator writes


def argv_start(tokens: list[str]) -> int:
    """Index of the first flag after `python mlproject/main.py` in a shell-split command."""
    return tokens.index("mlproject/main.py") + 1


@pytest.mark.parametrize("uri,shown,hidden", [
    ("sqlite:////tmp/x/mlflow.db", "mlflow ui --backend-store-uri sqlite:////tmp/x/mlflow.db, then "
     "http://127.0.0.1:5000/#/experiments/7/runs/abc?workflowType=machine_learning", ""),
    ("http://host:5000/", "http://host:5000/#/experiments/7/runs/abc?workflowType=machine_learning", ""),
    ("https://ann:s3cret@host/mlflow", "https://host/mlflow/#/experiments/7/runs/abc?", "s3cret"),
    ("postgresql://ann:s3cret@db/mlflow", "--backend-store-uri postgresql://ann:***@db/mlflow, then", "s3cret"),
])
def test_ui_link_opens_the_model_training_view_and_never_shows_a_password(uri, shown, hidden):
    text = ui_hint("7", "abc", uri)
    assert shown in text and text.endswith("#/experiments/7/runs/abc?workflowType=machine_learning")
    assert not hidden or hidden not in text
