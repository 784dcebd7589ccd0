"""Per-step metric logging cost of RunLogger: local SQLite file vs an `mlflow server` over HTTP (loopback).

Starts its own `mlflow server` (SQLite backend) on a free port, then for each store times
  - one flush (log_batch) of a buffer holding k steps x 7 per-step metrics, and
  - the whole per-step cost in a loop of `steps` steps (log_metrics every step, the flush RunLogger does
    every `flush_secs`, here forced every k steps), divided by the steps.

    python benchmarks/logging_cost.py [--steps 2000] [--every 100]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEYS = ("train/loss", "train/lr", "train/grad_norm", "progress/tokens_seen", "progress/flops_seen", "perf/step_time_ms",
            "perf/tokens_per_s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(uri: str, steps: int, every: int) -> dict[str, float]:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from scaling_lab import tracking

    exp = tracking.setup("logging-cost")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = client.create_run(exp).info.run_id
    log = tracking.RunLogger(run_id, flush_secs=1e9, client=client)
    flushes = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        log.log_metrics({k: float(step) for k in KEYS}, step=step)
        if step % every == 0:
            tf = time.perf_counter()
            log.flush()
            flushes.append(time.perf_counter() - tf)
    log.flush()
    total = time.perf_counter() - t0
    client.set_terminated(run_id)
    stored = len(client.get_metric_history(run_id, "train/loss"))
    assert stored == steps, (stored, steps)
    return {"per_step_ms": 1000 * total / steps, "flush_ms_median": 1000 * statistics.median(flushes),
            "flush_ms_max": 1000 * max(flushes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100, help="steps per flush (RunLogger: every 10 s)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                   f"sqlite:///{folder / 'server.db'}", "--artifacts-destination",
                                   str(folder / "art"), "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(240):
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.5)
            os.chdir(folder)
            rows = {"sqlite (local file)": measure(f"sqlite:///{folder / 'local.db'}", a.steps, a.every),
                    "http (mlflow server, loopback)": measure(f"http://127.0.0.1:{port}", a.steps, a.every)}
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"{a.steps} steps x {len(KEYS)} metrics, one flush every {a.every} steps ({a.every * len(KEYS)} values)")
    print(f"{'store':32s} {'per step (ms)':>14s} {'flush median (ms)':>18s} {'flush max (ms)':>15s}")
    for name, r in rows.items():
        print(f"{name:32s} {r['per_step_ms']:14.3f} {r['flush_ms_median']:18.1f} {r['flush_ms_max']:15.1f}")


if __name__ == "__main__":
    main()
