"""Configuration: one dataclass per concern, the modes table, validation, and THE field parser.

Every field name is also the MLproject parameter, the CLI flag and the MLflow param key (holding the value
actually used; see README "Parameters"). Every entry point turns its
strings into typed values with ``parse_fields``: a value is unset only when absent, None or '' (never 0, so
``--seed 0`` or ``--grad_clip 0`` mean zero).
"""

from __future__ import annotations

import ast
import codecs
import dataclasses
import functools
import inspect
import math
import textwrap
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from scaling_lab.errors import ConfigError

GPT2_RANKS = 50256  # BPE ranks in GPT-2's vocabulary; the end-of-text token is id 50256
GPT2_VOCAB = GPT2_RANKS + 1  # 50,257 ids in GPT-2 (Radford et al. 2019)
MIN_VOCAB = 256  # byte level: the 256 byte tokens only

FLOPS_RULES = ("kaplan", "total", "chinchilla", "exact")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "bf16", "fp32")
COMPILE_CHOICES = ("auto", "true", "false")
SCHEDULES = ("cosine", "wsd")
NAMED_DATASETS = ("wikitext-2", "wikitext-103", "openwebtext")
TOKENIZERS = ("gpt2",)


def n_vocab_for(vocab_size: int) -> int:
    """Embedding rows for a truncated GPT-2 vocabulary: the kept BPE ranks plus end-of-text."""
    return min(vocab_size, GPT2_RANKS) + 1


def positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(name, value, "a non-negative integer" if allow_zero else "a positive integer")


def positive_float(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(name, value, "a non-negative finite number" if allow_zero else "a positive finite number")


def _is_text_codec(name: str) -> bool:
    try:
        return codecs.lookup(name)._is_text_encoding
    except LookupError:
        return False


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(name, value, "one of " + ", ".join(allowed))


@dataclass
class ModelConfig:
    """Shape of the GPT decoder."""

    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 128
    """Residual stream width d_model."""
    block_size: int = 128
    """Context length in tokens."""
    n_vocab: int = 513
    """Embedding rows (derived from vocab_size: kept BPE ranks + end-of-text)."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "n_vocab"):
            positive_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ConfigError("n_embd", self.n_embd, f"a multiple of n_head={self.n_head}")


@dataclass
class DataConfig:
    """Where tokens come from and how they are cut."""

    dataset: str = "wikitext-2"
    """wikitext-2, wikitext-103, openwebtext, or a local directory/file(s) (comma-separated)."""
    train_split: str = "train"
    """Split to train on (e.g. 'test' when only valid/test files exist offline)."""
    val_split: str = "validation"
    """Split to score val/loss on."""
    tokenizer: str = "gpt2"
    """tiktoken encoding (GPT-2 BPE)."""
    vocab_size: int = 512
    """GPT-2 BPE ranks kept (256 = bytes only ... 50257 = all of GPT-2); end-of-text is one more id."""
    cache_dir: str = ""
    """Token cache folder ('' = $SCALING_LAB_CACHE or ~/.cache/scaling_lab)."""
    encoding: str = "utf-8"
    """Text encoding of local text, jsonl and csv files (a Python codec: utf-8, latin-1, cp1252, utf-16, ...)."""

    def __post_init__(self) -> None:
        if not isinstance(self.encoding, str) or not _is_text_codec(self.encoding):
            raise ConfigError("encoding", self.encoding, "a Python text codec such as utf-8, latin-1, cp1252, utf-16")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError("dataset", self.dataset, "one of " + ", ".join(NAMED_DATASETS) + ", or a local path")
        choice("tokenizer", self.tokenizer, TOKENIZERS)
        if (
            not isinstance(self.vocab_size, int)
            or isinstance(self.vocab_size, bool)
            or not MIN_VOCAB <= self.vocab_size <= GPT2_VOCAB
        ):
            raise ConfigError("vocab_size", self.vocab_size, f"an integer from {MIN_VOCAB} to {GPT2_VOCAB}")
        for name in ("train_split", "val_split"):
            if not getattr(self, name):
                raise ConfigError(name, getattr(self, name), "a split name such as train, validation, test")


@dataclass
class TrainConfig:
    """Budget, optimizer, schedule, device and checkpoints."""

    tokens: int = 0
    """Training tokens D (0 = derive from flops)."""
    flops: float = 0.0
    """Training compute C in FLOPs under flops_rule (0 = use tokens)."""
    flops_rule: str = "total"
    """FLOPs per token rule that turns C into D: kaplan (6N), total (6N_total), chinchilla (App. F), exact
    (the matmul FLOPs the model does)."""
    batch_size: int = 16
    """Sequences per optimizer step (the target batch)."""
    micro_batch: int = 0
    """Sequences per forward pass (0 = choose from free memory); accumulation makes up batch_size."""
    lr: float = 3e-3
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """The decay ends at this fraction of lr."""
    schedule: str = "cosine"
    """Learning-rate decay after the warmup: cosine (a half cosine to min_lr_ratio * lr at the last step) or wsd
    (warmup-stable-decay, Hägele et al. 2024: lr held, then a 1-sqrt cooldown over the last cooldown_frac)."""
    cooldown_frac: float = 0.2
    """schedule=wsd: fraction of the schedule's steps in the cooldown (Hägele et al. 2024 use 0.2)."""
    warmup_frac: float = 0.1
    """Fraction of the run's own steps of linear warmup (used when warmup_steps is 0)."""
    warmup_steps: int = 0
    """Steps of linear warmup whatever the run's length (0 = warmup_frac of the run's steps)."""
    schedule_steps: int = 0
    """Length of the warmup + cosine schedule in steps (0 = the run's own steps: the decay ends at its last step);
    longer runs stop mid-schedule where their budget ends, steps past it stay at min_lr_ratio * lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = off)."""
    eval_every: int = 0
    """Steps between validation passes (0 = about 10 per run)."""
    eval_tokens: int = 16384
    """Fixed validation tokens scored at each evaluation."""
    device: str = "auto"
    """auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps."""
    dtype: str = "auto"
    """Autocast precision: auto (bf16 on CUDA with bf16 and on CPUs with native bf16, else fp32), bf16, fp32."""
    compile: str = "false"
    """torch.compile: true, false, auto (when the run is long enough to repay compiling)."""
    seed: int = 1337
    """Seed for init, data order and evaluation windows."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0 = at every evaluation)."""
    checkpoint_dir: str = "checkpoints"
    """Folder for periodic checkpoints, one subfolder per run."""
    save_checkpoint: bool = False
    """Log the final checkpoint as an MLflow artifact."""
    resume: str = ""
    """Run id to continue from its last checkpoint."""
    yes: bool = False
    """Start a run or search whose plan is estimated at more than a day at the calibrated speed (refused without
    it; a bare --yes means true)."""

    def __post_init__(self) -> None:
        positive_int("tokens", self.tokens, allow_zero=True)
        positive_float("flops", self.flops, allow_zero=True)
        choice("flops_rule", self.flops_rule, FLOPS_RULES)
        for name in ("batch_size", "eval_tokens"):
            positive_int(name, getattr(self, name))
        for name in ("micro_batch", "eval_every", "checkpoint_every", "seed", "warmup_steps", "schedule_steps"):
            positive_int(name, getattr(self, name), allow_zero=True)
        if self.micro_batch and self.batch_size % self.micro_batch:
            raise ConfigError("micro_batch", self.micro_batch, f"a divisor of batch_size={self.batch_size}")
        if self.schedule_steps and self.warmup_steps > self.schedule_steps:
            raise ConfigError("warmup_steps", self.warmup_steps, f"at most schedule_steps={self.schedule_steps}")
        positive_float("lr", self.lr)
        for name in ("weight_decay", "grad_clip"):
            positive_float(name, getattr(self, name), allow_zero=True)
        for name in ("min_lr_ratio", "warmup_frac", "beta1", "beta2"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v < 1 + (name == "min_lr_ratio"):
                raise ConfigError(name, v, "a number in [0, 1]" if name == "min_lr_ratio" else "a number in [0, 1)")
        dev = self.device
        if not (dev in DEVICES or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError("device", dev, "auto, cpu, cuda, cuda:N, mps")
        choice("dtype", self.dtype, DTYPES)
        choice("compile", self.compile, COMPILE_CHOICES)
        choice("schedule", self.schedule, SCHEDULES)
        if not isinstance(self.cooldown_frac, (int, float)) or not 0 < self.cooldown_frac <= 1:
            raise ConfigError("cooldown_frac", self.cooldown_frac, "a number in (0, 1]")
        if not isinstance(self.yes, bool):
            raise ConfigError("yes", self.yes, "true or false")


@dataclass
class RunConfig:
    """Everything one training run needs."""

    mode: str = "quick"
    """Preset from MODES; explicit parameters override it."""
    experiment: str = "scaling-lab"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name ('' = generated from shape and budget)."""
    dry_run: bool = False
    """Print the plan and estimated cost, then exit: no training, no MLflow run (see docs/estimate-and-doctor.md)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Text, tokenizer and vocabulary (built first: a bad vocab_size is named before the n_vocab it implies)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Shape of the GPT."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(tokens=1))
    """Budget, optimizer, schedule, device, checkpoints."""

    def __post_init__(self) -> None:
        choice("mode", self.mode, tuple(MODES))
        t = self.train
        if (t.tokens > 0) == (t.flops > 0):  # a run needs one budget; TrainConfig alone may have none (a search's)
            raise ConfigError("tokens/flops", (t.tokens, t.flops), "exactly one of tokens (D) or flops (C) > 0")
        if self.model.n_vocab != n_vocab_for(self.data.vocab_size):
            raise ConfigError("n_vocab", self.model.n_vocab, f"{n_vocab_for(self.data.vocab_size)} for vocab_size")

    def flat(self) -> dict[str, Any]:
        """All fields as one flat dict keyed by field name (the MLflow param keys)."""
        return flat(self)


def flat(obj: Any) -> dict[str, Any]:
    """A config dataclass as one flat dict keyed by field name, the fields of its parts flattened in."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.update(flat(v))
        else:
            out[f.name] = v
    return out


def build(cls: type, values: dict[str, Any]) -> Any:
    """A config dataclass from flat ``values``: each part (a dataclass-typed field) gets the values named like
    its fields; fields left out keep their defaults."""
    kw: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        part = hints[f.name]
        if dataclasses.is_dataclass(part):
            names = {g.name for g in fields(part)}
            kw[f.name] = part(**{k: v for k, v in values.items() if k in names})
        elif f.name in values:
            kw[f.name] = values[f.name]
    return cls(**kw)


# Modes: presets of the fields above. Sizes and expected times are in README's modes table.
# quick: a CPU-sized run (~3 min on 2 cores) with a 512-rank vocabulary (see README "Vocabulary").
MODES: dict[str, dict[str, Any]] = {
    "tiny": dict(  # for tests and smoke checks: seconds on a CPU
        n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=256,
        tokens=40_960, batch_size=8, lr=3e-3, eval_tokens=4096, eval_every=0, dtype="fp32",
    ),
    "quick": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=512,
        tokens=2_000_000, batch_size=16, lr=3e-3, eval_tokens=16_384,
    ),
    "standard": dict(  # laptop GPU / MPS, about an hour
        n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=GPT2_VOCAB, dataset="wikitext-103",
        tokens=50_000_000, batch_size=64, lr=1e-3, eval_tokens=131_072, compile="auto",
    ),
    "full": dict(  # GPT-2 small on OpenWebText, hours on a GPU
        n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=GPT2_VOCAB, dataset="openwebtext",
        tokens=2_500_000_000, batch_size=480, lr=6e-4, eval_tokens=1_048_576, compile="auto",
    ),
}

_PARTS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}  # data first: vocab errors name vocab_size
TOP_FIELDS = ("mode", "experiment", "run_name", "dry_run")


def field_names() -> list[str]:
    """Every user-facing field name of a training run (the one-name-per-idea list), n_vocab excluded (derived)."""
    names = list(TOP_FIELDS)
    for cls in _PARTS.values():
        names += [f.name for f in fields(cls) if f.name != "n_vocab"]
    return names


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def types_of(cls: type) -> dict[str, type]:
    """{field name: python type} of a dataclass, the fields of its dataclass-typed parts flattened in."""
    out: dict[str, type] = {}
    for name, t in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(t):  # a part (ModelConfig, DataConfig, TrainConfig): its fields are flags too
            out.update(types_of(t))
        else:
            out[name] = t
    return out


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its attribute docstring (the string under the field), whitespace folded} of a dataclass,
    read once from its source; the fields of its dataclass-typed parts flattened in (its own docs win)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    own = {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
           if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
           and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)}
    parts: dict[str, str] = {}
    for name, t in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(t) and name in {f.name for f in fields(cls)}:
            parts.update(field_docs(t))
    return {**parts, **own}


def field_defaults(cls: type) -> dict[str, Any]:
    """{field name: dataclass default} of a dataclass, the defaults of its parts' fields flattened in."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(field_defaults(hints[f.name]))
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
    return out


def field_types() -> dict[str, type]:
    """Python type of every user-facing field of a training run, for parsing CLI strings."""
    types = {name: str for name in TOP_FIELDS} | {"dry_run": bool}
    for cls in _PARTS.values():
        types.update(types_of(cls))
    types.pop("n_vocab", None)
    return types


def is_unset(value: Any) -> bool:
    """A parameter the user left to the mode: absent (None) or '' (MLproject's default). 0 is a value."""
    return value is None or (isinstance(value, str) and not value.strip())


def parse_value(name: str, raw: Any, t: type | None = None) -> Any:
    """Turn a CLI/MLproject string into type ``t`` (default: the training field's type), or raise ConfigError
    naming the field and what is allowed."""
    t = t or field_types()[name]
    if not isinstance(raw, str):
        return raw
    s = raw.strip()
    try:
        if t is bool:
            if s.lower() not in _TRUE + _FALSE:
                raise ValueError
            return s.lower() in _TRUE
        if t is int:
            v = float(s)  # accept 2e6
            if not v.is_integer():
                raise ValueError
            return int(v)
        if t is float:
            return float(s)
    except ValueError:
        allowed = {bool: "true or false (also 1/0, yes/no)", int: "an integer", float: "a number"}[t]
        raise ConfigError(name, raw, allowed) from None
    return s


def parse_fields(raw: dict[str, Any], types: dict[str, type]) -> dict[str, Any]:
    """The one parser of every entry point: {name: string} -> {name: typed value}, unset values dropped, an
    unknown name a ConfigError listing the known ones."""
    unknown = sorted(set(raw) - set(types))
    if unknown:
        raise ConfigError(unknown[0], raw[unknown[0]], "one of " + ", ".join(types))
    return {k: parse_value(k, v, types[k]) for k, v in raw.items() if not is_unset(v)}


def resolve(overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build a validated RunConfig: dataclass defaults < mode preset < explicit overrides.

    ``overrides`` maps field names to values or strings; unset values ('' / None) are ignored.
    """
    given = parse_fields(dict(overrides or {}), field_types())
    mode = given.get("mode", "quick")
    choice("mode", mode, tuple(MODES))
    values: dict[str, Any] = dict(MODES[mode])
    if "tokens" in given and "flops" in given:
        raise ConfigError("tokens/flops", (given["tokens"], given["flops"]), "only one of tokens (D) or flops (C)")
    if "flops" in given:
        values.pop("tokens", None)
    values.update(given)
    vocab = values.get("vocab_size", DataConfig.vocab_size)
    if isinstance(vocab, int) and not isinstance(vocab, bool):
        values["n_vocab"] = n_vocab_for(vocab) if MIN_VOCAB <= vocab <= GPT2_VOCAB else vocab
    return build(RunConfig, values)


def resolve_preset(cls: type, presets: dict[str, dict[str, Any]], types: dict[str, type],
                   overrides: dict[str, Any] | None = None, text: tuple[str, ...] = ()) -> Any:
    """A config with a ``mode`` field (a search, a tuning): defaults < the mode's preset < explicit overrides
    ('' / None unset), parsed with ``parse_fields``; ``text`` fields given as numbers (budgets=1e11) become text."""
    given = parse_fields(dict(overrides or {}), types)
    mode = given.get("mode", "quick")
    choice("mode", mode, tuple(presets))
    values = {**presets[mode], **given}
    for name in text:
        if isinstance(values.get(name), (int, float)):
            values[name] = str(values[name])
    return build(cls, values)


def from_flat(values: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from ``RunConfig.flat()`` (checkpoints store this; older ones have no dry_run)."""
    return build(RunConfig, values)
