"""MLflow entry point `analyze`: fit scaling laws to stored runs, a CSV or a simulation (see docs/analysis.md)."""

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny fits: one BLAS thread is fastest

from scaling_lab.analyze import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
