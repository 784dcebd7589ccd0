"""Design power (scaling_lab.power, analysis/design_power.py): simulated re-runs of a design under a known law,
refitted by Approaches 2 and 3. On the fixed ladder of tests/test_approach2.py."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_approach2 import A_TRUE, LABELS, C, D, N

from scaling_lab import laws, power, sources

ROOT = Path(__file__).resolve().parents[1]
LAW = laws.ChinchillaFit(**laws.HOFFMANN)


def test_noise_free_draws_give_back_the_law_exponent():
    s = power.design_spread(N, D, C, LABELS, LAW, noise=0.0, draws=2)
    a3, a2 = s["approach3"].summary(), s["approach2"].summary()
    assert a3["fitted"] == 1.0 and a3["median"] == pytest.approx(A_TRUE, abs=1e-3) and a3["width"] < 1e-3
    assert a2["fitted"] == 1.0 and a2["median"] == pytest.approx(A_TRUE, abs=0.02) and a2["width"] < 1e-3


def test_noisy_draws_spread_and_do_not_depend_on_the_processes():
    one = power.design_spread(N, D, C, LABELS, LAW, noise=0.02, draws=6, seed=3)
    two = power.design_spread(N, D, C, LABELS, LAW, noise=0.02, draws=6, seed=3, workers=2)
    for name in ("approach2", "approach3"):
        np.testing.assert_array_equal(one[name].a, two[name].a)
        m = one[name].summary()
        assert m["width"] > 0.001 and abs(m["bias"]) < 0.06  # 0.02 nats on 2-4 nat losses: a moves, not far
    other = power.design_spread(N, D, C, LABELS, LAW, noise=0.02, draws=6, seed=4, approaches=("approach3",))
    assert set(other) == {"approach3"} and not np.array_equal(other["approach3"].a, one["approach3"].a)


@pytest.mark.parametrize("kw, param", [({"noise": -0.1}, "noise"), ({"noise": float("nan")}, "noise"),
                                       ({"noise": 0.01, "draws": 0}, "draws"), ({"noise": 0.01, "seed": -1}, "seed"),
                                       ({"noise": 0.01, "approaches": ("approach9",)}, "approaches")])
def test_bad_arguments_name_the_parameter(kw, param):
    with pytest.raises(laws.FitError, match=f"parameter '{param}'"):
        power.design_spread(N, D, C, LABELS, LAW, **kw)


def test_script_on_a_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    sources.log_study(sources.simulate(seed=7, noise=0.01), "lab", "s1")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    script = [sys.executable, str(ROOT / "analysis" / "design_power.py"), "--experiment", "lab", "--tags", "study=s1"]
    ok = subprocess.run([*script, "--draws", "3", "--noise", "residual,0.01", "--fit_workers", "1"], env=env,
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    rows = [line.split() for line in ok.stdout.splitlines()[3:]]  # after the design, law and header lines
    assert len(rows) == 4 and [next(t for t in r if t.startswith("approach")) for r in rows] == [
        "approach2", "approach3"] * 2
    assert "fitted on the runs" in ok.stdout and "RMS residual" in ok.stdout
    for args, param in ((["--law", "1,2,3"], "law"), (["--noise", "seed"], "noise"), (["--noise", "-1"], "noise"),
                        (["--convention", "both"], "convention"), (["--seed", "-1"], "seed"),
                        (["--draws", "0"], "draws"), (["--fit_workers", "-1"], "fit_workers")):
        bad = subprocess.run([*script, *args], env=env, capture_output=True, text=True, timeout=600)
        assert bad.returncode == 2 and f"parameter '{param}'" in bad.stderr and "Traceback" not in bad.stderr
