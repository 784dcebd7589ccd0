"""One torch thread or all of them, per shape (issue 16: spend the CPU on training): shapes of the quick search
(2 layers, block 64, vocabulary 513, batches as its plan gives them), timed side by side in one process at one
thread and at every physical core, for one GPT and for a stack of 3 seed replicas (StackedGPT).

    PYTHONPATH=src python benchmarks/threads_per_shape.py [--steps 60]

Prints milliseconds per whole training step (forward, backward, clipping at 1.0, FlatAdamW, zero_grad), the
better of 2 alternating rounds, and the ratio. Run it on a quiet machine: a second busy process distorts
exactly this.
"""

from __future__ import annotations

import argparse
import time

import torch

from scaling_lab import family, optim, runtime
from scaling_lab.config import ModelConfig, TrainConfig
from scaling_lab.model import GPT, StackedGPT

# (d, batch): the quick plan's sizes at its five budgets (search.py --mode quick --dry_run true)
SHAPES = ((8, 2), (16, 1), (16, 8), (24, 5), (24, 14), (32, 3), (32, 9), (40, 21), (48, 15), (56, 12), (72, 8))


def step_ms(d: int, batch: int, k: int, threads: int, steps: int) -> float:
    """Mean milliseconds per training step over ``steps`` steps at ``threads`` torch threads (after 10 warm-up)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shape = ModelConfig(n_layer=2, n_head=d // family.head_dim(d), n_embd=d, block_size=64, n_vocab=513)
    model = GPT(shape) if k == 1 else StackedGPT([GPT(shape) for _ in range(k)])
    params = list(model.parameters())
    opt = optim.adamw(model.param_groups(0.1), TrainConfig(), torch.device("cpu"), rows=k)
    lead = (k,) if k > 1 else ()
    x, y = torch.randint(0, 512, (*lead, batch, 64)), torch.randint(0, 512, (*lead, batch, 64))

    def one() -> None:
        _, loss = model(x, y)
        loss.sum().backward()
        optim.clip_grad_norm(opt, params, 1.0, rows=k)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(10):
        one()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="timed steps per cell")
    args = ap.parse_args()
    cores = runtime.physical_cores()
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, torch {torch.__version__}, {cores} physical "
          f"cores; ms per training step (better of 2 rounds), 1 thread against {cores}")
    print(f"{'d':>4} {'batch':>5} {'stack':>5} {'1 thread':>9} {f'{cores} threads':>10} {'1 vs all':>9}")
    for d, batch in SHAPES:
        for k in (1, 3):
            one, many = float("inf"), float("inf")
            for _ in range(2):
                one = min(one, step_ms(d, batch, k, 1, args.steps))
                many = min(many, step_ms(d, batch, k, cores, args.steps))
            print(f"{d:>4} {batch:>5} {k:>5} {one:>9.2f} {many:>10.2f} {many / one:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
