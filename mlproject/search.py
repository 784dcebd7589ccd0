"""MLflow entry point `search`: Optuna isoFLOP studies, one per budget (see MLproject and docs/search.md)."""

import sys

from scaling_lab.cli import main_search

if __name__ == "__main__":
    sys.exit(main_search(sys.argv[1:]))
