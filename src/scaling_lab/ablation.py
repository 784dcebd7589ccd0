"""The protocol ablation: from Kaplan et al.'s training and counting choices to Chinchilla's, one change at a time,
one isoFLOP search per step on the same budgets, data and seeds (issue 18).

The steps are cumulative, in this order (each keeps every change before it):

  kaplan   Kaplan et al. 2020 (arXiv:2001.08361). C = 6N per token with N non-embedding and no output head
           (flops_rule=kaplan, Sec. 2.1); a fixed linear warmup of 3,000 steps and a cosine schedule over 2.5e5
           steps whatever the run's length, loss read where the budget ends, mid-schedule (Sec. 2.2); one learning
           rate and one batch for every size.
  head     Porian et al. 2024 (NeurIPS, "Resolving Discrepancies in Compute-Optimal Scaling of Language Models"),
           the first correction: the output head's FLOPs counted and N including it: flops_rule=total, C = 6 N_total
           per token (the head is tied to the token embedding, so N_total counts its d·V weights once; it also
           counts the position table, 6·s·d, 1/8 of the head's 6·d·V at s = 64, V = 513).
  warmup   Porian et al. 2024: warmup short and proportional to the run: warmup_frac (0.1) of each run's own steps.
  decay    Hoffmann et al. 2022 (arXiv:2203.15556, Sec. 3 and App. B: the cosine cycle should match the training
           length): the cosine decay ends exactly at each budget's last step (schedule_steps=0).
  tuned    Hoffmann et al. 2022 / Porian et al. 2024 (per-size tuned hyper-parameters): the learning rate and batch of
           the tuning rule (hparams=tuned: the rule fitted for the mode, docs/tuning.md; or a tuning JSON).

Scaling Kaplan's schedule to these runs (``design``): Kaplan trained 2.5e5 steps with 3,000 warmup steps (1.2% of the
schedule) and read the compute-efficient points off those long runs. Here the schedule is as long as the longest
planned run of the ablation (the smallest planned size at the largest budget, under the kaplan rule; a size the
widening adds below it runs past the schedule's end at min_lr_ratio * lr), and the warmup is the same 1.2% of it:
short runs (large models at small budgets) spend a large part of their steps warming up, as the short runs of
Kaplan's grid did. The one batch of the kaplan..decay steps is the
batch the search's fixed rule (steps_target) gives the Chinchilla-sized model at the geometric-mean budget; their
one learning rate is ``lr``. Pearce & Song 2024 ("Reconciling Kaplan and Chinchilla Scaling Laws") showed that
counting non-embedding parameters at small scale alone pushes a toward Kaplan's value: the analysis reports every
step under each counting convention (kaplan, total, exact) side by side.

Nothing here is tuned to reach an exponent: the settings follow from the papers and the search's own rules.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import optuna

from scaling_lab import config, counting, isoflop, search, studies
from scaling_lab.counting import make_plan
from scaling_lab.errors import ConfigError
from scaling_lab.estimate import fmt_seconds
from scaling_lab.isoflop import SEARCH_MODES, TUNED, SearchConfig

KAPLAN_WARMUP_STEPS = 3_000  # Kaplan et al. 2020, Sec. 2.2: 3,000 warmup steps, then cosine decay over 2.5e5 steps
KAPLAN_SCHEDULE_STEPS = 250_000
KAPLAN_WARMUP_RATIO = KAPLAN_WARMUP_STEPS / KAPLAN_SCHEDULE_STEPS  # 1.2% of the schedule


@dataclass(frozen=True)
class Step:
    """One protocol step: what it changes, where that comes from, and the options it sets."""

    name: str
    """Step name (the ``protocol`` tag)."""
    change: str
    """The change this step makes over the one before, in a few words."""
    source: str
    """Where the choice comes from."""
    flops_rule: str
    """FLOPs per token rule that defines the budget (and the convention its a is read in)."""
    fixed_warmup: bool
    """True: Kaplan's fixed warmup in steps; False: warmup_frac of each run."""
    fixed_schedule: bool
    """True: one schedule length for every run (mid-schedule loss); False: the decay ends at each budget."""
    tuned: bool
    """True: lr and batch per size from the tuning rule; False: one lr and one batch for every size."""

    @property
    def convention(self) -> str:
        """The analysis convention matching the step's counting (kaplan: non-embedding N; total: all parameters)."""
        return "kaplan" if self.flops_rule == "kaplan" else "total"


STEPS: tuple[Step, ...] = (
    Step("kaplan", "Kaplan's setup: 6N without embeddings or head, 3,000-step warmup scaled, fixed-length cosine, "
         "one lr and batch", "Kaplan et al. 2020, Sec. 2.1-2.2", "kaplan", True, True, False),
    Step("head", "count the output head's FLOPs and parameters (C = 6 N_total D)",
         "Porian et al. 2024 (NeurIPS), first correction", "total", True, True, False),
    Step("warmup", "warmup short and proportional to the run (warmup_frac of its steps)",
         "Porian et al. 2024 (NeurIPS), warmup correction", "total", False, True, False),
    Step("decay", "cosine decay ending exactly at each budget's last step", "Hoffmann et al. 2022, Sec. 3, App. B",
         "total", False, False, False),
    Step("tuned", "per-size learning rate and batch from the tuning rule (Chinchilla-like)",
         "Porian et al. 2024 (NeurIPS); Hoffmann et al. 2022", "total", False, False, True),
)
STEP_NAMES = tuple(s.name for s in STEPS)
BY_NAME = {s.name: s for s in STEPS}
ALIASES = {f"+{s.name}": s.name for s in STEPS[1:4]}  # +head, +warmup, +decay as in the issue
CONVENTION = {s.name: s.convention for s in STEPS}
# Search options each step sets: refused as ablation parameters (one step would no longer be one change).
STEP_FIELDS = ("flops_rule", "warmup_steps", "schedule_steps", "hparams")


def parse_steps(spec: str) -> tuple[str, ...]:
    """Step names from 'kaplan,+head,...' (aliases resolved), validated: known names, each once, in the documented
    cumulative order."""
    names = [x.strip() for x in str(spec).split(",") if x.strip()]
    allowed = f"steps from {', '.join(STEP_NAMES)} (+head, +warmup, +decay also accepted), comma-separated, each " \
              "once, in that order"
    resolved = [ALIASES.get(n, n) for n in names]
    unknown = [n for n, r in zip(names, resolved) if r not in BY_NAME]
    if not names or unknown:
        raise ConfigError("steps", spec, allowed + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    order = [STEP_NAMES.index(r) for r in resolved]
    if any(b <= a for a, b in zip(order, order[1:])):
        raise ConfigError("steps", spec, allowed + f" (the order is {' < '.join(STEP_NAMES)})")
    return tuple(resolved)


# --------------------------------------------------------------------------- configuration


@dataclass
class AblationConfig:
    """One ablation: the steps to run, the tuned step's rule, the closing analysis, and the search settings every
    step shares (budgets, storage, data, seeds; the ``search`` part; its fields are ablation parameters too)."""

    steps: str = ",".join(STEP_NAMES)
    """Protocol steps, comma-separated, in the documented order kaplan, head, warmup, decay, tuned (a subset such
    as kaplan,tuned runs just those; +head, +warmup, +decay are accepted)."""
    tuned_rule: str = "tuned"
    """The tuned step's lr/batch rule: tuned (the rule fitted for the mode, docs/tuning.md) or a tuning JSON
    written by the tune entry point."""
    analyze: bool = True
    """After the searches, fit every step's runs (analyze group_by=protocol), write the report, log it to MLflow."""
    bootstrap: int = 1000
    """Bootstrap resamples of that analysis (0 = none)."""
    out: str = ""
    """Report folder of that analysis ('' = reports/ablation-<UTC time>)."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """Budgets, storage, sampler, data and training settings shared by every step (flops_rule, warmup_steps,
    schedule_steps and hparams are set by the steps)."""

    def __post_init__(self) -> None:
        names = parse_steps(self.steps)
        if "tuned" in names and self.tuned_rule == "tuned" and self.search.mode not in TUNED:
            raise ConfigError("tuned_rule", self.tuned_rule, f"a tuning JSON written by the tune entry point (no "
                              f"tuned rule ships for mode {self.search.mode}; modes with one: {', '.join(TUNED)})")
        if "tuned" in names and self.tuned_rule != "tuned":
            try:
                isoflop.HyperRule.from_json(self.tuned_rule)
            except ConfigError as exc:
                raise ConfigError("tuned_rule", self.tuned_rule, str(exc).split("allowed: ", 1)[-1]) from None
        if not (isinstance(self.bootstrap, int) and self.bootstrap >= 0 and self.bootstrap != 1):
            raise ConfigError("bootstrap", self.bootstrap, "0 (off) or an integer >= 2")

    def step_list(self) -> tuple[str, ...]:
        return parse_steps(self.steps)


OWN_FIELDS = ("steps", "tuned_rule", "analyze", "bootstrap", "out")
# Per mode, over the search's preset: the studies get their own prefix (ablation-<step>-C<budget>-<rule>). quick
# drops the search's 1e12 budget (about two thirds of every step's time) and keeps one extra seed: the dry run of the
# five steps on the 2-core CPU estimates 4 h 06 min with the search's preset, 1 h 27 min with this (docs/ablation.md).
ABLATION_MODES: dict[str, dict[str, Any]] = {m: {"study_prefix": "ablation"} for m in SEARCH_MODES}
ABLATION_MODES["quick"].update(budgets="3e10,1e11,3e11", replicas=1)
_OWN_TYPES = {k: t for k, t in config.types_of(AblationConfig).items() if k in OWN_FIELDS}
_TYPES = {"mode": str, **_OWN_TYPES, **{k: t for k, t in isoflop._TYPES.items() if k not in STEP_FIELDS}}
ABLATION_FIELDS = list(_TYPES)


def resolve_ablation(overrides: dict[str, Any] | None = None) -> AblationConfig:
    """Defaults < the search preset of the mode < ABLATION_MODES < explicit overrides ('' / None unset); a field a
    step sets is refused with one line."""
    raw = dict(overrides or {})
    for name in STEP_FIELDS:
        if not config.is_unset(raw.get(name)):
            raise ConfigError(name, raw[name], "left to the protocol steps, which set it (docs/ablation.md); choose "
                              "steps instead")
    given = config.parse_fields(raw, _TYPES)
    own = {k: given.pop(k) for k in OWN_FIELDS if k in given}
    presets = {m: {**SEARCH_MODES[m], **ABLATION_MODES[m]} for m in SEARCH_MODES}
    scfg = config.resolve_preset(SearchConfig, presets, isoflop._TYPES, given, text=("budgets",))
    return AblationConfig(**own, search=scfg)


# --------------------------------------------------------------------------- the design


@dataclass
class Design:
    """What the steps share, derived from the search settings (module docstring)."""

    batch: int
    """The one batch (sequences) of the kaplan..decay steps."""
    schedule_steps: int
    """Kaplan's schedule length scaled: the longest planned run of any step."""
    warmup_steps: int
    """Kaplan's warmup scaled: KAPLAN_WARMUP_RATIO of schedule_steps."""


def one_batch(scfg: SearchConfig) -> int:
    """The fixed rule's batch for the Chinchilla-sized model (D = 20 N) at the geometric-mean budget."""
    budgets = scfg.budget_list()
    c = math.exp(sum(map(math.log, budgets)) / len(budgets))
    fixed = dataclasses.replace(scfg, hparams="fixed")
    return fixed.hyper_rule().batch_for(20 * counting.chinchilla_n(c), scfg.batch_min, scfg.batch_max,
                                        scfg.batch_round)


def design(scfg: SearchConfig) -> Design:
    """The batch, schedule length and warmup of Kaplan's setup for this search's budgets and family."""
    b = one_batch(scfg)
    k = dataclasses.replace(scfg, hparams="fixed", batch_min=b, batch_max=b,
                            train=dataclasses.replace(scfg.train, flops_rule="kaplan"))
    longest = 0
    for c in k.budget_list():  # the smallest size planned trains the most tokens, in the most steps
        longest = max(longest, make_plan(isoflop.trial_config(k, c, isoflop.plan_budget(k, c).lo)).steps)
    return Design(b, longest, max(1, round(KAPLAN_WARMUP_RATIO * longest)))


def step_config(scfg: SearchConfig, step: str, d: Design, tuned_rule: str = "tuned") -> SearchConfig:
    """The search of one step: the shared settings with the step's counting, warmup, schedule and lr/batch rule."""
    s = BY_NAME[step]
    train = dataclasses.replace(scfg.train, flops_rule=s.flops_rule, warmup_steps=d.warmup_steps if s.fixed_warmup
                                else 0, schedule_steps=d.schedule_steps if s.fixed_schedule else 0)
    rule = {"hparams": tuned_rule} if s.tuned else {"hparams": "fixed", "batch_min": d.batch, "batch_max": d.batch}
    return dataclasses.replace(scfg, train=train, protocol=step, **rule)


def step_configs(acfg: AblationConfig) -> dict[str, SearchConfig]:
    """{step: its SearchConfig} for the steps asked for, in order."""
    d = design(acfg.search)
    return {s: step_config(acfg.search, s, d, acfg.tuned_rule) for s in acfg.step_list()}


def options(scfg: SearchConfig) -> dict[str, Any]:
    """The options that make a step's trials what they are (stored on its studies; a re-run must match them)."""
    t = scfg.train
    return {"flops_rule": t.flops_rule, "warmup_steps": t.warmup_steps, "warmup_frac": t.warmup_frac,
            "schedule_steps": t.schedule_steps, "min_lr_ratio": t.min_lr_ratio, "batch_min": scfg.batch_min,
            "batch_max": scfg.batch_max, "rule": dataclasses.asdict(scfg.hyper_rule()), "seed": t.seed}


# --------------------------------------------------------------------------- running


def mark_studies(scfg: SearchConfig, storage: Any, write: bool) -> None:
    """Check (and with ``write``, record) each budget's study user attributes ``protocol`` and
    ``protocol_options``: a study trained with other options is refused, so a re-run only reuses what matches."""
    names = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    want = options(scfg)
    for c in scfg.budget_list():
        name = isoflop.study_name(scfg, c)
        have = names[name].user_attrs.get("protocol_options") if name in names else None
        if have is not None and have != want:
            diff = ", ".join(f"{k} {have.get(k)!r} -> {v!r}" for k, v in want.items() if have.get(k) != v)
            raise ConfigError("study_prefix", scfg.study_prefix, f"a new prefix: study {name} was trained with "
                              f"other options ({diff})")
        if name in names and not write:  # its trials' lr and batch too, before any step trains
            studies.check_recipe(optuna.load_study(study_name=name, storage=storage), isoflop.plan_budget(scfg, c),
                                 scfg)
        if write:
            study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
            study.set_user_attr("protocol", scfg.protocol)
            study.set_user_attr("protocol_options", want)


@dataclass
class StepResult:
    """One step's searches: its config, the closing rows, the wall time of this invocation."""

    step: str
    scfg: SearchConfig
    results: list[isoflop.BudgetResult]
    wall_s: float


def run_ablation(acfg: AblationConfig, out: TextIO | None = None) -> list[StepResult]:
    """Every step asked for: its studies checked and tagged, then ``search.run_search`` (finished trials are kept,
    so a finished step trains nothing). The analysis is the caller's (cli.main_ablation)."""
    out = out or sys.stdout
    cfgs = step_configs(acfg)
    storage = studies.make_storage(acfg.search.storage)
    for scfg in cfgs.values():  # every step checked before anything trains
        for c in scfg.budget_list():
            isoflop.plan_budget(scfg, c)
        mark_studies(scfg, storage, write=False)
    done = []
    for step, scfg in cfgs.items():
        print(f"\n== protocol step {step}: {BY_NAME[step].change} ({BY_NAME[step].source})", file=out)
        mark_studies(scfg, storage, write=True)
        t0 = time.perf_counter()
        results = search.run_search(scfg, out)
        done.append(StepResult(step, scfg, results, time.perf_counter() - t0))
    print("\nablation: " + "; ".join(f"{r.step} {sum(sum(b.trials.values()) for b in r.results)} trials in "
                                     f"{fmt_seconds(r.wall_s)}" for r in done), file=out)
    return done


# --------------------------------------------------------------------------- the dry run


def describe(scfg: SearchConfig) -> str:
    """One line: a step's counting, warmup, schedule, lr/batch and seeds."""
    t, rule = scfg.train, scfg.hyper_rule()
    warm = f"{t.warmup_steps} steps (fixed)" if t.warmup_steps else f"{t.warmup_frac:g} of each run"
    sched = f"{t.schedule_steps:,} steps (fixed; runs stop mid-schedule)" if t.schedule_steps else "ends at each budget"
    hp = (f"lr {t.lr:g} and batch {scfg.batch_min} for every size" if scfg.hparams == "fixed"
          else f"lr {rule.lr_coef:.3g}*(N_total/1e5)^{rule.lr_exp:.3g}, batch rule {rule.source}")
    seeds = f"seed {t.seed}" + (f" (+ seeds {t.seed + 1}..{t.seed + scfg.replicas} for the best size and its two "
                                 "neighbours)" if scfg.replicas else "")
    return f"flops_rule {t.flops_rule}; warmup {warm}; schedule {sched}; {hp}; {seeds}"


def format_ablation_plan(acfg: AblationConfig, timed_seconds: float = search.SEARCH_TIMED_SECONDS) -> str:
    """The dry run: every step's budgets, sizes, seeds and estimated time (search.plan_search), and the total."""
    lines = [f"dry run (ablation {acfg.search.mode}): steps {', '.join(acfg.step_list())}; nothing trained, no "
             "MLflow run, no Optuna study"]
    total_s, trials = 0.0, 0
    per_step = []
    for step, scfg in step_configs(acfg).items():
        budgets = search.plan_search(scfg, timed_seconds)
        s = sum(b.total_s for b in budgets)
        total_s, trials = total_s + s, trials + sum(b.n_trials for b in budgets)
        per_step.append(f"{step} {fmt_seconds(s)}")
        lines += ["", f"== step {step}: {BY_NAME[step].change} ({BY_NAME[step].source})", "   " + describe(scfg),
                  search.format_search_plan(scfg, budgets)]
    lines += ["", f"ablation total: {trials} trials, estimated {fmt_seconds(total_s)} ({'; '.join(per_step)}) "
              "without pruning or widening, plus the analysis"]
    return "\n".join(lines)
