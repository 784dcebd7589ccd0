"""train(cfg, log) -> TrainResult: the loop, top to bottom. No mlflow import: ``log`` is a callback.

Phases, in order: device and precision -> data -> model and optimizer -> plan (steps, micro-batch)
-> resume -> loop (step, log, evaluate, checkpoint) -> final evaluation and artifacts.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from scaling_lab import counting, data
from scaling_lab.config import ConfigError, RunConfig, from_flat
from scaling_lab.errors import Interrupted, NonFiniteLoss, StopTraining
from scaling_lab.model import GPT


class Logger(Protocol):
    """What train() needs from a tracker (tracking.RunLogger, or MemoryLogger in tests)."""

    run_id: str
    last_step: int

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
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

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step > self.last_step or step == 0:
            self.metrics += [(step, k, float(v)) for k, v in metrics.items()]

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tags.update(tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(str(path))

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
class Plan:
    """What a configuration will do, computed without training (also used by dry runs)."""

    steps: int
    tokens_per_step: int
    tokens_trained: int
    counts: dict[str, float]
    eval_steps: list[int]
    checkpoint_every: int

    def params(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens_per_step": self.tokens_per_step,
                "tokens_trained": self.tokens_trained, **self.counts}


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


def make_plan(cfg: RunConfig) -> Plan:
    """Steps, tokens and FLOPs of ``cfg``: D from tokens, or from flops under flops_rule."""
    t, m = cfg.train, cfg.model
    tokens = t.tokens if t.tokens else counting.tokens_for_flops(m, t.flops, t.flops_rule)
    tokens_per_step = t.batch_size * m.block_size
    steps = tokens // tokens_per_step
    if steps < 1:
        what = "flops" if t.flops else "tokens"
        need = tokens_per_step if not t.flops else tokens_per_step * counting.flops_per_token(m, t.flops_rule)
        raise ConfigError(what, t.flops or t.tokens, f"at least one optimizer step: >= {need:.4g} "
                          f"(batch_size {t.batch_size} x block_size {m.block_size} tokens)")
    trained = steps * tokens_per_step
    every = t.eval_every or max(1, math.ceil(steps / 10))
    evals = sorted({min(steps, s) for s in range(every, steps + every, every)} | {steps})
    if not t.eval_every:  # evaluate at the same fractions of the budget in every run: 10%, 20%, ... 100%
        evals = sorted({max(1, round(steps * k / 10)) for k in range(1, 11)})
    return Plan(steps, tokens_per_step, trained, counting.counts(m, trained), evals, t.checkpoint_every)


# --------------------------------------------------------------------------- device and precision


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", name, "auto or cpu (no CUDA device here)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device", name, "auto or cpu (no MPS device here)")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype. auto: bf16 on CUDA (when supported) and CPU (measured faster here), fp32 on MPS."""
    if name == "fp32":
        return torch.float32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if name == "bf16":
            raise ConfigError("dtype", name, "fp32 or auto on this GPU (no bf16)")
        return torch.float32
    if name == "auto" and device.type == "mps":
        return torch.float32
    return torch.bfloat16


def pick_micro_batch(cfg: RunConfig, device: torch.device) -> int:
    """Largest divisor of batch_size whose activations fit in half the free memory.

    Per sequence (bytes, fp32 upper bound): layers * T * d * 34 * 2 (Korthikanti et al. 2022, Eq. 2
    without the attention-score term SDPA avoids) plus logits, their softmax and grad T * V * 12.
    """
    m, t = cfg.model, cfg.train
    if t.micro_batch:
        return t.micro_batch
    per_seq = m.n_layer * m.block_size * m.n_embd * 34 * 2 + m.block_size * m.n_vocab * 12
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    fit = max(1, int(0.5 * free // per_seq))
    return max(d for d in range(1, t.batch_size + 1) if t.batch_size % d == 0 and d <= fit)


def lr_at(step: int, steps: int, peak: float, warmup_frac: float, min_ratio: float) -> float:
    """Linear warmup, then cosine to min_ratio * peak exactly at the last step (step is 0-based)."""
    warmup = int(warmup_frac * steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if steps - 1 <= warmup:
        return peak
    progress = (step - warmup) / (steps - 1 - warmup)  # 0 -> 1 over the decay
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- checkpoints


def checkpoint_path(cfg: RunConfig, run_id: str) -> Path:
    return Path(cfg.train.checkpoint_dir) / run_id / "last.pt"


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


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError("resume", str(path.parent.name), f"a run with a checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def resume_config(run_id: str, checkpoint_dir: str) -> RunConfig:
    """The config a run was started with, from its checkpoint (resume must train the same thing)."""
    state = load_checkpoint(Path(checkpoint_dir) / run_id / "last.pt")
    flat = dict(state["config"])
    flat["resume"] = run_id
    return from_flat(flat)


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT/SIGTERM set a flag the loop checks after each step (checkpoint, then stop KILLED)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if flag.is_set():  # second signal: stop now
            raise KeyboardInterrupt
        flag.set()

    for s in old:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- several processes (torchrun)


def dist_setup(device_name: str = "auto") -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) join the process group once: NCCL on CUDA, gloo
    on CPU. One process: (0, 1), nothing initialised."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def dist_teardown() -> None:
    """Leave the process group (torchrun runs), if one was joined."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def dist_micro_batch(micro: int, batch_size: int, world: int) -> int:
    """Largest micro-batch <= ``micro`` whose count of micro-batches per step splits evenly over ``world``."""
    for d in range(micro, 0, -1):
        if batch_size % d == 0 and (batch_size // d) % world == 0:
            return d
    raise ConfigError("batch_size", batch_size, f"a multiple of the number of processes ({world})")


# --------------------------------------------------------------------------- the loop


def train(
    cfg: RunConfig,
    log: Logger,
    on_eval: Callable[[int, float, float], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``cfg`` and report through ``log``. ``on_eval(step, budget_fraction, val_loss)`` may raise
    StopTraining (pruning). Raises NonFiniteLoss, ConfigError, or Interrupted on SIGINT/SIGTERM."""
    t0 = time.perf_counter()
    m, tc = cfg.model, cfg.train

    # 1. processes, device, precision, seeds
    rank, world = dist_setup(tc.device)
    device = pick_device(tc.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dtype = pick_dtype(tc.dtype, device)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed % 2**32)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())

    # 2. plan and data
    plan = make_plan(cfg)
    if world > 1 and rank > 0:
        _barrier()  # rank 0 fills the token cache first
    train_tokens = data.load_tokens(cfg.data, cfg.data.train_split, max_tokens=plan.tokens_trained)
    val_tokens = data.load_tokens(cfg.data, cfg.data.val_split, max_tokens=tc.eval_tokens * 4)
    batches = data.Batches(train_tokens.ids, m.block_size, tc.seed)
    val_x, val_y = data.eval_windows(val_tokens.ids, m.block_size, tc.eval_tokens)
    enc = data.get_encoding(cfg.data.vocab_size, cfg.data.tokenizer)
    val_bytes = int(data.token_byte_lengths(enc)[val_y.numpy()].sum())  # bytes the scored targets stand for
    if world > 1 and rank == 0:
        _barrier()
    prep_s = time.perf_counter() - t0

    # 3. model and optimizer
    model = GPT(m).to(device)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.param_groups(tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                  fused=fused, foreach=None if fused else True)
    micro = pick_micro_batch(cfg, device)
    if world > 1:
        micro = dist_micro_batch(micro, tc.batch_size, world)
    accum = tc.batch_size // micro  # micro-batches per optimizer step, all processes together
    mine = list(range(rank, accum, world))  # this process's micro-batch indices (batches: f(seed, step, k))
    compile_on = tc.compile == "true" or (tc.compile == "auto" and device.type == "cuda")
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = torch.compile(net) if compile_on else net
    eval_fwd = fwd if world == 1 else model  # evaluation needs no gradient sync

    # 4. resume
    start, history = 0, []
    ckpt = checkpoint_path(cfg, log.run_id)
    if tc.resume:
        state = load_checkpoint(checkpoint_path(cfg, tc.resume))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        for s in sorted({s for s, _, _ in state.get("unsent", [])}):  # metrics the store missed before the stop
            log.log_metrics({k: v for s2, k, v in state["unsent"] if s2 == s}, step=s)
    else:
        log.log_params({f"resolved.{k}": v for k, v in cfg.flat().items()} | plan.params()
                       | {"n_vocab": m.n_vocab, "micro_batch_used": micro, "grad_accum": accum,
                          "device_used": str(device), "dtype_used": str(dtype).replace("torch.", ""),
                          "compile_used": compile_on})
        log.set_tags({"mode": cfg.mode, "dataset": cfg.data.dataset, "device": str(device)})
        log.log_metrics({"data/train_tokens": len(train_tokens.ids), "data/val_bytes_per_token":
                         val_tokens.n_bytes / len(val_tokens.ids),
                         "data/unigram_entropy": data.unigram_entropy(train_tokens.ids, m.n_vocab),
                         "data/prep_s": prep_s}, step=0)

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total = 0.0
        for i in range(rank * micro, len(val_x), micro * world):  # each process scores its share of windows
            x, y = val_x[i : i + micro].to(device), val_y[i : i + micro].to(device)
            with autocast:
                _, loss = eval_fwd(x, y)
            total += loss.item() * len(x)
        model.train()
        return _sum_over_processes(torch.tensor([total]), world, device)[0].item() / len(val_x)

    # 5. the loop
    tok_per_step = plan.tokens_per_step
    val_loss = float("nan")
    stopped = False
    bar = _progress(plan.steps, start, progress)
    t_loop = time.perf_counter()
    with _stop_on_signals() as stop:
        for step in range(start, plan.steps):
            ts = time.perf_counter()
            lr = lr_at(step, plan.steps, tc.lr, tc.warmup_frac, tc.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for j, k in enumerate(mine):
                x, y = batches.get(step, k, micro)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = world == 1 or j == len(mine) - 1  # DDP all-reduces gradients on the last micro-batch only
                with contextlib.nullcontext() if sync else net.no_sync():
                    with autocast:
                        _, loss = fwd(x, y)
                    (loss / len(mine)).backward()  # DDP averages over processes: the mean over all accum
                loss_sum += loss.detach()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip else math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # one collective per step: the loss summed over processes, and whether any process got a signal
            loss_sum, stop_any = _sum_over_processes(torch.stack([loss_sum.float().cpu(),
                                                                  torch.tensor(float(stop.is_set()))]), world, device)
            if stop_any > 0:
                stop.set()
            train_loss = float(loss_sum) / accum  # syncs the device once per step
            done = step + 1
            if not math.isfinite(train_loss):
                raise NonFiniteLoss(f"train/loss is {train_loss} at step {done}")
            history.append(train_loss)
            dt = time.perf_counter() - ts
            log.log_metrics({"train/loss": train_loss, "lr": lr, "grad_norm": float(norm),
                             "tokens_seen": done * tok_per_step,
                             "flops_seen": done * tok_per_step * counting.flops_per_token(m, tc.flops_rule),
                             "step_time_ms": dt * 1000, "tokens_per_s": tok_per_step / dt}, step=done)
            bar.update(train_loss, tok_per_step / dt)
            if done in plan.eval_steps:
                val_loss = evaluate()
                log.log_metrics({"val/loss": val_loss,
                                 "val/bpb": data.bits_per_byte(val_loss, val_y.numel(), val_bytes)}, step=done)
                if not math.isfinite(val_loss):
                    raise NonFiniteLoss(f"val/loss is {val_loss} at step {done}")
                if on_eval is not None:
                    try:
                        on_eval(done, done / plan.steps, val_loss)
                    except StopTraining:
                        stopped = True
                        break
            at_ckpt = (done % plan.checkpoint_every == 0) if plan.checkpoint_every else done in plan.eval_steps
            if ((at_ckpt and done < plan.steps) or stop.is_set()) and rank == 0:
                log.flush(raise_on_error=False)  # stored history reaches the checkpoint (kill -9 leaves no gap)
                save_checkpoint(ckpt, model, optimizer, done, cfg, history, log.unsent())
            if stop.is_set():
                bar.close()
                raise Interrupted(f"signal at step {done}; checkpoint {ckpt}")
    bar.close()
    loop_s = time.perf_counter() - t_loop
    steps_run = len(history) - start
    done = len(history)

    # 6. final evaluation, artifacts
    if not stopped and (not plan.eval_steps or plan.eval_steps[-1] != plan.steps or math.isnan(val_loss)):
        val_loss = evaluate()
    bpb = data.bits_per_byte(val_loss, val_y.numel(), val_bytes)
    log.log_metrics({"final/val_loss": val_loss, "final/val_bpb": bpb}, step=done)
    if rank == 0:
        save_checkpoint(ckpt, model, optimizer, done, cfg, history, log.unsent())
    log.flush()  # raises TrackingUnavailable when the store is away: the checkpoint keeps the metrics
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.json"
        import json

        cfg_path.write_text(json.dumps(cfg.flat(), indent=2))
        log.log_artifact(cfg_path)
        png = Path(tmp) / "loss_curve.png"
        if _plot_curve(history, png, cfg):
            log.log_artifact(png)
        if tc.save_checkpoint:
            log.log_artifact(ckpt, "checkpoint")
    log.flush()
    wall = time.perf_counter() - t0
    tps = steps_run * tok_per_step / loop_s if loop_s > 0 else 0.0
    return TrainResult(log.run_id, val_loss, bpb, done, done * tok_per_step, wall, tps, stopped,
                       getattr(log, "flush_seconds_total", 0.0), history)


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _sum_over_processes(t: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """Element-wise sum of a small CPU tensor over all processes (itself with one process)."""
    if world > 1:
        import torch.distributed as dist

        t = t.to(device)  # NCCL reduces CUDA tensors only; gloo CPU ones
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t.cpu()
    return t


class _progress:
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


def _plot_curve(history: list[float], path: Path, cfg: RunConfig) -> bool:
    if not history:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(history) + 1), history, lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title(f"{cfg.mode}: L={cfg.model.n_layer} d={cfg.model.n_embd} V={cfg.model.n_vocab}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
