"""The search's model family: sqrt(2) steps in N_total, long depth runs, counts against the real module."""

import dataclasses
import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest

import scaling_lab
from scaling_lab import counting, family
from scaling_lab.config import ModelConfig, n_vocab_for

VOCABS = [257, 513, 50257]  # embedding rows: vocab_size 256, 512, all of GPT-2
SWEEP = [(v, s) for v in (257, 331, 513, 1025, 8193, 50257) for s in (1, 16, 64, 256, 1024, 2048)]


def _ratios(sizes):
    return [b.n_params_total / a.n_params_total for a, b in zip(sizes, sizes[1:])]


def _runs(sizes):
    return [(n_layer, len(list(g))) for n_layer, g in itertools.groupby(sizes, key=lambda s: s.n_layer)]


@pytest.mark.parametrize("n_vocab", VOCABS)
def test_neighbours_are_about_sqrt2_apart(n_vocab):
    sizes = family.family(n_vocab, 64)
    r = _ratios(sizes)
    assert r[0] <= family.R_FIRST  # d 4 -> 6: no width between
    assert all(1.25 <= x <= 1.6 for x in r[1:]), r
    assert math.exp(sum(map(math.log, r[1:])) / len(r[1:])) == pytest.approx(math.sqrt(2), rel=0.03)
    assert sizes[0].n_embd == 4 and sizes[-1].n_params_total == pytest.approx(family.N_MAX, rel=0.1)


@pytest.mark.parametrize("n_vocab,block_size", SWEEP)
def test_family_invariants_over_vocabularies_and_contexts(n_vocab, block_size):
    sizes = family.family(n_vocab, block_size)
    r = _ratios(sizes)
    assert r[0] <= family.R_FIRST and all(family.R_MIN <= x <= family.R_MAX for x in r[1:]), r
    runs = _runs(sizes)
    assert all(n >= 4 for _, n in runs), runs  # depth constant over >= 4 neighbours
    assert [n_layer for n_layer, _ in runs] == sorted({n_layer for n_layer, _ in runs})  # grows, never back
    assert len(runs) <= 4  # three depth changes at most over 5k..1.07B
    for s in sizes:
        assert s.n_embd % s.n_head == 0 and s.head_dim == family.head_dim(s.n_embd) in (3, 4, 5, 8, 16, 32, 64)
        assert s.head_dim >= 4 or s.n_embd < family.ODD_BELOW
        assert s.n_layer == family.depth_for(s.n_params_total)
        assert s.n_params == counting.n_params_nonembed(s.n_layer, s.n_embd)
        assert s.n_params_total == counting.n_params_total(s.n_layer, s.n_embd, n_vocab, block_size)
        ModelConfig(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd, block_size=block_size, n_vocab=n_vocab)


def test_no_depth_change_where_cpu_minima_sit():
    """isoFLOP minima on CPU: N_total ~ 10k-200k at 513 rows, block 64. One depth there, with sizes around."""
    sizes = family.family(n_vocab_for(512), 64)
    inside = [s for s in sizes if 10_000 <= s.n_params_total <= 200_000]
    assert len(inside) >= 8 and {s.n_layer for s in inside} == {2}
    assert sizes[0].n_params_total < 10_000 and any(s.n_layer == 2 and s.n_params_total > 400_000 for s in sizes)


@pytest.mark.parametrize("n_vocab,index", [(257, 0), (257, 9), (513, 1), (513, 13), (513, 16), (50257, 0)])
def test_parameter_counts_match_the_module(n_vocab, index):
    torch = pytest.importorskip("torch")
    from scaling_lab.model import GPT

    s = family.shape_at(index, n_vocab, 64)
    with torch.device("meta"):  # shapes only, no init cost
        model = GPT(ModelConfig(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd, block_size=64, n_vocab=n_vocab))
    assert sum(p.numel() for p in model.parameters()) == s.n_params_total  # tied head counted once
    embed = model.wte.weight.numel() + model.wpe.weight.numel()
    assert s.n_params_total - embed == s.n_params


def test_docstring_table_is_current():
    assert family.table(513, 64, 20) in family.__doc__


def test_deterministic_cached_frozen_and_lookups():
    a = family.family(513, 64)
    assert family.family(513, 64) is a and family.family.cache_info().hits >= 1
    family.family.cache_clear()
    assert family.family(513, 64) == a and isinstance(a, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a[0].n_embd = 9
    totals = [s.n_params_total for s in a]
    assert [family.nearest(n, totals) for n in totals] == list(range(len(a)))
    assert family.nearest(1, totals) == 0 and family.nearest(1e12, totals) == len(a) - 1
    assert family.nearest(math.sqrt(totals[3] * totals[4]) * 1.01, totals) == 4
    assert family.shape_at(3, 513, 64) == a[3]
    with pytest.raises(IndexError, match="sizes 0.."):
        family.shape_at(len(a), 513, 64)
    with pytest.raises(ValueError, match="n_vocab"):
        family.family(0, 64)
    assert family.family(16, 8)  # a toy vocabulary still gets a family


def test_module_is_pure():
    src = str(Path(scaling_lab.__file__).resolve().parents[1])
    code = "import sys, scaling_lab.family as f; f.family(513, 64); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": src})
