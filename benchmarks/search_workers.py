"""Trials per hour of a tiny search with 1, 2 and 4 workers sharing one study on a private PostgreSQL cluster.

    SCALING_LAB_TEST_DATA=../shared/data/wikitext-2-raw-v1 TIKTOKEN_CACHE_DIR=../shared/data/tiktoken-cache \
        python benchmarks/search_workers.py --budgets 2e10 --pad 3 --workers 1,2,4

Starts PostgreSQL with tests/servers.py (Debian's postgresql binaries), times the whole `search` command per
worker count (start-up included) and counts COMPLETE + PRUNED trials.
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
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="2e10")
    ap.add_argument("--pad", default="3")
    ap.add_argument("--workers", default="1,2,4")
    args = ap.parse_args()

    import optuna
    from servers import SEARCH, Postgres, postgres_bindir

    data = os.environ["SCALING_LAB_TEST_DATA"]
    print(f"# {time.strftime('%Y-%m-%d')} {os.cpu_count()} cores; tiny search, budgets {args.budgets}, pad {args.pad}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)  # the postgres user must reach its data folder
        pg = Postgres(root / "pg", postgres_bindir()).start()
        try:
            for workers in (int(w) for w in args.workers.split(",")):
                url = pg.create_db(f"w{workers}")
                store = root / f"w{workers}"
                store.mkdir()
                cmd = [sys.executable, str(SEARCH), "--mode", "tiny", "--dataset", data, "--train_split", "test",
                       "--val_split", "validation", "--budgets", args.budgets, "--pad", args.pad, "--pruner", "none",
                       "--storage", url, "--workers", str(workers), "--experiment", "bench"]
                env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
                       "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
                t0 = time.perf_counter()
                r = subprocess.run(cmd, cwd=store, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if r.returncode:
                    sys.exit(r.stderr[-2000:])
                n = sum(t.state.name in ("COMPLETE", "PRUNED") for s in optuna.get_all_study_summaries(url)
                        for t in optuna.load_study(study_name=s.study_name, storage=url).get_trials())
                print(f"workers={workers}: {n} trials in {wall:.1f} s = {n / wall * 3600:.0f} trials/hour", flush=True)
        finally:
            pg.stop()


if __name__ == "__main__":
    main()
