"""Helpers shared by several test files (tests/ is on sys.path, see conftest.py)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def truncating_hook(keep, r):
    """The gradient hook WORM's truncation must equal: g * (keep ? 1 : r), formed in
    fp32 for the float dtypes and rounded once; in the tensor's own dtype otherwise."""
    def fn(g):
        if g.dtype in (torch.float32, torch.bfloat16, torch.float16):
            return (g.float() * torch.where(keep, 1.0, r)).to(g.dtype)
        real = g.real.dtype if g.is_complex() else g.dtype
        return g * torch.where(keep, torch.ones((), dtype=real), torch.full((), r, dtype=real))
    return fn


def train_steps(model, opt, steps=4, seed=0, n_in=6, n_out=3):
    """A few optimizer steps of `model` (n_in features -> n_out classes) on fixed data."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, n_in, generator=g)
        y = torch.randint(0, n_out, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def zeroed_realised(model, plan):
    """The original with every channel the pruner removed zeroed (gamma and beta)."""
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, keep in plan.realised.items():
            mods[name].weight[~keep] = 0
            mods[name].bias[~keep] = 0
    return ref


def backward_and_step(loss, opt, scaler=None):
    """loss.backward() and opt.step(), through a GradScaler when one is given."""
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
