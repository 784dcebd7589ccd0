"""Warmup-stable-decay against cosine at the same N and D (issue 16.3: before a cooldown schedule may serve a
default, compare each cooldown's final loss with a full cosine run of the same N and D at several sizes).

    PYTHONPATH=src TIKTOKEN_CACHE_DIR=... python benchmarks/wsd_vs_cosine.py --dataset DIR [--budget 1e11]

Trains every size of the quick search's plan at one budget (its trials' shapes, tokens, lr and batch:
isoflop.trial_config) twice with the same seed, init and data order: schedule=cosine (the default) and
schedule=wsd (lr held after the warmup, then a 1 - sqrt cooldown over the last ``--cooldown_frac`` of the steps,
Hägele et al. 2024, arXiv:2405.18392), both ending at min_lr_ratio * lr. The middle size also trains with
``--seeds`` more seeds under each schedule, so the difference can be read against the seed-to-seed spread. Prints
final validation losses and the differences. A wsd run of D tokens is what a cooldown branched from a
constant-lr run at D·(1 - cooldown_frac) tokens trains (same steps, same lr at every step); branching several
budgets from one run per size is ``branching.train_branches``, measured by ``benchmarks/branched_cooldowns.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from scaling_lab import counting, isoflop
from scaling_lab.train import MemoryLogger, train


def final_loss(cfg) -> tuple[float, float]:
    """(final validation loss, seconds) of one in-memory run."""
    t0 = time.perf_counter()
    res = train(cfg, MemoryLogger(), progress=False)
    return res.val_loss, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, help="WikiText-2 raw folder (train on its test split offline)")
    ap.add_argument("--train_split", default="test")
    ap.add_argument("--budget", type=float, default=1e11, help="FLOP budget C (total rule)")
    ap.add_argument("--cooldown_frac", type=float, default=0.2)
    ap.add_argument("--seeds", type=int, default=2, help="extra seeds of the middle size under each schedule")
    args = ap.parse_args()
    scfg = isoflop.resolve_search({"mode": "quick", "dataset": args.dataset, "train_split": args.train_split})
    plan = isoflop.plan_budget(scfg, args.budget)
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; quick plan at C={args.budget:g}, "
          f"sizes d {plan.widths[plan.lo]}..{plan.widths[plan.hi]}; cooldown_frac {args.cooldown_frac}")
    print(f"{'d':>4} {'N_total':>8} {'tokens':>9} {'steps':>6} {'seed':>5} {'cosine':>8} {'wsd':>8} "
          f"{'wsd-cos':>8} {'rel %':>7}")
    mid = (plan.lo + plan.hi) // 2
    diffs, spread = [], {"cosine": [], "wsd": []}
    for rung in range(plan.lo, plan.hi + 1):
        for replica in range(1 + (args.seeds if rung == mid else 0)):
            cos = isoflop.trial_config(scfg, args.budget, rung, replica=replica)
            wsd = dataclasses.replace(cos, train=dataclasses.replace(cos.train, schedule="wsd",
                                                                     cooldown_frac=args.cooldown_frac))
            lc, _ = final_loss(cos)
            lw, _ = final_loss(wsd)
            m = cos.model
            n = counting.n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size)
            tokens = counting.tokens_for_flops(m, args.budget, scfg.flops_rule)
            steps = int(tokens // (cos.train.batch_size * m.block_size))
            if replica == 0:
                diffs.append((lw - lc) / lc)
            if rung == mid:
                spread["cosine"].append(lc)
                spread["wsd"].append(lw)
            print(f"{m.n_embd:>4} {n:>8,} {int(tokens):>9,} {steps:>6} {cos.train.seed:>5} {lc:>8.4f} {lw:>8.4f} "
                  f"{lw - lc:>+8.4f} {100 * (lw - lc) / lc:>+6.2f}%", flush=True)
    print(f"wsd - cosine over the {len(diffs)} sizes (first seed): mean {100 * statistics.mean(diffs):+.2f}%, "
          f"range {100 * min(diffs):+.2f}% .. {100 * max(diffs):+.2f}%")
    for name, v in spread.items():
        if len(v) > 1:
            print(f"seed-to-seed SD of the middle size under {name}: {statistics.stdev(v):.4f} "
                  f"({100 * statistics.stdev(v) / statistics.mean(v):.2f}%, {len(v)} seeds)")


if __name__ == "__main__":
    main()
