"""Compute-optimal search: one resumable Optuna isoFLOP study per FLOP budget, Kaplan against Chinchilla.

For a budget C each trial trains one model shape from a documented family (``shape_for``) on
D = C / flops_per_token(N) tokens, so every trial of a study spends the same training FLOPs under
``flops_rule``. Two trials are enqueued first: the size Kaplan et al. (2020) and the size Hoffmann
et al. (2022) predict for C. Intermediate validation losses are reported at the same fractions of
the budget (10%, 20%, ... 100%) so a pruner compares trials of different sizes fairly.

MLflow: one parent run per study (tags ``scaling_lab.kind=study``), one child run per trial
(``scaling_lab.kind=trial``, ``allocation``, ``trial_state``). Pruned trials end KILLED with
``trial_state=PRUNED`` and keep their partial curves; failed ones end FAILED with the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import multiprocessing as mp
import os
import socket
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from scaling_lab import config, counting
from scaling_lab.config import ConfigError, ModelConfig, n_vocab_for

# --------------------------------------------------------------------------- published allocations

PF_DAY = 1e15 * 86_400  # FLOPs in one petaflop/s-day (Kaplan et al. 2020, Sec. 1.3)
KAPLAN_N_COEF = 1.3e9  # Kaplan et al. 2020, Eq. 6.1: N_opt = 1.3e9 * (C_min / PF-day)^0.73, N non-embedding
KAPLAN_N_EXP = 0.73
CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022: a = b = 0.50 (Table 3, Approaches 1-2); Chinchilla
# itself is 70B parameters on 1.4T tokens (Sec. 4), 20 tokens per parameter; N counts all parameters.

ALLOCATIONS = ("kaplan", "chinchilla", "search")
SAMPLERS = ("grid", "tpe", "random")
PRUNERS = ("median", "none")
MIN_STEPS = 10  # every trial needs 10 optimizer steps: one per reported budget fraction
# Optuna trial heartbeat period (s); a trial silent for GRACE_S is failed and retried once. The environment
# may shorten both (tests of killed workers, see docs/scaling-out.md).
HEARTBEAT_S = int(os.environ.get("SCALING_LAB_HEARTBEAT_S", "30"))
GRACE_S = int(os.environ.get("SCALING_LAB_GRACE_S", "120"))
POLL_S = 2.0  # how often an idle worker looks at the study again while other workers' trials run (s)
FRACTIONS = 10  # intermediate losses reported at k/10 of the budget, k = 1..10


def kaplan_n(flops: float) -> float:
    """Kaplan-optimal non-embedding parameters for C training FLOPs (Kaplan et al. 2020, Eq. 6.1)."""
    return KAPLAN_N_COEF * (flops / PF_DAY) ** KAPLAN_N_EXP


def chinchilla_n(flops: float) -> float:
    """Chinchilla-optimal total parameters: C = 6 N D with D = 20 N, so N = sqrt(C / 120) (Hoffmann et al. 2022)."""
    return math.sqrt(flops / (6.0 * CHINCHILLA_TOKENS_PER_PARAM))


# --------------------------------------------------------------------------- the model family

# Widths d_model searched, about x1.4 apart. Depth and heads follow from the width (shape_for).
LADDER = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def shape_for(n_embd: int) -> tuple[int, int]:
    """(n_layer, n_head) for a width: depth grows with log2 of width for small models (1 layer at d <= 16,
    4 at d = 128, as in the CPU probes) and as d/64 for large ones (GPT-2 small: d = 768, 12 layers);
    heads of 16 dims below d = 256, of 64 dims from there on."""
    n_layer = max(1, round(math.log2(n_embd / 8)), round(n_embd / 64))
    n_head = max(1, n_embd // 64) if n_embd >= 256 else max(1, n_embd // 16)
    return n_layer, n_head


def model_at(rung: int, vocab_size: int, block_size: int) -> ModelConfig:
    """The model of ladder position ``rung``."""
    d = LADDER[rung]
    n_layer, n_head = shape_for(d)
    return ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=d, block_size=block_size, n_vocab=n_vocab_for(vocab_size))


def nearest_rung(target: float, sizes: list[float]) -> int:
    """Ladder position whose size is nearest to ``target`` on a log scale."""
    t = math.log(max(target, 1.0))
    return min(range(len(sizes)), key=lambda i: abs(math.log(sizes[i]) - t))


# --------------------------------------------------------------------------- configuration


@dataclass
class SearchConfig:
    """One search: budgets, study storage, sampler, the batch rule and the data every trial trains on."""

    mode: str = "quick"
    """Search preset (tiny, quick, standard, full); also the training mode of each trial."""
    experiment: str = "scaling-lab"
    """MLflow experiment of the study and trial runs."""
    budgets: str = ""
    """Comma-separated training FLOP budgets C, e.g. 1e11,3e11,1e12 ('' = the mode's)."""
    trials: int = 0
    """Finished trials wanted per budget, seeded ones included (0 = the mode's; grid: every size in range)."""
    storage: str = "sqlite:///optuna.db"
    """Optuna RDB storage URL (sqlite:///optuna.db, postgresql://user:pw@host/db)."""
    study_prefix: str = "isoflop"
    """Study name = <study_prefix>-C<budget>-<flops_rule>."""
    flops_rule: str = "total"
    """FLOPs per token rule that defines the budget: kaplan (6N), total (6N_total), chinchilla (App. F)."""
    sampler: str = "grid"
    """grid (every size in range once), tpe, or random."""
    pruner: str = "median"
    """median (Optuna MedianPruner) or none."""
    prune_warmup: int = 3
    """Budget tenths before pruning may act (MedianPruner n_warmup_steps)."""
    prune_startup: int = 3
    """Finished trials before pruning may act (MedianPruner n_startup_trials)."""
    seed: int = 1337
    """Seed of the sampler and of every trial's training (same data order for every size)."""
    workers: int = 1
    """Parallel worker processes per study (several need a server storage such as PostgreSQL)."""
    pad: int = 2
    """Sizes searched above the larger seeded size."""
    pad_below: int = 0
    """Sizes searched below the smaller seeded size (widening adds more when the best is the smallest)."""
    widen: int = 2
    """Extra sizes tried, one at a time, when the best size is at an edge of the range."""
    steps_target: int = 2000
    """Batch rule: batch_size = D / (steps_target * block_size) as a power of two, clipped to batch_min..batch_max."""
    batch_min: int = 1
    """Smallest batch in sequences."""
    batch_max: int = 512
    """Largest batch in sequences."""
    lr: float = 3e-3
    """Peak AdamW learning rate of every trial."""
    block_size: int = 64
    """Context length of every trial."""
    vocab_size: int = 512
    """GPT-2 BPE ranks kept (small vocabularies keep the embedding from dominating small models)."""
    eval_tokens: int = 16384
    """Validation tokens scored at each of the 10 evaluations."""
    dataset: str = "wikitext-2"
    """Dataset name or local path (as in the main entry point)."""
    train_split: str = "train"
    """Split to train on."""
    val_split: str = "validation"
    """Split to score on."""
    cache_dir: str = ""
    """Token cache folder ('' = default)."""
    device: str = "auto"
    """Training device of every trial."""
    dtype: str = "fp32"
    """Autocast precision of every trial: fp32, bf16, auto (fp32 on CPU here: bf16 autocast is slower for tiny widths)."""
    checkpoint_dir: str = "checkpoints"
    """Folder for trial checkpoints."""
    dry_run: bool = False
    """Print each budget's plan (sizes, tokens, batch, estimated time) and exit; create no study and no run."""

    def __post_init__(self) -> None:
        config._choice("mode", self.mode, tuple(SEARCH_MODES))
        self.budget_list()  # validates
        config._positive_int("trials", self.trials, allow_zero=True)
        validate_storage_url(self.storage)
        if not self.study_prefix or any(c.isspace() for c in self.study_prefix):
            raise ConfigError("study_prefix", self.study_prefix, "a non-empty name without spaces")
        config._choice("flops_rule", self.flops_rule, config.FLOPS_RULES)
        config._choice("sampler", self.sampler, SAMPLERS)
        config._choice("pruner", self.pruner, PRUNERS)
        for name in ("prune_warmup", "prune_startup", "seed", "pad", "pad_below", "widen"):
            config._positive_int(name, getattr(self, name), allow_zero=True)
        for name in ("workers", "steps_target", "batch_min", "batch_max", "block_size", "eval_tokens"):
            config._positive_int(name, getattr(self, name))
        if self.batch_max < self.batch_min:
            raise ConfigError("batch_max", self.batch_max, f">= batch_min={self.batch_min}")
        if self.trials == 1:
            raise ConfigError("trials", self.trials, "0 (the mode's) or at least 2 (the two seeded trials)")
        if self.workers > 1 and self.storage.startswith("sqlite"):
            raise ConfigError("workers", self.workers, "1 with SQLite storage; several workers need a server "
                              "storage such as postgresql://user:pw@host/db (see docs/search.md)")
        config._positive_float("lr", self.lr)
        config.DataConfig(dataset=self.dataset, train_split=self.train_split, val_split=self.val_split,
                          vocab_size=self.vocab_size, cache_dir=self.cache_dir)
        config.TrainConfig(tokens=1, device=self.device, dtype=self.dtype)

    def budget_list(self) -> list[float]:
        """The budgets as floats, validated: positive, finite, distinct."""
        out = []
        for part in str(self.budgets).split(","):
            try:
                c = float(part)
            except ValueError:
                raise ConfigError("budgets", self.budgets, "comma-separated positive FLOP counts, e.g. 1e11,1e12") from None
            if not (math.isfinite(c) and c > 0):
                raise ConfigError("budgets", self.budgets, "comma-separated positive FLOP counts, e.g. 1e11,1e12")
            out.append(c)
        if len(set(out)) != len(out):
            raise ConfigError("budgets", self.budgets, "distinct budgets")
        return sorted(out)


# Presets. quick: ~30 min on 2 CPU cores (docs/search.md has the measured time and the reasons for
# the batch rule and the vocabulary). tiny: seconds per trial, for tests.
SEARCH_MODES: dict[str, dict[str, Any]] = {
    "tiny": dict(budgets="2e9,6e9", sampler="grid", pad=1, widen=0, steps_target=40, batch_min=1, batch_max=64,
                 block_size=64, vocab_size=256, eval_tokens=2048, lr=3e-3, prune_startup=2, prune_warmup=5,
                 dtype="fp32"),
    "quick": dict(budgets="3e10,1e11,3e11", sampler="grid", pad=1, widen=2, steps_target=2000, batch_min=1,
                  batch_max=512, block_size=64, vocab_size=512, eval_tokens=16384, lr=3e-3, dtype="fp32"),
    "standard": dict(budgets="1e15,3e15,1e16", sampler="tpe", trials=10, pad=2, widen=2, steps_target=3000,
                     batch_min=8, batch_max=512, block_size=256, vocab_size=config.GPT2_VOCAB,
                     dataset="wikitext-103", eval_tokens=131072, lr=1e-3, dtype="auto"),
    "full": dict(budgets="1e17,3e17,1e18", sampler="tpe", trials=12, pad=2, widen=2, steps_target=5000,
                 batch_min=32, batch_max=1024, block_size=1024, vocab_size=config.GPT2_VOCAB,
                 dataset="openwebtext", eval_tokens=1048576, lr=6e-4, dtype="auto"),
}
SEARCH_FIELDS = [f.name for f in fields(SearchConfig)]
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def resolve_search(overrides: dict[str, Any] | None = None) -> SearchConfig:
    """Defaults < mode preset < explicit overrides ('' / None unset). Raises ConfigError naming the field."""
    raw = {k: v for k, v in (overrides or {}).items() if v is not None and not (isinstance(v, str) and not v.strip())}
    unknown = sorted(set(raw) - set(SEARCH_FIELDS))
    if unknown:
        raise ConfigError(unknown[0], raw[unknown[0]], "one of " + ", ".join(SEARCH_FIELDS))
    types = {f.name: _TYPES[f.type if isinstance(f.type, str) else f.type.__name__] for f in fields(SearchConfig)}
    given: dict[str, Any] = {}
    for k, v in raw.items():
        given[k] = _parse(k, v, types[k])
    mode = given.get("mode", "quick")
    config._choice("mode", mode, tuple(SEARCH_MODES))
    values = {**SEARCH_MODES[mode], **given}
    if isinstance(values.get("budgets"), (int, float)):
        values["budgets"] = str(values["budgets"])
    return SearchConfig(**values)


def _parse(name: str, raw: Any, t: type) -> Any:
    if not isinstance(raw, str):
        return raw
    s = raw.strip()
    if t is bool:
        if s.lower() not in _TRUE + _FALSE:
            raise ConfigError(name, raw, "true or false (also 1/0, yes/no)")
        return s.lower() in _TRUE
    try:
        if t is int:
            v = float(s)
            if not v.is_integer():
                raise ValueError
            return int(v)
        if t is float:
            return float(s)
    except ValueError:
        raise ConfigError(name, raw, "an integer" if t is int else "a number") from None
    return s


def validate_storage_url(url: str) -> None:
    """An Optuna RDB URL: dialect[+driver]://... (sqlite:///file.db, postgresql://user:pw@host/db)."""
    allowed = "an Optuna RDB URL such as sqlite:///optuna.db or postgresql://user:password@host:5432/db"
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError("storage", url, allowed)
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        parsed.get_dialect()
    except Exception:
        raise ConfigError("storage", url, allowed) from None
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database:
            raise ConfigError("storage", url, "sqlite:///<file> (a file, not memory: the study must outlive the process)")
    elif not parsed.host:
        raise ConfigError("storage", url, allowed)


def masked(url: str) -> str:
    """Storage URL with any password hidden (for tags and console)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# --------------------------------------------------------------------------- one budget's plan


@dataclass
class BudgetPlan:
    """What one budget's study searches: its name, the size range, the two seeded sizes."""

    budget: float
    study_name: str
    lo: int
    """Smallest ladder position searched."""
    hi: int
    """Largest ladder position searched."""
    cap: int
    """Largest ladder position that affords MIN_STEPS steps at batch_min."""
    kaplan_rung: int
    chinchilla_rung: int
    kaplan_n: float
    """Kaplan's predicted N (non-embedding)."""
    chinchilla_n: float
    """Chinchilla's predicted N (total)."""

    @property
    def seeds(self) -> list[tuple[str, int]]:
        return [("kaplan", self.kaplan_rung), ("chinchilla", self.chinchilla_rung)]


def study_name(scfg: SearchConfig, budget: float) -> str:
    return f"{scfg.study_prefix}-C{budget:.3g}-{scfg.flops_rule}".replace("+", "")


def min_budget(model: ModelConfig, scfg: SearchConfig) -> float:
    """FLOPs that give ``model`` MIN_STEPS optimizer steps of batch_min sequences."""
    return MIN_STEPS * scfg.batch_min * model.block_size * counting.flops_per_token(model, scfg.flops_rule)


def plan_budget(scfg: SearchConfig, budget: float) -> BudgetPlan:
    """Range of sizes for one budget: from pad_below under the smaller seeded size to pad above the larger,
    no larger than a size that gets MIN_STEPS steps."""
    models = [model_at(r, scfg.vocab_size, scfg.block_size) for r in range(len(LADDER))]
    if budget < min_budget(models[0], scfg):
        m = models[0]
        raise ConfigError("budgets", f"{budget:g}", f"budgets >= {min_budget(m, scfg):.3g} FLOPs: the smallest model "
                          f"(L{m.n_layer} d{m.n_embd}, N_total {counting.n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size):,}) "
                          f"needs {MIN_STEPS} steps of {scfg.batch_min}x{scfg.block_size} tokens")
    cap = max(r for r, m in enumerate(models) if min_budget(m, scfg) <= budget)
    nonembed = [counting.n_params_nonembed(m.n_layer, m.n_embd) for m in models]
    total = [counting.n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size) for m in models]
    nk, nc = kaplan_n(budget), chinchilla_n(budget)
    rk, rc = min(nearest_rung(nk, nonembed), cap), min(nearest_rung(nc, total), cap)
    lo, hi = max(0, min(rk, rc) - scfg.pad_below), min(cap, max(rk, rc) + scfg.pad)
    return BudgetPlan(budget, study_name(scfg, budget), lo, hi, cap, rk, rc, nk, nc)


def batch_for(tokens: float, scfg: SearchConfig) -> int:
    """Batch rule: sequences per step so a run takes about steps_target steps (power of two, clipped)."""
    want = tokens / (scfg.steps_target * scfg.block_size)
    b = 2 ** round(math.log2(max(want, 1e-9)))
    return int(min(scfg.batch_max, max(scfg.batch_min, b)))


def trial_config(scfg: SearchConfig, budget: float, rung: int, run_name: str = "") -> config.RunConfig:
    """The training configuration of the trial at ladder position ``rung`` for budget C."""
    m = model_at(rung, scfg.vocab_size, scfg.block_size)
    tokens = counting.tokens_for_flops(m, budget, scfg.flops_rule)
    b = batch_for(tokens, scfg)
    return config.resolve({
        "mode": scfg.mode, "experiment": scfg.experiment, "run_name": run_name, "dataset": scfg.dataset,
        "train_split": scfg.train_split, "val_split": scfg.val_split, "vocab_size": scfg.vocab_size,
        "cache_dir": scfg.cache_dir, "n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd,
        "block_size": scfg.block_size, "flops": budget, "flops_rule": scfg.flops_rule, "batch_size": b,
        "micro_batch": b, "lr": scfg.lr, "eval_tokens": scfg.eval_tokens, "eval_every": "", "device": scfg.device,
        "dtype": scfg.dtype,
        "seed": scfg.seed, "checkpoint_dir": scfg.checkpoint_dir,
    })


# --------------------------------------------------------------------------- Optuna plumbing


def storage_url(url: str) -> str:
    """``url`` with a driver SQLAlchemy can load: a plain ``postgresql://`` means psycopg 3 to SQLAlchemy 2.1;
    when only psycopg2 is installed it becomes ``postgresql+psycopg2://``."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


class StudyLock:
    """A lock every process that opens the study shares, for the few storage steps that must not interleave:
    find-or-create the study's parent run and enqueue its sizes; see that a trial waits and take it. A
    PostgreSQL (or MySQL) storage gives a session lock in the study's own database, so workers on several
    machines share it and a dead worker's lock ends with its connection; a SQLite storage gives an flock on
    ``<file>.lock`` beside the database (one lock per file, for the processes of one machine). Held for
    milliseconds, never while training. ``release`` may be called more than once."""

    def __init__(self, url: str, name: str):
        from sqlalchemy.engine import make_url

        self.url, self.name = storage_url(url), name
        self.backend = make_url(self.url).get_backend_name()
        # 64-bit key of the study name (pg_advisory_lock takes a bigint)
        self.key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        self._conn = None
        self._file = None

    def acquire(self) -> StudyLock:
        if self.backend in ("postgresql", "mysql"):
            from sqlalchemy import create_engine, text
            from sqlalchemy.pool import NullPool

            self._conn = create_engine(self.url, poolclass=NullPool).connect()
            sql = ("SELECT pg_advisory_lock(:k)" if self.backend == "postgresql"
                   else "SELECT GET_LOCK(:n, 600)")
            self._conn.execute(text(sql), {"k": self.key, "n": f"scaling-lab:{self.name}"[:64]})
        elif self.backend == "sqlite":
            import fcntl

            from sqlalchemy.engine import make_url

            self._file = open(f"{make_url(self.url).database}.lock", "a")  # noqa: SIM115 (held until release)
            fcntl.flock(self._file, fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()  # a session lock ends with its session
            finally:
                self._conn = None
        if self._file is not None:
            try:
                self._file.close()  # closing the file drops the flock
            finally:
                self._file = None

    def __enter__(self) -> StudyLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def make_storage(url: str):
    """RDBStorage with heartbeats: a trial whose process died is marked FAIL after the grace period and
    retried once (RetryHeartbeatStaleTrialCallback), so several workers can share one study."""
    import warnings

    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = storage_url(url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}
    try:
        # under a lock: two commands opening an empty database at once would both create Optuna's tables
        with warnings.catch_warnings(), StudyLock(url, "optuna-schema"):
            warnings.simplefilter("ignore")  # heartbeats are "experimental" in Optuna 5
            return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    except Exception as exc:  # bad driver, unreachable server, wrong password: one line
        raise ConfigError("storage", masked(url), f"a reachable Optuna RDB storage ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]})") from None


def make_sampler(scfg: SearchConfig):
    import optuna

    if scfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=scfg.seed, n_startup_trials=3)
    return optuna.samplers.RandomSampler(seed=scfg.seed)  # grid: every size is enqueued; random fills gaps only


def make_pruner(scfg: SearchConfig):
    import optuna

    if scfg.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=scfg.prune_startup, n_warmup_steps=scfg.prune_warmup)


def open_study(scfg: SearchConfig, plan: BudgetPlan, storage, pruner=None):
    """Create or load the budget's study (load_if_exists) and record its budget and range."""
    import optuna

    study = optuna.create_study(study_name=plan.study_name, storage=storage, sampler=make_sampler(scfg),
                                pruner=pruner or make_pruner(scfg), direction="minimize", load_if_exists=True)
    attrs = study.user_attrs
    lo = min(plan.lo, attrs.get("range_lo", plan.lo))
    hi = max(plan.hi, attrs.get("range_hi", plan.hi))
    plan.lo, plan.hi = lo, min(hi, plan.cap)
    for k, v in {"budget": plan.budget, "flops_rule": scfg.flops_rule, "range_lo": plan.lo, "range_hi": plan.hi,
                 "vocab_size": scfg.vocab_size, "block_size": scfg.block_size}.items():
        if attrs.get(k) != v:
            study.set_user_attr(k, v)
    return study


_ACTIVE = ("COMPLETE", "PRUNED", "WAITING", "RUNNING")


def _rung_of(t) -> int | None:
    return t.params.get("rung", t.system_attrs.get("fixed_params", {}).get("rung"))


def enqueue_missing(study, plan: BudgetPlan, grid: bool) -> int:
    """Enqueue the seeded trials (and with grid, every size in range) not yet finished, waiting or running.
    Returns how many were enqueued; a re-run never enqueues a finished one twice."""
    trials = study.get_trials(deepcopy=False)
    active = [t for t in trials if t.state.name in _ACTIVE]
    added = 0
    for alloc, rung in plan.seeds:
        if not any(t.user_attrs.get("allocation") == alloc for t in active):
            study.enqueue_trial({"rung": rung}, user_attrs={"allocation": alloc})
            added += 1
    if grid:
        taken = {_rung_of(t) for t in active} | {r for _, r in plan.seeds}
        for rung in range(plan.lo, plan.hi + 1):
            if rung not in taken:
                study.enqueue_trial({"rung": rung}, user_attrs={"allocation": "search"})
                added += 1
    return added


def _dead_here(worker: str) -> bool:
    """True when ``worker`` ('host:pid', set by the objective) names a process of this machine that is gone."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def fail_stale_running(study, reason: str) -> dict[int, str]:
    """Mark FAIL the RUNNING trials whose worker process on this machine is gone (a killed search being
    re-run), at once rather than after the heartbeat grace period. Trials of live workers, or of other
    machines, are left to the heartbeat. Returns {trial number: its MLflow run id ('' if none)}."""
    from optuna.trial import TrialState

    stale = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _dead_here(str(t.user_attrs.get("worker", ""))):
            study._storage.set_trial_system_attr(t._trial_id, "fail_reason", reason)
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            stale[t.number] = t.user_attrs.get("mlflow_run_id", "")
    return stale


def target_trials(scfg: SearchConfig, plan: BudgetPlan, study) -> int:
    """Finished trials (COMPLETE or PRUNED) this study should have."""
    if scfg.sampler == "grid":
        rungs = set(range(plan.lo, plan.hi + 1)) | {r for _, r in plan.seeds}
        extra = {_rung_of(t) for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")}
        return len(rungs | extra) + (plan.kaplan_rung == plan.chinchilla_rung)
    return max(scfg.trials, 2)


def _count(study, states: tuple[str, ...]) -> int:
    return sum(t.state.name in states for t in study.get_trials(deepcopy=False))


# --------------------------------------------------------------------------- the objective


class Objective:
    """objective(trial): train the trial's size at the budget, report losses at the budget's tenths."""

    def __init__(self, scfg: SearchConfig, plan: BudgetPlan, parent_run_id: str):
        self.scfg, self.plan, self.parent_run_id = scfg, plan, parent_run_id

    def __call__(self, trial) -> float:
        import optuna

        from scaling_lab import tracking
        from scaling_lab.errors import Interrupted, StopTraining
        from scaling_lab.train import make_plan, train

        scfg, plan = self.scfg, self.plan
        lo, hi = trial.study.user_attrs.get("range_lo", plan.lo), trial.study.user_attrs.get("range_hi", plan.hi)
        rung = trial.suggest_int("rung", lo, hi)
        allocation = trial.user_attrs.get("allocation", "search")
        cfg = trial_config(scfg, plan.budget, rung)
        m = cfg.model
        cfg.run_name = f"{plan.study_name}-t{trial.number}-{allocation}-L{m.n_layer}-d{m.n_embd}"
        tplan = make_plan(cfg)
        info = {"allocation": allocation, "n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head,
                "n_params": tplan.counts["n_params"], "n_params_total": tplan.counts["n_params_total"],
                "tokens_trained": tplan.tokens_trained, "batch_size": cfg.train.batch_size, "steps": tplan.steps}
        info["worker"] = f"{socket.gethostname()}:{os.getpid()}"  # who ran it (a killed worker is named)
        for k, v in info.items():
            trial.set_user_attr(k, v)
        tags = {"scaling_lab.kind": "trial", "study": plan.study_name, "budget": f"{plan.budget:g}",
                "flops_rule": scfg.flops_rule, "trial_number": trial.number, "allocation": allocation,
                "storage": masked(scfg.storage)}
        twin = _finished_twin(trial, rung)
        if twin is not None:  # same size already trained (e.g. both seeds at one size): reuse its result
            with tracking.run(scfg.experiment, cfg.run_name, parent_run_id=self.parent_run_id, tags=tags,
                              system_metrics=False) as log:
                trial.set_user_attr("mlflow_run_id", log.run_id)
                log.set_tags({"duplicate_of": twin.number, "trial_state": twin.state.name})
                if twin.state.name == "COMPLETE":
                    log.log_metrics({"final/val_loss": twin.value}, step=0)
            if twin.state.name != "COMPLETE":
                tracking.end_pruned_run(log.run_id, f"same size as pruned trial {twin.number}")
                raise optuna.TrialPruned(f"same size as pruned trial {twin.number}")
            return twin.value
        state = "FAIL"
        with tracking.run(scfg.experiment, cfg.run_name, parent_run_id=self.parent_run_id, tags=tags,
                          system_metrics=False) as log:
            trial.set_user_attr("mlflow_run_id", log.run_id)
            pruned_at: list[float] = []

            def on_eval(step: int, fraction: float, val_loss: float) -> None:
                trial.report(val_loss, max(1, round(fraction * FRACTIONS)))
                if trial.should_prune():
                    pruned_at.append(fraction)
                    raise StopTraining

            try:
                result = train(cfg, log, on_eval=on_eval, progress=False)
            except Interrupted as exc:
                log.set_tags({"trial_state": "FAIL"})
                raise KeyboardInterrupt(str(exc)) from exc
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"[:500]
                trial.set_user_attr("error", reason)
                log.set_tags({"trial_state": "FAIL"})
                raise
            state = "PRUNED" if result.stopped_early else "COMPLETE"
            log.set_tags({"trial_state": state})
            run_id = log.run_id
        if state == "PRUNED":
            reason = f"pruned by {scfg.pruner} pruner at {pruned_at[0]:.0%} of the budget (val/loss {result.val_loss:.4f})"
            tracking.end_pruned_run(run_id, reason)
            raise optuna.TrialPruned(reason)
        return result.val_loss


def _finished_twin(trial, rung: int):
    for t in trial.study.get_trials(deepcopy=False):
        if t.number != trial.number and t.state.name in ("COMPLETE", "PRUNED") and t.params.get("rung") == rung:
            return t
    return None


# --------------------------------------------------------------------------- workers


def close_failed_trials(study, seen: set[int] | None = None) -> list[int]:
    """Fail trials whose worker stopped beating (Optuna heartbeat; the retry callback queues them again) and
    end the MLflow runs of FAIL trials still RUNNING: KILLED, trial_state=FAIL, with the reason. ``seen``:
    FAIL trial numbers already handled by this worker (a finished trial's attributes cannot be changed)."""
    import warnings

    import optuna

    from scaling_lab import tracking

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental in Optuna 5
        optuna.storages.fail_stale_trials(study)
    closed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id and (seen is None or t.number not in seen):
            reason = t.user_attrs.get("error") or t.system_attrs.get("fail_reason") or (
                f"worker {t.user_attrs.get('worker', '?')} stopped sending heartbeats (killed or lost) during the trial")
            if tracking.close_trial_run(run_id, reason):
                closed.append(t.number)
            if seen is not None:
                seen.add(t.number)
    return closed


def optimize_loop(scfg: SearchConfig, plan: BudgetPlan, parent_run_id: str, target: int, storage=None,
                  pruner=None, on_trial=None) -> None:
    """One worker: run trials one at a time until the study has ``target`` finished trials. With grid a
    worker only takes queued trials; while only other workers' trials are RUNNING it looks again every
    POLL_S instead of stopping, since a dead worker's trial turns FAIL after the grace period and is queued
    again. At most 2 * target trials per call, so trials that keep failing cannot loop forever.

    The look at the study and Optuna's ask() run under the study's lock: without it two workers can both see
    the last queued size, and the one whose ask() finds the queue empty gets a freshly sampled extra trial."""
    import optuna

    storage = storage or make_storage(scfg.storage)
    study = optuna.load_study(study_name=plan.study_name, storage=storage, sampler=make_sampler(scfg),
                              pruner=pruner or make_pruner(scfg))
    objective = Objective(scfg, plan, parent_run_id)
    lock = StudyLock(scfg.storage, plan.study_name)

    taken: list[int] = []

    def take(trial) -> float:  # ask() has given this worker its trial: let the other workers look
        lock.release()
        taken.append(trial.number)
        return objective(trial)

    started, seen = 0, set()
    while started < 2 * target:
        close_failed_trials(study, seen)
        with lock:
            states = [t.state.name for t in study.get_trials(deepcopy=False)]
            finished = states.count("COMPLETE") + states.count("PRUNED")
            running, waiting = states.count("RUNNING"), states.count("WAITING")
            if finished >= target:
                action = "stop"
            elif (waiting > 0) if scfg.sampler == "grid" else (finished + running < target):
                action = "run"
                study.optimize(take, n_trials=1, catch=(Exception,), gc_after_trial=True)
            else:  # other workers' trials: they finish, or turn FAIL (heartbeat) and are queued again
                action = "wait" if running else "stop"
        if action == "stop":
            break
        if action == "wait":
            time.sleep(min(HEARTBEAT_S, POLL_S))
            continue
        started += 1
        if scfg.sampler == "grid" and taken:
            retry_failed_once(study, taken[-1], lock)
        if on_trial is not None:
            on_trial(study)
    close_failed_trials(study, seen)


def retry_failed_once(study, number: int, lock: StudyLock) -> bool:
    """A grid trial that raised (a transient error such as a locked database, or a real bug) would leave a hole in
    its isoFLOP curve: queue its size once more, unless it is itself such a retry or the size is queued, running or
    done. The failed trial keeps its error (user attribute ``error``, its run FAILED); the copy names it in
    ``retry_of``. Returns whether a copy was queued."""
    t = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if t is None or t.state.name != "FAIL" or "retry_of" in t.user_attrs or "failed_trial" in t.system_attrs:
        return False
    rung = _rung_of(t)
    if rung is None:
        return False
    with lock:
        if rung in {_rung_of(x) for x in study.get_trials(deepcopy=False) if x.state.name in _ACTIVE}:
            return False
        study.enqueue_trial({"rung": rung}, user_attrs={"allocation": t.user_attrs.get("allocation", "search"),
                                                        "retry_of": number})
    print(f"  {study.study_name}: trial {number} (n_embd {LADDER[rung]}) failed "
          f"({t.user_attrs.get('error', 'see the log above')}); its size is queued once more", file=sys.stderr)
    return True


def _worker_main(scfg_dict: dict, plan_dict: dict, parent_run_id: str, target: int) -> None:
    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores: N workers x all cores would oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // scfg_dict["workers"]))
    optimize_loop(SearchConfig(**scfg_dict), BudgetPlan(**plan_dict), parent_run_id, target)


class WorkersDied(RuntimeError):
    """Search worker processes died and left their study incomplete."""


def run_workers(scfg: SearchConfig, plan: BudgetPlan, parent_run_id: str, target: int, study, bar,
                out=None) -> None:
    """workers=N: N spawned processes, each a loop of study.optimize against the shared storage."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(dataclasses.asdict(scfg), dataclasses.asdict(plan),
                                                     parent_run_id, target), name=f"search-worker-{i}")
             for i in range(scfg.workers)]
    for p in procs:
        p.start()
    seen = _count(study, ("COMPLETE", "PRUNED"))
    while any(p.is_alive() for p in procs):
        time.sleep(2.0)
        now = _count(study, ("COMPLETE", "PRUNED"))
        bar.update(max(0, now - seen))
        seen = now
    bad = [f"{p.name} (exit code {p.exitcode})" for p in procs if p.exitcode]
    if not bad:
        return
    if _count(study, ("COMPLETE", "PRUNED")) >= target:  # the others took over its trial: say so, go on
        print(f"\n  {plan.study_name}: {len(bad)} of {len(procs)} workers died: {', '.join(bad)}; their trials "
              "were failed by heartbeat and run again, the study is complete", file=out or sys.stdout)
        return
    raise WorkersDied(f"{len(bad)} of {len(procs)} search workers died ({', '.join(bad)}) and the study "
                       f"{plan.study_name} is incomplete; re-run the same command to finish it")


# --------------------------------------------------------------------------- summary


@dataclass
class BudgetResult:
    """One row of the closing table."""

    budget: float
    study_name: str
    parent_run_id: str
    n_opt: float = float("nan")
    n_opt_nonembed: float = float("nan")
    d_opt: float = float("nan")
    best_loss: float = float("nan")
    best_allocation: str = ""
    best_n_embd: int = 0
    kaplan_loss: float = float("nan")
    chinchilla_loss: float = float("nan")
    kaplan_state: str = "missing"
    chinchilla_state: str = "missing"
    winner: str = ""
    edge: str = "none"
    note: str = ""
    n_searched: list[float] = dataclasses.field(default_factory=list)
    trials: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def tokens_per_param(self) -> float:
        return self.d_opt / self.n_opt if self.n_opt else float("nan")


def summarize(study, plan: BudgetPlan, parent_run_id: str) -> BudgetResult:
    """Best size, the two seeded results, the winner and whether the best sits at an edge of the range."""
    trials = study.get_trials(deepcopy=False)
    res = BudgetResult(plan.budget, plan.study_name, parent_run_id)
    res.trials = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    done = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None and math.isfinite(t.value)]
    res.n_searched = sorted({t.user_attrs.get("n_params_total") for t in trials if "n_params_total" in t.user_attrs})
    if done:
        best = min(done, key=lambda t: t.value)
        ua = best.user_attrs
        res.n_opt, res.n_opt_nonembed, res.d_opt = ua["n_params_total"], ua["n_params"], ua["tokens_trained"]
        res.best_loss, res.best_allocation, res.best_n_embd = best.value, ua.get("allocation", "search"), ua["n_embd"]
        rungs = [_rung_of(t) for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
        if _rung_of(best) == min(rungs) and min(rungs) == plan.lo:
            res.edge = "smallest"
        elif _rung_of(best) == max(rungs) and max(rungs) == plan.hi:
            res.edge = "largest"
        else:  # inside: say whether a neighbour side is known only from pruned trials (stopped early)
            sides = {"smaller": [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and _rung_of(t) < _rung_of(best)],
                     "larger": [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and _rung_of(t) > _rung_of(best)]}
            only_pruned = [k for k, ts in sides.items() if all(t.state.name == "PRUNED" for t in ts)]
            if only_pruned:
                res.note = " and ".join(only_pruned) + " sizes known only from pruned trials (worse at equal compute)"
    for alloc in ("kaplan", "chinchilla"):
        seeded = [t for t in trials if t.user_attrs.get("allocation") == alloc and t.state.name != "WAITING"]
        seeded.sort(key=lambda t: (t.state.name != "COMPLETE", t.number))
        if seeded:
            t = seeded[0]
            setattr(res, f"{alloc}_state", t.state.name)
            if t.state.name == "COMPLETE":
                setattr(res, f"{alloc}_loss", t.value)
    k, c = res.kaplan_loss, res.chinchilla_loss
    if math.isfinite(k) or math.isfinite(c):
        k, c = (k if math.isfinite(k) else math.inf), (c if math.isfinite(c) else math.inf)
        res.winner = "tie" if k == c else ("kaplan" if k < c else "chinchilla")
    return res


def plot_loss_vs_n(study, plan: BudgetPlan, res: BudgetResult, path: Path) -> bool:
    """PNG of final val/loss against N_total (finished trials), seeded trials marked, pruned shown at
    their last reported loss as open circles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = study.get_trials(deepcopy=False)
    pts = [(t.user_attrs["n_params_total"], t.value, t.user_attrs.get("allocation", "search"))
           for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    pruned = [(t.user_attrs["n_params_total"], t.intermediate_values[max(t.intermediate_values)])
              for t in trials if t.state.name == "PRUNED" and t.intermediate_values and "n_params_total" in t.user_attrs]
    if not pts and not pruned:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    style = {"search": ("o", "tab:gray"), "kaplan": ("s", "tab:red"), "chinchilla": ("D", "tab:blue")}
    for alloc, (marker, color) in style.items():
        xs = [(n, v) for n, v, a in pts if a == alloc]
        if xs:
            ax.scatter(*zip(*xs), marker=marker, color=color, label=f"{alloc}", zorder=3)
    if pruned:
        ax.scatter(*zip(*pruned), facecolors="none", edgecolors="k", label="pruned (last report)", zorder=2)
    if pts:
        line = sorted((n, v) for n, v, _ in pts)
        ax.plot(*zip(*line), color="k", lw=0.8, alpha=0.5)
    if math.isfinite(res.best_loss):
        ax.scatter([res.n_opt], [res.best_loss], marker="o", s=260, facecolors="none", edgecolors="goldenrod",
                   linewidths=2, zorder=4, label="best")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N (total)")
    ax.set_ylabel("final val/loss (nats/token)")
    ax.set_title(f"isoFLOP C = {plan.budget:.3g} ({study.user_attrs.get('flops_rule', '')} rule)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _fmt_n(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def _fmt_loss(x: float, state: str) -> str:
    return f"{x:.4f}" if math.isfinite(x) else state.lower()


def table(results: list[BudgetResult], rule: str) -> str:
    """The closing table: one row per budget."""
    head = ["budget C", "N_opt", "D_opt", "D/N", "best loss", "kaplan loss", "chinchilla loss", "winner", "best at"]
    rows = []
    for r in results:
        where = {"none": "inside", "smallest": "EDGE (smallest)", "largest": "EDGE (largest)"}[r.edge]
        rows.append([f"{r.budget:.3g}", _fmt_n(r.n_opt), _fmt_n(r.d_opt), f"{r.tokens_per_param:.1f}"
                     if math.isfinite(r.tokens_per_param) else "-", _fmt_loss(r.best_loss, "none"),
                     _fmt_loss(r.kaplan_loss, r.kaplan_state), _fmt_loss(r.chinchilla_loss, r.chinchilla_state),
                     r.winner or "-", where])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows]
    lines.append(f"N = all parameters (embeddings included); C under the '{rule}' rule; "
                 "winner = the lower of the two seeded trials' losses.")
    return "\n".join(lines)


def log_parent(plog, study, plan: BudgetPlan, res: BudgetResult) -> None:
    """Best N, D, D/N, loss, the seeded losses and the loss-vs-N PNG on the study's parent run."""
    import tempfile

    finished = res.trials.get("COMPLETE", 0) + res.trials.get("PRUNED", 0)
    metrics = {"best/n_params_total": res.n_opt, "best/n_params": res.n_opt_nonembed, "best/tokens": res.d_opt,
               "best/tokens_per_param": res.tokens_per_param, "best/val_loss": res.best_loss,
               "kaplan/val_loss": res.kaplan_loss, "chinchilla/val_loss": res.chinchilla_loss,
               "trials/complete": res.trials.get("COMPLETE", 0), "trials/pruned": res.trials.get("PRUNED", 0),
               "trials/failed": res.trials.get("FAIL", 0)}
    plog.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
                     step=finished)
    plog.set_tags({"winner": res.winner or "none", "best_allocation": res.best_allocation or "none",
                   "edge": res.edge, "range_n_embd": f"{LADDER[plan.lo]}-{LADDER[plan.hi]}"})
    plog.flush()
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "loss_vs_n.png"
        if plot_loss_vs_n(study, plan, res, png):
            plog.log_artifact(png)


# --------------------------------------------------------------------------- the whole search


def widen_once(study, plan: BudgetPlan, res: BudgetResult) -> bool:
    """Extend the range by one size beyond the edge the best sits at; enqueue it unless another search
    command already did. False when it cannot. Call under the study's lock."""
    attrs = study.user_attrs  # another command may have widened first
    plan.lo, plan.hi = min(plan.lo, attrs.get("range_lo", plan.lo)), max(plan.hi, attrs.get("range_hi", plan.hi))
    best = LADDER.index(res.best_n_embd)  # at the edge: the smallest or largest size finished
    if (res.edge == "smallest" and plan.lo < best) or (res.edge == "largest" and plan.hi > best):
        return True  # widened by another command: its new size is queued, running or done
    if res.edge == "smallest" and plan.lo > 0:
        plan.lo -= 1
        new = plan.lo
    elif res.edge == "largest" and plan.hi < plan.cap:
        plan.hi += 1
        new = plan.hi
    else:
        return False
    study.set_user_attr("range_lo", plan.lo)
    study.set_user_attr("range_hi", plan.hi)
    if new not in {_rung_of(t) for t in study.get_trials(deepcopy=False) if t.state.name in _ACTIVE}:
        study.enqueue_trial({"rung": new}, user_attrs={"allocation": "search", "widened": True})
    return True


def _run_budget(scfg: SearchConfig, plan: BudgetPlan, study, plog, target: int, bar, out, pruner,
                lock: StudyLock) -> BudgetResult:
    """One budget: its trials (here, or in ``workers`` processes), widening while the best size sits at an
    edge of the range, then the result on the study's parent run."""

    def tick(s) -> None:
        bar.update(1)
        b = [t for t in s.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        if b:
            t = min(b, key=lambda t: t.value)
            bar.set_postfix_str(f"C={plan.budget:.0e} best {t.value:.3f} @ d={t.user_attrs['n_embd']}")

    for rounds in range(scfg.widen + 1):
        if scfg.workers == 1:
            optimize_loop(scfg, plan, plog.run_id, target, study._storage, pruner, on_trial=tick)
        else:
            run_workers(scfg, plan, plog.run_id, target, study, bar, out)
        res = summarize(study, plan, plog.run_id)
        if res.edge == "none" or rounds == scfg.widen:
            break
        with lock:
            if not widen_once(study, plan, res):
                break
        new_target = target_trials(scfg, plan, study) if scfg.sampler == "grid" else target + 1
        bar.total += max(0, new_target - target)
        target = new_target
        bar.refresh()
        print(f"  {plan.study_name}: best size is the {res.edge} searched; widening to "
              f"n_embd {LADDER[plan.lo]}..{LADDER[plan.hi]}", file=out)
    log_parent(plog, study, plan, res)
    return res


def run_search(scfg: SearchConfig, out=None, pruner=None) -> list[BudgetResult]:
    """All budgets, one study each: the library behind the ``search`` entry point. ``pruner`` overrides the
    configured one (tests force pruning with it)."""
    import optuna
    from tqdm import tqdm

    from scaling_lab import tracking
    from scaling_lab.data import validate_source

    out = out or sys.stdout
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plans = [plan_budget(scfg, c) for c in scfg.budget_list()]  # ConfigError before anything is created
    validate_source(config.DataConfig(dataset=scfg.dataset, train_split=scfg.train_split, val_split=scfg.val_split,
                                      vocab_size=scfg.vocab_size, cache_dir=scfg.cache_dir))
    storage = make_storage(scfg.storage)
    studies = [open_study(scfg, p, storage, pruner) for p in plans]
    targets = [target_trials(scfg, p, s) for p, s in zip(plans, studies)]
    already = sum(_count(s, ("COMPLETE", "PRUNED")) for s in studies)
    print(f"search: {len(plans)} studies in {masked(scfg.storage)}; sampler {scfg.sampler}, {scfg.workers} worker(s)",
          file=out)
    for p in plans:
        print(f"  {p.study_name}: n_embd {LADDER[p.lo]}..{LADDER[p.hi]}; seeds kaplan N={_fmt_n(p.kaplan_n)} "
              f"(non-embedding) -> d={LADDER[p.kaplan_rung]}, chinchilla N={_fmt_n(p.chinchilla_n)} -> "
              f"d={LADDER[p.chinchilla_rung]}", file=out)
    bar = tqdm(total=sum(targets), initial=min(already, sum(targets)), unit="trial", desc="trials",
               dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
    results = []
    try:
        for plan, study in zip(plans, studies):
            tags = {"scaling_lab.kind": "study", "study": plan.study_name, "budget": f"{plan.budget:g}",
                    "flops_rule": scfg.flops_rule, "storage": masked(scfg.storage), "vocab_size": scfg.vocab_size}
            # under the study's lock: several search commands (machines) starting at once find or create ONE
            # parent run and enqueue each size once
            lock = StudyLock(scfg.storage, plan.study_name).acquire()
            try:
                parent_id = tracking.find_study_run(scfg.experiment, plan.study_name, masked(scfg.storage))
                with tracking.run(scfg.experiment, plan.study_name, run_id=parent_id, tags=tags,
                                  system_metrics=False) as plog:
                    plog.log_params({k: v for k, v in dataclasses.asdict(scfg).items() if k != "storage"}
                                    | {"budget": plan.budget, "kaplan_n_predicted": round(plan.kaplan_n),
                                       "chinchilla_n_predicted": round(plan.chinchilla_n)})
                    stale = fail_stale_running(study, "process died (found RUNNING when the search restarted)")
                    for run_id in filter(None, stale.values()):
                        tracking.close_trial_run(run_id, "process died before the trial finished")
                    if stale:
                        print(f"  {plan.study_name}: trials {sorted(stale)} were left RUNNING by a killed process "
                              "on this machine: marked FAIL and queued again", file=out)
                    enqueue_missing(study, plan, scfg.sampler == "grid")
                    target = target_trials(scfg, plan, study)
                    lock.release()
                    results.append(_run_budget(scfg, plan, study, plog, target, bar, out, pruner, lock))
            finally:
                lock.release()

    finally:
        bar.close()
    print("\n" + table(results, scfg.flops_rule), file=out)
    for r in results:
        if r.edge != "none":
            print(f"WARNING: at C={r.budget:.3g} the lowest loss is at the {r.edge} size searched (N={_fmt_n(r.n_opt)}): "
                  "the true optimum may lie outside the range; re-run with a larger widen or pad.", file=out)
        else:
            print(f"C={r.budget:.3g}: minimum inside the searched range at N={_fmt_n(r.n_opt)} "
                  f"(searched {_fmt_n(min(r.n_searched))}..{_fmt_n(max(r.n_searched))})"
                  + (f"; {r.note}" if r.note else "") + ".", file=out)
    print(f"Studies: optuna-dashboard {scfg.storage}   Runs: mlflow ui --backend-store-uri "
          f"{tracking.tracking_uri()}", file=out)
    return results


def main(argv: list[str]) -> int:
    """The ``search`` entry point: parse flags named like SearchConfig fields, run, print the table."""
    from scaling_lab import cli, tracking
    from scaling_lab.data import DataUnavailable

    launched = os.environ.pop("MLFLOW_RUN_ID", None)  # the run `mlflow run` made: it records this invocation
    try:
        args = cli.parse(argv, SEARCH_FIELDS, "Optuna isoFLOP studies, one per budget: Kaplan against Chinchilla.")
        scfg = resolve_search(args)
        for c in scfg.budget_list():
            plan_budget(scfg, c)
        from scaling_lab.data import validate_source

        validate_source(config.DataConfig(dataset=scfg.dataset, train_split=scfg.train_split,
                                          val_split=scfg.val_split, vocab_size=scfg.vocab_size,
                                          cache_dir=scfg.cache_dir))
        if scfg.dry_run:
            from scaling_lab import estimate

            return estimate.dry_run_search(scfg, launched)
        make_storage(scfg.storage)
    except (ConfigError, DataUnavailable) as exc:
        cli.error(str(exc))
        if launched:
            tracking.fail_run(launched, str(exc))
        return 2
    try:
        results = run_search(scfg)
    except (ConfigError, DataUnavailable) as exc:
        cli.error(str(exc))
        if launched:
            tracking.fail_run(launched, str(exc))
        return 2
    except WorkersDied as exc:
        cli.error(str(exc))
        if launched:
            tracking.fail_run(launched, str(exc))
        return 1
    except KeyboardInterrupt:
        cli.error("interrupted; re-run the same command to continue the studies")
        if launched:
            tracking.fail_run(launched, "interrupted")
        return 130
    if launched:
        tracking.finish_invocation_run(launched, table(results, scfg.flops_rule),
                                       {r.study_name: r.parent_run_id for r in results})
    return 0
