"""One run per size, several budgets: ``train_branches(cfg, steps)`` trains one constant-lr trunk and branches a
warmup-stable-decay cooldown at each requested length (issue 16.3; Hägele et al. 2024, "Scaling Laws and
Compute-Optimal Training Beyond Fixed Training Durations", arXiv:2405.18392, Sec. 4: one run at a constant lr
with cooldowns taken from it stands in for a family of fixed-length runs).

A branch of S steps trains exactly what a ``schedule=wsd`` run of S steps trains: the same initialisation, the
same batches (a pure function of seed, step and micro index), and at every step the same lr, since its steps up
to the cooldown's start are the trunk's (warmup, then the peak) and its cooldown is that run's. That needs a
warmup of a fixed number of steps (``warmup_steps``): a warmup that is a fraction of the run would differ per
length. Each branch costs its cooldown (``cooldown_frac`` of its steps) and one evaluation; the trunk is paid
once, up to the last branch's cooldown. Local datasets load whole, so a branch also sees the same text as the
run alone; a streamed split loads the longest branch's tokens, a longer prefix than a shorter run would read.

No mlflow import: the caller logs each ``Branch`` (``on_branch``), as ``train`` takes a logger.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from scaling_lab import runtime
from scaling_lab.config import RunConfig, TrainConfig
from scaling_lab.errors import ConfigError, Interrupted, NonFiniteLoss
from scaling_lab.train import MemoryLogger, Session, evaluate, setup, train_step


@dataclass
class Branch:
    """One cooldown taken from the trunk: what a wsd run of ``steps`` steps ends with."""

    steps: int
    """Optimizer steps of the branch (trunk steps included)."""
    tokens: int
    """Tokens trained: steps x batch_size x block_size."""
    val_loss: float
    """Validation loss (nats/token) after the branch's last step."""
    cooldown_from: int
    """Steps taken from the trunk (0-based steps before this one ran at warmup or peak lr)."""
    seconds: float
    """Wall seconds of the cooldown and its evaluation (the trunk's are shared and not counted)."""
    history: list[float] = field(default_factory=list)
    """train/loss of steps 1..steps (the trunk's, then the cooldown's)."""
    lrs: list[float] = field(default_factory=list)
    """Learning rate of steps 1..steps."""


def cooldown_start(steps: int, tc: TrainConfig) -> int:
    """Steps of a wsd run of ``steps`` steps that run at warmup or peak lr, i.e. the ones it shares with a trunk:
    the 0-based index of its first cooldown step (``train.lr_at``'s rule; ``steps`` when it has no cooldown)."""
    if steps - 1 <= tc.warmup_steps:
        return steps
    return max(tc.warmup_steps, steps - 1 - round(tc.cooldown_frac * steps)) + 1


def check_branches(cfg: RunConfig, steps: list[int], trunk_steps: int) -> None:
    """A branchable configuration (schedule wsd, a fixed warmup, no resume) and lengths from its warmup to its own
    steps."""
    tc = cfg.train
    if tc.schedule != "wsd":
        raise ConfigError("schedule", tc.schedule, "wsd (only a warmup-stable-decay run has a constant-lr trunk)")
    if tc.warmup_steps < 1:
        raise ConfigError("warmup_steps", tc.warmup_steps,
                          "a fixed warmup of at least 1 step (a warmup_frac warmup differs per branch length)")
    if tc.schedule_steps:
        raise ConfigError("schedule_steps", tc.schedule_steps, "0 (each branch's schedule ends at its own last step)")
    if tc.resume:
        raise ConfigError("resume", tc.resume, "no resume for branched runs")
    lo = tc.warmup_steps
    if not steps or any(not isinstance(n, int) or n < lo or n > trunk_steps for n in steps) \
            or len(set(steps)) != len(steps):
        raise ConfigError("steps", steps, f"distinct whole step counts in {lo}..{trunk_steps} (warmup_steps to the "
                          "run's own steps)")


def train_branches(cfg: RunConfig, steps: list[int], on_branch: Callable[[Branch], None] | None = None) -> list[Branch]:
    """Train ``cfg`` (schedule=wsd, warmup_steps > 0) as one trunk and branch a cooldown at each length in
    ``steps`` (each at most cfg's own steps). Returns the branches shortest first; ``on_branch`` sees each as it
    ends. Raises ConfigError for a configuration that cannot branch, NonFiniteLoss, or Interrupted on a signal."""
    s = setup(cfg, MemoryLogger())
    check_branches(cfg, steps, s.plan.steps)
    if s.world > 1:
        raise ConfigError("nproc", s.world, "1 process (branched runs do not run under torchrun)")
    done, losses, lrs, out = 0, [], [], []  # trunk steps done; their losses (on the device) and lrs
    with runtime.stop_on_signals() as stop:
        for n in sorted(steps):
            _at_length(s, n)
            start = cooldown_start(n, cfg.train)
            while done < start:  # the trunk: warmup, then the peak lr (the same under every branch's schedule)
                done = _step(s, done, losses, lrs, stop)
            t0 = time.perf_counter()
            saved = copy.deepcopy((s.model.state_dict(), s.optimizer.state_dict(), torch.get_rng_state()))
            b_losses, b_lrs, k = list(losses), list(lrs), done
            while k < n:  # the cooldown, on a copy of the trunk's lists
                k = _step(s, k, b_losses, b_lrs, stop)
            hist = torch.stack(b_losses).float().tolist() if b_losses else []  # one host sync per branch
            bad = next((i + 1 for i, v in enumerate(hist) if not math.isfinite(v)), 0)
            if bad:
                raise NonFiniteLoss(f"train/loss is {hist[bad - 1]} at step {bad} (branch of {n} steps)")
            val = evaluate(s)
            if not math.isfinite(val):
                raise NonFiniteLoss(f"val/loss is {val} at the end of the branch of {n} steps")
            b = Branch(n, n * s.plan.tokens_per_step, val, start, time.perf_counter() - t0, hist, b_lrs)
            out.append(b)
            if on_branch is not None:
                on_branch(b)
            s.model.load_state_dict(saved[0])  # back to the trunk (in place: the flat optimizer's views hold)
            s.optimizer.load_state_dict(saved[1])
            torch.set_rng_state(saved[2])
    return out


def _at_length(s: Session, n: int) -> None:
    """Schedule every following step as a wsd run of ``n`` steps would (its cooldown ends at step n)."""
    s.cfg = dataclasses.replace(s.cfg, train=dataclasses.replace(s.cfg.train, schedule_steps=n))


def _step(s: Session, step: int, losses: list[torch.Tensor], lrs: list[float], stop) -> int:
    """One optimizer step (0-based ``step``), its loss kept on the device; returns the steps done."""
    loss, _, lr = train_step(s, step, stop)
    losses.append(loss)
    lrs.append(lr)
    if stop.is_set():
        raise Interrupted(f"signal at step {step + 1} of a branched run (branches in memory are lost)")
    return step + 1
