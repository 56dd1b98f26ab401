"""Applying an unstructured ticket so that it stays applied through retraining.

The author's code used ``prune.remove`` and let pruned weights grow back; here the
pruned entries are zeroed now, their gradients are zeroed by a tensor hook (so
neither the gradient nor anything built from it, e.g. Adam's moments, sees them),
and the owning module re-zeroes them before every forward, which also undoes what
weight decay or an old momentum buffer could add. Pass the optimizer to re-zero
right after each step as well, so the weights are exactly zero at all times.
Parameter names and ``state_dict`` keys do not change (unlike a parametrization).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

__all__ = ["apply_masks", "remove_masks", "MaskHandle"]

_ATTR = "_worm_mask_handle"


class MaskHandle:
    """The hooks keeping a ticket applied; ``remove()`` lets the weights train freely."""

    def __init__(self, masks: dict):
        self.masks = masks          # {param: bool keep mask}
        self._handles: list = []

    @torch.no_grad()
    def reapply(self) -> None:
        for p, keep in self.masks.items():
            p.mul_(keep)

    def sparsity(self) -> float:
        """Fraction of the masked entries that are pruned."""
        n = sum(m.numel() for m in self.masks.values())
        pruned = sum(int((~m).sum()) for m in self.masks.values())
        return pruned / max(n, 1)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _owners(model: nn.Module) -> dict:
    owners = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), mod)
    return owners


def apply_masks(model: nn.Module, ticket: Dict[torch.Tensor, torch.Tensor],
                optimizer: Optional[torch.optim.Optimizer] = None) -> MaskHandle:
    """Zero the pruned entries of ``ticket`` (``{param: bool keep}``) and keep them zero."""
    if not ticket:
        raise ValueError("apply_masks: the ticket is empty")
    owners = _owners(model)
    masks = {}
    for p, keep in ticket.items():
        if id(p) not in owners:
            raise ValueError(f"apply_masks: a ticket entry (shape {tuple(p.shape)}) is not a "
                             "parameter of this model")
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            raise TypeError("apply_masks: keep masks are bool tensors (True = keep)")
        if keep.shape != p.shape:
            raise ValueError(f"apply_masks: mask shape {tuple(keep.shape)} != parameter shape {tuple(p.shape)}")
        masks[p] = keep.to(p.device)
    # only once the new ticket is known good: a rejected one must not drop the old
    remove_masks(model)
    handle = MaskHandle(masks)
    handle.reapply()
    by_module: dict = {}
    for p, keep in masks.items():
        by_module.setdefault(owners[id(p)], []).append(p)
        if p.requires_grad:
            handle._handles.append(p.register_hook(lambda g, keep=keep: g * keep))

    def _rezero(module, args, params):
        with torch.no_grad():
            for p in params:
                p.mul_(masks[p])

    for mod, params in by_module.items():
        handle._handles.append(mod.register_forward_pre_hook(
            lambda m, a, params=params: _rezero(m, a, params)))
    if optimizer is not None:
        handle._handles.append(optimizer.register_step_post_hook(lambda *a: handle.reapply()))
    setattr(model, _ATTR, handle)
    return handle


def remove_masks(model: nn.Module) -> None:
    """Remove the hooks of a ticket applied with :func:`apply_masks` (weights keep values)."""
    handle = getattr(model, _ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(model, _ATTR)
