"""Seed replicas trained as one stacked model: ``train_stacked(cfgs, logs)`` trains k runs of one shape that differ
only by seed in one process, one batched step for all of them (issue 16: small matmuls are dominated by per-op
and per-step overhead, so k replicas cost little more than one).

Each replica is still its own run: ``train.setup`` builds it (its seed's initialisation and data order, its
parameters and datasets logged), the stacked loop gives it its own AdamW state (AdamW is element-wise), its own
gradient clipping (norms per replica), its own batches, history, evaluations and checkpoints, and
``train.finish`` ends it. Its metrics are the ones a run alone logs, up to float rounding of batched matmuls;
the runs add only the param ``stacked_replicas``. No mlflow import: ``logs`` are callbacks, as for ``train``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from scaling_lab import data, optim, runtime
from scaling_lab.config import RunConfig
from scaling_lab.errors import ConfigError, Interrupted, NonFiniteLoss, StopTraining
from scaling_lab.model import StackedGPT
from scaling_lab.train import Logger, Progress, Session, StepLog, TrainResult, finish, lr_for, save_checkpoint, setup

OnEval = Callable[[int, float, float], None]


def check_stackable(cfgs: list[RunConfig]) -> None:
    """Replicas must be one configuration but for seed and run name, fresh (no resume), on one process."""
    flat = [{k: v for k, v in c.flat().items() if k not in ("seed", "run_name")} for c in cfgs]
    if any(f != flat[0] for f in flat[1:]) or len({c.train.seed for c in cfgs}) != len(cfgs):
        raise ConfigError("seed", [c.train.seed for c in cfgs], "replicas that differ only by seed")
    if any(c.train.resume for c in cfgs):
        raise ConfigError("resume", [c.train.resume for c in cfgs], "no resume for stacked replicas")


class Stack:
    """The k sessions and the one model and optimizer that train them."""

    def __init__(self, sessions: list[Session]):
        s0 = sessions[0]
        self.sessions, self.k = sessions, len(sessions)
        self.model = StackedGPT([s.model for s in sessions]).to(s0.device)
        self.optimizer = optim.adamw(self.model.param_groups(s0.cfg.train.weight_decay), s0.cfg.train, s0.device,
                                     rows=self.k)

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step of every replica: (losses (k,), gradient norms (k,), lr), on the device."""
        s0 = self.sessions[0]
        tc = s0.cfg.train
        lr = lr_for(step, s0.plan.steps, tc)  # the same schedule as train_step (warmup_steps, schedule_steps too)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros(self.k, device=s0.device)
        for j in s0.mine:
            xy = [s.batches.get(step, j, s0.micro) for s in self.sessions]  # each replica's own data order
            x = torch.stack([a for a, _ in xy]).to(s0.device, non_blocking=True)
            y = torch.stack([b for _, b in xy]).to(s0.device, non_blocking=True)
            with s0.autocast():
                _, losses = self.model(x, y)
            (losses.sum() / len(s0.mine)).backward()  # replica i's gradient is its own loss's
            loss_sum += losses.detach()
        norms = optim.clip_grad_norm(self.optimizer, list(self.model.weights), tc.grad_clip, rows=self.k)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / s0.accum, norms, lr

    @torch.no_grad()
    def evaluate(self) -> list[float]:
        """Every replica's mean validation loss over the same fixed windows."""
        s0 = self.sessions[0]
        total, m = torch.zeros(self.k, dtype=torch.float64), s0.eval_micro
        for i in range(0, len(s0.val_x), m):
            x = s0.val_x[i : i + m].to(s0.device)
            y = s0.val_y[i : i + m].to(s0.device)
            with s0.autocast():
                _, losses = self.model(x.expand(self.k, -1, -1), y.expand(self.k, -1, -1))
            total += losses.double().cpu() * len(x)
        return (total / len(s0.val_x)).tolist()

    @torch.no_grad()
    def unstack(self, i: int) -> None:
        """Replica i's weights and AdamW state into its own session's model and optimizer (checkpoints, finish)."""
        s = self.sessions[i]
        own = dict(s.model.named_parameters())
        index = {id(p): j for j, p in enumerate(p for g in s.optimizer.param_groups for p in g["params"])}
        sd = s.optimizer.state_dict()
        sd["state"] = {}
        for name, w in zip(self.model.names, self.model.weights):
            own[name].copy_(w[i])
            state = self.optimizer.state.get(w)
            if state:
                sd["state"][index[id(own[name])]] = {"step": state["step"].clone(), "exp_avg": state["exp_avg"][i].clone(),
                                                     "exp_avg_sq": state["exp_avg_sq"][i].clone()}
        for group in sd["param_groups"]:
            group["lr"] = self.optimizer.param_groups[0]["lr"]
        s.optimizer.load_state_dict(sd)  # AdamW's own format, whichever AdamW the session has


def train_stacked(cfgs: list[RunConfig], logs: list[Logger], on_evals: list[OnEval | None] | None = None,
                  progress: bool = False) -> list[TrainResult | BaseException]:
    """Train the replicas ``cfgs`` (one shape, different seeds) together, each reporting through its own log.
    ``on_evals[i](step, budget_fraction, val_loss)`` may raise StopTraining (pruning) for replica i alone.
    Returns per replica its TrainResult, or the exception that ended it (NonFiniteLoss, a tracking error); the
    others train on. Raises Interrupted on SIGINT/SIGTERM (every replica checkpointed first)."""
    check_stackable(cfgs)
    sessions = [setup(c, log) for c, log in zip(cfgs, logs)]
    if sessions[0].world > 1:
        raise ConfigError("replicas", len(cfgs), "stacked replicas on one process (not under torchrun)")
    for log in logs:
        log.log_params({"stacked_replicas": len(cfgs)})
    st = Stack(sessions)
    outcome: list[TrainResult | BaseException | None] = [None] * len(cfgs)
    val, stopped, loop_s = fit_stacked(st, logs, on_evals or [None] * len(cfgs), outcome, progress)
    for i, (s, log) in enumerate(zip(sessions, logs)):
        if outcome[i] is None:
            if not stopped[i]:
                st.unstack(i)
            try:
                outcome[i] = finish(s, log, val[i], stopped[i], loop_s)
            except Exception as exc:  # this replica's store or disk: the others still finish
                outcome[i] = exc
    return outcome  # type: ignore[return-value]


def fit_stacked(st: Stack, logs: list[Logger], on_evals: list[OnEval | None],
                outcome: list, progress: bool) -> tuple[list[float], list[bool], float]:
    """``train.fit`` for the stack: step, log, evaluate, checkpoint, per replica. A replica that is pruned or whose
    loss is not finite stops logging (``outcome[i]`` holds its exception); its slice is still computed, alone, so
    nothing of it reaches the others. Returns (last val/loss, stopped early, loop seconds) per replica."""
    s0, k = st.sessions[0], st.k
    plan = s0.plan
    val, stopped = [float("nan")] * k, [False] * k
    steps = [StepLog(s, log, Progress(plan.steps, 0, progress and i == 0)) for i, (s, log) in
             enumerate(zip(st.sessions, logs))]

    def live() -> list[int]:
        return [i for i in range(k) if outcome[i] is None and not stopped[i]]

    t_loop = time.perf_counter()
    with runtime.stop_on_signals() as stop:
        for step in range(plan.steps):
            ts = time.perf_counter()
            losses, norms, lr = st.step(step)
            done, dt = step + 1, time.perf_counter() - ts
            for i in live():
                try:
                    steps[i].add(done, losses[i], norms[i], lr, dt)
                except NonFiniteLoss as exc:  # read back in a full logging batch
                    outcome[i] = exc
            at_ckpt = (done % plan.checkpoint_every == 0) if plan.checkpoint_every else done in plan.eval_steps
            if done in plan.eval_steps or at_ckpt or stop.is_set():
                _drain(steps, live(), outcome)
            if done in plan.eval_steps:
                _evaluate(st, logs, on_evals, live(), val, stopped, outcome, done)
            if (at_ckpt and done < plan.steps) or stop.is_set():
                for i in live():
                    st.unstack(i)
                    logs[i].flush(raise_on_error=False)
                    s = st.sessions[i]
                    save_checkpoint(s.ckpt, s.model, s.optimizer, done, s.cfg, s.history, logs[i].unsent())
            if stop.is_set():
                raise Interrupted(f"signal at step {done}; checkpoints {[str(s.ckpt) for s in st.sessions]}")
            if not live():
                break
        _drain(steps, live(), outcome)
    for sl in steps:
        sl.bar.close()
    return val, stopped, time.perf_counter() - t_loop


def _drain(steps: list[StepLog], live: list[int], outcome: list) -> None:
    for i in live:
        try:
            steps[i].drain()
        except NonFiniteLoss as exc:
            outcome[i] = exc


def _evaluate(st: Stack, logs: list[Logger], on_evals: list[OnEval | None], live: list[int], val: list[float],
              stopped: list[bool], outcome: list, done: int) -> None:
    """Score every replica at an evaluation step; log and report it to its own on_eval."""
    s0 = st.sessions[0]
    losses = st.evaluate()
    for i in live:
        val[i] = losses[i]
        logs[i].log_metrics({"val/loss": val[i], "val/bpb": data.bits_per_byte(val[i], s0.val_y.numel(), s0.val_bytes)},
                            step=done)
        if not math.isfinite(val[i]):
            outcome[i] = NonFiniteLoss(f"val/loss is {val[i]} at step {done}")
        elif on_evals[i] is not None:
            try:
                on_evals[i](done, done / s0.plan.steps, val[i])
            except StopTraining:
                stopped[i] = True
                st.unstack(i)  # its checkpoint and final state: the weights it was pruned with
