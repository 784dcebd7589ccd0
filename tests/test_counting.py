"""Parameter and FLOP counts against the real module."""

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scaling_lab import counting
from scaling_lab.config import FLOPS_RULES, ModelConfig, n_vocab_for
from scaling_lab.model import GPT

SHAPES = [(1, 1, 16, 8, 257), (2, 4, 64, 32, 300), (3, 6, 96, 64, n_vocab_for(1024))]


@pytest.mark.parametrize("n_layer,n_head,n_embd,block,vocab", SHAPES)
def test_parameter_counts_match_numel(n_layer, n_head, n_embd, block, vocab):
    model = GPT(ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block, n_vocab=vocab))
    total = sum(p.numel() for p in model.parameters())  # tied head counted once
    embed = model.wte.weight.numel() + model.wpe.weight.numel()
    assert counting.n_params_total(n_layer, n_embd, vocab, block) == total
    assert counting.n_params_nonembed(n_layer, n_embd) == total - embed
    # Kaplan's approximation 12 L d^2 is the leading term
    assert counting.n_params_nonembed(n_layer, n_embd) == pytest.approx(12 * n_layer * n_embd**2, rel=0.15)


@pytest.mark.parametrize("n_layer,n_head,n_embd,block,vocab", SHAPES)
def test_flops_rules_against_direct_matmul_count(n_layer, n_head, n_embd, block, vocab):
    """FlopCounterMode counts every matmul of forward + backward (attention through the math path).

    Chinchilla App. F also counts the embedding lookup as a matmul (2 V d forward) and the softmax
    (3 h s per token forward); the module does neither as a matmul, so the direct count must equal
    the rule minus exactly those terms (times 3 for forward + backward)."""
    cfg = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block, n_vocab=vocab)
    model = GPT(cfg)
    batch = 2
    x = torch.randint(0, vocab, (batch, block))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        _, loss = model(x, x)
        loss.backward()
    direct = fc.get_total_flops() / (batch * block)
    chinchilla = counting.flops_per_token(cfg, "chinchilla")
    assert direct == pytest.approx(chinchilla - 3 * (2 * vocab * n_embd + n_layer * 3 * n_head * block), rel=1e-9)
    # 6N (Kaplan) is the weight-matmul part of that count without attention, head and biases
    attention_and_head = 3 * (n_layer * 4 * block * n_embd + 2 * vocab * n_embd)
    weight_matmuls = direct - attention_and_head
    assert weight_matmuls == 6 * n_layer * 12 * n_embd**2
    assert counting.flops_per_token(cfg, "kaplan") == pytest.approx(weight_matmuls, rel=0.15)
    assert counting.flops_per_token(cfg, "total") == 6 * counting.n_params_total(n_layer, n_embd, vocab, block)


EXACT_SHAPES = [  # n_layer, n_head, n_embd, block_size, n_vocab
    (1, 1, 16, 16, 257), (1, 2, 32, 64, 513), (3, 4, 32, 16, 513), (3, 2, 48, 64, 257), (2, 8, 64, 64, 513),
]


def _counted(model: GPT, x: torch.Tensor, backend: SDPBackend | None) -> dict[str, int]:
    """FlopCounterMode totals per aten op of one forward + backward (fp32, CPU)."""
    ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
    with ctx, FlopCounterMode(display=False) as fc:
        _, loss = model(x, x)
        loss.backward()
    return {str(op).split(".")[-1]: n for op, n in fc.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("n_layer,n_head,n_embd,block,vocab", EXACT_SHAPES)
def test_exact_rule_matches_flop_counter(n_layer, n_head, n_embd, block, vocab):
    """The exact rule is every matmul FLOP torch does, forward + backward, per token.

    FlopCounterMode counts only matmul-like aten ops (mm, addmm, bmm, SDPA kernels it knows), at 2 FLOPs per
    multiply-add, bias adds of addmm excluded; so do we: the match is exact (integers), with no residual from
    LayerNorm, GELU, softmax, embedding or cross-entropy, which neither side counts. On CPU (torch 2.13) the
    default SDPA dispatch is _scaled_dot_product_flash_attention_for_cpu, which FlopCounterMode does not count
    (0 FLOPs): there the attention term 12 L s d comes from the shapes; the math backend runs attention as
    bmm over the full s x s scores, which it does count, and the total equals the rule."""
    cfg = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block, n_vocab=vocab)
    torch.manual_seed(0)
    model = GPT(cfg).float()
    batch = 2
    x = torch.randint(0, vocab, (batch, block))
    tokens = batch * block
    exact = counting.flops_per_token(cfg, "exact")
    attention = 3 * n_layer * 4 * block * n_embd  # QK^T + att @ V, forward + backward, per token

    math_path = _counted(model, x, SDPBackend.MATH)
    assert sum(math_path.values()) / tokens == exact
    assert math_path["bmm"] / tokens == attention  # full s x s, causality not halved

    default = _counted(model, x, None)
    assert "bmm" not in default  # CPU flash attention: uncounted by FlopCounterMode
    assert sum(default.values()) / tokens + attention == exact


def test_exact_rule_against_the_other_rules():
    """exact = chinchilla minus embedding lookup (2 V d) and softmax (3 h s) forward terms, times 3;
    exact - total = 12 L s d (attention) - 6 (13 L + 2 + s) d (biases, LayerNorms, positions)."""
    for n_layer, n_head, d, s, v in EXACT_SHAPES:
        cfg = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=d, block_size=s, n_vocab=v)
        exact = counting.flops_per_token(cfg, "exact")
        assert exact == 72 * n_layer * d * d + 12 * n_layer * s * d + 6 * d * v
        assert counting.flops_per_token(cfg, "chinchilla") - exact == 3 * (2 * v * d + 3 * n_layer * n_head * s)
        assert exact - counting.flops_per_token(cfg, "total") == 12 * n_layer * s * d - 6 * (13 * n_layer + 2 + s) * d
        assert counting.counts(cfg, 1000)["flops_exact"] == 1000 * exact
    with pytest.raises(ValueError, match="exact"):
        counting.flops_per_token(cfg, "6nd")


def test_counts_follow_vocab_size():
    small = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, n_vocab=n_vocab_for(256))
    large = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, n_vocab=n_vocab_for(50257))
    assert small.n_vocab == 257 and large.n_vocab == 50257
    assert counting.counts(large, 1000)["n_params_total"] - counting.counts(small, 1000)["n_params_total"] == (
        (50257 - 257) * 32
    )
    assert counting.counts(large, 1000)["n_params"] == counting.counts(small, 1000)["n_params"]
    assert counting.flops_per_token(large, "chinchilla") > counting.flops_per_token(small, "chinchilla")


def test_tokens_for_flops_inverts_the_rule():
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, n_vocab=257)
    for rule in FLOPS_RULES:
        d = counting.tokens_for_flops(cfg, 1e12, rule)
        assert d * counting.flops_per_token(cfg, rule) <= 1e12 < (d + 1) * counting.flops_per_token(cfg, rule)


def test_cpu_bf16_autocast_runs_attention_in_fp32(monkeypatch):
    """Under bf16 autocast on CPU, SDPA gets fp32 q, k, v (its bf16 backward is ~3x slower there) and the block
    still returns bf16 activations, gradients flow, and the loss matches the fp32 model's to bf16 precision."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, n_vocab=n_vocab_for(256)))
    idx = torch.randint(0, 257, (4, 16))
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(q.dtype)
        return real(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    _, loss32 = model(idx, idx)
    assert seen == [torch.float32] * 2
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.blocks[0].attn(torch.randn(4, 16, 32))
        _, loss16 = model(idx, idx)
    assert h.dtype == torch.bfloat16 and seen == [torch.float32] * 3
    loss16.backward()
    assert model.blocks[0].attn.c_attn.weight.grad.abs().sum() > 0
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
