"""AdamW over one flat buffer (CPU): a few whole-buffer operations per step instead of ~10 per parameter tensor.

On the CPU ``torch.optim.AdamW(foreach=True)`` and ``clip_grad_norm_(foreach=True)`` loop over the parameter
tensors one kernel at a time, so the update of a tiny model costs more than its forward pass (profiled: 2.3 ms of
a 5.7 ms step at d = 12, batch 1 x 64 tokens; benchmarks/RESULTS.md). ``FlatAdamW`` lays every parameter into one
buffer of shape (rows, M) (rows = 1 for a GPT, k for a stacked model whose weights carry a leading replica
dimension; each parameter is a view of columns of it), gathers the gradients into one (rows, M) buffer, clips
each row by its own norm and updates the buffer with torch's AdamW arithmetic, element by element the same
operations as ``torch.optim.AdamW(foreach=True)``. Its ``state_dict`` is AdamW's (per parameter ``step``,
``exp_avg``, ``exp_avg_sq``), so checkpoints move between the two. torch only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from scaling_lab.config import TrainConfig


class FlatAdamW(torch.optim.AdamW):
    """AdamW (decoupled weight decay, Loshchilov & Hutter 2019) on one (rows, M) buffer.

    ``params``: AdamW's param groups; every parameter has ``rows`` as its leading dimension when ``rows`` > 1.
    Parameters are moved into the buffer (``p.data`` becomes a view), so build this after the model is on its
    device and before anything keeps a reference to ``p.data``. ``clip_grad_norm_`` gathers and clips the
    gradients; ``step`` gathers them itself when it was not called (or takes a closure); ``zero_grad`` forgets
    a gathered set. Unlike AdamW, a parameter without a gradient is updated as with a zero one (decay and
    momentum): every GPT parameter has a gradient at every step.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, rows: int = 1):
        # foreach=True is only what its state_dict says: torch's AdamW resuming it takes the same arithmetic
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)
        self.rows = rows
        ps = self._params()
        if any(p.dim() == 0 or (rows > 1 and p.shape[0] != rows) for p in ps):
            raise ValueError(f"every parameter needs a leading dimension of {rows} rows")
        sizes = [p.numel() // rows for p in ps]
        p0 = ps[0]
        self.flat = torch.empty(rows, sum(sizes), dtype=p0.dtype, device=p0.device)  # (rows, M) parameters
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        self.gbuf = torch.zeros_like(self.flat)  # (rows, M) the gradients of this step, gathered (and clipped)
        self.gathered = False
        self.spans: list[tuple[int, int]] = []  # columns of each group
        self.views: dict[torch.Tensor, tuple[int, int]] = {}
        col = 0
        for group in self.param_groups:
            start = col
            for p in group["params"]:
                n = p.numel() // rows
                with torch.no_grad():
                    self.flat[:, col:col + n].copy_(p.reshape(rows, n))
                p.data = self._view(self.flat, col, n, p.shape)
                self.views[p] = (col, n)
                col += n
            self.spans.append((start, col))
        self.gviews = {p: self._view(self.gbuf, c, n, p.shape) for p, (c, n) in self.views.items()}
        self.n_steps = 0
        self._step = torch.zeros(())  # AdamW's per-parameter ``step``, shared here; state_dict gives copies

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _view(self, buf: torch.Tensor, col: int, n: int, shape: torch.Size) -> torch.Tensor:
        return buf[:, col:col + n].view(shape) if self.rows > 1 else buf[0, col:col + n].view(shape)

    @torch.no_grad()
    def gather(self) -> torch.Tensor:
        """The gradients copied into the (rows, M) buffer in one operation (zeros for a parameter without one)."""
        rows = self.rows
        torch.cat([p.grad.reshape(rows, -1) if p.grad is not None
                   else torch.zeros(rows, p.numel() // rows, dtype=p.dtype, device=p.device)
                   for p in self._params()], dim=1, out=self.gbuf)
        self.gathered = True
        return self.gbuf

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, order: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Each row's gradient L2 norm (rows,) before clipping, and row i scaled by min(1, max_norm / (norm_i +
        1e-6)): ``torch.nn.utils.clip_grad_norm_``'s arithmetic (the norm of the per-parameter norms, taken in
        the order of ``order``, the parameters as the caller lists them; then one multiply), so the numbers are
        the per-tensor path's, bit for bit."""
        g = self.gather()
        gv = [self.gviews[p] for p in (order if order is not None else self.views)]
        if self.rows == 1:
            norms = torch.nn.utils.get_total_norm(gv, foreach=True).reshape(1)
        else:
            norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v.flatten(1), dim=1)
                                                          for v in gv]), dim=0)
        if math.isfinite(max_norm):
            g.mul_((max_norm / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1).to(g.dtype))
        return norms

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """torch's AdamW update (its multi-tensor arithmetic, operation for operation) on each group's columns."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            self.gathered = False  # the closure made new gradients
        g = self.gbuf if self.gathered else self.gather()
        self.n_steps += 1
        for group, (a, b) in zip(self.param_groups, self.spans):
            if a == b:
                continue
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            p, m, v, gg = self.flat[:, a:b], self.exp_avg[:, a:b], self.exp_avg_sq[:, a:b], g[:, a:b]
            if wd != 0:
                p.mul_(1 - lr * wd)
            m.lerp_(gg, 1 - beta1)
            v.mul_(beta2).addcmul_(gg, gg, value=1 - beta2)
            step_size = (lr / (1 - beta1 ** float(self.n_steps))) * -1  # as torch: negated, bias-corrected lr
            denom = v.sqrt().div_((1 - beta2 ** float(self.n_steps)) ** 0.5).add_(eps)
            p.addcdiv_(m, denom, value=step_size)
        self.gathered = False
        self._step.fill_(float(self.n_steps))
        if self.n_steps == 1:
            self._bind_state()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.gathered = False
        super().zero_grad(set_to_none)

    # ---------------------------------------------------------------- AdamW's state, views of the buffers

    def _bind_state(self) -> None:
        """``state[p]`` as AdamW keeps it, its moments views of the buffers (what ``unstack`` and checkpoints read)."""
        for p, (col, n) in self.views.items():
            self.state[p] = {"step": self._step, "exp_avg": self._view(self.exp_avg, col, n, p.shape),
                             "exp_avg_sq": self._view(self.exp_avg_sq, col, n, p.shape)}

    def state_dict(self):  # type: ignore[override]
        sd = super().state_dict()
        # one ``step`` tensor per parameter, as AdamW has (a shared one would be counted once per parameter there)
        sd["state"] = {i: {**st, "step": st["step"].clone()} for i, st in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict) -> None:  # type: ignore[override]
        """AdamW's state dict (from this class or ``torch.optim.AdamW``): moments copied into the buffers."""
        super().load_state_dict(state_dict)
        steps = {float(st["step"]) for st in self.state.values() if "step" in st}
        if len(steps) > 1:
            raise ValueError(f"parameters at different AdamW steps {sorted(steps)}")
        self.n_steps = int(steps.pop()) if steps else 0
        self._step.fill_(float(self.n_steps))
        with torch.no_grad():
            for p, (col, n) in self.views.items():
                st = self.state.get(p)
                self._view(self.exp_avg, col, n, p.shape).copy_(st["exp_avg"] if st else torch.zeros(()))
                self._view(self.exp_avg_sq, col, n, p.shape).copy_(st["exp_avg_sq"] if st else torch.zeros(()))
        self.state.clear()
        if self.n_steps:
            self._bind_state()


def adamw(groups: list[dict], tc: TrainConfig, device: torch.device, rows: int = 1) -> torch.optim.Optimizer:
    """The training optimizer: fused AdamW on CUDA, ``FlatAdamW`` on the CPU, foreach AdamW elsewhere (MPS).
    ``rows``: the leading replica dimension of stacked weights (1 for one model)."""
    kw = dict(lr=tc.lr, betas=(tc.beta1, tc.beta2))
    if device.type == "cpu":
        return FlatAdamW(groups, rows=rows, **kw)
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, fused=fused, foreach=None if fused else True, **kw)


def clip_grad_norm(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float | None,
                   rows: int = 1) -> torch.Tensor:
    """Clip each replica's gradients to ``max_norm`` (None or 0: no clipping) and return their norms before
    clipping, shape (rows,): through ``FlatAdamW``'s buffer, else torch's per-tensor norms."""
    limit = max_norm if max_norm else math.inf
    if isinstance(optimizer, FlatAdamW):
        return optimizer.clip_grad_norm_(limit, params)
    if rows == 1:
        return torch.nn.utils.clip_grad_norm_(params, limit, foreach=True).reshape(1)
    return clip_per_replica(params, limit)


def clip_per_replica(weights: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ for each replica on its own: the L2 norm over replica i's gradients (the norm of the
    per-tensor norms, as torch computes it) scales replica i's gradients by min(1, max_norm / (norm + 1e-6)).
    Returns the norms before clipping (k,)."""
    grads = [w.grad for w in weights if w.grad is not None]
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]), dim=0)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return norms
