"""Keep training after pruning: hand an optimizer the pruned model's parameters with
its per-parameter state sliced to the kept entries.

Every state tensor of a parameter's shape (SGD's momentum buffer, Adam's exp_avg /
exp_avg_sq / max_exp_avg_sq, Adagrad's sum, ...) is sliced with the parameter's index
map, so the next step equals that of the same optimizer had it always trained the
smaller model; scalars (Adam's ``step``) are kept. State of another shape (LBFGS's
flat history, Adafactor's factored moments) cannot be sliced: such an optimizer is
refused, with the reason, before anything changes.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

__all__ = ["check_sliceable", "move_optimizer"]


def _truncating_owner(opt, ids: set):
    """The name of a worm search still truncating or penalising one of ``ids``."""
    from .truncation import ATTR
    st = getattr(opt, ATTR, None)
    if st is None:
        return None
    for o in st._owners.values():
        if o.claimed & ids or any(id(p) in ids for p in o.bits):
            return o.name
    if any(id(p) in ids for p, _, _ in st.l1.terms()):
        return "an l1 penalty"
    return None


def check_sliceable(opt, model: nn.Module) -> None:
    """Refuse (ValueError) an optimizer whose state for ``model``'s parameters cannot be
    sliced, or that a worm search still truncates; changes nothing."""
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"prune_channels: optimizer must be a torch.optim.Optimizer, got {type(opt).__name__}")
    names = {id(p): n for n, p in model.named_parameters()}
    held = [p for g in opt.param_groups for p in g["params"] if id(p) in names]
    if not held:
        raise ValueError(f"prune_channels: the optimizer holds none of this {type(model).__name__}'s "
                         "parameters; pass the optimizer that trains it")
    who = _truncating_owner(opt, {id(p) for p in held})
    if who is not None:
        raise ValueError(f"prune_channels: the optimizer is still truncated by {who}; call "
                         "search.close() before pruning (the search ends where pruning begins)")
    cls = type(opt).__name__
    if isinstance(opt, torch.optim.LBFGS):
        raise ValueError("prune_channels: LBFGS keeps one flat history over all its parameters, "
                         "which cannot be sliced to the kept channels; prune without optimizer= "
                         "and build a new LBFGS on the small model")
    for p in held:
        for key, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                raise ValueError(
                    f"prune_channels: {cls} state {key!r} of {names[id(p)]} has shape {tuple(v.shape)}, "
                    f"not its parameter's {tuple(p.shape)}, so it cannot be sliced to the kept "
                    f"channels; prune without optimizer= and build a new {cls} on the small model")


def move_optimizer(opt, model: nn.Module, small: nn.Module, maps: Dict[str, torch.Tensor]) -> None:
    """Swap ``model``'s parameters in ``opt`` for ``small``'s (same names), slicing their
    state by ``maps`` ({name: flat index of each kept entry}); checked by
    :func:`check_sliceable` first."""
    old = {id(p): n for n, p in model.named_parameters()}
    new = dict(small.named_parameters())
    for group in opt.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            name = old.get(id(p))
            if name is None:
                continue  # not the model's: left as it is
            q = new[name]
            state = opt.state.pop(p, None)
            if state:
                idx = maps.get(name)
                opt.state[q] = {k: _slice(v, p, q, idx) for k, v in state.items()}
            params[i] = q


def _slice(v, p: torch.Tensor, q: torch.Tensor, idx) -> object:
    if not isinstance(v, torch.Tensor) or v.dim() == 0 or tuple(v.shape) != tuple(p.shape):
        return v
    if tuple(q.shape) == tuple(p.shape):
        return v
    return v.reshape(-1)[idx.reshape(-1).to(v.device)].view(q.shape)
