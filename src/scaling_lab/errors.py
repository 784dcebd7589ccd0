"""Exceptions shared by the loop and the tracker (no torch, no mlflow)."""


class NonFiniteLoss(RuntimeError):
    """Training or validation loss became NaN or inf; the run ends FAILED with this reason."""


class StopTraining(Exception):
    """Raised by an ``on_eval`` callback to end training early (Optuna pruning)."""


class Interrupted(Exception):
    """SIGINT/SIGTERM during training: a checkpoint was saved; the run ends KILLED."""


class TrackingUnavailable(RuntimeError):
    """The tracking store did not answer when metrics had to be written; they are kept in the checkpoint."""
