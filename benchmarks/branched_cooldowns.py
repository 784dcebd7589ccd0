"""Cooldowns branched across budgets against full cosine runs of the same N and D (issue 16.3: before a reused
run may serve a default, the report compares each cooldown's final loss with a full cosine run of the same N and
D at several sizes and states the difference, and what the reuse saves).

    PYTHONPATH=src TIKTOKEN_CACHE_DIR=... python benchmarks/branched_cooldowns.py --dataset DIR \
        [--budgets 1e10,3e10,1e11] [--seeds 1]

For every size of the quick search's family that the quick plan trains at two or more of ``--budgets``, one
constant-lr trunk is trained with a wsd cooldown branched at each of those budgets' token counts
(``branching.train_branches``; Hägele et al. 2024, arXiv:2405.18392), and each (size, budget) point is trained
again alone under the default cosine schedule. Both use the size's lr from the search's rule, one batch per size
(the rule's batch at the size's smallest budget: a branch cannot change the batch) and a warmup of a fixed number
of steps (10% of the shortest run's steps). Prints each point's final validation loss both ways and the
difference, and each size's wall seconds both ways (nothing else should run meanwhile).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from scaling_lab import config, counting, isoflop
from scaling_lab.branching import train_branches
from scaling_lab.errors import ConfigError
from scaling_lab.train import MemoryLogger, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, help="WikiText-2 raw folder (train on its test split offline)")
    ap.add_argument("--train_split", default="test")
    ap.add_argument("--budgets", default="1e10,3e10,1e11", help="FLOP budgets C (total rule), comma-separated")
    ap.add_argument("--cooldown_frac", type=float, default=0.2)
    ap.add_argument("--seeds", type=int, default=1, help="seeds per size (each trains everything again)")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error(str(ConfigError("seeds", args.seeds, "a positive integer")))
    try:  # the search's and training's own checks: budgets, dataset, split, cooldown_frac
        scfg = isoflop.resolve_search({"mode": "quick", "dataset": args.dataset, "train_split": args.train_split,
                                       "budgets": args.budgets})
        budgets = scfg.budget_list()
        config.TrainConfig(schedule="wsd", cooldown_frac=args.cooldown_frac)
    except ConfigError as e:
        ap.error(str(e))
    at: dict[int, list[float]] = {}  # rung -> the budgets whose quick plan trains it
    for c in budgets:
        plan = isoflop.plan_budget(scfg, c)
        for rung in range(plan.lo, plan.hi + 1):
            at.setdefault(rung, []).append(c)
    rungs = sorted(r for r, cs in at.items() if len(cs) > 1)
    if not rungs:
        ap.error(str(ConfigError("budgets", args.budgets, "budgets whose quick plans share a size (nothing to "
                                 "branch otherwise), e.g. 1e10,3e10,1e11")))
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; quick family, budgets "
          f"{', '.join(f'{c:g}' for c in budgets)}; wsd cooldown_frac {args.cooldown_frac}, branched, against cosine")
    print(f"{'d':>4} {'N_total':>8} {'C':>6} {'tokens':>9} {'batch':>5} {'steps':>6} {'seed':>5} {'cosine':>8} "
          f"{'branch':>8} {'br-cos':>8} {'rel %':>7}")
    rel, secs = [], {"branched": 0.0, "cosine": 0.0}
    for rung in rungs:
        first = isoflop.trial_config(scfg, at[rung][0], rung)
        m = first.model
        n = counting.n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size)
        per_step = first.train.batch_size * m.block_size
        steps = [int(counting.tokens_for_flops(m, c, scfg.flops_rule) // per_step) for c in at[rung]]
        warmup = max(1, steps[0] // 10)
        for seed in range(first.train.seed, first.train.seed + args.seeds):
            base = dataclasses.replace(first.train, seed=seed, warmup_steps=warmup, flops=0.0)
            trunk = dataclasses.replace(first, train=dataclasses.replace(
                base, tokens=steps[-1] * per_step, schedule="wsd", cooldown_frac=args.cooldown_frac))
            t0 = time.perf_counter()
            branches = train_branches(trunk, steps)
            t_branched = time.perf_counter() - t0
            t_cos = 0.0
            for c, b in zip(at[rung], branches):
                t0 = time.perf_counter()
                cos = train(dataclasses.replace(first, train=dataclasses.replace(base, tokens=b.tokens)),
                            MemoryLogger(), progress=False)
                t_cos += time.perf_counter() - t0
                rel.append((b.val_loss - cos.val_loss) / cos.val_loss)
                print(f"{m.n_embd:>4} {n:>8,} {c:>6.0e} {b.tokens:>9,} {first.train.batch_size:>5} {b.steps:>6} "
                      f"{seed:>5} {cos.val_loss:>8.4f} {b.val_loss:>8.4f} {b.val_loss - cos.val_loss:>+8.4f} "
                      f"{100 * rel[-1]:>+6.2f}%", flush=True)
            secs["branched"] += t_branched
            secs["cosine"] += t_cos
            print(f"     d {m.n_embd} seed {seed}: branched {t_branched:.1f} s (trunk {steps[-1]} steps + "
                  f"{sum(b.steps - b.cooldown_from for b in branches[:-1])} cooldown steps), separate cosine runs "
                  f"{t_cos:.1f} s ({sum(steps)} steps): {t_cos / t_branched:.2f}x", flush=True)
    print(f"branch - cosine over {len(rel)} points: mean {100 * statistics.mean(rel):+.2f}%, "
          f"range {100 * min(rel):+.2f}% .. {100 * max(rel):+.2f}%")
    print(f"wall time: branched {secs['branched']:.1f} s, separate cosine runs {secs['cosine']:.1f} s "
          f"({secs['cosine'] / secs['branched']:.2f}x)")


if __name__ == "__main__":
    main()
