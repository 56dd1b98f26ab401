"""WormSGD and gradient truncation for any optimizer.

Truncation (docs/method.md): while on, every optimizer step first multiplies the gradient
of each entry that the newest mask prunes by ``r``; weight decay and momentum then
act as usual. It behaves exactly like a gradient hook.

* :class:`WormSGD` is ``torch.optim.SGD`` (a subclass: same arguments, defaults,
  ``param_groups`` and ``state_dict``) whose step fuses truncation into the update
  when a kernel backend runs; with truncation off (or ``r == 1``) it *is* SGD's step.
* :class:`GradTruncation` (from :func:`truncation_pre_hook`) gives any other
  optimizer (AdamW, ...) the same truncation through a step pre-hook, one multi-tensor
  pass over the masked gradients.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from . import _ops
from . import reference as _ref
from .distributed import local as _local
from .distributed import sgd_step_ as _sgd_step_on_shards

__all__ = ["WormSGD", "GradTruncation", "truncation_pre_hook"]

_STATE_KEY = "worm_truncation"


def _check_r(r) -> float:
    r = float(r)
    if not math.isfinite(r) or r < 0:
        raise ValueError(f"truncation factor r must be finite and >= 0, got {r!r}")
    return r


def _pack_masks(masks: Dict[torch.Tensor, torch.Tensor], known: set, owner: str) -> dict:
    """{param: packed keep bits}, validating each mask against its parameter."""
    bits = {}
    for p, m in masks.items():
        if id(p) not in known:
            raise ValueError(f"{owner}: a truncation mask is keyed by a tensor (shape "
                             f"{tuple(p.shape)}) that the optimizer does not hold")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"{owner}: keep masks are bool tensors (True = keep), got "
                            f"{getattr(m, 'dtype', type(m).__name__)} for a parameter of shape {tuple(p.shape)}")
        if m.shape != p.shape:
            raise ValueError(f"{owner}: keep mask shape {tuple(m.shape)} does not match "
                             f"its parameter's {tuple(p.shape)}")
        if m.device != p.device:
            raise ValueError(f"{owner}: keep mask on {m.device} but its parameter on {p.device}")
        bits[p] = _ref.pack([_local(m)])  # DTensor params (FSDP2): bits of the local shard
    return bits


def _check_bits(bits: dict, owner: str) -> dict:
    for p, b in bits.items():
        n = _local(p).numel()  # a DTensor's bits cover its local shard
        if b.dtype != torch.uint8 or b.dim() != 1 or b.numel() != _ref.packed_nbytes(n):
            raise ValueError(f"{owner}: packed keep bits for a parameter of {n} entries must be "
                             f"uint8 [{_ref.packed_nbytes(n)}], got {b.dtype} {tuple(b.shape)}")
        if b.device != p.device:
            raise ValueError(f"{owner}: packed keep bits on {b.device} but parameter on {p.device}")
    return bits


class _TruncationState:
    """Packed keep bits per parameter and the factor r; None r means off."""

    def __init__(self):
        self.bits: dict = {}
        self.r: Optional[float] = None

    @property
    def active(self) -> bool:
        return self.r is not None and self.r != 1.0 and bool(self.bits)

    def state(self, index_of: dict) -> dict:
        return {"r": self.r, "bits": {index_of[id(p)]: b for p, b in self.bits.items()}}

    def load(self, sd: Optional[dict], params: list) -> None:
        if not sd or sd.get("r") is None:
            self.bits, self.r = {}, None
            return
        bits = {}
        for i, b in sd["bits"].items():
            p = params[int(i)]
            bits[p] = b.to(p.device)
        self.bits, self.r = _check_bits(bits, "load_state_dict"), float(sd["r"])


def _all_params(optimizer) -> list:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _no_sparse(p: torch.Tensor, owner: str) -> None:
    if p.grad is not None and p.grad.is_sparse:
        raise RuntimeError(f"{owner}: truncation does not support sparse gradients "
                           f"(parameter of shape {tuple(p.shape)} has one)")


class WormSGD(torch.optim.SGD):
    """``torch.optim.SGD`` with WORM gradient truncation fused into its step.

    Same arguments and defaults as ``torch.optim.SGD``. :meth:`set_truncation` turns
    truncation on for some parameters. ``state_dict()`` is SGD's plus one extra key
    (``"worm_truncation"``) that ``torch.optim.SGD`` ignores, so either optimizer loads
    the other's state.
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)
        self._trunc = _TruncationState()

    # -------------------------------------------------------------- truncation
    def set_truncation(self, masks: Optional[Dict[torch.Tensor, torch.Tensor]], r: float = 3e-3) -> None:
        """Truncate the pruned entries (``keep == False``) of these params by ``r``.

        ``masks``: ``{param: bool keep mask of the param's shape}``; None turns it off.
        """
        if masks is None:
            self._trunc.bits, self._trunc.r = {}, None
            return
        r = _check_r(r)
        known = {id(p) for p in _all_params(self)}
        self._trunc.bits = _pack_masks(masks, known, "WormSGD.set_truncation")
        self._trunc.r = r

    def set_truncation_bits(self, bits: Optional[dict], r: float = 3e-3) -> None:
        """As :meth:`set_truncation`, with masks already packed (``reference.pack``)."""
        if bits is None:
            self._trunc.bits, self._trunc.r = {}, None
            return
        known = {id(p) for p in _all_params(self)}
        for p in bits:
            if id(p) not in known:
                raise ValueError("WormSGD.set_truncation_bits: a key is not a parameter of this optimizer")
        self._trunc.bits, self._trunc.r = _check_bits(dict(bits), "WormSGD"), _check_r(r)

    @property
    def truncation(self) -> Optional[dict]:
        """``{"r": r, "params": n}`` while truncation is on, else None."""
        if self._trunc.r is None:
            return None
        return {"r": self._trunc.r, "params": len(self._trunc.bits)}

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        if not self._trunc.active:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                _no_sparse(p, "WormSGD")
        if not self._fused_step():
            # The reference path: truncation is a gradient hook, then SGD's own step.
            for p, bits in self._trunc.bits.items():
                if p.grad is not None:
                    _ref.truncate_([_local(p.grad)], [bits], self._trunc.r)
            super().step()
        return loss

    def _fused_step(self) -> bool:
        """Run every group through the backend's fused op; False: use the reference."""
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if (isinstance(group["lr"], torch.Tensor) or isinstance(group["weight_decay"], torch.Tensor)
                    or group.get("differentiable")):
                return False
            be = _ops.resolve(params[0].device)
            if be.name == "reference":
                return False
            groups.append((group, params, be))
        r = self._trunc.r
        for group, params, be in groups:
            grads = [p.grad for p in params]
            momentum = group["momentum"]
            bufs = [self.state[p].get("momentum_buffer") if momentum != 0 else None for p in params]
            bits = [self._trunc.bits.get(p) for p in params]
            new_bufs = _sgd_step_on_shards(be.sgd_step_, params, grads, bufs, bits, r=r, lr=group["lr"],
                                    weight_decay=group["weight_decay"], momentum=momentum,
                                    dampening=group["dampening"], nesterov=group["nesterov"],
                                    maximize=group["maximize"])
            if momentum != 0:
                for p, b in zip(params, new_bufs):
                    self.state[p]["momentum_buffer"] = b
        return True

    # -------------------------------------------------------------- state dict
    def state_dict(self):
        sd = super().state_dict()
        index_of = {id(p): i for i, p in enumerate(_all_params(self))}
        sd[_STATE_KEY] = self._trunc.state(index_of)
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        trunc = state_dict.pop(_STATE_KEY, None)
        super().load_state_dict(state_dict)
        self._trunc.load(trunc, _all_params(self))


class GradTruncation:
    """Truncation for any ``torch.optim.Optimizer``, applied by a step pre-hook.

    The hook multiplies, in place and in one multi-tensor pass, the gradients of the
    pruned entries by ``r`` just before the optimizer's step: the gradient-hook
    semantics of docs/method.md, with no per-parameter Python hooks.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._trunc = _TruncationState()
        self._handle = optimizer.register_step_pre_hook(self._pre_step)

    def set(self, masks: Optional[Dict[torch.Tensor, torch.Tensor]], r: float = 3e-3) -> None:
        if masks is None:
            self._trunc.bits, self._trunc.r = {}, None
            return
        known = {id(p) for p in _all_params(self.optimizer)}
        r = _check_r(r)
        self._trunc.bits = _pack_masks(masks, known, "GradTruncation.set")
        self._trunc.r = r

    def set_bits(self, bits: Optional[dict], r: float = 3e-3) -> None:
        if bits is None:
            self._trunc.bits, self._trunc.r = {}, None
            return
        self._trunc.bits, self._trunc.r = _check_bits(dict(bits), "GradTruncation"), _check_r(r)

    @property
    def active(self) -> bool:
        return self._trunc.active

    def _pre_step(self, optimizer, args, kwargs):
        if not self._trunc.active:
            return None
        by_device: dict = {}
        for p, bits in self._trunc.bits.items():
            if p.grad is None:
                continue
            _no_sparse(p, type(optimizer).__name__)
            g = _local(p.grad)  # FSDP2: truncate the local shard in place
            if g.numel() == 0:
                continue
            grads, bl = by_device.setdefault(g.device, ([], []))
            grads.append(g)
            bl.append(bits)
        for device, (grads, bl) in by_device.items():
            _ops.resolve(device).truncate_(grads, bl, self._trunc.r)
        return None

    def state_dict(self) -> dict:
        index_of = {id(p): i for i, p in enumerate(_all_params(self.optimizer))}
        return self._trunc.state(index_of)

    def load_state_dict(self, sd: dict) -> None:
        self._trunc.load(sd, _all_params(self.optimizer))

    def remove(self) -> None:
        self._handle.remove()


def truncation_pre_hook(optimizer: torch.optim.Optimizer) -> GradTruncation:
    """Attach WORM truncation to any optimizer; returns the handle that sets masks."""
    return GradTruncation(optimizer)
