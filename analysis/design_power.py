"""Design power: how wide must an exponent's interval be on these runs' design? Redraws every run's final loss
from a law (default: Approach 3 fitted on the runs) plus noise, refits Approaches 2 and 3 as the analysis does
(Approach 2 with fewer draws for its weights: power.py), and prints each approach's spread of a over the draws.
At the seed-to-seed sd it is what that estimator gives on this design when the law holds and only that noise
remains; at the law's RMS residual, the case the runs measured.

    python analysis/design_power.py --tags scaling_lab.kind=trial --draws 100
    python analysis/design_power.py --tags scaling_lab.kind=trial --law 1.69,406.4,410.7,0.34,0.28 --noise 0.01
"""

import argparse
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny fits: one BLAS thread is fastest

import numpy as np  # noqa: E402

from scaling_lab import laws, power  # noqa: E402
from scaling_lab.analyze import CONVENTIONS, AnalyzeConfig, convention_data  # noqa: E402
from scaling_lab.errors import ConfigError  # noqa: E402
from scaling_lab.power import LAW_NAMES, parse_law, parse_noise  # noqa: E402
from scaling_lab.sources import load_mlflow  # noqa: E402


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="scaling-lab")
    p.add_argument("--tags", default="")
    p.add_argument("--parent_run", default="")
    p.add_argument("--convention", default="total", help="kaplan, total or exact (N and C of the runs)")
    p.add_argument("--law", default="", help="E,A,B,alpha,beta to draw from ('' = Approach 3 fitted on the runs)")
    p.add_argument("--noise", default="seed,residual", help="seed, residual and/or nats, comma-separated")
    p.add_argument("--draws", type=int, default=100, help="simulated re-runs of the design per noise level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit_workers", type=int, default=0, help="processes (0 = one per core), as analyze's")
    a = p.parse_args(argv)
    try:
        if a.convention not in CONVENTIONS:
            raise ConfigError("convention", a.convention, ", ".join(CONVENTIONS))
        if a.draws < 1:
            raise ConfigError("draws", a.draws, "a whole number >= 1")
        if a.seed < 0:
            raise ConfigError("seed", a.seed, "a whole number >= 0")
        cfg = AnalyzeConfig(experiment=a.experiment, tags=a.tags, parent_run=a.parent_run, log=False, bootstrap=0,
                            fit_workers=a.fit_workers)  # validates fit_workers; cores() reads it
        d = convention_data(load_mlflow(cfg, with_histories=False), a.convention, cfg, {})
        given = parse_law(a.law, d.k)
        law = given or laws.approach3(d.N, d.D, d.L, k=d.k)
        resid = float(np.sqrt(np.mean((d.L - law.loss(d.N, d.D)) ** 2)))
        levels = parse_noise(a.noise, d.seed_std, resid)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"design: {len(d.N)} runs, {d.n_budgets} budgets ({d.C.min():.3g} to {d.C.max():.3g} FLOPs), "
          f"{len(set(zip(d.labels, d.N)))} (budget, size) pairs; convention {a.convention}")
    print("law: " + ", ".join(f"{n} {getattr(law, n):.4g}" for n in LAW_NAMES) + f"; a = {law.a:.3f}"
          + (" (given)" if given else " (Approach 3 fitted on the runs"
             + (f"; on a bound: {', '.join(law.at_bounds)})" if law.at_bounds else ")"))
          + f"; RMS residual on the runs {resid:.4f} nats")
    print(f"{'noise':<22} {'approach':<10} {'true a':>6} {'median':>7} {'95% range':>16} {'width':>6} {'fitted':>7}")
    for label, sd in levels:
        spreads = power.design_spread(d.N, d.D, d.C, d.labels, law, sd, a.draws, a.seed, workers=cfg.cores())
        for name, s in spreads.items():
            m = s.summary()
            print(f"{label:<22} {name:<10} {s.truth:>6.3f} {m['median']:>7.3f} "
                  f"{'[' + format(m['lo'], '.3f') + ', ' + format(m['hi'], '.3f') + ']':>16} {m['width']:>6.3f} "
                  f"{m['fitted']:>7.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
