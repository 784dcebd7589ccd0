"""Analysis time on a real SQLite MLflow store: N stored trial runs with full histories -> query + fit + report.

Builds the store with ``sources.log_study`` (simulated quick-mode studies replicated with different seeds, each
run with a train/loss history of about ``--points`` values and 10 val/loss values), then times the steps of the
``analyze`` entry point. Prints one table; the goal in issue 4 is under 60 s for 1,000 runs.

    python benchmarks/analysis_bench.py --runs 100,1000 --bootstrap 200
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

from scaling_lab import analyze, report, sources, tracking  # noqa: E402


def build_store(folder: Path, n_runs: int, points: int) -> float:
    """Log ``n_runs`` simulated trial runs (32 per replica study) into ``folder``/mlflow.db; returns seconds."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    os.chdir(folder)
    t0 = time.perf_counter()
    done, seed = 0, 0
    while done < n_runs:
        sim = sources.simulate(seed=seed, noise=0.01)
        sim.runs = sim.runs.iloc[: n_runs - done].copy()
        sim.runs["run_id"] = [f"{r}-s{seed}" for r in sim.runs["run_id"]]
        sim.curves = {f"{k}-s{seed}": v for k, v in sim.curves.items()}
        sources.log_study(sim, "bench", f"rep{seed}", train_points=points)
        done += len(sim.runs)
        seed += 1
    return time.perf_counter() - t0


def time_analysis(folder: Path, bootstrap: int) -> dict[str, float]:
    cfg = analyze.AnalyzeConfig(experiment="bench", tags="scaling_lab.kind=trial", bootstrap=bootstrap,
                                out=str(folder / "report"), log=True)
    t = {}
    t0 = time.perf_counter()
    frame = tracking.runs_frame(["bench"], tags={"scaling_lab.kind": "trial"})
    t["query runs"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    ids = frame["run_id"].tolist()
    hist = tracking.metric_histories(ids, list(sources.HISTORY_KEYS))
    t["val/loss histories"] = time.perf_counter() - t1
    study = sources.from_frame(frame, hist, {"source": "mlflow"})
    t2 = time.perf_counter()
    results, objects = analyze.analyze_study(study, cfg)
    t["fits + bootstrap"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    report.write_report(results, objects, study, cfg.out)
    t["figures + report"] = time.perf_counter() - t3
    t["total (analyze)"] = time.perf_counter() - t0
    t4 = time.perf_counter()
    full = tracking.metric_histories(ids, ["train/loss"])
    t["train/loss full histories (extra)"] = time.perf_counter() - t4
    t["train/loss values read"] = float(sum(len(v["train/loss"]) for v in full.values()))
    t["runs"] = float(len(study.runs))
    t["a (total, approach 3)"] = results["conventions"]["total"]["approach3"]["a"]
    return t


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="100,1000", help="store sizes, comma-separated")
    p.add_argument("--points", type=int, default=500, help="train/loss values per run (full history)")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--dir", default=None, help="where to build the stores (e.g. /dev/shm: no fsync per commit, so "
                   "building 5,000 runs takes minutes, not an hour; the analysis reads the same SQLite file)")
    a = p.parse_args(argv)
    rows = []
    for n in (int(x) for x in a.runs.split(",")):
        with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
            build = build_store(Path(tmp), n, a.points)
            size = (Path(tmp) / "mlflow.db").stat().st_size / 2**20
            t = time_analysis(Path(tmp), a.bootstrap)
            rows.append((n, build, size, t))
            print(f"runs={n}: store built in {build:.0f} s ({size:.0f} MiB); "
                  + ", ".join(f"{k} {v:.2f}" for k, v in t.items()), flush=True)
    print(f"\n| stored runs | store MiB | query runs s | val/loss histories s | fits + bootstrap ({a.bootstrap}) s | "
          f"figures + report s | total s | train/loss histories s (values) |")
    print("|---|---|---|---|---|---|---|---|")
    for n, _build, size, t in rows:
        print(f"| {n} | {size:.0f} | {t['query runs']:.1f} | {t['val/loss histories']:.1f} | "
              f"{t['fits + bootstrap']:.1f} | {t['figures + report']:.1f} | {t['total (analyze)']:.1f} | "
              f"{t['train/loss full histories (extra)']:.1f} ({t['train/loss values read']:.0f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
