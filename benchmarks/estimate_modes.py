"""Measured training tokens/s and estimated wall time of each mode on this machine (the figures of
docs/estimate-and-doctor.md). Usage: python benchmarks/estimate_modes.py [modes...] [--dataset DIR]

Calibrates each mode's shape afresh (SCALING_LAB_RECALIBRATE=1 behaviour) on device=auto and prints one
table row per mode. Large shapes on a CPU are timed at one sequence and scaled (stated in the row)."""

from __future__ import annotations

import sys
import time

from scaling_lab import config, estimate


def main(argv: list[str]) -> int:
    dataset = ""
    if "--dataset" in argv:
        i = argv.index("--dataset")
        dataset = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    modes = argv or list(config.MODES)
    print("| mode | shape (L, d, T, V) | tokens | micro x accum | dtype | training tokens/s | step p90/median "
          "| estimated time | calibration took |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        over = {"mode": mode}
        if dataset and mode in ("tiny", "quick"):
            over |= {"dataset": dataset, "train_split": "test"}
        cfg = config.resolve(over)
        t = time.perf_counter()
        est = estimate.estimate_run(cfg, refresh=True)
        took = time.perf_counter() - t
        m, cal = cfg.model, est.calibration
        scaled = f" (timed at 1 seq, x{cal.micro_batch})" if cal.measured_batch != cal.micro_batch else ""
        print(f"| {mode} | {m.n_layer}, {m.n_embd}, {m.block_size}, {m.n_vocab} | {est.plan.tokens_trained:,} | "
              f"{est.micro_batch} x {est.grad_accum} | {est.dtype} | {est.tokens_per_s:,.0f}{scaled} | "
              f"{cal.spread:.1f} | {estimate.fmt_seconds(est.total_s)} | {took:.0f} s |", flush=True)
    print(f"\ndevice: {est.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
