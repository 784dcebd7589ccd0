"""Cooldowns branched from one constant-lr trunk give the runs a wsd run of each length trains alone (issue 16.3)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaling_lab import branching, config
from scaling_lab.branching import cooldown_start, train_branches
from scaling_lab.errors import ConfigError
from scaling_lab.train import MemoryLogger, lr_at, train


def test_cooldown_start_is_where_lr_at_leaves_the_peak():
    tc = config.TrainConfig(schedule="wsd", warmup_steps=5, cooldown_frac=0.2)
    for steps in (6, 7, 20, 101, 500):
        lrs = [lr_at(i, steps, 1.0, 0.0, 0.1, 5, 0, "wsd", 0.2) for i in range(steps)]
        k = cooldown_start(steps, tc)
        assert all(lr == pytest.approx(min(1.0, (i + 1) / 5)) for i, lr in enumerate(lrs[:k]))  # warmup, then peak
        assert all(lr < 1.0 for lr in lrs[k:]) and (k == steps or lrs[-1] == pytest.approx(0.1))


def test_each_branch_is_the_wsd_run_of_its_length(tiny, monkeypatch):
    """Three lengths from one trunk: each branch's per-step losses, lrs and final validation loss are those of a
    schedule=wsd run of that many steps trained alone (same seed), and the trunk is shared, not retrained."""
    cfg = config.resolve({**tiny, "tokens": "61440", "schedule": "wsd", "warmup_steps": "6", "lr": "2e-3"})
    steps = [24, 40, cfg.train.tokens // (cfg.train.batch_size * cfg.model.block_size)]
    seen, trained = [], []
    real_step = branching.train_step
    monkeypatch.setattr(branching, "train_step", lambda s, step, stop: trained.append(step) or real_step(s, step, stop))
    branches = train_branches(cfg, [steps[2], steps[0], steps[1]], seen.append)  # any order: shortest first back
    assert [b.steps for b in branches] == steps and seen == branches
    # optimizer steps trained: the longest run once, plus each shorter branch's cooldown
    assert len(trained) == steps[2] + sum(b.steps - b.cooldown_from for b in branches[:2])
    for b in branches:
        alone_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, tokens=b.tokens))
        alone = train(alone_cfg, MemoryLogger(), progress=False)
        assert alone.steps == b.steps and len(b.history) == b.steps
        assert b.history == pytest.approx(alone.history, rel=1e-6, abs=1e-6)  # same ops in the same order
        lrs = [lr_at(i, b.steps, 2e-3, 0.1, cfg.train.min_lr_ratio, 6, 0, "wsd", 0.2) for i in range(b.steps)]
        assert b.lrs == pytest.approx(lrs, rel=1e-12)
        assert b.val_loss == pytest.approx(alone.val_loss, rel=1e-6)
        assert b.cooldown_from == cooldown_start(b.steps, cfg.train)
    # the branches part where their schedules do: same losses up to the shorter one's cooldown, then not
    short, long_ = branches[0], branches[2]
    k = short.cooldown_from
    assert short.history[:k] == long_.history[:k] and short.history[k:] != long_.history[k:short.steps]
    assert short.val_loss != long_.val_loss


@pytest.mark.parametrize("overrides, steps, names", [
    ({"schedule": "cosine", "warmup_steps": "4"}, [10], ["schedule", "wsd"]),
    ({"schedule": "wsd"}, [10], ["warmup_steps", "fixed warmup"]),
    ({"schedule": "wsd", "warmup_steps": "4", "schedule_steps": "30"}, [10], ["schedule_steps"]),
    ({"schedule": "wsd", "warmup_steps": "4"}, [10, 10], ["steps", "distinct"]),
    ({"schedule": "wsd", "warmup_steps": "4"}, [3], ["steps", "4..40"]),
    ({"schedule": "wsd", "warmup_steps": "4"}, [41], ["steps", "4..40"]),
])
def test_a_configuration_that_cannot_branch_is_named(tiny, overrides, steps, names):
    cfg = config.resolve({**tiny, "tokens": "20480", **overrides})  # 40 steps of 8 x 64 tokens
    with pytest.raises(ConfigError) as e:
        train_branches(cfg, steps)
    assert all(n in str(e.value) for n in names), str(e.value)


def test_benchmark_script_names_a_bad_flag(data_dir):
    """benchmarks/branched_cooldowns.py: one line naming the parameter, exit 2, no traceback, before any training."""
    script = [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "branched_cooldowns.py"),
              "--dataset", str(data_dir)]
    for args, param in ((["--budgets", "1e10,abc"], "budgets"), (["--budgets", "1e10"], "budgets"),
                        (["--seeds", "0"], "seeds"), (["--cooldown_frac", "1.5"], "cooldown_frac")):
        bad = subprocess.run([*script, *args], env=os.environ, capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and f"parameter '{param}'" in bad.stderr, bad.stderr[-2000:]
        assert "Traceback" not in bad.stderr and bad.stdout == ""
