"""The ``doctor`` entry point: is this machine ready for a mode? Each check prints ok / FAIL / info,
and every FAIL comes with the exact fix. Exit 1 when something the chosen mode needs is missing.

Checks, in order: device (CUDA/MPS/CPU), bf16, torch.compile, free memory, token cache and checkpoint
folders, MLflow tracking store, Optuna storage, tokenizer (online or offline cache), datasets (the
chosen one is required; the other named ones are listed), and a measured throughput of the quick shape.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaling_lab import config, counting, data, estimate, tracking
from scaling_lab.estimate import OPTIMIZER_BYTES_PER_PARAM, fmt_bytes
from scaling_lab.runtime import (
    activation_bytes_per_seq,
    compile_used,
    device_name,
    pick_device,
    pick_dtype,
    pick_micro_batch,
)

DOCTOR_FIELDS = ["mode", "experiment", "dataset", "train_split", "val_split", "tokenizer", "vocab_size", "cache_dir",
                 "device", "dtype", "compile", "checkpoint_dir", "storage"]
DEFAULT_STORAGE = "sqlite:///optuna.db"  # the search entry point's default Optuna storage
TIKTOKEN_HOST = "openaipublic.blob.core.windows.net"
TIKTOKEN_FILES = {  # what tiktoken downloads for gpt2; cached as $TIKTOKEN_CACHE_DIR/<sha1(url)>
    "vocab.bpe": f"https://{TIKTOKEN_HOST}/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": f"https://{TIKTOKEN_HOST}/gpt-2/encodings/main/encoder.json",
}


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str
    """ok, FAIL (the mode needs it), warn (works, but worth knowing) or info."""
    detail: str
    fix: str = ""


# --------------------------------------------------------------------------- the checks


def check_device(cfg: config.RunConfig) -> tuple[list[Check], Any]:
    import torch


    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    seen = (f"CUDA: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if cuda else "CUDA: none") + \
        f"; MPS: {'yes' if mps else 'none'}; torch {torch.__version__}"
    try:
        device = pick_device(cfg.train.device)
    except config.ConfigError as exc:
        return [Check("device", "FAIL", f"device={cfg.train.device} is not available ({seen})",
                      f"pass device=auto or device=cpu ({exc})")], None
    return [Check("device", "ok", f"{device} = {device_name(device)} ({seen})")], device


def check_bf16(cfg: config.RunConfig, device) -> Check:
    """Run a tiny bf16 autocast matmul on the device; required when dtype resolves to bf16."""
    import torch


    try:
        wanted = pick_dtype(cfg.train.dtype, device)
    except config.ConfigError as exc:
        return Check("bf16", "FAIL", str(exc), "pass dtype=fp32")
    try:
        a = torch.randn(16, 16, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = a @ a
        works = out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    except Exception as exc:
        works, why = False, f"{type(exc).__name__}: {exc}"
    else:
        why = "autocast produced " + str(out.dtype)
    used = wanted == torch.bfloat16
    if works:
        return Check("bf16", "ok" if used else "info",
                     f"bf16 autocast works on {device.type}" + ("" if used else f" (mode {cfg.mode} uses fp32)"))
    return Check("bf16", "FAIL" if used else "info", f"bf16 autocast fails on {device.type} ({why})",
                 "pass dtype=fp32" if used else "")


def check_compile(cfg: config.RunConfig, device) -> Check:
    """torch.compile needs a C compiler (CPU inductor) or triton (CUDA); exercised when the run compiles."""
    import torch


    used = compile_used(cfg, device)
    if device.type == "cuda":
        try:
            import triton  # noqa: F401

            have, what = True, "triton " + getattr(sys.modules["triton"], "__version__", "?")
        except ImportError:
            have, what = False, "triton is not installed"
    else:
        cc = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        have, what = bool(cc), (f"C++ compiler {cc}" if cc else "no C++ compiler found (inductor needs one)")
    if not used:
        return Check("compile", "info", f"{'available' if have else 'unavailable'}: {what}; not exercised "
                     f"(compile={cfg.train.compile} on {device.type} does not compile)")
    if not have:
        return Check("compile", "FAIL", what, "pass compile=false, or install "
                     + ("triton (pip install triton)" if device.type == "cuda" else "a C++ compiler (apt-get install g++)"))
    t = time.perf_counter()
    try:
        f = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2)
        f(torch.randn(8, device=device))
    except Exception as exc:
        return Check("compile", "FAIL", f"torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}",
                     "pass compile=false")
    return Check("compile", "ok", f"{what}; a test function compiled in {time.perf_counter() - t:.1f} s")


def check_memory(cfg: config.RunConfig, device) -> Check:
    """Free memory against the expected peak of the chosen mode (weights+grads+AdamW + activations)."""
    import psutil
    import torch


    m = cfg.model
    micro = pick_micro_batch(cfg, device)
    need = OPTIMIZER_BYTES_PER_PARAM * counting.n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size) + \
        micro * activation_bytes_per_seq(cfg)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        where = "GPU"
    else:
        vm = psutil.virtual_memory()
        free, total = vm.available, vm.total
        where = "RAM"
    detail = f"{where} {fmt_bytes(free)} free of {fmt_bytes(total)}; mode {cfg.mode} needs about {fmt_bytes(need)} " \
             f"at micro_batch {micro}"
    if need > free:
        return Check("memory", "FAIL", detail, "pass a smaller micro_batch (accumulation keeps batch_size), or "
                     "free memory")
    return Check("memory", "ok", detail)


def check_folder(name: str, param: str, path: Path) -> Check:
    """A folder the run writes to: it must exist and be writable, or be creatable."""
    p = path.expanduser().resolve()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.is_dir() and os.access(probe, os.W_OK):
        free = shutil.disk_usage(probe).free
        return Check(name, "ok", f"{p} writable ({free / 2**30:.1f} GiB free on disk)"
                     + ("" if p.exists() else "; will be created"))
    return Check(name, "FAIL", f"{p} is not writable", f"pass {param}=<a writable folder>")


def check_tracking(experiment: str) -> Check:

    uri = tracking.tracking_uri()
    ok, detail = tracking.check_store(experiment)
    source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "default (MLFLOW_TRACKING_URI unset)"
    if ok:
        return Check("tracking store", "ok", f"{detail} [{source}]")
    fix = ("start the server (mlflow server --backend-store-uri sqlite:///mlflow.db --port 5000) or point "
           "MLFLOW_TRACKING_URI at a reachable store" if uri.startswith("http")
           else "export MLFLOW_TRACKING_URI=sqlite:///<a writable folder>/mlflow.db")
    return Check("tracking store", "FAIL", f"{detail} [{source}]", fix)


def check_storage(url: str) -> Check:
    """Optuna RDB storage: connect, read, and test that a write is allowed (nothing is created)."""
    from sqlalchemy import create_engine, inspect, text
    from sqlalchemy.engine import make_url

    if url.startswith("journal:"):
        return _check_journal(url)
    try:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
    except Exception:
        return Check("optuna storage", "FAIL", f"storage={url!r} is not a database URL",
                     "pass storage=sqlite:///optuna.db or storage=postgresql://user:password@host:5432/db")
    shown = tracking.masked(url)
    if backend == "sqlite":
        path = Path(parsed.database or "")
        if not parsed.database or parsed.database == ":memory:":
            return Check("optuna storage", "FAIL", f"{shown}: a study must live in a file",
                         "pass storage=sqlite:///optuna.db")
        folder = path.resolve().parent
        if not path.exists():
            if folder.is_dir() and os.access(folder, os.W_OK):
                return Check("optuna storage", "ok", f"{shown} (not created yet; folder {folder} is writable)")
            return Check("optuna storage", "FAIL", f"{shown}: folder {folder} is not writable",
                         "pass storage=sqlite:///<a writable folder>/optuna.db")
        if not (os.access(path, os.W_OK) and os.access(folder, os.W_OK)):
            return Check("optuna storage", "FAIL", f"{shown}: file or its folder is not writable",
                         "pass storage=sqlite:///<a writable folder>/optuna.db")
    args = {"connect_args": {"connect_timeout": 5}} if backend.startswith("postgres") else {}
    try:
        engine = create_engine(url, **args)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            tables = inspect(conn).get_table_names()
            if backend.startswith("postgres"):
                q = ("SELECT has_table_privilege('studies', 'INSERT')" if "studies" in tables
                     else "SELECT has_schema_privilege(current_schema(), 'CREATE')")
                if not conn.execute(text(q)).scalar():
                    return Check("optuna storage", "FAIL", f"{shown}: connected, but this user may not write",
                                 "GRANT ALL ON SCHEMA public TO <user> (or use a database the user owns)")
        engine.dispose()
    except Exception as exc:
        why = str(exc).splitlines()[0][:200]
        return Check("optuna storage", "FAIL", f"{shown}: {type(exc).__name__}: {why}",
                     "start the database server and check host, port, user and password in storage=..."
                     if backend != "sqlite" else "pass storage=sqlite:///<a writable folder>/optuna.db")
    studies = "has studies" if "studies" in tables else "no studies yet"
    return Check("optuna storage", "ok", f"{shown} (connected, writable, {studies})")


def _check_journal(url: str) -> Check:
    """A journal:///<file> storage (Optuna JournalStorage on a file): the log, or its folder, is writable."""
    path = Path(url[len("journal:///"):]) if url.startswith("journal:///") else Path("")
    fix = "pass storage=journal:///<a writable folder>/optuna.log"
    if not str(path) or str(path) == "." or url.endswith("/"):
        return Check("optuna storage", "FAIL", f"storage={url!r}: a journal storage is journal:///<file>", fix)
    folder = path.resolve().parent
    if path.exists():
        if path.is_file() and os.access(path, os.W_OK) and os.access(folder, os.W_OK):
            return Check("optuna storage", "ok", f"{url} (journal log, {path.stat().st_size:,} bytes)")
        return Check("optuna storage", "FAIL", f"{url}: not a writable file in a writable folder", fix)
    if folder.is_dir() and os.access(folder, os.W_OK):
        return Check("optuna storage", "ok", f"{url} (journal log not created yet; folder {folder} is writable)")
    return Check("optuna storage", "FAIL", f"{url}: folder {folder} is not writable", fix)


def tiktoken_cache_dir() -> tuple[Path | None, str]:
    """Where tiktoken looks for cached files (same rule as tiktoken.load.read_file_cached)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        d = os.environ["TIKTOKEN_CACHE_DIR"]
        return (Path(d) if d else None), "TIKTOKEN_CACHE_DIR"
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return Path(os.environ["DATA_GYM_CACHE_DIR"]), "DATA_GYM_CACHE_DIR"
    import tempfile

    return Path(tempfile.gettempdir()) / "data-gym-cache", "tiktoken's default (TIKTOKEN_CACHE_DIR unset)"


def check_tokenizer(cfg: config.RunConfig) -> Check:
    """Load the tokenizer for real; describe the offline state: cache folder, cached files, host reachable."""

    folder, source = tiktoken_cache_dir()
    cached = [n for n, url in TIKTOKEN_FILES.items()
              if folder is not None and (folder / hashlib.sha1(url.encode()).hexdigest()).exists()]
    online = data.reachable(TIKTOKEN_HOST)
    state = (f"cache {folder} [{source}] holds {len(cached)}/{len(TIKTOKEN_FILES)} gpt2 files"
             if folder else "cache disabled (TIKTOKEN_CACHE_DIR is empty)")
    state += f"; {TIKTOKEN_HOST} {'reachable' if online else 'unreachable (offline)'}"
    try:
        enc = data.get_encoding(cfg.data.vocab_size, cfg.data.tokenizer)
        ids = enc.encode_ordinary("Hello world")
    except data.DataUnavailable as exc:
        return Check("tokenizer", "FAIL", f"{cfg.data.tokenizer} cannot be loaded: {state}",
                     "export TIKTOKEN_CACHE_DIR=<folder with tiktoken's cached gpt2 files: sha1-named copies of "
                     "vocab.bpe and encoder.json, see docs/estimate-and-doctor.md> "
                     f"(or allow https://{TIKTOKEN_HOST}) [{exc}]")
    how = "from the offline cache" if (len(cached) == len(TIKTOKEN_FILES) and not online) else \
        ("from the cache" if len(cached) == len(TIKTOKEN_FILES) else "downloaded")
    return Check("tokenizer", "ok", f"{cfg.data.tokenizer} loaded {how} (vocab_size {cfg.data.vocab_size}: "
                 f"n_vocab {enc.n_vocab}, 'Hello world' -> {ids}); {state}")


def _hf_cache_has(name: str) -> bool:

    path, conf, _ = data.HUB[name]
    root = Path(os.environ.get("HF_DATASETS_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                          "huggingface")) / "datasets")
    folder = root / path.replace("/", "___")
    return folder.is_dir() and (conf is None or (folder / conf).is_dir())


def check_datasets(cfg: config.RunConfig) -> list[Check]:
    """The chosen dataset is required; the other named datasets are listed as info."""

    out = []
    chosen = cfg.data.dataset
    hub = data.hub_reachable()
    hub_state = "Hugging Face hub reachable" if hub else "Hugging Face hub unreachable (offline or HF_HUB_OFFLINE=1)"
    if data.is_local(chosen):
        try:
            data.validate_source(cfg.data)
            files = data.local_files(chosen)
            listing = "; ".join(f"{s}: {', '.join(p.name for p in ps)} ({sum(p.stat().st_size for p in ps) / 1e6:.1f} MB)"
                                for s, ps in sorted(files.items()))
            out.append(Check("dataset", "ok", f"local {chosen} -> {listing}; trains on '{cfg.data.train_split}', "
                             f"scores '{cfg.data.val_split}'"))
        except config.ConfigError as exc:
            out.append(Check("dataset", "FAIL", f"local dataset {chosen}: {exc}",
                             "pass dataset=<folder with train*/valid*/test* .txt/.raw, .parquet or .jsonl files> "
                             "and train_split/val_split naming splits it holds (e.g. train_split=test)"))
    elif hub:
        out.append(Check("dataset", "ok", f"{chosen}: {hub_state} ({data.HUB[chosen][0]})"))
    else:
        cache = " (a Hugging Face cache copy exists, but loading needs the hub)" if _hf_cache_has(chosen) else ""
        out.append(Check("dataset", "FAIL", f"{chosen}: {hub_state}{cache}; no local path given",
                         "pass dataset=/path/to/dir with local text files, e.g. dataset=<dir with wiki.valid.raw and "
                         "wiki.test.raw> train_split=test; or connect to https://huggingface.co"))
    for name in config.NAMED_DATASETS:
        if name != chosen:
            out.append(Check(f"  {name}", "info", ("loadable from the hub" if hub else "not loadable: hub unreachable")
                             + (" (Hugging Face cache present)" if _hf_cache_has(name) else "")))
    return out


def check_throughput(cfg: config.RunConfig, device) -> Check:
    """A fresh calibration of the quick shape on the chosen device: tokens/s and the quick run's estimate."""

    quick = config.resolve({"mode": "quick", "device": cfg.train.device, "cache_dir": cfg.data.cache_dir,
                            "dataset": cfg.data.dataset if cfg.mode == "quick" else "",
                            "train_split": cfg.data.train_split if cfg.mode == "quick" else "",
                            "val_split": cfg.data.val_split if cfg.mode == "quick" else ""})
    try:
        est = estimate.estimate_run(quick, refresh=True)
    except Exception as exc:
        return Check("throughput", "FAIL", f"quick shape could not run: {type(exc).__name__}: {exc}",
                     "check the device lines above")
    m = quick.model
    return Check("throughput", "ok", f"quick shape (L{m.n_layer} d{m.n_embd} T{m.block_size} V{m.n_vocab}, "
                 f"micro_batch {est.micro_batch}, {est.dtype}): {est.tokens_per_s:,.0f} training tokens/s measured "
                 f"now -> quick run ({quick.train.tokens:,} tokens) about {estimate.fmt_seconds(est.total_s)}")


# --------------------------------------------------------------------------- the report


def run_checks(args: dict[str, Any]) -> list[Check]:
    """All checks for the configuration ``args`` (field names as in the main and search entry points)."""
    storage = args.pop("storage", None) or DEFAULT_STORAGE
    try:
        cfg = config.resolve(args)
    except config.ConfigError as exc:
        return [Check("parameters", "FAIL", str(exc), f"fix parameter '{exc.param}'")]
    checks, device = check_device(cfg)
    if device is not None:
        checks += [check_bf16(cfg, device), check_compile(cfg, device), check_memory(cfg, device)]

    checks += [check_folder("token cache", "cache_dir", data.cache_root(cfg.data)),
               check_folder("checkpoints", "checkpoint_dir", Path(cfg.train.checkpoint_dir)),
               check_tracking(cfg.experiment), check_storage(storage), check_tokenizer(cfg)]
    checks += check_datasets(cfg)
    if device is not None:
        checks.append(check_throughput(cfg, device))
    return checks


def report(checks: list[Check], mode: str) -> str:
    lines = [f"scaling-lab doctor (mode {mode})"]
    for c in checks:
        lines.append(f"  {c.status:<4}  {c.name:<15} {c.detail}")
        if c.fix:
            lines.append(f"  {'':<4}  {'':<15} fix: {c.fix}")
    failed = [c.name for c in checks if c.status == "FAIL"]
    lines.append(f"doctor: {len(failed)} problem(s) for mode {mode}: {', '.join(failed)}" if failed
                 else f"doctor: ready for mode {mode}")
    return "\n".join(lines)
