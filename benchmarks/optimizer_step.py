"""Per-step overhead on the CPU, side by side in one process (issue 16: less overhead per step where it does not
change results): the training step with torch's foreach AdamW + clip_grad_norm_ against FlatAdamW
(scaling_lab.optim), and one validation pass (16,384 tokens) at the training micro-batch against
``runtime.eval_micro_batch``'s.

    PYTHONPATH=src python benchmarks/optimizer_step.py [--threads 1] [--steps 200] [--only step|eval]

For each shape (the quick search's 2-layer family at block 64, vocabulary 513, with the batches its fixed rule
gives) it times whole steps (forward, backward, clipping at 1.0, AdamW, zero_grad) of one GPT and of a stack of
3 seed replicas (StackedGPT), alternating the two optimizers twice and keeping the faster of each, and prints
milliseconds per step and the ratio. Both give the same numbers bit for bit (tests/test_optim.py). The validation
table times ``train.evaluate``'s loop over 256 windows of 64 tokens both ways (best of 3); the mean losses agree
to rounding (tests/test_train.py). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from scaling_lab import optim, runtime
from scaling_lab.config import ModelConfig, TrainConfig
from scaling_lab.model import GPT, StackedGPT

SHAPES = ((8, 2, 1), (12, 3, 1), (16, 4, 2), (24, 6, 5), (32, 4, 8), (48, 6, 8), (72, 9, 16))  # (d, heads, batch)


def step_ms(d: int, heads: int, batch: int, flat: bool, k: int, steps: int) -> float:
    """Mean milliseconds per training step over ``steps`` steps, after 20 warm-up steps."""
    torch.manual_seed(0)
    shape = ModelConfig(n_layer=2, n_head=heads, n_embd=d, block_size=64, n_vocab=513)
    model = GPT(shape) if k == 1 else StackedGPT([GPT(shape) for _ in range(k)])
    params = list(model.parameters())
    if flat:
        opt = optim.adamw(model.param_groups(0.1), TrainConfig(), torch.device("cpu"), rows=k)
    else:
        opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3, foreach=True)
    lead = (k,) if k > 1 else ()
    x, y = torch.randint(0, 512, (*lead, batch, 64)), torch.randint(0, 512, (*lead, batch, 64))

    def one() -> None:
        _, loss = model(x, y)
        loss.sum().backward()
        if flat:
            optim.clip_grad_norm(opt, params, 1.0, rows=k)
        elif k == 1:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        else:
            optim.clip_per_replica(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(20):
        one()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - t0) / steps * 1e3


@torch.no_grad()
def eval_ms(d: int, heads: int, micro: int, windows: int = 256) -> float:
    """Best of 3 passes over ``windows`` validation windows, ``micro`` per forward pass (ms)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=heads, n_embd=d, block_size=64, n_vocab=513)).eval()
    x, y = torch.randint(0, 512, (windows, 64)), torch.randint(0, 512, (windows, 64))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(0, windows, micro):
            model(x[i : i + micro], y[i : i + micro])[1].item()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a search worker on 2 cores: 1)")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    ap.add_argument("--only", choices=("step", "eval"), default=None, help="one of the two tables")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} torch {torch.__version__}, {args.threads} thread(s), "
          f"ms per training step (best of 2), block 64, vocabulary 513, 2 layers")
    if args.only != "eval":
        steps_table(args.steps)
    if args.only != "step":
        print("# validation pass, 16,384 tokens (256 x 64), ms (best of 3): training micro-batch against "
              "eval_micro_batch")
        print(f"{'d':>4} {'micro':>5} {'ms':>8} {'eval micro':>10} {'ms':>8} {'ratio':>6}")
        for d, heads, batch in SHAPES:
            em = runtime.eval_micro_batch(batch, 64)
            a, b = eval_ms(d, heads, batch), eval_ms(d, heads, em)
            print(f"{d:4d} {batch:5d} {a:8.1f} {em:10d} {b:8.1f} {a / b:6.2f}")


def steps_table(steps: int) -> None:
    print(f"{'model':>10} {'d':>4} {'batch':>5} {'foreach':>9} {'flat':>9} {'ratio':>6}")
    for k in (1, 3):
        for d, heads, batch in SHAPES:
            pairs = [(step_ms(d, heads, batch, False, k, steps), step_ms(d, heads, batch, True, k, steps))
                     for _ in range(2)]
            a, f = min(p[0] for p in pairs), min(p[1] for p in pairs)
            print(f"{'GPT' if k == 1 else f'stack of {k}':>10} {d:4d} {batch:5d} {a:9.2f} {f:9.2f} {a / f:6.2f}")


if __name__ == "__main__":
    main()
