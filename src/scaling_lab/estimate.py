"""Know the cost before spending it: measured throughput -> predicted wall time, memory and FLOPs.

A calibration runs a few real forward/backward/AdamW steps of the actual shape (random token ids: the
cost does not depend on their values) on the chosen device, dtype and compile setting, and caches the
timings per device + shape + dtype + compile in ``<cache dir>/calibration.json``. ``estimate_run``
turns a RunConfig's plan into a time estimate from those timings; ``format_plan`` prints it for
``dry_run=true``. No mlflow import (the dry run itself, printing and stray-run cleanup, lives in cli).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from scaling_lab import counting, data, figures, model, optim
from scaling_lab.config import FLOPS_RULES, RunConfig
from scaling_lab.counting import Plan, make_plan
from scaling_lab.model import GPT
from scaling_lab.runtime import (
    EVAL_PASS_TOKENS,
    activation_bytes_per_seq,
    autocast,
    compile_used,
    device_name,
    eval_micro_batch,
    pick_device,
    pick_dtype,
    pick_micro_batch,
    sync,
)

CALIBRATION_FILE = "calibration.json"
TIMED_SECONDS = 1.5  # wall time spent on timed steps per calibration (more steps average out contention)
MAX_TIMED_STEPS = 50
PROBE_LIMIT_S = 2.0  # when one full micro-batch step would take longer, time 1 sequence and scale linearly
CHECKPOINT_PROBE_BYTES = 64 * 2**20  # write at most this much to measure checkpoint write speed
# fp32 weight 4 + grad 4 + AdamW exp_avg 4 + exp_avg_sq 4 (Kingma & Ba 2015), + 4 for the gradients FlatAdamW
# gathers into its buffer on the CPU (an upper bound elsewhere)
OPTIMIZER_BYTES_PER_PARAM = 20


# --------------------------------------------------------------------------- device and keys


def _model_code() -> str:
    """Short hash of the compute path's source (the model, the optimizer, and the validation pass size): a timing
    cached before a change to it is not reused."""
    h = hashlib.sha256()
    for f in (model.__file__, optim.__file__):
        h.update(Path(f).read_bytes())
    h.update(f"eval {EVAL_PASS_TOKENS}".encode())
    return h.hexdigest()[:8]


def calibration_key(cfg: RunConfig, device: torch.device, dtype: torch.dtype, compile_on: bool, micro: int) -> str:
    m = cfg.model
    return (f"{device_name(device)}|torch {torch.__version__}|model {_model_code()}|L{m.n_layer} H{m.n_head} "
            f"d{m.n_embd} T{m.block_size} V{m.n_vocab}|micro {micro}|{str(dtype).replace('torch.', '')}|"
            f"compile {compile_on}")


def calibration_path(cfg: RunConfig) -> Path:
    return data.cache_root(cfg.data) / CALIBRATION_FILE


# --------------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    """Timings of one shape on one device (seconds unless named otherwise)."""

    key: str
    """device|torch|shape|micro batch|dtype|compile."""
    device: str
    """Device in words (GPU model or CPU model and threads)."""
    micro_batch: int
    """Sequences per forward pass the timings are for."""
    measured_batch: int
    """Sequences actually timed (1 when a full micro-batch step was too slow and was scaled linearly)."""
    micro_s: float
    """Forward + backward of one micro-batch."""
    opt_s: float
    """Gradient clipping + AdamW step + zero_grad (once per optimizer step)."""
    eval_tokens_per_s: float
    """Forward-only tokens/s (validation)."""
    warmup_extra_s: float
    """Extra time of the first two steps over steady state (allocator warm-up, compilation)."""
    build_s: float
    """Model and optimizer construction."""
    checkpoint_bytes_per_s: float
    """torch.save write speed of model+optimizer state."""
    plot_s: float
    """Loss-curve figure written at the end of a run."""
    peak_mem_bytes: int
    """Peak device memory allocated during the timed steps (CUDA only; 0 elsewhere)."""
    timed_steps: int
    """Steady-state steps timed (the medians are used)."""
    spread: float
    """90th-percentile step time / median: near 1 on a quiet device, large when the CPU is shared."""
    measured_at: str
    """UTC time of the measurement."""
    cached: bool = False
    """Read from the calibration file rather than measured now."""

    def step_s(self, accum: int) -> float:
        """Seconds per optimizer step of ``accum`` micro-batches."""
        return accum * self.micro_s + self.opt_s


def measure(cfg: RunConfig, device: torch.device, dtype: torch.dtype, compile_on: bool, micro: int,
            timed_seconds: float = TIMED_SECONDS) -> Calibration:
    """Time real training steps of ``cfg.model`` at micro-batch ``micro`` (no data, no logging)."""
    m, tc = cfg.model, cfg.train
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    model = GPT(m).to(device)
    opt = optim.adamw(model.param_groups(tc.weight_decay), tc, device)  # the optimizer train.setup builds
    sync(device)
    build_s = time.perf_counter() - t0
    fwd = torch.compile(model) if compile_on else model
    amp = autocast(device, dtype)

    def batch(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(m.n_vocab, (b, m.block_size + 1), generator=gen)
        return ids[:, :-1].to(device), ids[:, 1:].to(device)

    def fb(x, y) -> None:
        with amp:
            _, loss = fwd(x, y)
        loss.backward()

    def opt_step() -> None:
        optim.clip_grad_norm(opt, list(model.parameters()), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    b = micro
    if micro > 1 and not compile_on:  # probe one sequence first: huge shapes on a CPU scale linearly
        x1, y1 = batch(1)
        fb(x1, y1)
        opt_step()
        sync(device)
        t = time.perf_counter()
        fb(x1, y1)
        sync(device)
        if micro * (time.perf_counter() - t) > PROBE_LIMIT_S:
            b = 1
        opt.zero_grad(set_to_none=True)
    x, y = batch(b)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    t = time.perf_counter()  # two warm-up steps (compilation happens in the first); one after a slow probe
    for _ in range(1 if b < micro else 2):
        fb(x, y)
        opt_step()
    sync(device)
    warm_s = time.perf_counter() - t

    fb_times: list[float] = []
    opt_times: list[float] = []
    start = time.perf_counter()
    while not fb_times or (time.perf_counter() - start < timed_seconds and len(fb_times) < MAX_TIMED_STEPS):
        t = time.perf_counter()
        fb(x, y)
        sync(device)
        t1 = time.perf_counter()
        opt_step()
        sync(device)
        fb_times.append(t1 - t)
        opt_times.append(time.perf_counter() - t1)
    # medians: a step stalled by another process sharing the CPU does not set the rate (see the docs)
    micro_s, opt_s, n = statistics.median(fb_times), statistics.median(opt_times), len(fb_times)
    steps_s = sorted(f + o for f, o in zip(fb_times, opt_times))
    spread = steps_s[int(0.9 * (n - 1))] / max(steps_s[(n - 1) // 2], 1e-9)
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0

    model.eval()
    eval_times: list[float] = []
    xe, ye = batch(eval_micro_batch(micro, m.block_size)) if b == micro else (x, y)  # as train.evaluate passes
    start = time.perf_counter()
    with torch.no_grad():
        while not eval_times or (time.perf_counter() - start < timed_seconds / 3 and len(eval_times) < MAX_TIMED_STEPS):
            t = time.perf_counter()
            with amp:
                fwd(xe, ye)
            sync(device)
            eval_times.append(time.perf_counter() - t)
    eval_tps = len(xe) * m.block_size / statistics.median(eval_times)
    model.train()

    scale = micro / b  # linear in sequences when timed at one sequence
    return Calibration(
        key=calibration_key(cfg, device, dtype, compile_on, micro), device=device_name(device),
        micro_batch=micro, measured_batch=b, micro_s=micro_s * scale, opt_s=opt_s, eval_tokens_per_s=eval_tps,
        warmup_extra_s=max(0.0, warm_s - (1 if b < micro else 2) * (micro_s + opt_s)), build_s=build_s,
        checkpoint_bytes_per_s=_checkpoint_speed(model, opt), plot_s=_plot_seconds(cfg),
        peak_mem_bytes=peak, timed_steps=n, spread=spread, measured_at=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )


def _checkpoint_speed(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    """Bytes/s of torch.save for model + optimizer state (at most CHECKPOINT_PROBE_BYTES written)."""
    state: dict[str, Any] = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    nbytes = _state_bytes(model)
    if nbytes > CHECKPOINT_PROBE_BYTES:  # time a slice of the weights, same writer
        state = {"probe": torch.zeros(CHECKPOINT_PROBE_BYTES // 4)}
        nbytes = CHECKPOINT_PROBE_BYTES
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        torch.save(state, Path(tmp) / "probe.pt")
        dt = time.perf_counter() - t
    return nbytes / max(dt, 1e-6)


def _state_bytes(model: torch.nn.Module) -> int:
    """Checkpoint size: fp32 weights + AdamW's two moments (12 B/param)."""
    n = sum(p.numel() for p in model.parameters())
    return 12 * n


def _plot_seconds(cfg: RunConfig) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        figures.loss_curve([3.0, 2.0, 1.0], Path(tmp) / "c.png", cfg.mode)
        return time.perf_counter() - t


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def calibrate(cfg: RunConfig, refresh: bool = False, timed_seconds: float = TIMED_SECONDS) -> Calibration:
    """Timings for ``cfg``'s shape on its device: from the cache, or measured now and cached."""
    device = pick_device(cfg.train.device)
    dtype = pick_dtype(cfg.train.dtype, device)
    compile_on = compile_used(cfg, device)
    micro = pick_micro_batch(cfg, device)
    key = calibration_key(cfg, device, dtype, compile_on, micro)
    path = calibration_path(cfg)
    entry = _read_cache(path).get(key)
    refresh = refresh or os.environ.get("SCALING_LAB_RECALIBRATE", "") not in ("", "0")
    if entry and not refresh:
        with contextlib.suppress(TypeError):
            return Calibration(**{**entry, "cached": True})
    cal = measure(cfg, device, dtype, compile_on, micro, timed_seconds)
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-measurement next time
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = _read_cache(path)
        cache[key] = {k: v for k, v in asdict(cal).items() if k != "cached"}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, path)
    return cal


# --------------------------------------------------------------------------- the estimate


@dataclass
class Estimate:
    """A run's plan and its predicted cost on the chosen device."""

    plan: Plan
    device: str
    dtype: str
    compile_on: bool
    micro_batch: int
    grad_accum: int
    calibration: Calibration
    tokens_per_s: float
    """Training tokens/s at this batch (measured steps, accumulation and optimizer included)."""
    parts_s: dict[str, float] = field(default_factory=dict)
    """Predicted seconds per phase: data, build, steps, eval, checkpoints, finish."""
    notes: list[str] = field(default_factory=list)
    """What the estimate leaves out (e.g. a download)."""
    weights_bytes: int = 0
    """Weights + gradients + AdamW moments."""
    activations_bytes: int = 0
    """Activation bound at micro_batch (see activation_bytes_per_seq)."""

    @property
    def total_s(self) -> float:
        return sum(self.parts_s.values())

    @property
    def peak_mem_bytes(self) -> int:
        return self.weights_bytes + self.activations_bytes


def _data_seconds(cfg: RunConfig, plan: Plan, notes: list[str]) -> float:
    """Tokenizing what the token cache lacks, at the tokenizer's measured speed on a sample of the text."""
    d = cfg.data
    needed = {d.train_split: plan.tokens_trained, d.val_split: cfg.train.eval_tokens * 4}
    root = data.cache_root(d)
    if data.is_local(d.dataset):
        try:
            files = data.local_files(d.dataset)
        except Exception:
            return 0.0
    else:
        files = {}

    def name(split: str) -> str:  # as data.open_split names the cache files
        if not data.is_local(d.dataset):
            return d.dataset
        return "local-" + "-".join(sorted({p.parent.name for p in files.get(split, [])}))[:40]

    missing = {s: n for s, n in needed.items() if not list(root.glob(f"{name(s)}-{s}-{d.tokenizer}{d.vocab_size}-*.json"))}
    if not missing:
        return 0.0
    if not data.is_local(d.dataset):
        notes.append(f"downloading and tokenizing {d.dataset} ({', '.join(missing)}) is not included")
        return 0.0
    sample = next((p for s in missing for p in files.get(s, []) if p.suffix in data.TEXT_EXTENSIONS), None)
    if sample is None:
        notes.append("tokenizing non-text local files is not included")
        return 0.0
    try:
        enc = data.get_encoding(d.vocab_size, d.tokenizer)
    except data.DataUnavailable:
        notes.append("tokenizer unavailable: tokenizing is not included (run the doctor entry point)")
        return 0.0
    with open(sample, "rb") as fh:
        text = fh.read(256 * 1024).decode("utf-8", errors="ignore")
    t = time.perf_counter()
    n_sample = len(enc.encode_ordinary(text))
    rate = n_sample / max(time.perf_counter() - t, 1e-6)  # tokens/s of this tokenizer on this text
    bytes_per_token = len(text.encode()) / max(n_sample, 1)
    total = 0
    for s, n in missing.items():
        available = sum(p.stat().st_size for p in files.get(s, [])) / bytes_per_token
        total += min(n, available)
    return total / rate


def estimate_run(cfg: RunConfig, refresh: bool = False, timed_seconds: float = TIMED_SECONDS) -> Estimate:
    """Plan, memory and wall time of ``cfg`` on its device, from a (cached) calibration.

    Phases predicted as train() runs them: data (tokenize what is not cached), build (model+optimizer),
    steps (warm-up + steps * step time), eval (validation passes), checkpoints (one per evaluation
    plus the final one), finish (loss-curve figure).
    """
    plan = make_plan(cfg)
    cal = calibrate(cfg, refresh=refresh, timed_seconds=timed_seconds)
    device = pick_device(cfg.train.device)
    accum = cfg.train.batch_size // cal.micro_batch
    step_s = cal.step_s(accum)
    notes: list[str] = []
    m = cfg.model
    n_total = counting.n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size)
    eval_windows = max(1, cfg.train.eval_tokens // m.block_size)
    n_evals = len(plan.eval_steps) + (0 if plan.eval_steps and plan.eval_steps[-1] == plan.steps else 1)
    if plan.checkpoint_every:
        n_ckpt = (plan.steps - 1) // plan.checkpoint_every + 1
    else:
        n_ckpt = len([s for s in plan.eval_steps if s < plan.steps]) + 1
    parts = {
        "data": _data_seconds(cfg, plan, notes),
        "build": cal.build_s,
        "steps": cal.warmup_extra_s + plan.steps * step_s,
        "eval": n_evals * eval_windows * m.block_size / cal.eval_tokens_per_s,
        "checkpoints": n_ckpt * 12 * n_total / cal.checkpoint_bytes_per_s,
        "finish": cal.plot_s,
    }
    return Estimate(
        plan=plan, device=f"{device} ({cal.device})", dtype=str(pick_dtype(cfg.train.dtype, device)).replace("torch.", ""),
        compile_on=compile_used(cfg, device), micro_batch=cal.micro_batch, grad_accum=accum, calibration=cal,
        tokens_per_s=plan.tokens_per_step / step_s, parts_s=parts, notes=notes,
        weights_bytes=OPTIMIZER_BYTES_PER_PARAM * n_total,
        activations_bytes=cal.micro_batch * activation_bytes_per_seq(cfg),
    )


def estimate_error(estimated_s: float, measured_s: float) -> float:
    """Signed relative error of the time estimate: +0.25 = predicted 25% longer than it took."""
    return estimated_s / measured_s - 1.0 if measured_s > 0 else float("nan")


# --------------------------------------------------------------------------- printing


def fmt_seconds(s: float) -> str:
    """3.2 s, 4 min 05 s, 2 h 10 min, 3 d 4 h."""
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    if s < 86400:
        return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
    return f"{int(s // 86400)} d {int(s % 86400 // 3600)} h"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


RULE_NAMES = {"kaplan": "6N (Kaplan)", "total": "6N_total", "chinchilla": "Hoffmann App. F",
              "exact": "matmuls incl. head and attention"}


def format_plan(cfg: RunConfig, est: Estimate) -> str:
    """The dry-run report: shape, N, D, C under each rule, batch, memory, throughput, time."""
    m, t, p, cal = cfg.model, cfg.train, est.plan, est.calibration
    budget = f"tokens={t.tokens:,}" if t.tokens else f"flops={t.flops:.4g} under {t.flops_rule}"
    c = "  ".join(f"{rule} {RULE_NAMES[rule]}: {p.counts[f'flops_{rule}']:.6e}" for rule in FLOPS_RULES)
    src = (f"cached {cal.measured_at}" if cal.cached else f"measured now, {cal.timed_steps} steps") + \
        (f", timed at 1 sequence and scaled x{cal.micro_batch}" if cal.measured_batch != cal.micro_batch else "")
    parts = " + ".join(f"{k} {fmt_seconds(v)}" for k, v in est.parts_s.items())
    mem_measured = f"; measured {fmt_bytes(cal.peak_mem_bytes)} allocated" if cal.peak_mem_bytes else ""
    lines = [
        f"dry run ({cfg.mode}): nothing trained, no MLflow run, no Optuna trial",
        f"  shape       n_layer {m.n_layer}, n_head {m.n_head}, n_embd {m.n_embd}, block_size {m.block_size}, "
        f"vocab_size {cfg.data.vocab_size} (n_vocab {m.n_vocab})",
        f"  N           n_params {p.counts['n_params']:,} (non-embedding, Kaplan)  "
        f"n_params_total {p.counts['n_params_total']:,} (embeddings included, Hoffmann)",
        f"  D           tokens_trained {p.tokens_trained:,} ({budget}: {p.steps:,} steps x "
        f"{p.tokens_per_step:,} tokens)",
        f"  C (FLOPs)   {c}   [flops_rule {t.flops_rule}]",
        f"  batch       batch_size {t.batch_size} = micro_batch {est.micro_batch} x grad_accum {est.grad_accum}; "
        f"{len(p.eval_steps)} evaluations of {max(1, t.eval_tokens // m.block_size) * m.block_size:,} tokens",
        f"  device      {est.device}, dtype {est.dtype}, compile {'on' if est.compile_on else 'off'}",
        f"  memory      expected peak {fmt_bytes(est.peak_mem_bytes)} = weights+grads+AdamW "
        f"{fmt_bytes(est.weights_bytes)} + activations {fmt_bytes(est.activations_bytes)}{mem_measured}",
        f"  throughput  {est.tokens_per_s:,.0f} training tokens/s, {cal.eval_tokens_per_s:,.0f} eval tokens/s "
        f"(calibration {src}; step-time p90/median {cal.spread:.1f})",
        f"  time        estimated {fmt_seconds(est.total_s)} = {parts}",
    ]
    notes = list(est.notes)
    if cal.spread > 2:
        notes.append(f"step times varied (p90 = {cal.spread:.1f} x median): the device looks shared; expect longer")
    notes.append("interpreter start and MLflow run setup (seconds) are not included")
    lines += [f"  note        {n}" for n in notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry-point helpers


def estimate_or_none(cfg: RunConfig) -> Estimate | None:
    """The estimate a real run is compared with afterwards; None on resume or when estimating fails
    (an estimate must never stop training)."""
    if cfg.train.resume:
        return None
    try:
        if not _cached(cfg):
            print(f"estimate: calibrating this shape on its device (cached in {calibration_path(cfg)})",
                  file=sys.stderr)
        return estimate_run(cfg)
    except Exception as exc:  # report and train anyway
        print(f"estimate: skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def _cached(cfg: RunConfig) -> bool:
    device = pick_device(cfg.train.device)
    key = calibration_key(cfg, device, pick_dtype(cfg.train.dtype, device), compile_used(cfg, device),
                          pick_micro_batch(cfg, device))
    return key in _read_cache(calibration_path(cfg))


def summary(est: Estimate | None, measured_s: float) -> str:
    """The summary-line fragment: estimated vs measured wall time and the signed error."""
    if est is None:
        return ""
    return (f"Estimated {fmt_seconds(est.total_s)} vs {fmt_seconds(measured_s)} measured "
            f"(estimate_error {estimate_error(est.total_s, measured_s):+.0%}). ")
