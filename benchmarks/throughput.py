"""Training throughput: the platform's loop against a plain PyTorch loop of the same shape.

For one shape (quick or standard) and each precision/compile variant, runs in a fresh subprocess:
  plain     a minimal GPT forward/backward/AdamW loop written here, directly in PyTorch (no scaling_lab);
  platform  scaling_lab.train.train() with an in-memory logger (the real loop: data, schedule, clipping,
            per-step metrics, evaluation only at the end).
Prints tokens/s, achieved FLOP/s under each counting rule, peak RSS, and the platform/plain ratio.

    python benchmarks/throughput.py --shape quick --dataset ../shared/data/wikitext-2-raw-v1
    python benchmarks/throughput.py --shape standard --batch_size 8 --steps 6 --dataset ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

VARIANTS = {  # name -> (dtype, compile)
    "fp32-eager": ("fp32", False),
    "bf16-eager": ("bf16", False),
    "fp32-compile": ("fp32", True),
    "bf16-compile": ("bf16", True),
}


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def plain_loop(shape: dict, dtype: str, compile_on: bool, warmup: int, steps: int, seed: int = 0) -> dict:
    """A minimal GPT of the given shape trained on random tokens; seconds per step after warmup."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(seed)
    L, H, d, T, V, B = (shape[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "n_vocab", "batch_size"))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (z.view(b, t, H, d // H).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(d, 2))
            x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, d), nn.Embedding(T, d)
            self.blocks = nn.Sequential(*[Block() for _ in range(L)])
            self.ln = nn.LayerNorm(d)
            nn.init.normal_(self.wte.weight, std=0.02)  # GPT-2 init; N(0, 1) would make tied logits huge

        def forward(self, idx, tgt):
            x = self.blocks(self.wte(idx) + self.wpe(torch.arange(idx.shape[1])))
            logits = self.ln(x) @ self.wte.weight.T  # tied head, (b, t, V)
            return F.cross_entropy(logits.float().view(-1, V), tgt.view(-1))

    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, foreach=True)
    fwd = torch.compile(net) if compile_on else net
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cpu", enabled=False)
    times, losses = [], []
    t_first = time.perf_counter()
    for i in range(warmup + steps):
        x = torch.randint(0, V, (B, T))
        y = torch.randint(0, V, (B, T))
        ts = time.perf_counter()
        with ctx:
            loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if i >= warmup:
            times.append(time.perf_counter() - ts)
        if i == warmup - 1:
            warm_s = time.perf_counter() - t_first
    return {"s_per_step": sum(times) / len(times), "warmup_s": warm_s, "final_loss": losses[-1]}


def platform_loop(shape: dict, dtype: str, compile_on: bool, warmup: int, steps: int, dataset: str,
                  train_split: str) -> dict:
    """scaling_lab.train.train() on real text; mean step time over the steps after warmup."""
    from scaling_lab import config
    from scaling_lab.train import MemoryLogger, train

    over = {"mode": shape["mode"], "n_layer": shape["n_layer"], "n_head": shape["n_head"], "n_embd": shape["n_embd"],
            "block_size": shape["block_size"], "vocab_size": shape["vocab_size"], "batch_size": shape["batch_size"],
            "micro_batch": shape["batch_size"], "tokens": (warmup + steps) * shape["batch_size"] * shape["block_size"],
            "dtype": dtype, "compile": "true" if compile_on else "false", "eval_every": warmup + steps,
            "eval_tokens": shape["block_size"] * 4, "dataset": dataset, "train_split": train_split,
            "device": "cpu", "checkpoint_dir": os.environ.get("TMPDIR", "/tmp") + "/bench-ckpt"}
    cfg = config.resolve({k: str(v) for k, v in over.items()})
    log = MemoryLogger()
    t0 = time.perf_counter()
    res = train(cfg, log, progress=False)
    step_ms = [v for s, v in log.history("perf/step_time_ms") if s > warmup]
    return {"s_per_step": sum(step_ms) / len(step_ms) / 1000, "wall_s": time.perf_counter() - t0,
            "final_loss": res.history[-1]}


def child(args: argparse.Namespace) -> None:
    shape = json.loads(args.child_shape)
    dtype, compile_on = VARIANTS[args.child_variant]
    if args.child_kind == "plain":
        out = plain_loop(shape, dtype, compile_on, args.warmup, args.steps)
    else:
        out = platform_loop(shape, dtype, compile_on, args.warmup, args.steps, args.dataset, args.train_split)
    out["peak_rss_mib"] = _peak_rss_mib()
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="quick", choices=["quick", "standard"])
    ap.add_argument("--batch_size", type=int, default=0, help="sequences per step (0 = the mode's)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dataset", required=True, help="local text folder (e.g. WikiText-2 raw)")
    ap.add_argument("--train_split", default="test")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--child_kind", help=argparse.SUPPRESS)
    ap.add_argument("--child_variant", help=argparse.SUPPRESS)
    ap.add_argument("--child_shape", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_kind:
        return child(args)

    import torch

    from scaling_lab import config, counting

    cfg = config.resolve({"mode": args.shape})
    m = cfg.model
    shape = {"mode": args.shape, "n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd,
             "block_size": m.block_size, "vocab_size": cfg.data.vocab_size, "n_vocab": m.n_vocab,
             "batch_size": args.batch_size or cfg.train.batch_size}
    tok_per_step = shape["batch_size"] * shape["block_size"]
    fpt = {r: counting.flops_per_token(m, r) for r in ("kaplan", "total", "chinchilla")}
    print(f"# {time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()} {os.cpu_count()} cores, "
          f"torch {torch.__version__}; shape {args.shape}: {shape}; {args.warmup} warmup + {args.steps} timed steps")
    print(f"{'variant':14s} {'loop':8s} {'tok/s':>9s} {'GFLOP/s kaplan':>14s} {'total':>7s} {'chinch':>7s} "
          f"{'warm s':>7s} {'RSS MiB':>8s} {'loss':>6s}")
    rows = []
    for variant in args.variants.split(","):
        got = {}
        for kind in ("plain", "platform"):
            cmd = [sys.executable, __file__, "--child_kind", kind, "--child_variant", variant, "--child_shape",
                   json.dumps(shape), "--warmup", str(args.warmup), "--steps", str(args.steps), "--dataset",
                   args.dataset, "--train_split", args.train_split]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{variant:14s} {kind:8s} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(line[0][7:])
            tps = tok_per_step / r["s_per_step"]
            got[kind] = tps
            warm = r.get("warmup_s", r.get("wall_s", math.nan))
            print(f"{variant:14s} {kind:8s} {tps:9,.0f} {tps * fpt['kaplan'] / 1e9:14.1f} "
                  f"{tps * fpt['total'] / 1e9:7.1f} {tps * fpt['chinchilla'] / 1e9:7.1f} {warm:7.1f} "
                  f"{r['peak_rss_mib']:8.0f} {r['final_loss']:6.3f}", flush=True)
            rows.append({"variant": variant, "loop": kind, "tokens_per_s": tps, **r})
        if len(got) == 2:
            print(f"{'':14s} platform / plain = {got['platform'] / got['plain']:.3f}")
    base = [r["tokens_per_s"] for r in rows if r["variant"] == "fp32-eager" and r["loop"] == "plain"]
    if base:
        for r in rows:
            if r["loop"] == "platform":
                print(f"platform {r['variant']:14s} / plain fp32-eager = {r['tokens_per_s'] / base[0]:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
