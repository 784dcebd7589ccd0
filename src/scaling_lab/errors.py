"""Every exception the library raises on purpose (no torch, no mlflow, no other scaling_lab import).

User mistakes (``ConfigError`` and its kin, ``DataUnavailable``) reach the user as one line with exit code 2;
the rest describe what happened to a run (see ``cli.py`` for the exit codes).
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """Bad input: the message names the parameter and what is allowed."""

    def __init__(self, param: str, value: Any, allowed: str):
        self.param = param
        super().__init__(f"parameter '{param}': got {value!r}; allowed: {allowed}")


class DataUnavailable(RuntimeError):
    """The data or tokenizer cannot be obtained (offline, no cache): the message says how to fix it."""


class NonFiniteLoss(RuntimeError):
    """Training or validation loss became NaN or inf; the run ends FAILED with this reason."""


class StopTraining(Exception):
    """Raised by an ``on_eval`` callback to end training early (Optuna pruning)."""


class Interrupted(Exception):
    """SIGINT/SIGTERM during training: a checkpoint was saved; the run ends KILLED."""


class TrackingUnavailable(RuntimeError):
    """The tracking store did not answer when metrics had to be written; they are kept in the checkpoint."""


class WorkersDied(RuntimeError):
    """Search worker processes died and left their study incomplete."""


class DataFileError(ConfigError):
    """A local data file that cannot serve its split (empty, binary, undecodable, no 'text' column, too short):
    the message names the file as given, the split and what is allowed."""

    def __init__(self, path: Any, split: str, problem: str, allowed: str):
        self.param = "dataset"
        ValueError.__init__(self, f"parameter 'dataset': file '{path}' (split '{split}') {problem}; allowed: {allowed}")
