"""GPT decoder (after karpathy/nanoGPT): pre-LayerNorm blocks, causal SDPA attention, GELU MLP,
learned positions, output head tied to the token embedding. torch only."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaling_lab.config import ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (batch, time, n_embd)
        q, k, v = self.c_attn(x).split(d, dim=2)
        # (b, n_head, t, head_dim)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        return self.c_proj(attend(q, k, v).transpose(1, 2).contiguous().view(b, t, d))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA over (batch, n_head, time, head_dim)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # bf16 autocast on CPU: torch's bf16 flash-attention backward is ~3x slower than fp32 here (11.5 vs 3.7 ms
        # per layer at b16 h4 t128, benchmarks/RESULTS.md), half of a quick step; attention runs in fp32, the
        # matmuls around it stay bf16
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.n_vocab, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.n_vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: the head adds no parameters
        self.apply(self._init_weights)
        # GPT-2 scaled init of residual projections: std 0.02 / sqrt(2 n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: (batch, time) int64. Returns logits (batch, time, n_vocab) and mean loss."""
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (b, t, d)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay matrices (and the tied embedding), not biases or LayerNorm gains."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class StackedGPT(nn.Module):
    """k GPTs of one shape (seed replicas) as one module: each weight of ``GPT`` carries a leading replica
    dimension, every linear layer is one batched matmul over the replicas, attention runs them as extra batch
    rows. Replica i computes exactly what its own GPT would (up to float rounding); nothing mixes replicas."""

    def __init__(self, models: list[GPT]):
        super().__init__()
        self.cfg, self.k = models[0].cfg, len(models)
        self.names = [n for n, _ in models[0].named_parameters()]  # the tied head appears once, as wte.weight
        own = [dict(m.named_parameters()) for m in models]
        self.weights = nn.ParameterList(torch.stack([o[n].detach() for o in own]).clone() for n in self.names)
        self.index = {n: i for i, n in enumerate(self.names)}

    def p(self, name: str) -> torch.Tensor:
        """The stacked weight ``name`` of GPT (k, *its shape)."""
        return self.weights[self.index[name]]

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:  # x (k, rows, in) -> (k, rows, out)
        return torch.baddbmm(self.p(name + ".bias").unsqueeze(1), x, self.p(name + ".weight").transpose(1, 2))

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:]) * self.p(name + ".weight").unsqueeze(1) + self.p(name + ".bias").unsqueeze(1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: (k, batch, time) int64. Returns logits (k, batch * time, n_vocab) and each replica's mean
        loss (k,)."""
        k, b, t = idx.shape
        d, v, nh = self.cfg.n_embd, self.cfg.n_vocab, self.cfg.n_head
        wte = self.p("wte.weight")  # (k, V, d); also the tied output head
        offsets = (torch.arange(k, device=idx.device) * v).view(k, 1, 1)  # replica i's rows of the flat table
        x = F.embedding(idx + offsets, wte.reshape(k * v, d)) + self.p("wpe.weight")[:, None, :t]  # (k, b, t, d)
        x = x.reshape(k, b * t, d)
        for i in range(self.cfg.n_layer):
            pre = f"blocks.{i}."
            q, kk, vv = self._linear(self._norm(x, pre + "ln_1"), pre + "attn.c_attn").split(d, dim=2)
            q, kk, vv = (z.reshape(k * b, t, nh, d // nh).transpose(1, 2) for z in (q, kk, vv))
            y = attend(q, kk, vv).transpose(1, 2).reshape(k, b * t, d)
            x = x + self._linear(y, pre + "attn.c_proj")
            x = x + self._linear(F.gelu(self._linear(self._norm(x, pre + "ln_2"), pre + "mlp.c_fc")), pre + "mlp.c_proj")
        logits = torch.bmm(self._norm(x, "ln_f"), wte.transpose(1, 2))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, v), targets.reshape(-1), reduction="none").view(k, -1).mean(1)
        return logits, loss

    def param_groups(self, weight_decay: float) -> list[dict]:
        """GPT's AdamW groups, stacked: decay what is a matrix in one replica."""
        decay = [p for p in self.weights if p.dim() >= 3]
        no_decay = [p for p in self.weights if p.dim() < 3]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
