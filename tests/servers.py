"""Real processes and servers for the tests: launched training runs, `mlflow server`, a private PostgreSQL
cluster on a loopback port, and readers of a test's MLflow store. No mocks: each helper starts the real
program and waits for it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "mlproject" / "main.py"
SEARCH = ROOT / "mlproject" / "search.py"
PER_STEP = ("train/loss", "train/lr", "train/grad_norm", "progress/tokens_seen", "progress/flops_seen", "perf/step_time_ms",
            "perf/tokens_per_s")


# --------------------------------------------------------------------------- a test's MLflow store


def store_client(store: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{store / 'mlflow.db'}")


def all_runs(client: MlflowClient):
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id], max_results=5000)]


def store_runs(store: Path):
    """Every run in ``store``/mlflow.db ([] before the store exists)."""
    return all_runs(store_client(store)) if (store / "mlflow.db").exists() else []


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def assert_complete(client: MlflowClient, run_id: str) -> list[float]:
    """Every per-step metric holds steps 1..N exactly once (N = the run's planned steps), evaluations once each;
    returns the train/loss curve."""
    n = int(client.get_run(run_id).data.params["steps"])
    for key in PER_STEP:
        assert steps_of(client, run_id, key) == list(range(1, n + 1)), key
    val = steps_of(client, run_id, "val/loss")
    assert len(val) == len(set(val)) and val[-1] == n
    return [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]


def falls(losses: list[float]) -> bool:
    return sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 90) -> None:
    """Block until something accepts connections on 127.0.0.1:port (fail if ``proc`` dies first)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        time.sleep(0.25)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def env_for(store: Path, uri: str | None = None) -> dict[str, str]:
    """Environment of a launched process: the test's tracking store, no system-metrics thread."""
    return {**os.environ, "MLFLOW_TRACKING_URI": uri or f"sqlite:///{store / 'mlflow.db'}",
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "PYTHONUNBUFFERED": "1"}


def args_of(overrides: dict[str, str]) -> list[str]:
    return [x for k, v in overrides.items() for x in (f"--{k}", str(v))]


def launch(overrides: dict[str, str], store: Path, uri: str | None = None, cmd: list[str] | None = None,
           name: str = "proc", env: dict[str, str] | None = None):
    """Start ``main.py`` (or ``cmd``) with ``--name value`` flags in the background, in its own process group;
    stdout+stderr go to a log file in ``store``; ``env`` adds variables."""
    out = open(store / f"{name}-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 (closed by finish())
    proc = subprocess.Popen([*(cmd or [sys.executable, str(MAIN)]), *args_of(overrides)], cwd=store,
                            env={**env_for(store, uri), **(env or {})}, stdout=out, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    proc.log_path = out.name  # type: ignore[attr-defined]
    proc.log_file = out  # type: ignore[attr-defined]
    return proc


def output(proc) -> str:
    return Path(proc.log_path).read_text()


def finish(proc, timeout: float = 240) -> tuple[int, str]:
    """Wait for ``proc``; return (exit code, its output). Kills its process group on timeout."""
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.log_file.close()
    return rc, output(proc)


def wait_for(cond, proc, timeout: float = 180, what: str = ""):
    """Poll ``cond()`` until it returns something truthy; fail early if ``proc`` exits first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{output(proc)[-3000:]}")
        time.sleep(0.2)
    if proc is not None:
        proc.kill()
    pytest.fail(f"timed out waiting for {what}:\n{output(proc)[-3000:] if proc is not None else ''}")


class MlflowServer:
    """``mlflow server`` with a SQLite backend and an artifacts directory on a free loopback port.
    ``stop()``/``start()`` take it away and bring it back on the same port and store."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
               f"sqlite:///{self.folder / 'server.db'}", "--artifacts-destination", str(self.folder / "artifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.log = open(self.folder / "mlflow-server.log", "a")  # noqa: SIM115 (closed by stop())
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        self.proc = subprocess.Popen(cmd, cwd=self.folder, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        wait_port(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.log.close()
        self.proc = None


def postgres_bindir() -> Path | None:
    """Folder with initdb/pg_ctl: ``pg_config --bindir``, else the newest /usr/lib/postgresql/<v>/bin."""
    cands = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
        cands.append(Path(out))
    cands += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                    if p.parent.name.isdigit() else 0, reverse=True)
    for c in cands:
        if (c / "initdb").exists() and (c / "pg_ctl").exists():
            return c
    return None


class Postgres:
    """A private PostgreSQL cluster in ``folder`` on a free loopback port (trust auth, user ``postgres``).
    As root, initdb refuses to run: the cluster then belongs to the ``postgres`` system user."""

    def __init__(self, folder: Path, bindir: Path):
        self.bindir, self.port = bindir, free_port()
        self.data = folder / "pgdata"
        self.as_root = os.geteuid() == 0
        if self.as_root:  # the folder must be reachable and writable by postgres
            folder.mkdir(parents=True, exist_ok=True)
            for p in [folder, *folder.parents]:
                if p == Path("/"):
                    break
                os.chmod(p, os.stat(p).st_mode | 0o011)  # traverse only
            shutil.chown(folder, "postgres")

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        full = (["runuser", "-u", "postgres", "--"] if self.as_root else []) + list(cmd)
        return subprocess.run(full, capture_output=True, text=True, timeout=120)

    def start(self) -> Postgres:
        r = self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--no-sync")
        if r.returncode:
            raise RuntimeError(f"initdb failed: {r.stderr[-2000:]}")
        opts = f"-p {self.port} -h 127.0.0.1 -k {self.data} -c max_connections=200 -c fsync=off"
        r = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                      str(self.data / "server.log"), "-w", "-t", "60", "start")
        if r.returncode:
            raise RuntimeError(f"pg_ctl start failed: {r.stdout[-1000:]} {r.stderr[-1000:]}")
        return self

    def create_db(self, name: str) -> str:
        """Create database ``name``; return its SQLAlchemy URL."""
        r = self._run(str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        if r.returncode:
            raise RuntimeError(f"createdb failed: {r.stderr[-1000:]}")
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"  # SQLAlchemy 2.1 defaults to psycopg 3

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
