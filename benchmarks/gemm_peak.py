"""Matrix-multiply FLOP/s of this CPU in fp32 and bf16: a measured peak for MFU, and the rate the quick shape's
own matmuls reach. Prints one table.

    python benchmarks/gemm_peak.py

Rows: a large square GEMM (the practical peak) and the quick shape's matmuls with 2,048 tokens per step
(quick: n_embd 128, 4 layers, vocabulary 512 + 1): qkv 2048x128 @ 128x384, MLP up 2048x128 @ 128x512, MLP down
2048x512 @ 512x128, head 2048x128 @ 128x513. FLOPs = 2·m·k·n per product.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = {"square 2048": (2048, 2048, 2048), "qkv": (2048, 128, 384), "mlp up": (2048, 128, 512),
          "mlp down": (2048, 512, 128), "head (513)": (2048, 128, 513)}


def gflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b  # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2.0 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print("| matmul (m x k @ k x n) | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |")
    print("|---|---|---|---|")
    for name, (m, k, n) in SHAPES.items():
        f32 = gflops(m, k, n, torch.float32, a.seconds)
        b16 = gflops(m, k, n, torch.bfloat16, a.seconds)
        print(f"| {name} ({m}x{k} @ {k}x{n}) | {f32:.0f} | {b16:.0f} | {b16 / f32:.2f} |", flush=True)


if __name__ == "__main__":
    main()
