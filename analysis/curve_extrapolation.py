"""Learning-curve extrapolation error over stored runs: fit L(step) = a·step^-b + c on the first part of each
validation curve and compare the predicted final loss with the measured one.

    python analysis/curve_extrapolation.py --experiment scaling-lab --fracs 0.3,0.5,0.7
"""

import argparse
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny fits: one BLAS thread is fastest

from scaling_lab.analyze import AnalyzeConfig, curve_extrapolation  # noqa: E402
from scaling_lab.sources import load_mlflow  # noqa: E402


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="scaling-lab")
    p.add_argument("--tags", default="")
    p.add_argument("--parent_run", default="")
    p.add_argument("--fracs", default="0.3,0.5,0.7", help="fitted fractions of each curve")
    a = p.parse_args(argv)
    study = load_mlflow(AnalyzeConfig(experiment=a.experiment, tags=a.tags, parent_run=a.parent_run, log=False))
    print(f"{'fit on first':>12} {'runs':>5} {'median |err|':>13} {'mean |err|':>11} {'max |err|':>10} "
          f"{'mean signed':>12} {'within 5%':>10}")
    for frac in (float(x) for x in a.fracs.split(",")):
        r = curve_extrapolation(study, frac)
        if not r["runs"]:
            print(f"{frac:>12.0%} {0:>5} ({r['note']})")
            continue
        print(f"{frac:>12.0%} {r['runs']:>5} {r['median_abs_rel_err']:>13.2%} {r['mean_abs_rel_err']:>11.2%} "
              f"{r['max_abs_rel_err']:>10.2%} {r['mean_rel_err']:>+12.2%} {r['within_5pct']:>10.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
