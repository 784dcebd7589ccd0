"""train(cfg, log) -> TrainResult: setup, the loop, finish, top to bottom. No mlflow import: ``log`` is a
callback (tracking.RunLogger, or MemoryLogger in tests).

``setup``: processes, device and precision -> plan and data -> model and optimizer -> resume or first params.
``fit``: the loop (step, log, evaluate, checkpoint). ``finish``: final evaluation and artifacts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from scaling_lab import counting, data, figures, optim, runtime
from scaling_lab.config import RunConfig, TrainConfig, from_flat
from scaling_lab.counting import Plan, make_plan
from scaling_lab.errors import ConfigError, Interrupted, NonFiniteLoss, StopTraining
from scaling_lab.model import GPT


class Logger(Protocol):
    """What train() needs from a tracker (tracking.RunLogger, or MemoryLogger in tests)."""

    run_id: str
    last_step: int

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dataset(self, name: str, source: dict[str, str], digest: str, context: str) -> None: ...
    def log_model(self, model: torch.nn.Module, name: str, metrics: tuple[str, ...] = ()) -> str: ...
    def flush(self, raise_on_error: bool = True) -> None: ...
    def unsent(self) -> list[tuple[int, str, float]]: ...


@dataclass
class MemoryLogger:
    """A Logger that keeps everything in memory (tests, benchmarks, dry checks)."""

    run_id: str = "memory"
    last_step: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    metrics: list[tuple[int, str, float]] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)
    datasets: list[dict[str, Any]] = field(default_factory=list)
    models: list[str] = field(default_factory=list)

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step > self.last_step or step == 0:
            self.metrics += [(step, k, float(v)) for k, v in metrics.items()]

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tags.update(tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(str(path))

    def log_dataset(self, name: str, source: dict[str, str], digest: str, context: str) -> None:
        self.datasets.append({"name": name, "source": source, "digest": digest, "context": context})

    def log_model(self, model: torch.nn.Module, name: str, metrics: tuple[str, ...] = ()) -> str:
        self.models.append(name)
        return f"memory-{name}"

    def flush(self, raise_on_error: bool = True) -> None:
        pass

    def unsent(self) -> list[tuple[int, str, float]]:
        return []

    def history(self, key: str) -> list[tuple[int, float]]:
        return [(s, v) for s, k, v in self.metrics if k == key]


@dataclass
class NullLogger(MemoryLogger):
    """A Logger that drops everything (ranks other than 0 under torchrun)."""

    run_id: str = "null"

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass


@dataclass
class TrainResult:
    run_id: str
    val_loss: float
    val_bpb: float
    steps: int
    tokens_trained: int
    wall_s: float
    tokens_per_s: float
    stopped_early: bool = False
    log_seconds: float = 0.0
    history: list[float] = field(default_factory=list)
    epochs: float = 0.0
    """Passes over the train split: tokens trained / tokens in the split (>1 repeats the data)."""


def lr_at(step: int, steps: int, peak: float, warmup_frac: float, min_ratio: float, warmup_steps: int = 0,
          schedule_steps: int = 0, schedule: str = "cosine", cooldown_frac: float = 0.2) -> float:
    """Linear warmup (``warmup_steps``, else ``warmup_frac`` of the run's ``steps``), then a decay to
    min_ratio * peak at the schedule's last step: the run's last step, or step ``schedule_steps`` - 1 when that is
    set (a run shorter than it stops mid-schedule; steps past it stay at min_ratio * peak). ``step`` is 0-based.
    cosine: the decay is a half cosine over everything after the warmup. wsd (warmup-stable-decay, Hägele et al.
    2024, arXiv:2405.18392): the peak is held, and the last ``cooldown_frac`` of the schedule's steps fall as
    1 - sqrt(progress), their best cooldown shape."""
    horizon = schedule_steps or steps
    warmup = warmup_steps or int(warmup_frac * steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if horizon - 1 <= warmup:
        return peak
    if schedule == "wsd":
        start = max(warmup, horizon - 1 - round(cooldown_frac * horizon))  # first step of the cooldown
        if step <= start:
            return peak
        shape = 1 - math.sqrt(min(1.0, (step - start) / (horizon - 1 - start)))  # 1 -> 0 over the cooldown
        return peak * (min_ratio + (1 - min_ratio) * shape)
    progress = min(1.0, (step - warmup) / (horizon - 1 - warmup))  # 0 -> 1 over the decay
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_for(step: int, steps: int, tc: TrainConfig) -> float:
    """The learning rate of 0-based ``step`` of a run of ``steps`` optimizer steps under ``tc``'s schedule."""
    return lr_at(step, steps, tc.lr, tc.warmup_frac, tc.min_lr_ratio, tc.warmup_steps, tc.schedule_steps,
                 tc.schedule, tc.cooldown_frac)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_file(checkpoint_dir: str, run_id: str) -> Path:
    """Where a run's checkpoint lives locally (its copy in the run's artifacts is ``checkpoint/last.pt``)."""
    return Path(checkpoint_dir) / run_id / "last.pt"


def checkpoint_path(cfg: RunConfig, run_id: str) -> Path:
    return checkpoint_file(cfg.train.checkpoint_dir, run_id)


def save_checkpoint(path: Path, model, optimizer, step: int, cfg: RunConfig, history: list[float],
                    unsent: list[tuple[int, str, float]] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,  # optimizer steps completed; also the data position (batches are a function of step)
        "config": cfg.flat(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "history": history,
        "unsent": unsent or [],  # (step, key, value) the tracker could not write yet; resume sends them
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: kill -9 never leaves a torn checkpoint


def checkpoint(s: Session, log: Logger, done: int) -> None:
    """Save ``last.pt`` (rank 0) and upload it as the run's artifact ``checkpoint/last.pt``, so ``resume`` works on
    any machine that reaches the store; an upload that fails (store away) is only reported: the next one catches up."""
    if s.rank != 0:
        return
    save_checkpoint(s.ckpt, s.model, s.optimizer, done, s.cfg, s.history, log.unsent())
    upload_checkpoint(s, log)


def upload_checkpoint(s: Session, log: Logger) -> None:
    """``last.pt`` as the run's artifact ``checkpoint/last.pt`` (a failed upload is reported, never raised)."""
    try:
        log.log_artifact(s.ckpt, "checkpoint")
    except Exception as exc:  # the local file is what a resume on this machine reads
        print(f"checkpoint: kept at {s.ckpt}; uploading it to the run failed ({type(exc).__name__})", file=sys.stderr)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError("resume", str(path.parent.name), f"a run with a checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def resume_config(run_id: str, checkpoint_dir: str) -> RunConfig:
    """The config a run was started with, from its checkpoint (resume must train the same thing)."""
    state = load_checkpoint(checkpoint_file(checkpoint_dir, run_id))
    flat = dict(state["config"])
    flat["resume"] = run_id
    flat["checkpoint_dir"] = checkpoint_dir  # where it was found (a download on another machine)
    return from_flat(flat)




@dataclass
class Session:
    """Everything the loop needs, built by ``setup`` (tensors live on ``device``)."""

    cfg: RunConfig
    plan: Plan
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    model: GPT
    net: torch.nn.Module
    """The module the loop calls backward through: ``model``, or its DistributedDataParallel wrapper."""
    fwd: Any
    """``net``, compiled when the compile rule says so."""
    optimizer: torch.optim.Optimizer
    micro: int
    """Sequences per forward pass."""
    accum: int
    """Micro-batches per optimizer step, all processes together."""
    mine: list[int]
    """This process's micro-batch indices within a step (batches are a function of seed, step, index)."""
    batches: data.Batches
    val_x: torch.Tensor
    """(windows, block_size) validation inputs; val_y the targets."""
    val_y: torch.Tensor
    val_bytes: int
    """UTF-8 bytes the scored validation targets stand for (bits per byte)."""
    ckpt: Path
    t0: float
    epochs: float
    """Planned passes over the train split (tokens trained / tokens in the split)."""
    start: int = 0
    """Steps already done (resume)."""
    history: list[float] = field(default_factory=list)
    """train/loss of every step done."""
    halt: bool = False
    """Several processes: the step's collective found a signal on some process, so all stop after this step (a
    signal that lands after the collective waits for the next one: stopping on it alone would leave the others
    blocked in the next step's all-reduce)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        return runtime.autocast(self.device, self.dtype)

    @property
    def eval_micro(self) -> int:
        """Validation windows per forward pass (runtime.eval_micro_batch)."""
        return runtime.eval_micro_batch(self.micro, self.cfg.model.block_size)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def setup(cfg: RunConfig, log: Logger) -> Session:
    """Processes, device, precision and seeds -> plan and data -> model and optimizer -> resume (or log the
    run's parameters the first time)."""
    t0 = time.perf_counter()
    m, tc = cfg.model, cfg.train
    rank, world = runtime.dist_setup(tc.device)
    device = runtime.pick_device(tc.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dtype = runtime.pick_dtype(tc.dtype, device)
    _seed_everything(tc.seed)

    plan = make_plan(cfg)
    if world > 1 and rank > 0:
        runtime.barrier()  # rank 0 fills the token cache first
    train_tokens = data.load_tokens(cfg.data, cfg.data.train_split, max_tokens=plan.tokens_trained)
    val_tokens = data.load_tokens(cfg.data, cfg.data.val_split, max_tokens=tc.eval_tokens * 4)
    val_x, val_y = data.eval_windows(val_tokens.ids, m.block_size, tc.eval_tokens)
    enc = data.get_encoding(cfg.data.vocab_size, cfg.data.tokenizer)
    val_bytes = int(data.token_byte_lengths(enc)[val_y.numpy()].sum())
    if world > 1 and rank == 0:
        runtime.barrier()
    prep_s = time.perf_counter() - t0

    model = GPT(m).to(device)
    optimizer = optim.adamw(model.param_groups(tc.weight_decay), tc, device)  # CPU: one flat buffer
    micro = runtime.pick_micro_batch(cfg, device)
    if world > 1:
        micro = runtime.dist_micro_batch(micro, tc.batch_size, world)
    accum = tc.batch_size // micro
    compile_on = runtime.compile_used(cfg, device)
    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    s = Session(cfg, plan, rank, world, device, dtype, model, net, torch.compile(net) if compile_on else net,
                optimizer, micro, accum, list(range(rank, accum, world)),
                data.Batches(train_tokens.ids, m.block_size, tc.seed), val_x, val_y, val_bytes,
                checkpoint_path(cfg, log.run_id), t0, plan.tokens_trained / len(train_tokens.ids))
    if tc.resume:
        _resume(s, log)
    else:
        log.log_params(cfg.flat() | {"cache_dir": str(data.cache_root(cfg.data))} | plan.params()
                       | {"n_vocab": m.n_vocab, "micro_batch_used": micro, "grad_accum": accum,
                          "epochs": round(s.epochs, 4), "train_split_tokens": len(train_tokens.ids),
                          "device_used": str(device), "dtype_used": str(dtype).replace("torch.", ""),
                          "compile_used": compile_on} | runtime.thread_params())
        log.set_tags({"mode": cfg.mode, "dataset": cfg.data.dataset, "device": str(device)})
        for split, toks, context in ((cfg.data.train_split, train_tokens, "train"),
                                     (cfg.data.val_split, val_tokens, "validation")):
            log.log_dataset(f"{Path(cfg.data.dataset).name or cfg.data.dataset}/{split}",
                            data.dataset_source(cfg.data, split), toks.content_id, context)
        # one-off facts of the text: params, so the run page opens on the training curves, not on bar charts
        log.log_params({"data.train_tokens": len(train_tokens.ids),
                        "data.val_bytes_per_token": round(val_tokens.n_bytes / len(val_tokens.ids), 6),
                        "data.unigram_entropy": round(data.unigram_entropy(train_tokens.ids, m.n_vocab), 6),
                        "data.prep_s": round(prep_s, 3)})
    return s


def _resume(s: Session, log: Logger) -> None:
    """Model, optimizer, step, history and random state from the resumed run's checkpoint; metrics the store
    missed before the stop are sent now."""
    state = load_checkpoint(checkpoint_path(s.cfg, s.cfg.train.resume))
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.start, s.history = state["step"], list(state["history"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    for step in sorted({st for st, _, _ in state.get("unsent", [])}):
        log.log_metrics({k: v for st, k, v in state["unsent"] if st == step}, step=step)


@torch.no_grad()
def evaluate(s: Session) -> float:
    """Mean validation loss (nats/token) over the fixed windows; each process scores its share."""
    eval_fwd = s.fwd if s.world == 1 else s.model  # evaluation needs no gradient sync
    s.model.eval()
    total, m = 0.0, s.eval_micro
    for i in range(s.rank * m, len(s.val_x), m * s.world):
        x, y = s.val_x[i : i + m].to(s.device), s.val_y[i : i + m].to(s.device)
        with s.autocast():
            _, loss = eval_fwd(x, y)
        total += loss.item() * len(x)
    s.model.train()
    return runtime.sum_over_processes(torch.tensor([total]), s.world, s.device)[0].item() / len(s.val_x)


def train_step(s: Session, step: int, stop: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer step (0-based ``step``): set lr, accumulate this process's micro-batches, clip, update.
    Returns (train/loss averaged over the whole batch, gradient norm, lr); loss and norm stay on the device (no
    host sync: ``fit`` reads them back in its logging batch)."""
    tc = s.cfg.train
    lr = lr_for(step, s.plan.steps, tc)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=s.device)
    for j, k in enumerate(s.mine):
        x, y = s.batches.get(step, k, s.micro)
        x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
        sync = s.world == 1 or j == len(s.mine) - 1  # DDP all-reduces gradients on the last micro-batch only
        with contextlib.nullcontext() if sync else s.net.no_sync():
            with s.autocast():
                _, loss = s.fwd(x, y)
            (loss / len(s.mine)).backward()  # DDP averages over processes: the mean over all accum
        loss_sum += loss.detach()
    # CPU: the gradients gathered into one buffer, its norm, one scale; elsewhere torch's foreach norms
    norm = optim.clip_grad_norm(s.optimizer, list(s.model.parameters()), tc.grad_clip)[0]
    s.optimizer.step()  # AdamW's arithmetic on that buffer (fused on CUDA; CPU fused changes the numbers)
    s.optimizer.zero_grad(set_to_none=True)
    if s.world > 1:  # one collective per step: the loss summed over processes, and whether any got a signal
        loss_sum, stop_any = runtime.sum_over_processes(
            torch.stack([loss_sum.float().cpu(), torch.tensor(float(stop.is_set()))]), s.world, s.device)
        s.halt = bool(stop_any > 0)
        if s.halt:
            stop.set()
    return loss_sum / s.accum, norm.detach(), lr


LOG_EVERY = 32  # steps whose losses and norms are read back from the device in one go (and at evals, the end)


class StepLog:
    """Steps trained but not yet read back: (step, loss, norm on the device, lr, seconds). ``drain`` reads them
    in one host sync, checks them, appends train/loss to the history and logs every step's metrics."""

    def __init__(self, s: Session, log: Logger, bar: Progress):
        self.s, self.log, self.bar, self.rows = s, log, bar, []
        self.tok = s.plan.tokens_per_step
        self.fpt = counting.flops_per_token(s.cfg.model, s.cfg.train.flops_rule)

    def add(self, done: int, loss: torch.Tensor, norm: torch.Tensor, lr: float, dt: float) -> None:
        self.rows.append((done, loss, norm, lr, dt))
        if len(self.rows) >= LOG_EVERY:
            self.drain()

    def drain(self) -> None:
        if not self.rows:
            return
        vals = torch.stack([t.float() for r in self.rows for t in r[1:3]]).tolist()  # the one host sync
        rows, self.rows = self.rows, []
        for i, (done, _, _, lr, dt) in enumerate(rows):
            train_loss, norm = vals[2 * i], vals[2 * i + 1]
            if not math.isfinite(train_loss):
                raise NonFiniteLoss(f"train/loss is {train_loss} at step {done}")
            self.s.history.append(train_loss)
            self.log.log_metrics({"train/loss": train_loss, "train/lr": lr, "train/grad_norm": norm,
                                  "progress/tokens_seen": done * self.tok,
                                  "progress/flops_seen": done * self.tok * self.fpt,
                                  "perf/step_time_ms": dt * 1000, "perf/tokens_per_s": self.tok / dt}, step=done)
            self.bar.update(train_loss, self.tok / dt)


def fit(s: Session, log: Logger, on_eval: Callable[[int, float, float], None] | None = None,
        progress: bool = True) -> tuple[float, bool, float]:
    """The loop: step, log, evaluate, checkpoint. Returns (last val/loss, stopped early, loop seconds)."""
    plan = s.plan
    val_loss, stopped = float("nan"), False
    bar = Progress(plan.steps, s.start, progress)
    steps = StepLog(s, log, bar)
    t_loop = time.perf_counter()
    with runtime.stop_on_signals() as stop:
        for step in range(s.start, plan.steps):
            ts = time.perf_counter()
            loss, norm, lr = train_step(s, step, stop)
            done = step + 1
            halt = stop.is_set() if s.world == 1 else s.halt  # several processes stop at the step they agreed on
            steps.add(done, loss, norm, lr, time.perf_counter() - ts)
            at_ckpt = (done % plan.checkpoint_every == 0) if plan.checkpoint_every else done in plan.eval_steps
            if done in plan.eval_steps or at_ckpt or halt:
                steps.drain()  # history and metrics complete up to here (and a non-finite loss raised)
            if done in plan.eval_steps:
                val_loss = evaluate(s)
                log.log_metrics({"val/loss": val_loss,
                                 "val/bpb": data.bits_per_byte(val_loss, s.val_y.numel(), s.val_bytes)}, step=done)
                if not math.isfinite(val_loss):
                    raise NonFiniteLoss(f"val/loss is {val_loss} at step {done}")
                if on_eval is not None:
                    try:
                        on_eval(done, done / plan.steps, val_loss)
                    except StopTraining:
                        stopped = True
                        break
            halt = halt or (s.world == 1 and stop.is_set())  # one process: a signal during the eval counts now
            if ((at_ckpt and done < plan.steps) or halt) and s.rank == 0:
                steps.drain()  # a no-op unless a signal landed after the drain above
                log.flush(raise_on_error=False)  # stored history reaches the checkpoint (kill -9 leaves no gap)
                checkpoint(s, log, done)
            if halt:
                bar.close()
                raise Interrupted(f"signal at step {done}; checkpoint {s.ckpt}")
        steps.drain()
    bar.close()
    return val_loss, stopped, time.perf_counter() - t_loop


def finish(s: Session, log: Logger, val_loss: float, stopped: bool, loop_s: float) -> TrainResult:
    """Final evaluation (unless the loop just scored the last step), final metrics, checkpoint, artifacts."""
    plan, done = s.plan, len(s.history)
    if not stopped and (not plan.eval_steps or plan.eval_steps[-1] != plan.steps or math.isnan(val_loss)):
        val_loss = evaluate(s)
    bpb = data.bits_per_byte(val_loss, s.val_y.numel(), s.val_bytes)
    log.log_metrics({"final/val_loss": val_loss, "final/val_bpb": bpb}, step=done)
    if s.rank == 0:
        save_checkpoint(s.ckpt, s.model, s.optimizer, done, s.cfg, s.history, log.unsent())
    log.flush()  # raises TrackingUnavailable when the store is away: the checkpoint keeps the metrics
    if s.rank == 0 and s.cfg.train.save_checkpoint:  # the final state, now that the store answers (a finished
        upload_checkpoint(s, log)  # run needs no resume: searches would copy every trial's optimizer state)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.json"
        cfg_path.write_text(json.dumps(s.cfg.flat(), indent=2))
        log.log_artifact(cfg_path)
        png = Path(tmp) / "loss_curve.png"
        m = s.cfg.model
        if figures.loss_curve(s.history, png, f"{s.cfg.mode}: L={m.n_layer} d={m.n_embd} V={s.cfg.data.vocab_size}"):
            log.log_artifact(png)
        if s.cfg.train.save_checkpoint and s.rank == 0:  # the model, as an MLflow LoggedModel with its final metrics
            log.log_model(s.model, "model", ("final/val_loss", "final/val_bpb"))
    log.flush()
    tok_per_step = plan.tokens_per_step
    tps = (done - s.start) * tok_per_step / loop_s if loop_s > 0 else 0.0
    return TrainResult(log.run_id, val_loss, bpb, done, done * tok_per_step, time.perf_counter() - s.t0, tps,
                       stopped, getattr(log, "flush_seconds_total", 0.0), s.history, s.epochs)


def train(
    cfg: RunConfig,
    log: Logger,
    on_eval: Callable[[int, float, float], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``cfg`` and report through ``log``. ``on_eval(step, budget_fraction, val_loss)`` may raise
    StopTraining (pruning). Raises NonFiniteLoss, ConfigError, or Interrupted on SIGINT/SIGTERM."""
    s = setup(cfg, log)
    val_loss, stopped, loop_s = fit(s, log, on_eval, progress)
    return finish(s, log, val_loss, stopped, loop_s)


class Progress:
    """tqdm bar with loss, tokens/s and ETA (plain when not a terminal)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0,
                            file=sys.stderr, disable=None)

    def update(self, loss: float, tps: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f} | {tps:,.0f} tok/s", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
