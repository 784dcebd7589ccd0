"""scaling-lab: MLflow-tracked GPT training and Optuna isoFLOP search for measuring scaling laws."""

__version__ = "0.1.0"
