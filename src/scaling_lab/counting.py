"""Parameter and FLOP counts, the run plan and the published compute-optimal allocations: small pure functions,
each citing its source.

Shapes follow ``scaling_lab.model.GPT``: pre-LN blocks with biases, learned positions, MLP width 4d,
output head tied to the token embedding. Tests check every count against the real module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from scaling_lab.config import FLOPS_RULES, ModelConfig, RunConfig
from scaling_lab.errors import ConfigError

PF_DAY = 1e15 * 86_400  # FLOPs in one petaflop/s-day (Kaplan et al. 2020, Sec. 1.3)
KAPLAN_N_COEF = 1.3e9  # Kaplan et al. 2020, Eq. 6.1: N_opt = 1.3e9 * (C_min / PF-day)^0.73, N non-embedding
KAPLAN_N_EXP = 0.73
CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022: a = b = 0.50 (Table 3, Approaches 1-2); Chinchilla
# itself is 70B parameters on 1.4T tokens (Sec. 4), 20 tokens per parameter; N counts all parameters.


def n_params_nonembed(n_layer: int, n_embd: int) -> int:
    """Non-embedding parameters N (Kaplan et al. 2020, Sec. 2.1: N ~= 12 n_layer d_model^2).

    Counted exactly as the module holds them: per block QKV (3d^2 + 3d), attention output (d^2 + d),
    MLP (8d^2 + 5d), two LayerNorms (4d); plus the final LayerNorm (2d).
    """
    d = n_embd
    return n_layer * (12 * d * d + 13 * d) + 2 * d


def n_params_embed(n_embd: int, n_vocab: int, block_size: int) -> int:
    """Token and position embedding parameters (the tied head adds none)."""
    return n_vocab * n_embd + block_size * n_embd


def n_params_total(n_layer: int, n_embd: int, n_vocab: int, block_size: int) -> int:
    """All parameters, embeddings included (Hoffmann et al. 2022 count N this way)."""
    return n_params_nonembed(n_layer, n_embd) + n_params_embed(n_embd, n_vocab, block_size)


def flops_per_token_kaplan(n_layer: int, n_embd: int) -> float:
    """C = 6N per training token, N non-embedding (Kaplan et al. 2020, Sec. 2.1, Table 1)."""
    return 6.0 * n_params_nonembed(n_layer, n_embd)


def flops_per_token_total(n_layer: int, n_embd: int, n_vocab: int, block_size: int) -> float:
    """C = 6 N_total per training token: forward 2N plus backward 4N, embeddings and head included."""
    return 6.0 * n_params_total(n_layer, n_embd, n_vocab, block_size)


def flops_per_token_chinchilla(n_layer: int, n_head: int, n_embd: int, n_vocab: int, block_size: int) -> float:
    """Training FLOPs per token from Hoffmann et al. 2022, Appendix F (Table 4 recipe).

    Forward per sequence of length s: embeddings 2 s V d; per layer QKV 6 s d^2, logits 2 s^2 d,
    softmax 3 h s^2, attention over values 2 s^2 d, output projection 2 s d^2, MLP 16 s d^2
    (ffw = 4d); final logits 2 s d V. Backward = 2x forward. Divided by s for one token.
    """
    s, d, h, v = block_size, n_embd, n_head, n_vocab
    attention = 6 * s * d * d + 2 * s * s * d + 3 * h * s * s + 2 * s * s * d + 2 * s * d * d
    dense = 16 * s * d * d
    forward = 2 * s * v * d + n_layer * (attention + dense) + 2 * s * d * v
    return 3.0 * forward / s


def flops_per_token_exact(n_layer: int, n_head: int, n_embd: int, n_vocab: int, block_size: int) -> float:
    """Matmul FLOPs per training token that ``scaling_lab.model.GPT`` really does (forward + backward).

    Forward per token of a sequence of s tokens (2 FLOPs per multiply-add; Kaplan et al. 2020 Table 1
    without the embedding and bias terms; Chinchilla App. F without embedding lookup and softmax):
    per layer QKV 6 d^2, attention output 2 d^2, MLP 16 d^2 (two d x 4d matmuls); attention scores
    QK^T 2 s d and attention-weighted values 2 s d, summed over heads (h x 2 s (d/h)), so n_head cancels;
    tied output head 2 d V. Backward = 2x forward (input and weight gradients of every matmul).
    C = 3 [L (24 d^2 + 4 s d) + 2 d V] = 72 L d^2 + 12 L s d + 6 d V.

    Attention is the full s x s product, not half for causality: that is what the math SDPA path
    computes and what ``torch.utils.flop_counter`` counts, and what torch's CPU flash kernel computes
    up to s = 512 (it masks inside 512-key blocks and skips only whole blocks above the diagonal,
    ~0.62x of the time at s = 2048); CUDA flash kernels skip about half, so there this overcounts
    the 12 L s d term by up to ~2x. Not counted (not matmuls): embedding lookup, bias adds,
    LayerNorm, GELU, softmax and mask, cross-entropy, optimizer.
    """
    s, d, v = block_size, n_embd, n_vocab
    del n_head  # the dense count does not depend on how d is split into heads
    dense = 24 * d * d  # QKV + output projection + MLP, forward, per token
    attention = 4 * s * d  # QK^T (b, h, s, s) and att @ V, forward, per token
    head = 2 * d * v  # logits (b, s, V)
    return 3.0 * (n_layer * (dense + attention) + head)


def flops_per_token(model: ModelConfig, rule: str) -> float:
    """FLOPs per training token of ``model`` under ``rule`` (kaplan, total, chinchilla or exact)."""
    m = model
    if rule == "kaplan":
        return flops_per_token_kaplan(m.n_layer, m.n_embd)
    if rule == "total":
        return flops_per_token_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size)
    if rule == "chinchilla":
        return flops_per_token_chinchilla(m.n_layer, m.n_head, m.n_embd, m.n_vocab, m.block_size)
    if rule == "exact":
        return flops_per_token_exact(m.n_layer, m.n_head, m.n_embd, m.n_vocab, m.block_size)
    raise ValueError(f"parameter 'flops_rule': got {rule!r}; allowed: one of {', '.join(FLOPS_RULES)}")


def counts(model: ModelConfig, tokens: int) -> dict[str, float]:
    """N under each counting and C under each rule for ``tokens`` training tokens."""
    m = model
    out: dict[str, float] = {
        "n_params": n_params_nonembed(m.n_layer, m.n_embd),
        "n_params_total": n_params_total(m.n_layer, m.n_embd, m.n_vocab, m.block_size),
    }
    for rule in FLOPS_RULES:
        out[f"flops_{rule}"] = flops_per_token(m, rule) * tokens
    return out


def tokens_for_flops(model: ModelConfig, flops: float, rule: str) -> int:
    """D = C / flops_per_token(N) under ``rule`` (rounded down to whole tokens)."""
    return int(math.floor(flops / flops_per_token(model, rule)))


# --------------------------------------------------------------------------- published allocations


def kaplan_n(flops: float) -> float:
    """Kaplan-optimal non-embedding parameters for C training FLOPs (Kaplan et al. 2020, Eq. 6.1)."""
    return KAPLAN_N_COEF * (flops / PF_DAY) ** KAPLAN_N_EXP


def chinchilla_n(flops: float) -> float:
    """Chinchilla-optimal total parameters: C = 6 N D with D = 20 N, so N = sqrt(C / 120) (Hoffmann et al. 2022)."""
    return math.sqrt(flops / (6.0 * CHINCHILLA_TOKENS_PER_PARAM))


# --------------------------------------------------------------------------- the run plan


@dataclass
class Plan:
    """What a configuration will do, computed without training (also used by dry runs)."""

    steps: int
    """Optimizer steps."""
    tokens_per_step: int
    """batch_size x block_size."""
    tokens_trained: int
    """D: steps x tokens_per_step."""
    counts: dict[str, float]
    """N under each counting and C under each rule (``counts``)."""
    eval_steps: list[int]
    """Steps after which val/loss is scored."""
    checkpoint_every: int
    """Steps between checkpoints (0 = at every evaluation)."""

    def params(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens_per_step": self.tokens_per_step,
                "tokens_trained": self.tokens_trained, **self.counts}


def make_plan(cfg: RunConfig) -> Plan:
    """Steps, tokens and FLOPs of ``cfg``: D from tokens, or from flops under flops_rule."""
    t, m = cfg.train, cfg.model
    tokens = t.tokens if t.tokens else tokens_for_flops(m, t.flops, t.flops_rule)
    tokens_per_step = t.batch_size * m.block_size
    steps = tokens // tokens_per_step
    if steps < 1:
        what = "flops" if t.flops else "tokens"
        need = tokens_per_step if not t.flops else tokens_per_step * flops_per_token(m, t.flops_rule)
        raise ConfigError(what, t.flops or t.tokens, f"at least one optimizer step: >= {need:.4g} "
                          f"(batch_size {t.batch_size} x block_size {m.block_size} tokens)")
    trained = steps * tokens_per_step
    every = t.eval_every or max(1, math.ceil(steps / 10))
    evals = sorted({min(steps, s) for s in range(every, steps + every, every)} | {steps})
    if not t.eval_every:  # evaluate at the same fractions of the budget in every run: 10%, 20%, ... 100%
        evals = sorted({max(1, round(steps * k / 10)) for k in range(1, 11)})
    return Plan(steps, tokens_per_step, trained, counts(m, trained), evals, t.checkpoint_every)
