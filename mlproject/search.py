"""MLflow entry point `search`: Optuna isoFLOP studies, one per budget (see MLproject and docs/search.md)."""

import sys

from scaling_lab.search import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
