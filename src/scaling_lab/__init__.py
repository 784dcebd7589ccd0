"""scaling-lab: MLflow-tracked GPT training and Optuna isoFLOP search for measuring scaling laws."""

import os

# torch's OpenMP threads spin while they wait; beside one busy core that made a search 15x slower (issue 16).
# Passive unless the user chose; set here, before any entry point imports torch (libgomp reads it when it
# loads), and spawned workers inherit it. docs/scaling-out.md, "Threads".
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
