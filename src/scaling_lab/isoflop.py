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
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from scaling_lab import config, counting, family
from scaling_lab.config import DataConfig, ModelConfig, RunConfig, TrainConfig, n_vocab_for
from scaling_lab.errors import ConfigError

ALLOCATIONS = ("kaplan", "chinchilla", "search")
SAMPLERS = ("grid", "tpe", "random")
BATCH_ROUNDS = ("pow2", "integer")
PRUNERS = ("median", "none")
MIN_STEPS = 10  # every trial needs 10 optimizer steps: one per reported budget fraction
FRACTIONS = 10  # intermediate losses reported at k/10 of the budget, k = 1..10

# --------------------------------------------------------------------------- the model family


def shapes(vocab_size: int, block_size: int) -> tuple[family.Shape, ...]:
    """The family's sizes for this vocabulary and context (``scaling_lab.family``: ~sqrt(2) apart in N_total)."""
    return family.family(n_vocab_for(vocab_size), block_size)


def model_at(rung: int, vocab_size: int, block_size: int) -> ModelConfig:
    """The model of family position ``rung``."""
    s = shapes(vocab_size, block_size)[rung]
    return ModelConfig(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd, block_size=block_size,
                       n_vocab=n_vocab_for(vocab_size))


def nearest_rung(target: float, sizes: list[float]) -> int:
    """Family position whose size is nearest to ``target`` on a log scale."""
    t = math.log(max(target, 1.0))
    return min(range(len(sizes)), key=lambda i: abs(math.log(sizes[i]) - t))


# --------------------------------------------------------------------------- hyper-parameters per size

N_REF, D_REF = 1e5, 1e6  # reference N_total and tokens of the rule's coefficients


@dataclass(frozen=True)
class HyperRule:
    """Learning rate and batch of a trial from its size and tokens: lr = lr_coef·(N_total/1e5)^lr_exp and
    batch = batch_coef·(D/1e6)^batch_exp sequences, rounded (to a power of two or an integer) within
    batch_min..batch_max."""

    lr_coef: float
    """Peak AdamW learning rate at N_total = 1e5."""
    lr_exp: float
    """Exponent of lr in N_total (0: one learning rate for every size)."""
    batch_coef: float
    """Batch in sequences at D = 1e6 training tokens."""
    batch_exp: float
    """Exponent of the batch in D (1: a fixed number of steps per run)."""
    source: str = "fixed"
    """Where the rule comes from: 'fixed' (train.lr and steps_target) or the tuning that fitted it."""

    def lr_for(self, n_params_total: float) -> float:
        return float(self.lr_coef * (n_params_total / N_REF) ** self.lr_exp)

    def batch_for(self, tokens: float, batch_min: int, batch_max: int, rounding: str = "pow2") -> int:
        """Sequences per step for a run of ``tokens`` tokens: the nearest power of two on a log scale (pow2) or
        the nearest integer (integer: steps stay closer to the rule's aim; see SearchConfig.batch_round)."""
        want = self.batch_coef * (max(tokens, 1.0) / D_REF) ** self.batch_exp
        b = 2 ** round(math.log2(max(want, 1e-9))) if rounding == "pow2" else round(want)
        return int(min(batch_max, max(batch_min, b)))

    @classmethod
    def from_json(cls, path: str) -> HyperRule:
        """A rule written by the ``tune`` entry point (its ``rule`` object), or ConfigError naming hparams."""
        try:
            raw = json.loads(Path(path).read_text())["rule"]
            return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError("hparams", path, f"fixed, tuned, or a tuning JSON written by the tune entry point "
                              f"({type(exc).__name__}: {exc})") from None


# Fitted rules shipped with a mode ('hparams=tuned'); provenance (command, machine, date) in docs/tuning.md.
TUNED: dict[str, HyperRule] = {
    # lr_exp -0.416 +- 0.191 (lr_coef 4.93e-3 +- 1.21e-3); batch: no resolved trend in D (exp +0.015 +- 0.088), so one
    # batch (geometric mean 2.30 +- 0.21 -> 2 sequences), at the smallest batch tried in 8 of 10 cells
    "quick": HyperRule(lr_coef=4.929e-3, lr_exp=-0.4162, batch_coef=2.297, batch_exp=0.0,
                       source="tune quick 2026-12-01 (docs/tuning.md)"),
}


# --------------------------------------------------------------------------- configuration

# Set per trial by the design (the budget, the batch rule), or by an ablation (protocol), so not search parameters.
PER_TRIAL = ("tokens", "flops", "batch_size", "micro_batch", "eval_every", "resume", "protocol")


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
    """Optuna storage URL: sqlite:///optuna.db, journal:///optuna.log (a journal file: several workers on one
    machine) or postgresql://user:pw@host/db (several machines)."""
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
    """Parallel worker processes per study (several need a journal:/// or PostgreSQL storage, not SQLite)."""
    anchors: str = "kaplan,chinchilla"
    """Published allocations trained as seeded trials: kaplan, chinchilla, both (comma-separated) or none. The
    first range is centred on them (on Chinchilla's size with none)."""
    pad: int = 2
    """Sizes searched above the larger seeded size."""
    pad_below: int = 0
    """Sizes searched below the smaller seeded size (widening adds more when the best is the smallest)."""
    widen: int = 2
    """Extra sizes tried, one at a time, while fewer than ``bracket`` COMPLETE sizes lie on a side of the best."""
    bracket: int = 2
    """COMPLETE sizes wanted on each side of the best (lowest mean loss) size; pruning never stops a trial within
    this many sizes of the current best."""
    replicas: int = 0
    """Extra seeds (seed + 1, seed + 2, ...) trained for the best size and its two neighbours, each its own child
    run: the analysis averages them and measures the seed-to-seed noise."""
    stack_replicas: bool = True
    """Train the seed replicas of one size together as one stacked model (each still its own trial and run, the
    same losses up to float rounding; docs/search.md)."""
    hparams: str = "fixed"
    """Learning rate and batch per trial: fixed (train.lr for every size; batch from steps_target), tuned (the
    rule fitted for this mode, docs/tuning.md), or a tuning JSON written by the tune entry point."""
    steps_target: int = 2000
    """hparams=fixed: batch_size = D / (steps_target * block_size), rounded by batch_round within batch_min..batch_max."""
    batch_round: str = "pow2"
    """How the batch rule's batch is rounded: pow2 (nearest power of two, steps range ~0.7-1.4x the aim) or integer
    (nearest whole number of sequences, steps within ~±12% of the aim once the batch is 4 or more; quick's)."""
    batch_min: int = 1
    """Smallest batch in sequences."""
    batch_max: int = 512
    """Largest batch in sequences."""
    block_size: int = 64
    """Context length of every trial."""
    dry_run: bool = False
    """Print each budget's plan (sizes, tokens, batch, estimated time) and exit; create no study and no run."""
    protocol: str = ""
    """Protocol step of an ablation (scaling_lab.ablation) this search is ('' = none): in the study names, and the
    tag ``protocol`` of its studies and runs. Set by the ablation, not a search parameter."""
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
        if any(c.isspace() or c == "-" for c in self.protocol):
            raise ConfigError("protocol", self.protocol, "a step name without spaces or '-' (scaling_lab.ablation)")
        self.anchor_list()  # validates
        config.choice("sampler", self.sampler, SAMPLERS)
        config.choice("pruner", self.pruner, PRUNERS)
        config.choice("batch_round", self.batch_round, BATCH_ROUNDS)
        for name in ("prune_warmup", "prune_startup", "pad", "pad_below", "widen", "bracket", "replicas"):
            config.positive_int(name, getattr(self, name), allow_zero=True)
        for name in ("workers", "steps_target", "batch_min", "batch_max", "block_size"):
            config.positive_int(name, getattr(self, name))
        if self.batch_max < self.batch_min:
            raise ConfigError("batch_max", self.batch_max, f">= batch_min={self.batch_min}")
        if self.trials == 1:
            raise ConfigError("trials", self.trials, "0 (the mode's) or at least 2 (the two seeded trials)")
        self.hyper_rule()  # validates hparams
        if self.workers > 1 and self.storage.startswith("sqlite"):
            raise ConfigError("workers", self.workers, "1 with SQLite storage; several workers need "
                              "storage=journal:///optuna.log (one machine) or postgresql://user:pw@host/db "
                              "(see docs/search.md)")

    @property
    def flops_rule(self) -> str:
        """FLOPs per token rule that defines the budget (the trials' flops_rule)."""
        return self.train.flops_rule

    @property
    def seed(self) -> int:
        """Seed of the sampler and of every trial's training (same data order for every size)."""
        return self.train.seed

    def anchor_list(self) -> tuple[str, ...]:
        """The seeded allocations, validated."""
        names = tuple(x.strip() for x in self.anchors.split(",") if x.strip())
        if names == ("none",):
            return ()
        if not names or any(n not in ("kaplan", "chinchilla") for n in names) or len(set(names)) != len(names):
            raise ConfigError("anchors", self.anchors, "kaplan, chinchilla, kaplan,chinchilla or none")
        return names

    def hyper_rule(self) -> HyperRule:
        """The learning-rate and batch rule every trial uses (see ``hparams``)."""
        if self.hparams == "fixed":
            return HyperRule(self.train.lr, 0.0, D_REF / (self.steps_target * self.block_size), 1.0, "fixed")
        if self.hparams == "tuned":
            if self.mode not in TUNED:
                raise ConfigError("hparams", self.hparams, f"fixed or a tuning JSON (no tuned rule ships for mode "
                                  f"{self.mode}; modes with one: {', '.join(TUNED) or 'none yet'})")
            return TUNED[self.mode]
        return HyperRule.from_json(self.hparams)

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
    "tiny": dict(budgets="6e9,1.8e10", sampler="grid", pad=1, widen=0, steps_target=40, batch_min=1, batch_max=256,
                 block_size=64, vocab_size=256, eval_tokens=2048, lr=3e-3, prune_startup=2, prune_warmup=5,
                 dtype="fp32"),
    "quick": dict(budgets="1e10,3e10,1e11,3e11,1e12", anchors="chinchilla", sampler="grid", pad=2, pad_below=2,
                  widen=4, bracket=2, replicas=2, hparams="fixed", steps_target=2000, batch_round="integer",
                  batch_min=1, batch_max=512,
                  block_size=64, vocab_size=512, eval_tokens=16384, lr=3e-3, dtype="fp32"),
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
    return config.resolve_preset(SearchConfig, SEARCH_MODES, _TYPES, overrides, text=("budgets",))


def validate_storage_url(url: str) -> None:
    """An Optuna storage URL: journal:///<file> (JournalStorage on a file) or an RDB URL dialect[+driver]://...
    (sqlite:///file.db, postgresql://user:pw@host/db)."""
    allowed = ("an Optuna storage URL such as sqlite:///optuna.db, journal:///optuna.log or "
               "postgresql://user:password@host:5432/db")
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError("storage", url, allowed)
    if url.startswith("journal:"):
        path = url[len("journal:///"):] if url.startswith("journal:///") else ""
        if not path or path.endswith("/"):
            raise ConfigError("storage", url, "journal:///<file> (e.g. journal:///optuna.log, journal:////abs/optuna.log)")
        return
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
    widths: list[int] = field(default_factory=list)
    """n_embd of every family position (for messages)."""
    anchors: tuple[str, ...] = ("kaplan", "chinchilla")
    """The published allocations trained as seeded trials."""

    @property
    def seeds(self) -> list[tuple[str, int]]:
        rung = {"kaplan": self.kaplan_rung, "chinchilla": self.chinchilla_rung}
        return [(a, rung[a]) for a in self.anchors]

    @property
    def twin_anchors(self) -> bool:
        """Both anchors seeded on one size (the second reuses the first's result)."""
        return len(self.anchors) == 2 and self.kaplan_rung == self.chinchilla_rung


def study_name(scfg: SearchConfig, budget: float) -> str:
    """<study_prefix>-C<budget>-<flops_rule>, or <study_prefix>-<protocol>-C<budget>-<flops_rule> in an ablation."""
    step = f"-{scfg.protocol}" if scfg.protocol else ""
    return f"{scfg.study_prefix}{step}-C{budget:.3g}-{scfg.flops_rule}".replace("+", "")


def min_budget(model: ModelConfig, scfg: SearchConfig) -> float:
    """FLOPs that give ``model`` MIN_STEPS optimizer steps of batch_min sequences."""
    return MIN_STEPS * scfg.batch_min * model.block_size * counting.flops_per_token(model, scfg.flops_rule)


def plan_budget(scfg: SearchConfig, budget: float) -> BudgetPlan:
    """Range of sizes for one budget: from pad_below under the smaller seeded size to pad above the larger,
    no larger than a size that gets MIN_STEPS steps."""
    models = [model_at(r, scfg.data.vocab_size, scfg.block_size) for r in range(len(shapes(scfg.data.vocab_size,
                                                                                             scfg.block_size)))]
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
    anchors = scfg.anchor_list()
    centre = [{"kaplan": rk, "chinchilla": rc}[a] for a in anchors] or [rc]
    lo, hi = max(0, min(centre) - scfg.pad_below), min(cap, max(centre) + scfg.pad)
    return BudgetPlan(budget, study_name(scfg, budget), lo, hi, cap, rk, rc, nk, nc, [m.n_embd for m in models],
                      anchors)


def batch_for(tokens: float, scfg: SearchConfig) -> int:
    """The batch (sequences per step) of a trial training ``tokens`` tokens, from the search's rule."""
    return scfg.hyper_rule().batch_for(tokens, scfg.batch_min, scfg.batch_max, scfg.batch_round)


def trial_config(scfg: SearchConfig, budget: float, rung: int, run_name: str = "", replica: int = 0) -> RunConfig:
    """The training configuration of the trial at family position ``rung`` for budget C: the family's shape,
    the search's data and training settings, D from C under flops_rule, lr and batch from the search's rule.
    ``replica`` k > 0 is the same size with seed + k (new initialisation and data order)."""
    m = model_at(rung, scfg.data.vocab_size, scfg.block_size)
    rule = scfg.hyper_rule()
    b = rule.batch_for(counting.tokens_for_flops(m, budget, scfg.flops_rule), scfg.batch_min, scfg.batch_max,
                       scfg.batch_round)
    lr = rule.lr_for(counting.n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size))
    train = dataclasses.replace(scfg.train, tokens=0, flops=budget, batch_size=b, micro_batch=b, eval_every=0,
                                resume="", lr=lr, seed=scfg.train.seed + replica)
    return RunConfig(mode=scfg.mode, experiment=scfg.experiment, run_name=run_name, data=scfg.data, model=m,
                     train=train)


# --------------------------------------------------------------------------- summary


def rung_of(t: Any) -> int | None:
    """Family position of an Optuna trial (its param, or the fixed param of a queued one)."""
    return t.params.get("rung", t.system_attrs.get("fixed_params", {}).get("rung"))


def replica_of(t: Any) -> int:
    """0 for a size's first trial, k for its k-th extra seed."""
    return int(t.user_attrs.get("replica", 0))


def key_of(t: Any) -> tuple[int | None, int]:
    """(family position, replica): what a trial trains; a study trains each key once."""
    return rung_of(t), replica_of(t)


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
    """Mean final val/loss over the best size's COMPLETE trials (its seeds)."""
    best_allocation: str = ""
    best_n_embd: int = 0
    best_rung: int = -1
    kaplan_loss: float = float("nan")
    chinchilla_loss: float = float("nan")
    kaplan_state: str = "missing"
    chinchilla_state: str = "missing"
    winner: str = ""
    edge: str = "none"
    """none when ``bracket`` COMPLETE sizes lie on each side of the best; else the short side."""
    below: int = 0
    """COMPLETE sizes smaller than the best."""
    above: int = 0
    """COMPLETE sizes larger than the best."""
    note: str = ""
    seed_std: float = float("nan")
    """Pooled seed-to-seed standard deviation of the final loss (sizes with 2+ COMPLETE seeds)."""
    max_epochs: float = float("nan")
    """Most passes over the train split of any trial."""
    n_searched: list[float] = field(default_factory=list)
    trials: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_param(self) -> float:
        return self.d_opt / self.n_opt if self.n_opt else float("nan")


def size_means(trials: list[Any]) -> dict[int, list[float]]:
    """{family position: final losses of its COMPLETE trials (all seeds)}."""
    out: dict[int, list[float]] = {}
    for t in trials:
        if t.state.name == "COMPLETE" and t.value is not None and math.isfinite(t.value) and rung_of(t) is not None:
            out.setdefault(rung_of(t), []).append(t.value)
    return out


def pooled_std(groups: list[list[float]]) -> float:
    """Pooled sample standard deviation over groups of 2 or more values (NaN when there are none)."""
    ss = sum(sum((x - sum(g) / len(g)) ** 2 for x in g) for g in groups if len(g) > 1)
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    return math.sqrt(ss / dof) if dof else float("nan")


def summarize(study: Any, plan: BudgetPlan, parent_run_id: str, bracket: int = 2) -> BudgetResult:
    """Best size (lowest mean loss over its COMPLETE seeds), whether ``bracket`` COMPLETE sizes lie on each side of
    it (PRUNED trials never count: the analysis fits COMPLETE ones only), the seeded results and the winner."""
    trials = study.get_trials(deepcopy=False)
    res = BudgetResult(plan.budget, plan.study_name, parent_run_id)
    res.trials = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    res.n_searched = sorted({t.user_attrs.get("n_params_total") for t in trials if "n_params_total" in t.user_attrs})
    epochs = [t.user_attrs["epochs"] for t in trials if "epochs" in t.user_attrs]
    res.max_epochs = max(epochs) if epochs else float("nan")
    means = size_means(trials)
    res.seed_std = pooled_std(list(means.values()))
    if means:
        best_rung = min(means, key=lambda r: sum(means[r]) / len(means[r]))
        best = next(t for t in trials if t.state.name == "COMPLETE" and rung_of(t) == best_rung)
        ua = best.user_attrs
        res.n_opt, res.n_opt_nonembed, res.d_opt = ua["n_params_total"], ua["n_params"], ua["tokens_trained"]
        res.best_loss = sum(means[best_rung]) / len(means[best_rung])
        res.best_allocation, res.best_n_embd, res.best_rung = ua.get("allocation", "search"), ua["n_embd"], best_rung
        res.below = sum(r < best_rung for r in means)
        res.above = sum(r > best_rung for r in means)
        if res.below < bracket:
            res.edge = "smallest"
        elif res.above < bracket:
            res.edge = "largest"
        pruned = sorted({rung_of(t) for t in trials if t.state.name == "PRUNED"} - set(means))
        if pruned:
            res.note = f"{len(pruned)} size(s) known only from pruned trials (not counted)"
    _seeded(res, trials)
    return res


def _seeded(res: BudgetResult, trials: list[Any]) -> None:
    """The Kaplan- and Chinchilla-seeded trials' states and losses, and the lower of the two (only when both
    completed: a pruned, failed or missing anchor leaves no head-to-head)."""
    for alloc in ("kaplan", "chinchilla"):
        seeded = [t for t in trials if t.user_attrs.get("allocation") == alloc and t.state.name != "WAITING"]
        # the first COMPLETE one; else the latest (a killed anchor's retry says PRUNED or FAIL for itself)
        seeded.sort(key=lambda t: (0, t.number) if t.state.name == "COMPLETE" else (1, -t.number))
        if seeded:
            t = seeded[0]
            setattr(res, f"{alloc}_state", t.state.name)
            if t.state.name == "COMPLETE":
                setattr(res, f"{alloc}_loss", t.value)
    k, c = res.kaplan_loss, res.chinchilla_loss
    if math.isfinite(k) and math.isfinite(c):  # a winner only when both anchors completed
        res.winner = "tie" if k == c else ("kaplan" if k < c else "chinchilla")


def _fmt_n(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def _fmt_loss(x: float, state: str) -> str:
    return f"{x:.4f}" if math.isfinite(x) else state  # an Optuna state (PRUNED, FAIL, RUNNING), missing or none


def table(results: list[BudgetResult], rule: str) -> str:
    """The closing table: one row per budget."""
    head = ["budget C", "N_opt", "D_opt", "D/N", "best loss", "kaplan loss", "chinchilla loss", "winner", "best at",
            "epochs"]
    rows = []
    for r in results:
        where = {"none": "inside", "smallest": "EDGE (smallest)", "largest": "EDGE (largest)"}[r.edge]
        where += f" {r.below}|{r.above}"
        rows.append([f"{r.budget:.3g}", _fmt_n(r.n_opt), _fmt_n(r.d_opt), f"{r.tokens_per_param:.1f}"
                     if math.isfinite(r.tokens_per_param) else "-", _fmt_loss(r.best_loss, "none"),
                     _fmt_loss(r.kaplan_loss, r.kaplan_state), _fmt_loss(r.chinchilla_loss, r.chinchilla_state),
                     r.winner or "-", where, f"{r.max_epochs:.1f}" if math.isfinite(r.max_epochs) else "-"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows]
    lines.append(f"N = all parameters (embeddings included); C under the '{rule}' rule; best = lowest mean loss over "
                 "a size's seeds; best at: COMPLETE sizes below|above it; epochs: most passes over the train split; "
                 "kaplan/chinchilla loss: the seeded anchor's loss, or its state (PRUNED, FAIL, missing); winner = the lower "
                 "of the two anchors' losses when both completed (anchors, not a test of 0.73 against 0.50).")
    return "\n".join(lines)
