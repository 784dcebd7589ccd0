"""Addresses shown to users: the tracking URI in use, the same with its password hidden, and a link to a run in
the MLflow UI. Pure string functions (no store is contacted)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def masked(url: str) -> str:
    """``url`` with any password replaced by *** (for tags, reports and messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else ``sqlite:///<cwd>/mlflow.db`` (the project root under mlflow run)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri else f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def ui_hint(experiment_id: str, run_id: str, uri: str | None = None) -> str:
    """Where to see a run. MLflow 3.17's UI opens every experiment in its GenAI view unless the link asks for
    ``workflowType=machine_learning`` (its sidebar switch), whatever the experiment's kind tag says. A tracking
    server's address is shown without its user and password; any other store gets the ``mlflow ui`` command for
    it (password masked) and the UI's default address."""
    uri = uri or tracking_uri()
    path = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        web = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])).rstrip("/")
        return f"{web}/{path}"
    return f"mlflow ui --backend-store-uri {masked(uri)}, then http://127.0.0.1:5000/{path}"
