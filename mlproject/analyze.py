"""MLflow entry point `analyze`: fit scaling laws to stored runs, a CSV or a simulation (see docs/analysis.md)."""

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny fits: one BLAS thread is fastest

from scaling_lab.cli import main_analyze  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_analyze(sys.argv[1:]))
