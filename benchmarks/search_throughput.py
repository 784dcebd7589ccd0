"""Search throughput (issue 16): FLOPs trained per second of the search command's wall time, against this
machine's fp32 matmul peak measured in the same sitting.

    SCALING_LAB_TEST_DATA=../shared/data/wikitext-2-raw-v1 TIKTOKEN_CACHE_DIR=../shared/data/tiktoken-cache \
        python benchmarks/search_throughput.py            # quick, budgets=1e11, seeds included (minutes each)
    ... python benchmarks/search_throughput.py --smoke    # tiny, budgets=6e9, 2 seeds: seconds, checks it runs

Peak: the best of 20 torch 1024x1024 fp32 matmuls (2 * 1024^3 FLOPs each). Each variant runs the whole
``mlproject/search.py`` command (start-up included) in a fresh folder with its own Optuna and MLflow stores;
FLOPs are the sum over its trial runs of the last ``progress/flops_seen`` (what was trained, pruned trials
included; 6 N_total D under the default flops_rule). Variants: seed replicas stacked (the default) or not, and
the stacked search alone or beside a single-core busy loop (``python -c 'while True: pass'``). Run it on a
quiet machine: other jobs change every figure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEARCH = ROOT / "mlproject" / "search.py"


def matmul_peak(n: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of the best of ``repeats`` n x n fp32 matmuls (after one warm-up)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def trained_flops(store: Path) -> tuple[float, int]:
    """(sum of the last progress/flops_seen over the store's trial runs, how many trial runs)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id], max_results=5000)
            if r.data.tags.get("scaling_lab.kind") == "trial"]
    return sum(r.data.metrics.get("progress/flops_seen", 0.0) for r in runs), len(runs)


def run_search(args: list[str], root: Path, name: str, busy: bool, workers: int = 1) -> dict:
    """One search command in ``root/name``; with ``busy`` a single-core busy loop runs beside it; ``workers`` > 1
    share a journal storage (Optuna JournalStorage, one file: several workers on one machine)."""
    store = root / name
    store.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
           "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "PYTHONPATH": str(ROOT / "src")}
    storage = f"journal:///{store / 'optuna.log'}" if workers > 1 else f"sqlite:///{store / 'optuna.db'}"
    cmd = [sys.executable, str(SEARCH), *args, "--storage", storage, "--experiment", name, "--workers", str(workers)]
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=store, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if done.returncode != 0:
        raise SystemExit(f"{name}: search failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    flops, trials = trained_flops(store)
    return {"variant": name, "wall_s": wall, "flops": flops, "trials": trials}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny mode at budgets=6e9 with 2 seeds (seconds)")
    ap.add_argument("--budgets", default="", help="default: 1e11 (quick), 6e9 (smoke)")
    ap.add_argument("--variants", default="stacked,unstacked,stacked+busy,stacked+workers2",
                    help="comma-separated: stacked or unstacked, optionally +busy (a busy core beside it) and "
                         "+workers2 (two workers on a journal storage)")
    args = ap.parse_args()
    data = os.environ.get("SCALING_LAB_TEST_DATA", str(ROOT.parent / "shared" / "data" / "wikitext-2-raw-v1"))
    mode, budgets = ("tiny", args.budgets or "6e9") if args.smoke else ("quick", args.budgets or "1e11")
    base = ["--mode", mode, "--budgets", budgets, "--dataset", data, "--train_split", "test", "--val_split",
            "validation"] + (["--replicas", "2"] if args.smoke else [])  # quick's preset trains 2 extra seeds
    peak = matmul_peak()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {os.cpu_count()} CPUs; {mode} search, budgets {budgets}; "
          f"fp32 matmul peak (best of 20 1024^3) {peak / 1e9:.1f} GFLOP/s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            stack = "false" if variant.startswith("unstacked") else "true"
            rows.append(run_search([*base, "--stack_replicas", stack], Path(tmp), variant, "+busy" in variant,
                                   2 if "+workers2" in variant else 1))
            r = rows[-1]
            print(f"{r['variant']:<16} {r['trials']:>3} trials {r['wall_s']:>8.1f} s {r['flops']:>10.3e} FLOPs "
                  f"{r['flops'] / r['wall_s'] / 1e9:>8.2f} GFLOP/s {100 * r['flops'] / r['wall_s'] / peak:>6.2f}% of peak",
                  flush=True)
    by = {r["variant"]: r for r in rows}
    if "stacked" in by and "stacked+busy" in by:
        print(f"beside a busy core: {by['stacked+busy']['wall_s'] / by['stacked']['wall_s']:.2f}x the time alone "
              "(goal: at most 2.0x)")
    if "stacked" in by and "unstacked" in by:
        print(f"stacking: {by['unstacked']['wall_s'] / by['stacked']['wall_s']:.2f}x faster than unstacked")
    if "stacked" in by and "stacked+workers2" in by:
        print(f"two workers: {by['stacked']['wall_s'] / by['stacked+workers2']['wall_s']:.2f}x faster than one")


if __name__ == "__main__":
    main()
