"""``torch.ops.worm.sgd_step_``: one fused WormSGD step, truncation then torch.optim.SGD.

Schema, checks, fake kernel, wrapper and the reference, together. ``momentum_buffers``:
one per param (allocated by the caller) or none when momentum == 0; ``fresh[i] != 0``
marks a buffer this step initialises, as torch.optim.SGD's first step does. The
wrapper takes None for a buffer not created yet and allocates it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from . import _common as C
from .truncate import reference as _truncate_reference

SCHEMA = ("sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
          "int[] fresh, Tensor?[] keep_bits, *, float r, float lr, float weight_decay, "
          "float momentum, float dampening, bool nesterov, bool maximize) -> ()")


def check(params, grads, bufs, fresh, keep_bits, momentum):
    dev = params[0].device if params else None
    C.check_weights(params, "sgd_step_ params", dev)
    T = len(params)
    C.value(len(grads) == T, lambda: f"{T} params but {len(grads)} grads")
    C.value(len(keep_bits) == T, lambda: f"{T} params but {len(keep_bits)} keep_bits")
    if momentum != 0:
        C.value(len(bufs) == T and len(fresh) == T,
                lambda: f"{T} params but {len(bufs)} momentum buffers and {len(fresh)} fresh flags")
    else:
        C.value(len(bufs) == 0 and len(fresh) == 0,
                lambda: "momentum is 0: pass no momentum buffers and no fresh flags")
    for i, p in enumerate(params):
        C.check_contiguous(p, f"params[{i}]")
        for what, x in (("grads", grads[i]), ("momentum_buffers", bufs[i] if bufs else None)):
            if x is None:
                continue
            C.type_(x.dtype == p.dtype,
                    lambda: f"{what}[{i}] has dtype {x.dtype}, its param {p.dtype}")
            C.value(x.shape == p.shape and x.device == p.device,
                    lambda: f"{what}[{i}] is {tuple(x.shape)} on {x.device}; its param is "
                            f"{tuple(p.shape)} on {p.device}")
        if bufs:
            C.check_contiguous(bufs[i], f"momentum_buffers[{i}]")
        if keep_bits[i] is not None:
            C.check_bits(keep_bits[i], p.numel(), dev, f"keep_bits[{i}]")


def reference(params, grads, momentum_buffers, fresh, keep_bits, *, r, lr, weight_decay,
              momentum, dampening, nesterov, maximize):
    """One step, in place: truncation (a gradient hook) then torch.optim.SGD's math.

    Follows torch.optim.SGD's single-tensor path op by op, so with no truncation (or
    r == 1) the result is bit-for-bit SGD's. A ``fresh`` buffer receives the
    truncated, decayed gradient (SGD's ``clone`` on the first step). Grads are not
    modified.
    """
    for i, p in enumerate(params):
        g = grads[i]
        if keep_bits[i] is not None and r != 1.0:
            g = g.clone()
            _truncate_reference([g], [keep_bits[i]], r)
        g = g if not maximize else -g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if fresh[i]:
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g.add(buf, alpha=momentum) if nesterov else buf
        p.add_(g, alpha=-lr)


def _kernel(params, grads, momentum_buffers, fresh, keep_bits, *, r, lr, weight_decay,
            momentum, dampening, nesterov, maximize):
    check(params, grads, momentum_buffers, fresh, keep_bits, momentum)
    bits = [None if b is None else b.contiguous() for b in keep_bits]
    C.choose(params[0].device).sgd_step_(
        params, C.contig(grads), momentum_buffers, list(fresh), bits, r=r, lr=lr,
        weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=nesterov,
        maximize=maximize)


def _fake(params, grads, momentum_buffers, fresh, keep_bits, *, r, lr, weight_decay,
          momentum, dampening, nesterov, maximize):
    check(params, grads, momentum_buffers, fresh, keep_bits, momentum)


C.register("sgd_step_", SCHEMA, _kernel, _fake)


def with_optional_buffers(step, params, grads, momentum_buffers, keep_bits, **hyper):
    """Calls ``step`` (the op, or an implementation of it) with None buffers allocated
    and flagged fresh; returns the buffers (all None when momentum == 0)."""
    if hyper["momentum"] != 0:
        fresh = [1 if b is None else 0 for b in momentum_buffers]
        bufs = [torch.empty_like(p, memory_format=torch.contiguous_format) if b is None else b
                for p, b in zip(params, momentum_buffers)]
        step(params, grads, bufs, fresh, keep_bits, **hyper)
        return bufs
    step(params, grads, [], [], keep_bits, **hyper)
    return [None] * len(params)


def sgd_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              momentum_buffers: Sequence[Optional[torch.Tensor]],
              keep_bits: Sequence[Optional[torch.Tensor]], *, r: float, lr: float,
              weight_decay: float, momentum: float, dampening: float, nesterov: bool,
              maximize: bool) -> List[Optional[torch.Tensor]]:
    """One fused WormSGD step: truncation by ``r``, then torch.optim.SGD's update.

    ``momentum_buffers[i]`` None means "first step" (the buffer becomes the truncated,
    decayed gradient, as in torch.optim.SGD); ``keep_bits[i]`` None: no truncation
    for that param. Returns the buffers (new tensors where None came in; all None
    when momentum == 0). Grads are left unmodified. An empty list is a no-op.
    """
    params = [p.detach() for p in C.tensor_list(params, "sgd_step_ params")]
    if not params:
        return []
    grads = C.tensor_list(grads, "sgd_step_ grads")
    bufs = C.tensor_list(momentum_buffers, "momentum_buffers", optional=True)
    bits = C.tensor_list(keep_bits, "keep_bits", optional=True)
    if len(bufs) != len(params):
        raise ValueError(f"worm: {len(params)} params but {len(bufs)} momentum buffers "
                         "(pass None for a buffer not created yet)")
    return with_optional_buffers(
        torch.ops.worm.sgd_step_, params, grads, bufs, bits, r=float(r), lr=float(lr),
        weight_decay=float(weight_decay), momentum=float(momentum), dampening=float(dampening),
        nesterov=bool(nesterov), maximize=bool(maximize))
