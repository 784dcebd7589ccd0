"""MLflow entry point `analyze`: fit scaling laws to stored runs, a CSV or a simulation (see docs/analysis.md)."""

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny fits: one BLAS thread is fastest

if __name__ == "__main__":  # the import too: the bootstrap's spawned processes re-run this file's top level
    from scaling_lab.cli import main_analyze

    sys.exit(main_analyze(sys.argv[1:]))
