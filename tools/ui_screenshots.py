"""Screenshots of the MLflow UI for one run, in a real headless browser (docs/ui-screenshots.md).

Starts ``mlflow ui`` on the store, opens the runs table, the run's Overview and Model metrics tabs and the
experiment's Models page in the model-training view, and writes one PNG per page. Needs Playwright
(``pip install playwright``) and a Chromium binary (Debian: ``apt-get install chromium``); neither is a project
dependency.

    python tools/ui_screenshots.py --store sqlite:///mlflow.db --run RUN_ID --out docs/ui
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient
from playwright.sync_api import sync_playwright


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, timeout_s: float = 60) -> None:
    end = time.time() + timeout_s
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"error: mlflow ui did not answer at {url} within {timeout_s:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="tracking URI of the store (e.g. sqlite:///mlflow.db)")
    ap.add_argument("--run", required=True, help="run id to show")
    ap.add_argument("--out", default="docs/ui", help="folder for the PNGs")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    ap.add_argument("--wait_s", type=float, default=12, help="seconds each page gets to draw its charts")
    a = ap.parse_args()
    exp = MlflowClient(a.store).get_run(a.run).info.experiment_id
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", a.store,
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    q = "?workflowType=machine_learning"  # the sidebar's "Model training" switch; 3.17 opens GenAI without it
    pages = {"runs_table": f"#/experiments/{exp}/runs{q}", "run_overview": f"#/experiments/{exp}/runs/{a.run}{q}",
             "run_model_metrics": f"#/experiments/{exp}/runs/{a.run}/model-metrics{q}",
             "models": f"#/experiments/{exp}/models{q}"}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        wait_up(base)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=a.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 2000, "height": 1400})
            for name, path in pages.items():
                page.goto(f"{base}/{path}")
                page.wait_for_load_state("load")
                page.wait_for_timeout(a.wait_s * 1000)  # the UI polls, so the network never goes idle
                page.screenshot(path=str(out / f"{name}.png"))
                print(f"{out / name}.png  {base}/{path}")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
