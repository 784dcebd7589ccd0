"""The ``doctor`` entry point on this offline machine: ready with local data and the offline tokenizer
cache, not ready (exit 1, with the fix) without them; unreachable stores reported as such."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scaling_lab import cli, data, doctor, projectspec

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(out: str, name: str) -> list[str]:
    return [ln for ln in out.splitlines() if re.match(rf"\s+\S+\s+{re.escape(name)}\b", ln)]


def test_mlproject_doctor_entry_matches_its_flags():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["doctor"]
    assert list(spec["parameters"]) == list(projectspec.parameters("doctor"))  # the rest: extra -P name=value
    assert set(spec["parameters"]) <= set(doctor.DOCTOR_FIELDS)
    for name in spec["parameters"]:
        assert f"--{name} {{{name}}}" in spec["command"]


def test_ready_offline_with_local_data_and_the_tokenizer_cache(data_dir, store, capsys):
    code = cli.main_doctor(["--mode", "tiny", "--dataset", str(data_dir), "--train_split", "test"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "FAIL" not in out and "doctor: ready for mode tiny" in out
    tok = _lines(out, "tokenizer")[0]
    assert tok.split()[0] == "ok" and "offline cache" in tok and "holds 2/2 gpt2 files" in tok
    assert "unreachable (offline)" in tok  # no network here: the cache is what makes it work
    ds = _lines(out, "dataset")[0]
    assert ds.split()[0] == "ok" and "wiki.test.raw" in ds
    tps = float(re.search(r"([\d,]+) training tokens/s measured now", out).group(1).replace(",", ""))
    assert tps > 0
    assert _lines(out, "tracking store")[0].split()[0] == "ok"


def test_not_ready_when_the_dataset_cannot_be_found(data_dir, store, capsys):
    code = cli.main_doctor(["--mode", "quick"])  # wikitext-2 from the hub, which is unreachable (HF_HUB_OFFLINE=1)
    out = capsys.readouterr().out
    assert code == 1
    ds = _lines(out, "dataset")
    assert ds[0].split()[0] == "FAIL" and "unreachable" in ds[0]
    fix = out.splitlines()[out.splitlines().index(ds[0]) + 1]
    assert "fix: pass dataset=" in fix
    assert "problem(s) for mode quick: dataset" in out

    code = cli.main_doctor(["--mode", "tiny", "--dataset", str(store / "no-such-dir")])
    out = capsys.readouterr().out
    assert code == 1 and "parameter 'dataset'" in _lines(out, "dataset")[0]


def test_unreachable_stores_fail_with_the_fix(monkeypatch, tmp_path):
    port = _free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    c = doctor.check_tracking("scaling-lab")
    assert c.status == "FAIL" and "mlflow server" in c.fix
    c = doctor.check_storage(f"postgresql://u:pw@127.0.0.1:{port}/optuna")
    assert c.status == "FAIL" and "pw" not in c.detail and "storage=" in c.fix
    c = doctor.check_storage(f"sqlite:///{tmp_path}/missing/folder/optuna.db")
    assert c.status == "FAIL" and "not writable" in c.detail
    ok = doctor.check_storage(f"sqlite:///{tmp_path}/optuna.db")
    assert ok.status == "ok" and not (tmp_path / "optuna.db").exists()  # checked, nothing created


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["empty", "unset"])
def test_tokenizer_reported_missing_without_the_offline_cache(cache, data_dir, tmp_path):
    if data.reachable(doctor.TIKTOKEN_HOST):
        pytest.skip("tiktoken's host is reachable here: the tokenizer would simply download")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    env.pop("TIKTOKEN_CACHE_DIR")
    if cache == "empty":
        env["TIKTOKEN_CACHE_DIR"] = str(tmp_path / "empty")
    else:  # tiktoken's default cache is <tmp>/data-gym-cache: point tmp at an empty folder
        env["TMPDIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "mlproject" / "doctor.py"), "--mode", "tiny",
                           "--dataset", str(data_dir), "--train_split", "test"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    tok = _lines(proc.stdout, "tokenizer")[0]
    assert tok.split()[0] == "FAIL" and "holds 0/2 gpt2 files" in tok and "unreachable (offline)" in tok
    assert ("TIKTOKEN_CACHE_DIR unset" in tok) == (cache == "unset")
    assert "fix: export TIKTOKEN_CACHE_DIR=" in proc.stdout
    assert "problem(s) for mode tiny: tokenizer" in proc.stdout
