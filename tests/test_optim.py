"""FlatAdamW (one buffer for every parameter, CPU) against torch's own AdamW and clip_grad_norm_: the same numbers
(bit for bit on the AVX2 host where it was written; the tests allow 1e-6, the size of a CPU whose vector kernels
round a tail element otherwise, while a wrong formula moves them by 1e-4 or more), the same state_dict both ways,
per-replica clipping for stacked weights."""

import copy

import pytest
import torch

from scaling_lab import optim
from scaling_lab.config import ModelConfig, TrainConfig
from scaling_lab.model import GPT, StackedGPT
from scaling_lab.optim import FlatAdamW, clip_per_replica

SHAPE = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, n_vocab=257)


def _batches(n: int, k: int = 0, b: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    lead = (k,) if k else ()
    return [(torch.randint(0, 257, (*lead, b, 32), generator=g), torch.randint(0, 257, (*lead, b, 32), generator=g))
            for _ in range(n)]


def _same(a, b, tol: float = 1e-6) -> bool:
    """Nested lists of floats equal within ``tol``."""
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, tol) for x, y in zip(a, b))
    return abs(a - b) <= tol


def _same_weights(m1: torch.nn.Module, m2: torch.nn.Module) -> bool:
    return all(torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(m1.parameters(), m2.parameters()))


def _run(model: torch.nn.Module, opt: torch.optim.Optimizer, batches, clip: float, flat: bool, rows: int = 1,
         lrs: list[float] | None = None) -> tuple[list[list[float]], list[list[float]]]:
    """Steps with a changing lr; returns per step the losses and the gradient norms before clipping."""
    params = list(model.parameters())
    losses, norms = [], []
    for i, (x, y) in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = (lrs or [3e-3 * (1 - i / len(batches))] * len(batches))[i]
        _, loss = model(x, y)
        loss.sum().backward()
        if flat:
            n = optim.clip_grad_norm(opt, params, clip, rows=rows)
        elif rows == 1:
            n = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True).reshape(1)
        else:
            n = clip_per_replica(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().reshape(-1).tolist())
        norms.append(n.tolist())
    return losses, norms


@pytest.mark.parametrize("clip", [1e9, 1.0, 0.05])
def test_flat_adamw_is_torch_adamw(clip):
    """Same init, batches and lr schedule: every loss, norm and final weight equal to torch.optim.AdamW(foreach)
    with clip_grad_norm_ (clipping never, sometimes, always active)."""
    torch.manual_seed(0)
    ref = GPT(SHAPE)
    mine = copy.deepcopy(ref)
    kw = dict(lr=3e-3, betas=(0.9, 0.95))
    a = _run(ref, torch.optim.AdamW(ref.param_groups(0.1), foreach=True, **kw), _batches(30), clip, flat=False)
    opt = FlatAdamW(mine.param_groups(0.1), **kw)
    b = _run(mine, opt, _batches(30), clip, flat=True)
    assert _same(a, b)
    assert _same_weights(ref, mine)
    if clip == 0.05:
        assert all(n[0] > 0.05 for n in b[1])  # the clip acted at every step
    # the parameters are views of the one buffer: the update reached the module
    assert all(p.untyped_storage().data_ptr() == opt.flat.untyped_storage().data_ptr() for p in mine.parameters())


def test_flat_adamw_per_replica_clipping_matches_the_stacked_reference():
    """rows=k: each replica clipped by its own norm and updated as AdamW + clip_per_replica do, bit for bit."""
    torch.manual_seed(0)
    models = [GPT(SHAPE) for _ in range(3)]
    ref, mine = StackedGPT(models), StackedGPT(models)
    kw = dict(lr=3e-3, betas=(0.9, 0.95))
    batches = _batches(20, k=3)
    a = _run(ref, torch.optim.AdamW(ref.param_groups(0.1), foreach=True, **kw), batches, 0.3, flat=False, rows=3)
    b = _run(mine, FlatAdamW(mine.param_groups(0.1), rows=3, **kw), batches, 0.3, flat=True, rows=3)
    assert _same(a, b)
    assert len({tuple(n) for n in b[1]}) > 1 and all(len(set(n)) == 3 for n in b[1])  # one norm per replica


def test_state_dict_moves_between_flat_and_torch_adamw():
    """A checkpoint of either optimizer resumes in the other and the next steps are the same as without the move
    (old checkpoints of torch's AdamW resume on the flat one)."""
    torch.manual_seed(0)
    base = GPT(SHAPE)
    kw = dict(lr=3e-3, betas=(0.9, 0.95))
    batches = _batches(12)

    straight = copy.deepcopy(base)
    opt = FlatAdamW(straight.param_groups(0.1), **kw)
    want = _run(straight, opt, batches, 1.0, flat=True, lrs=[1e-3] * 12)

    for first, second in ((FlatAdamW, torch.optim.AdamW), (torch.optim.AdamW, FlatAdamW)):
        m = copy.deepcopy(base)
        o1 = first(m.param_groups(0.1), **kw)
        got = _run(m, o1, batches[:6], 1.0, flat=first is FlatAdamW, lrs=[1e-3] * 6)
        sd = copy.deepcopy(o1.state_dict())
        assert sorted(sd["state"][0]) == ["exp_avg", "exp_avg_sq", "step"] and float(sd["state"][0]["step"]) == 6
        assert len({id(s["step"]) for s in sd["state"].values()}) == len(sd["state"])  # one step tensor each
        m2 = copy.deepcopy(m)
        o2 = second(m2.param_groups(0.1), **kw)
        o2.load_state_dict(sd)
        got2 = _run(m2, o2, batches[6:], 1.0, flat=second is FlatAdamW, lrs=[1e-3] * 6)
        assert _same(got[0] + got2[0], want[0]), (first.__name__, second.__name__)
        assert _same_weights(m2, straight)


def test_cpu_gets_the_flat_optimizer_with_adamw_settings():
    m = GPT(SHAPE)
    tc = TrainConfig(lr=2e-3, beta1=0.8, beta2=0.9, weight_decay=0.2)
    opt = optim.adamw(m.param_groups(tc.weight_decay), tc, torch.device("cpu"))
    assert isinstance(opt, FlatAdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert all(g["lr"] == 2e-3 and g["betas"] == (0.8, 0.9) for g in opt.param_groups)
    with pytest.raises(ValueError, match="leading dimension of 3"):
        FlatAdamW(GPT(SHAPE).param_groups(0.1), rows=3)


def test_a_gathered_gradient_is_not_reused_after_zero_grad():
    """clip gathers; zero_grad forgets that set, so the next step reads the new gradients (no stale update)."""
    torch.manual_seed(0)
    m = GPT(SHAPE)
    opt = FlatAdamW(m.param_groups(0.0), lr=1e-2)
    (x, y), (x2, y2) = _batches(2)
    m(x, y)[1].backward()
    opt.clip_grad_norm_(1.0)
    opt.zero_grad()
    before = opt.flat.clone()
    m(x2, y2)[1].backward()
    want = torch.cat([p.grad.reshape(1, -1) for g in opt.param_groups for p in g["params"]], dim=1)
    opt.step()
    assert torch.equal(opt.gbuf, want) and not torch.equal(opt.flat, before)
