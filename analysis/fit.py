"""Fit scaling laws and write the report: the same as `mlflow run . -e analyze` (flags: see --help).

    python analysis/fit.py --experiment scaling-lab --tags study=quick
    python analysis/fit.py --source csv --csv chinchilla.csv --columns params=N,tokens=D,loss=L --log false
"""

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny fits: one BLAS thread is fastest

if __name__ == "__main__":  # the import too: the bootstrap's spawned processes re-run this file's top level
    from scaling_lab.cli import main_analyze

    sys.exit(main_analyze(sys.argv[1:]))
