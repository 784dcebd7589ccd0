"""Data speed: tokenization (MB/s) of a text folder through scaling_lab.data, and the cached load time.

    python benchmarks/data_speed.py --dataset ../shared/data/wikitext-2-raw-v1 --split test --vocab_sizes 512,50257

Each vocabulary size is tokenized into a fresh cache folder (cold), then loaded again (cached).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--vocab_sizes", default="256,512,1024,50257")
    args = ap.parse_args()

    from scaling_lab import config, data

    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cores; dataset {args.dataset} "
          f"split {args.split}")
    with tempfile.TemporaryDirectory() as cache:  # first use imports datasets and starts tiktoken's threads
        t0 = time.perf_counter()
        data.load_tokens(config.DataConfig(dataset=args.dataset, vocab_size=256, cache_dir=cache), args.split)
        print(f"(first load in this process, imports included: {time.perf_counter() - t0:.2f} s; not counted below)")
    print(f"{'vocab':>6s} {'MB':>6s} {'tokens':>10s} {'bytes/tok':>9s} {'cold s':>7s} {'MB/s':>6s} {'cached s':>9s}")
    for v in (int(x) for x in args.vocab_sizes.split(",")):
        with tempfile.TemporaryDirectory() as cache:
            cfg = config.DataConfig(dataset=args.dataset, vocab_size=v, cache_dir=cache)
            data.get_encoding(v, cfg.tokenizer)  # building the truncated encoding is not tokenization
            t0 = time.perf_counter()
            split = data.load_tokens(cfg, args.split)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = data.load_tokens(cfg, args.split)
            _ = int(again.ids[-1])  # touch the memmap
            cached = time.perf_counter() - t0
            mb = split.n_bytes / 1e6
            print(f"{v:6d} {mb:6.2f} {len(split.ids):10,d} {split.n_bytes / len(split.ids):9.2f} {cold:7.2f} "
                  f"{mb / cold:6.1f} {cached:9.4f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
