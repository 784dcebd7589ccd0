"""The quick demo: a study drawn from a known law plus noise at quick-mode sizes, analysed like real runs,
true against recovered parameters in the report. Extra flags as for analysis/fit.py (e.g. --noise 0.02).

    python analysis/simulate.py --out reports/simulated --log false
"""

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny fits: one BLAS thread is fastest

if __name__ == "__main__":  # the import too: the bootstrap's spawned processes re-run this file's top level
    from scaling_lab.cli import main_analyze

    sys.exit(main_analyze(["--source", "simulate", *sys.argv[1:]]))
