"""MLflow entry point `main`: train one configuration (see MLproject and README)."""

import sys

from scaling_lab.cli import main_train

if __name__ == "__main__":
    sys.exit(main_train(sys.argv[1:]))
