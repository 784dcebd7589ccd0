"""MLflow entry point `tune`: lr and batch tuned per (size, budget) cell, the fitted rule written as JSON for a
search's hparams=<path> (see MLproject and docs/tuning.md)."""

import sys

from scaling_lab.cli import main_tune

if __name__ == "__main__":
    sys.exit(main_tune(sys.argv[1:]))
