"""Where and how a run computes: device, precision, autocast, compile rule, micro-batch, torchrun processes,
signals. torch only (no mlflow, no data)."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import torch

from scaling_lab.config import RunConfig
from scaling_lab.errors import ConfigError

# --------------------------------------------------------------------------- device and precision


def pick_device(name: str) -> torch.device:
    """auto: CUDA, then MPS, then CPU; a named device that is absent is a ConfigError."""
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


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX). Elsewhere bf16 autocast is emulated: the
    quick shape's step took 2,736 ms in bf16 against 198 ms in fp32 on an AVX2-only EPYC (2026-12-03)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume not
        return False


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype. auto: bf16 on CUDA (when supported) and on a CPU with native bf16 (measured 1.5-1.9x faster
    on the quick shape with AVX-512 BF16, benchmarks/RESULTS.md), fp32 on other CPUs and on MPS."""
    if name == "fp32":
        return torch.float32
    if name == "auto" and device.type == "cpu" and not cpu_bf16_native():
        return torch.float32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if name == "bf16":
            raise ConfigError("dtype", name, "fp32 or auto on this GPU (no bf16)")
        return torch.float32
    if name == "auto" and device.type == "mps":
        return torch.float32
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """torch.autocast for bf16, a no-op context for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def compile_used(cfg: RunConfig, device: torch.device) -> bool:
    """torch.compile rule: compile=true, or auto on CUDA (on CPU compiling did not repay itself, docs)."""
    return cfg.train.compile == "true" or (cfg.train.compile == "auto" and device.type == "cuda")


def activation_bytes_per_seq(cfg: RunConfig) -> int:
    """Activation memory of one sequence (bytes, fp32 upper bound): layers * T * d * 34 * 2 (Korthikanti et al.
    2022, Eq. 2 without the attention-score term SDPA avoids) plus logits, their softmax and grad T * V * 12."""
    m = cfg.model
    return m.n_layer * m.block_size * m.n_embd * 34 * 2 + m.block_size * m.n_vocab * 12


def pick_micro_batch(cfg: RunConfig, device: torch.device) -> int:
    """micro_batch when given, else the largest divisor of batch_size whose activations fit in half the free
    memory."""
    t = cfg.train
    if t.micro_batch:
        return t.micro_batch
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    fit = max(1, int(0.5 * free // activation_bytes_per_seq(cfg)))
    return max(d for d in range(1, t.batch_size + 1) if t.batch_size % d == 0 and d <= fit)


EVAL_PASS_TOKENS = 512  # validation tokens per forward pass, at least (measured: benchmarks/RESULTS.md)


def eval_micro_batch(micro: int, block_size: int) -> int:
    """Validation windows per forward pass: the training micro-batch, or EVAL_PASS_TOKENS tokens' worth when that
    is more. Without gradients a pass holds no activations for backward, so this never needs more memory than
    a training micro-batch of one sequence at block_size >= EVAL_PASS_TOKENS. On a CPU, 1-sequence passes of a
    tiny model are per-operation overhead: 16k validation tokens took 2-4x as long at batch 1 x 64 as at 8 x 64,
    the fastest or near it for d = 8..48 (16 x 64 was slower again)."""
    return max(micro, EVAL_PASS_TOKENS // block_size)


def device_name(device: torch.device) -> str:
    """Human-readable device: GPU model, or CPU model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# --------------------------------------------------------------------------- threads


def physical_cores(cpus: set[int] | None = None) -> int:
    """Physical cores among the CPUs this process may run on (os.sched_getaffinity; the hyper-threads of one
    core count once)."""
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:  # no sysfs (macOS, containers): one core per CPU
            cores.add(("cpu", str(c)))
    return max(1, len(cores))


def configure_threads(share: int = 0) -> int:
    """torch's intra-op threads for this process: OMP_NUM_THREADS when the user set it, else the physical cores
    it may use divided by ``share`` (processes sharing them; 0 = torchrun's LOCAL_WORLD_SIZE, else 1). The wait
    policy is set before torch loads (scaling_lab/__init__.py). Returns the thread count."""
    user = os.environ.get("OMP_NUM_THREADS", "").strip()
    share = share or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    n = int(user) if user.isdigit() and int(user) > 0 else max(1, physical_cores() // max(1, share))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def thread_params() -> dict[str, object]:
    """What a run logs about its threads: the OpenMP wait policy and torch's thread count."""
    return {"runtime.omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "unset",
            "runtime.num_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- signals


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set a flag the loop checks after each step (checkpoint, then stop KILLED); a second
    signal stops at once."""
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


def barrier() -> None:
    """All processes wait here (torchrun)."""
    import torch.distributed as dist

    dist.barrier()


def sum_over_processes(t: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """Element-wise sum of a small CPU tensor over all processes (itself with one process)."""
    if world > 1:
        import torch.distributed as dist

        t = t.to(device)  # NCCL reduces CUDA tensors only; gloo CPU ones
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t.cpu()
    return t
