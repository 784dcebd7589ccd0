"""The model family of the isoFLOP search: sizes about sqrt(2) apart in N_total, depth in long runs.

Pure functions, no torch; shapes follow ``scaling_lab.model.GPT`` and sizes ``scaling_lab.counting``.
``family(n_vocab, block_size)`` is the whole ladder for one embedding table (``n_vocab`` rows, as in
``config.n_vocab_for(vocab_size)``: 513 for vocab_size 512) and context length; it is deterministic and cached.

Design
  * Width: a multiple of the head dim, which grows with width (``head_dim``): 4 below d = 32, 8 below 128,
    16 below 256, 32 below 512, 64 from 512 on (GPT-2's). The 4-dim heads are a deliberate exception to
    "8 or 16": at small widths N_total ~ (n_vocab + block_size) d is linear in d, so sqrt(2) steps need the
    widths 4, 6, 8, 10, 12, 16, 20, 24, 28; 12, 20 and 28 do not split into 8-dim heads, and 6 and 10 (two
    heads of 3 and 5) not into 4-dim ones. The widths 4, 6 and 10 put two sizes below N_total ~ 10k at 513
    rows, so the smallest CPU budget (1e10 FLOPs, minimum near d = 12) is bracketed by two smaller sizes.
    The 32-dim band between the 16- and 64-dim ones keeps the width grain fine enough for sqrt(2) steps
    where N ~ 12 L d^2.
  * Depth: a step function of N_total (``depth_for``): 2 layers below 2^21 (2.1M), 4 below 2^24 (16.8M), 8
    below 2^27 (134M), 16 beyond. So it changes three times over 5k..1.07B, and never inside the CPU range where
    isoFLOP minima sit (N_total ~ 10k-200k at 513 rows, block 64: all 2-layer). Each band spans 8x in N_total,
    5-7 sizes. At least 2 layers: 1-layer models fall off the trend of L(N) (Kaplan et al. 2020, Sec. 3.1,
    Fig. 6). At vocab 257-513 this gives d_model / n_layer from ~50 to ~120 above d = 100 (loss is flat
    within a few percent over such aspect ratios, Kaplan et al. 2020, Fig. 5); GPT-2 small is 64.
  * Sizes: all widths 4..4096 at the depth of their band are the candidates; the ladder is the path from the
    smallest (d = 4, 2 layers) to the one nearest ``N_MAX`` = 2^30 (1.07B) whose neighbour ratios lie in
    [``R_MIN``, ``R_MAX``] = [1.2, 1.6] and are as close to sqrt(2) as the integer widths allow (least squares
    of log ratio - log sqrt(2), a shortest path). Placing each size independently at the nearest width to a
    grid point 2^(k/2) adds two rounding errors per ratio and leaves 1.23 and 1.68 steps at 513 rows; the
    path keeps every ratio in band. The first step (d 4 -> 6) may be up to ``R_FIRST`` = 1.85: no width lies
    between (1.66 at 257 rows, 1.60 at 513, 1.50 at 50257).

Achieved neighbour ratios at block 64 (first step / all others, min..max):
n_vocab 257: 1.66 / 1.250..1.577 (40 sizes, N_total 1.8k..1078M);
n_vocab 513: 1.60 / 1.268..1.550 (38 sizes, N_total 2.8k..1078M);
n_vocab 50257: 1.50 / 1.252..1.503 (26 sizes, N_total 201.8k..1077M).
Over n_vocab 257..50257 and block 8..2048 they stay within [1.25, 1.6] (tests). (Before the widths 4, 6, 10
were added the ladder started at d = 8; every size from there up is unchanged, only the indices moved.)

The first 20 sizes at n_vocab 513, block 64 (``table(513, 64, 20)``; N = non-embedding, N_total = all parameters):

     i  n_layer  n_head  n_embd  head_dim           N     N_total  ratio
     0        2       1       4         4         496       2,804
     1        2       2       6         3       1,032       4,494  1.603
     2        2       2       8         4       1,760       6,376  1.419
     3        2       2      10         5       2,680       8,450  1.325
     4        2       3      12         4       3,792      10,716  1.268
     5        2       4      16         4       6,592      15,824  1.477
     6        2       5      20         4      10,160      21,700  1.371
     7        2       6      24         4      14,496      28,344  1.306
     8        2       4      32         8      25,472      43,936  1.550
     9        2       5      40         8      39,520      62,600  1.425
    10        2       6      48         8      56,640      84,336  1.347
    11        2       7      56         8      76,832     109,144  1.294
    12        2       9      72         8     126,432     167,976  1.539
    13        2      11      88         8     188,320     239,096  1.423
    14        2      13     104         8     262,496     322,504  1.349
    15        2       8     128        16     396,800     470,656  1.459
    16        2      10     160        16     618,880     711,200  1.511
    17        2      12     192        16     890,112   1,000,896  1.407
    18        2      15     240        16   1,389,120   1,527,600  1.526
    19        4      13     208        16   2,087,904   2,207,920  1.445
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from scaling_lab.counting import n_params_nonembed, n_params_total

HEAD_DIMS = ((32, 4), (128, 8), (256, 16), (512, 32))  # (width below, head dim); 64 from 512 on
DEPTHS = ((2**21, 2), (2**24, 4), (2**27, 8))  # (N_total below, n_layer); 16 beyond
MIN_WIDTH, MAX_WIDTH = 4, 4096
ODD_BELOW = 12  # widths below this that are not multiples of 4 (6, 10) get two heads of d/2
N_MAX = 2**30  # the ladder ends at the size nearest 1.07B parameters (full mode needs ~100M)
R_MIN, R_MAX = 1.2, 1.6  # neighbour ratio N_total[i+1] / N_total[i]
R_FIRST = 1.85  # the step from the smallest size (see the module docstring)
STEP = math.log(math.sqrt(2.0))  # wanted log ratio between neighbours


@dataclass(frozen=True)
class Shape:
    """One size of the family: GPT shape and its parameter counts (``counting``; tied head counted once)."""

    n_layer: int
    n_head: int
    n_embd: int
    n_params: int
    """Non-embedding parameters N (Kaplan)."""
    n_params_total: int
    """All parameters, token and position embeddings included (Chinchilla)."""

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def head_dim(n_embd: int) -> int:
    """Head width for a model width: 4, 8, 16, 32 below d = 32, 128, 256, 512; 64 (GPT-2) from 512 on; d/2 for
    the smallest widths that are not multiples of 4 (6 -> 3, 10 -> 5)."""
    if n_embd < ODD_BELOW and n_embd % 4:
        return n_embd // 2
    for below, dim in HEAD_DIMS:
        if n_embd < below:
            return dim
    return 64


def depth_for(n_params_total: int) -> int:
    """Blocks for a size: 2 below 2^21 parameters, 4 below 2^24, 8 below 2^27, 16 beyond."""
    for below, n_layer in DEPTHS:
        if n_params_total < below:
            return n_layer
    return 16


def widths() -> list[int]:
    """Candidate widths MIN_WIDTH..MAX_WIDTH, each a multiple of its head dim: every even width below
    ODD_BELOW (4, 6, 8, 10), multiples of 4 from there on."""
    return [d for d in range(MIN_WIDTH, MAX_WIDTH + 1, 2)
            if (d < ODD_BELOW or d % 4 == 0) and d % head_dim(d) == 0]


def _shape(n_layer: int, n_embd: int, n_vocab: int, block_size: int) -> Shape:
    return Shape(n_layer, n_embd // head_dim(n_embd), n_embd, n_params_nonembed(n_layer, n_embd),
                 n_params_total(n_layer, n_embd, n_vocab, block_size))


def _path(sizes: list[int], start: int, end: int) -> list[int] | None:
    """Indices start..end into ascending ``sizes`` with every neighbour ratio in band, minimising the sum of
    (log ratio - log sqrt(2))^2 (shortest path in a DAG); None when no such path exists."""
    cost = [math.inf] * len(sizes)
    prev = [-1] * len(sizes)
    cost[start] = 0.0
    for j in range(start + 1, end + 1):
        for i in range(start, j):
            r = sizes[j] / sizes[i]
            if cost[i] < math.inf and R_MIN <= r <= (R_FIRST if i == start else R_MAX):
                c = cost[i] + (math.log(r) - STEP) ** 2
                if c < cost[j]:
                    cost[j], prev[j] = c, i
    if cost[end] == math.inf:
        return None
    out = [end]
    while out[-1] != start:
        out.append(prev[out[-1]])
    return out[::-1]


@functools.lru_cache(maxsize=64)
def family(n_vocab: int, block_size: int) -> tuple[Shape, ...]:
    """The ladder for ``n_vocab`` embedding rows and context ``block_size``, smallest first (see module doc)."""
    for name, v in (("n_vocab", n_vocab), ("block_size", block_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"parameter '{name}': got {v!r}; allowed: a positive integer")
    # every (depth, width) whose size falls in that depth's band, ascending in N_total
    cands = sorted((s for n_layer in (2, 4, 8, 16) for d in widths()
                    if depth_for((s := _shape(n_layer, d, n_vocab, block_size)).n_params_total) == n_layer),
                   key=lambda s: s.n_params_total)
    sizes = [s.n_params_total for s in cands]
    end = nearest(N_MAX, sizes)
    for start in range(end):  # the smallest model first; drop it only if no in-band path starts there
        path = _path(sizes, start, end)
        if path is not None:
            return tuple(cands[i] for i in path)
    raise ValueError(f"no model family within ratios [{R_MIN}, {R_MAX}] for n_vocab={n_vocab}, "
                     f"block_size={block_size}")


def shape_at(i: int, n_vocab: int, block_size: int) -> Shape:
    """Size ``i`` of ``family(n_vocab, block_size)`` (0 = smallest)."""
    sizes = family(n_vocab, block_size)
    if not 0 <= i < len(sizes):
        raise IndexError(f"family size {i}: the family for n_vocab={n_vocab}, block_size={block_size} "
                         f"has sizes 0..{len(sizes) - 1}")
    return sizes[i]


def nearest(target_n: float, sizes: Sequence[float]) -> int:
    """Index of the size nearest to ``target_n`` on a log scale (ties: the smaller)."""
    t = math.log(max(target_n, 1.0))
    return min(range(len(sizes)), key=lambda i: abs(math.log(sizes[i]) - t))


def table(n_vocab: int, block_size: int, rows: int | None = None) -> str:
    """The family as a text table (the module docstring holds ``table(513, 64, 20)``)."""
    lines = ["     i  n_layer  n_head  n_embd  head_dim           N     N_total  ratio"]
    sizes = family(n_vocab, block_size)
    for i, s in enumerate(sizes[:rows]):
        ratio = f"  {s.n_params_total / sizes[i - 1].n_params_total:.3f}" if i else ""
        lines.append(f"{i:6d}  {s.n_layer:7d}  {s.n_head:6d}  {s.n_embd:6d}  {s.head_dim:8d}  "
                     f"{s.n_params:10,d}  {s.n_params_total:10,d}{ratio}")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(table(int(sys.argv[1]) if len(sys.argv) > 1 else 513, int(sys.argv[2]) if len(sys.argv) > 2 else 64))
