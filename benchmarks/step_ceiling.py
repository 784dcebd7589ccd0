"""How close to the fp32 matmul peak can a one-budget quick search get on this CPU? For every size the search
trains at one budget, the FLOP rate of (1) a whole training step of the real model (forward, backward, clipping,
AdamW) and (2) the step's matrix products alone at the same shapes, timed back to back with nothing else: (2) is
a ceiling no change to the training loop can pass. Both against the peak measured in the same sitting (best of 20
torch 1024x1024 fp32 matmuls, as benchmarks/search_throughput.py).

    PYTHONPATH=src python benchmarks/step_ceiling.py                   # quick, budget 1e11, 1 and 2 threads
    PYTHONPATH=src python benchmarks/step_ceiling.py --budget 1e12 --threads 1

The products of one step, per layer (T = batch x block tokens, d = n_embd, h heads of d/h, t = block): q/k/v
T x d @ d x 3d, attention output T x d @ d x d, MLP T x d @ d x 4d and T x 4d @ 4d x d, and the attention scores
and values, (B h) batched t x d/h @ d/h x t and t x t @ t x d/h; then the head T x d @ d x V. The backward pass
does two products of the same size per forward product (input and weight gradients). FLOPs = 2 m k n each; the
FLOP rate of a step is its 6 N_total T (the search's flops_rule total) over its time, as the search counts it.
"""

from __future__ import annotations

import argparse
import time

import torch
from search_throughput import matmul_peak  # the peak as that benchmark measures it (run from benchmarks/)

from scaling_lab import counting, isoflop
from scaling_lab.config import ModelConfig
from scaling_lab.model import GPT


def products(cfg: ModelConfig, batch: int) -> list[tuple[int, int, int, int]]:
    """(batch count, m, k, n) of every forward product of one step."""
    T, d, t, hd = batch * cfg.block_size, cfg.n_embd, cfg.block_size, cfg.n_embd // cfg.n_head
    per_layer = [(1, T, d, 3 * d), (1, T, d, d), (1, T, d, 4 * d), (1, T, 4 * d, d),
                 (batch * cfg.n_head, t, hd, t), (batch * cfg.n_head, t, t, hd)]
    return per_layer * cfg.n_layer + [(1, T, d, cfg.n_vocab)]


def best_time(fn, seconds: float) -> float:
    for _ in range(3):
        fn()
    best, t0 = float("inf"), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        t1 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t1)
    return best


def gemm_time(cfg: ModelConfig, batch: int, seconds: float) -> tuple[float, float]:
    """(seconds of the step's products, forward and both backward ones; their FLOPs)."""
    ops = []
    for g, m, k, n in products(cfg, batch):
        a, b, gy = torch.randn(g, m, k), torch.randn(g, k, n), torch.randn(g, m, n)
        ops.append((a, b, gy))

    def run() -> None:
        for a, b, gy in ops:
            torch.bmm(a, b)  # forward
            torch.bmm(gy, b.transpose(1, 2))  # input gradient
            torch.bmm(a.transpose(1, 2), gy)  # weight gradient

    flops = sum(3 * 2 * g * m * k * n for g, m, k, n in products(cfg, batch))
    return best_time(run, seconds), flops


def step_time(cfg: ModelConfig, batch: int, seconds: float) -> float:
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    x = torch.randint(0, cfg.n_vocab, (batch, cfg.block_size))

    def run() -> None:
        _, loss = model(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return best_time(run, seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=1e11, help="the quick search budget whose sizes are timed")
    ap.add_argument("--threads", default="1,2", help="torch intra-op threads to time, comma-separated")
    ap.add_argument("--seconds", type=float, default=1.5, help="time per measurement (best step kept)")
    a = ap.parse_args()
    scfg = isoflop.resolve_search({"mode": "quick", "budgets": f"{a.budget:g}"})
    plan = isoflop.plan_budget(scfg, a.budget)
    print(f"# quick search, budget {a.budget:g}, sizes {plan.lo}..{plan.hi} of the family; torch {torch.__version__}")
    for threads in [int(x) for x in a.threads.split(",")]:
        torch.set_num_threads(threads)
        peak = matmul_peak()
        print(f"\n{threads} thread(s): fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (best of 20 1024^3)")
        print("| n_embd | N_total | batch | step ms | step GFLOP/s | % of peak | products ms | products % of peak |")
        print("|---|---|---|---|---|---|---|---|")
        for rung in range(plan.lo, plan.hi + 1):
            rc = isoflop.trial_config(scfg, a.budget, rung)
            m = rc.model
            n_total = counting.n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size)
            b = rc.train.batch_size
            step = step_time(m, b, a.seconds)
            gt, gflop = gemm_time(m, b, a.seconds)
            rate = 6 * n_total * b * m.block_size / step
            print(f"| {m.n_embd} | {n_total:,} | {b} | {step * 1e3:.2f} | {rate / 1e9:.2f} | {100 * rate / peak:.1f}% "
                  f"| {gt * 1e3:.2f} | {100 * gflop / gt / peak:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
