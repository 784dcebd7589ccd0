"""Shared fixtures: the offline data (handed in by .ci/run through environment variables) and a
temporary MLflow store per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# torch's OpenMP threads spin-wait by default; on a shared 2-core machine that stalls steps for seconds
# (measured: 80 tiny steps 10-13 s vs 1.8-4.3 s passive). Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATA_DIR = Path(os.environ.get("SCALING_LAB_TEST_DATA", SHARED / "wikitext-2-raw-v1"))
TIKTOKEN_DIR = Path(os.environ.get("TIKTOKEN_CACHE_DIR", SHARED / "tiktoken-cache"))


@pytest.fixture(scope="session", autouse=True)
def _offline_env(tmp_path_factory):
    """Offline tokenizer cache and a session-wide token cache (first tokenization is shared)."""
    if not (TIKTOKEN_DIR / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").exists():
        pytest.exit(f"offline tiktoken cache not found at {TIKTOKEN_DIR}; set TIKTOKEN_CACHE_DIR", returncode=3)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(TIKTOKEN_DIR)
    os.environ.setdefault("SCALING_LAB_CACHE", str(tmp_path_factory.mktemp("token-cache")))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = "false"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_RUN_ID", None)
    yield


@pytest.fixture
def data_dir() -> Path:
    """WikiText-2 raw valid and test files (the train split is not available offline)."""
    assert (DATA_DIR / "wiki.test.raw").exists(), f"offline WikiText-2 not found at {DATA_DIR}"
    return DATA_DIR


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """Run in a fresh folder with its own SQLite store (mlflow.db) and mlruns/."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.fixture
def tiny(data_dir) -> dict[str, str]:
    """Overrides for a seconds-long real run on the offline text (train on the test split)."""
    return {"mode": "tiny", "dataset": str(data_dir), "train_split": "test", "val_split": "validation"}
