"""The isoFLOP search design, without Optuna: the search's configuration and presets, the model family, one
budget's plan (sizes, seeded sizes, batch rule), the typed training config of each trial, and the summary of a
finished study (best size, seeded results, edge test, closing table).

For a budget C each trial trains one model shape of the family on D = C / flops_per_token(N) tokens, so every
trial of a study spends the same training FLOPs under ``flops_rule``. Two trials are seeded first: the size
Kaplan et al. (2020) and the size Hoffmann et al. (2022) predict for C (anchors, not a test of 0.73 against
0.50: Kaplan's law was fitted at 1e-7 to 1e-1 PF-days, far above these budgets).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import make_url

from scaling_lab import config, counting
from scaling_lab.config import DataConfig, ModelConfig, RunConfig, TrainConfig, n_vocab_for
from scaling_lab.errors import ConfigError

ALLOCATIONS = ("kaplan", "chinchilla", "search")
SAMPLERS = ("grid", "tpe", "random")
PRUNERS = ("median", "none")
MIN_STEPS = 10  # every trial needs 10 optimizer steps: one per reported budget fraction
FRACTIONS = 10  # intermediate losses reported at k/10 of the budget, k = 1..10

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

# Set per trial by the design (the budget, the batch rule), so not search parameters.
PER_TRIAL = ("tokens", "flops", "batch_size", "micro_batch", "eval_every", "resume")


@dataclass
class SearchConfig:
    """One search: budgets, study storage, sampler, the batch rule, and the data and training settings every
    trial shares (the ``data`` and ``train`` parts; their fields are search parameters too)."""

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
    sampler: str = "grid"
    """grid (every size in range once), tpe, or random."""
    pruner: str = "median"
    """median (Optuna MedianPruner) or none."""
    prune_warmup: int = 3
    """Budget tenths before pruning may act (MedianPruner n_warmup_steps)."""
    prune_startup: int = 3
    """Finished trials before pruning may act (MedianPruner n_startup_trials)."""
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
    block_size: int = 64
    """Context length of every trial."""
    dry_run: bool = False
    """Print each budget's plan (sizes, tokens, batch, estimated time) and exit; create no study and no run."""
    data: DataConfig = field(default_factory=DataConfig)
    """Text, tokenizer and vocabulary of every trial (small vocabularies keep the embedding from dominating)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, schedule, device, dtype, seed (also the sampler's), flops_rule (defines the budget) of every
    trial; its per-trial fields (PER_TRIAL) are set by the design."""

    def __post_init__(self) -> None:
        config.choice("mode", self.mode, tuple(SEARCH_MODES))
        self.budget_list()  # validates
        config.positive_int("trials", self.trials, allow_zero=True)
        validate_storage_url(self.storage)
        if not self.study_prefix or any(c.isspace() for c in self.study_prefix):
            raise ConfigError("study_prefix", self.study_prefix, "a non-empty name without spaces")
        config.choice("sampler", self.sampler, SAMPLERS)
        config.choice("pruner", self.pruner, PRUNERS)
        for name in ("prune_warmup", "prune_startup", "pad", "pad_below", "widen"):
            config.positive_int(name, getattr(self, name), allow_zero=True)
        for name in ("workers", "steps_target", "batch_min", "batch_max", "block_size"):
            config.positive_int(name, getattr(self, name))
        if self.batch_max < self.batch_min:
            raise ConfigError("batch_max", self.batch_max, f">= batch_min={self.batch_min}")
        if self.trials == 1:
            raise ConfigError("trials", self.trials, "0 (the mode's) or at least 2 (the two seeded trials)")
        if self.workers > 1 and self.storage.startswith("sqlite"):
            raise ConfigError("workers", self.workers, "1 with SQLite storage; several workers need a server "
                              "storage such as postgresql://user:pw@host/db (see docs/search.md)")

    @property
    def flops_rule(self) -> str:
        """FLOPs per token rule that defines the budget (the trials' flops_rule)."""
        return self.train.flops_rule

    @property
    def seed(self) -> int:
        """Seed of the sampler and of every trial's training (same data order for every size)."""
        return self.train.seed

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
                     dataset="wikitext-103", eval_tokens=131072, lr=1e-3, dtype="auto", compile="auto"),
    "full": dict(budgets="1e17,3e17,1e18", sampler="tpe", trials=12, pad=2, widen=2, steps_target=5000,
                 batch_min=32, batch_max=1024, block_size=1024, vocab_size=config.GPT2_VOCAB,
                 dataset="openwebtext", eval_tokens=1048576, lr=6e-4, dtype="auto", compile="auto"),
}
_TYPES = {k: t for k, t in config.types_of(SearchConfig).items() if k not in PER_TRIAL}
SEARCH_FIELDS = list(_TYPES)


def resolve_search(overrides: dict[str, Any] | None = None) -> SearchConfig:
    """Defaults < mode preset < explicit overrides ('' / None unset). Raises ConfigError naming the field."""
    given = config.parse_fields(dict(overrides or {}), _TYPES)
    mode = given.get("mode", "quick")
    config.choice("mode", mode, tuple(SEARCH_MODES))
    values = {**SEARCH_MODES[mode], **given}
    if isinstance(values.get("budgets"), (int, float)):
        values["budgets"] = str(values["budgets"])
    return config.build(SearchConfig, values)


def validate_storage_url(url: str) -> None:
    """An Optuna RDB URL: dialect[+driver]://... (sqlite:///file.db, postgresql://user:pw@host/db)."""
    allowed = "an Optuna RDB URL such as sqlite:///optuna.db or postgresql://user:password@host:5432/db"
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError("storage", url, allowed)
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except Exception:
        raise ConfigError("storage", url, allowed) from None
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database:
            raise ConfigError("storage", url, "sqlite:///<file> (a file, not memory: the study must outlive the process)")
    elif not parsed.host:
        raise ConfigError("storage", url, allowed)



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
    models = [model_at(r, scfg.data.vocab_size, scfg.block_size) for r in range(len(LADDER))]
    if budget < min_budget(models[0], scfg):
        m = models[0]
        raise ConfigError("budgets", f"{budget:g}", f"budgets >= {min_budget(m, scfg):.3g} FLOPs: the smallest model "
                          f"(L{m.n_layer} d{m.n_embd}, N_total {counting.n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size):,}) "
                          f"needs {MIN_STEPS} steps of {scfg.batch_min}x{scfg.block_size} tokens")
    cap = max(r for r, m in enumerate(models) if min_budget(m, scfg) <= budget)
    nonembed = [counting.n_params_nonembed(m.n_layer, m.n_embd) for m in models]
    total = [counting.n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size) for m in models]
    nk, nc = counting.kaplan_n(budget), counting.chinchilla_n(budget)
    rk, rc = min(nearest_rung(nk, nonembed), cap), min(nearest_rung(nc, total), cap)
    lo, hi = max(0, min(rk, rc) - scfg.pad_below), min(cap, max(rk, rc) + scfg.pad)
    return BudgetPlan(budget, study_name(scfg, budget), lo, hi, cap, rk, rc, nk, nc)


def batch_for(tokens: float, scfg: SearchConfig) -> int:
    """Batch rule: sequences per step so a run takes about steps_target steps (power of two, clipped)."""
    want = tokens / (scfg.steps_target * scfg.block_size)
    b = 2 ** round(math.log2(max(want, 1e-9)))
    return int(min(scfg.batch_max, max(scfg.batch_min, b)))


def trial_config(scfg: SearchConfig, budget: float, rung: int, run_name: str = "") -> RunConfig:
    """The training configuration of the trial at ladder position ``rung`` for budget C: the family's shape,
    the search's data and training settings, D from C under flops_rule, and the batch rule's batch."""
    m = model_at(rung, scfg.data.vocab_size, scfg.block_size)
    b = batch_for(counting.tokens_for_flops(m, budget, scfg.flops_rule), scfg)
    train = dataclasses.replace(scfg.train, tokens=0, flops=budget, batch_size=b, micro_batch=b, eval_every=0,
                                resume="")
    return RunConfig(mode=scfg.mode, experiment=scfg.experiment, run_name=run_name, data=scfg.data, model=m,
                     train=train)


# --------------------------------------------------------------------------- summary


def rung_of(t: Any) -> int | None:
    """Ladder position of an Optuna trial (its param, or the fixed param of a queued one)."""
    return t.params.get("rung", t.system_attrs.get("fixed_params", {}).get("rung"))


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
    n_searched: list[float] = field(default_factory=list)
    trials: dict[str, int] = field(default_factory=dict)

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
        rungs = [rung_of(t) for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
        if rung_of(best) == min(rungs) and min(rungs) == plan.lo:
            res.edge = "smallest"
        elif rung_of(best) == max(rungs) and max(rungs) == plan.hi:
            res.edge = "largest"
        else:  # inside: say whether a neighbour side is known only from pruned trials (stopped early)
            sides = {"smaller": [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and rung_of(t) < rung_of(best)],
                     "larger": [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and rung_of(t) > rung_of(best)]}
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
