"""Network slimming: the l1 penalty ``g = trunc(g) + l1*sign(w)`` on representative weights.

Set by ``EarlyBird(l1=...)`` through :meth:`worm.optim.GradTruncation.set_l1`. The
penalty joins the gradient after truncation and before weight decay and momentum
(docs/method.md's order; the penalty itself is not truncated). Two ways in:

* other optimizers: the truncation pre-hook adds it to ``p.grad`` in place
  (:func:`add_in_place`), after truncating;
* :class:`worm.WormSGD`: the penalised tensors (BN gammas: a few KB) get
  ``trunc(g) + l1*sign(w)`` in one small pass and step untruncated on the same path
  as every other tensor (the fused kernel takes no l1 argument); their ``p.grad`` is
  swapped back after the step (:func:`swapped_grads`).

``l1 == 0`` registers nothing: the step is exactly the one without it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

from .distributed import local as _local
from .hook_grad import truncated_grad

__all__ = ["L1Penalties", "amp_scale", "l1_sign", "add_in_place", "swapped_grads"]


class L1Penalties:
    """Every owner's penalty on one optimizer: ``{owner key: (l1, {param: entry mask or None}, name)}``.

    One penalty per parameter: a second owner penalising a parameter already penalised
    is refused (the penalty would be added twice)."""

    def __init__(self):
        self._by_owner: dict = {}

    def __len__(self) -> int:
        return len(self._by_owner)

    def set(self, key, where: Optional[dict], l1: float, name: str = "an l1 penalty") -> None:
        if not where or l1 == 0:
            self._by_owner.pop(key, None)
            return
        mine = {id(p) for p in where}
        for k, (other_l1, other, other_name) in self._by_owner.items():
            shared = [p for p in other if id(p) in mine]
            if k != key and shared:
                raise ValueError(
                    f"{name}: a parameter of shape {tuple(shared[0].shape)} already has an l1 penalty "
                    f"(l1={other_l1}) from {other_name}; a second one would be added to its gradient "
                    "as well. Give the l1 to one search only (close() the other, or build it with l1=0)")
        self._by_owner[key] = (float(l1), dict(where), name)

    def remove(self, key) -> None:
        self._by_owner.pop(key, None)

    def terms(self):
        for l1, where, _ in self._by_owner.values():
            for p, m in where.items():
                yield p, m, l1


def amp_scale(optimizer) -> Optional[torch.Tensor]:
    """The loss scale GradScaler hands a fused optimizer (``optimizer.grad_scale``) while
    its gradients are still scaled; None once they are unscaled or without AMP."""
    gs = getattr(optimizer, "grad_scale", None)
    return gs if isinstance(gs, torch.Tensor) else None


def l1_sign(p: torch.Tensor, m: Optional[torch.Tensor],
            scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sign(w) on the penalised entries; times the loss scale when the gradient it joins
    is still scaled (a fused step under GradScaler unscales it afterwards, and a penalty
    added unscaled would shrink to l1/scale). The scale is a power of two: exact."""
    s = p.detach().sign()
    s = s if m is None else s * m
    return s if scale is None else s * scale.to(device=s.device, dtype=s.dtype)


def add_in_place(penalties: L1Penalties, optimizer) -> None:
    """``p.grad += l1*sign(w)`` on every penalised entry (after truncation)."""
    scale = amp_scale(optimizer)
    with torch.no_grad():
        for p, m, l1 in penalties.terms():
            if p.grad is not None:
                _local(p.grad).add_(_local(l1_sign(p, m, scale)), alpha=l1)


@contextmanager
def swapped_grads(optimizer, penalties: L1Penalties, bits: dict, r_of: dict):
    """Within: each penalised ``p.grad`` is ``trunc(g) + l1*sign(w)`` (a new tensor);
    yields the ids of the params swapped (they must step untruncated). ``p.grad`` is
    restored on exit, also when the step raises."""
    swapped = []
    try:
        with torch.no_grad():
            for p, m, l1 in penalties.terms():
                if p.grad is None:
                    continue
                g = truncated_grad(p.grad, bits[p], r_of[p]) if p in bits else p.grad.clone()
                g.add_(l1_sign(p, m, amp_scale(optimizer)), alpha=l1)
                swapped.append((p, p.grad))
                p.grad = g
        yield {id(p) for p, _ in swapped}
    finally:
        for p, g in swapped:
            p.grad = g
