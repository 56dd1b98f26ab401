"""``torch.ops.worm.truncate_``: WORM gradient truncation in place, ``g *= keep ? 1 : r``.

Schema, checks, fake kernel, wrapper and the reference, together.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..packing import unpack
from . import _common as C

SCHEMA = "truncate_(Tensor(a!)[] grads, Tensor[] keep_bits, float r) -> ()"


def check(grads, keep_bits, r):
    dev = grads[0].device if grads else None
    C.check_weights(grads, "truncate_ grads", dev)
    C.value(len(keep_bits) == len(grads),
            lambda: f"{len(grads)} grads but {len(keep_bits)} packed masks")
    for i, (g, b) in enumerate(zip(grads, keep_bits)):
        C.check_contiguous(g, f"grads[{i}]")
        C.check_bits(b, g.numel(), dev, f"keep_bits[{i}]")


def reference(grads, keep_bits, r):
    """In place: g <- g * (keep ? 1 : r), ``keep_bits[i]`` the packed mask of grads[i].

    The product is formed in fp32 and rounded once to the gradient's dtype (for fp32
    gradients exactly a hook computing ``g * where(keep, 1, r)``)."""
    for g, bits in zip(grads, keep_bits):
        keep = unpack(bits, [g.shape])[0]
        scale = torch.where(keep, torch.ones((), device=g.device),
                            torch.full((), float(r), dtype=torch.float32, device=g.device))
        g.copy_(g.float() * scale)


def _kernel(grads, keep_bits, r):
    check(grads, keep_bits, r)
    C.choose(grads[0].device).truncate_(grads, C.contig(keep_bits), r)


def _fake(grads, keep_bits, r):
    check(grads, keep_bits, r)


C.register("truncate_", SCHEMA, _kernel, _fake)


def truncate_(grads: Sequence[torch.Tensor], keep_bits: Sequence[torch.Tensor], r: float) -> None:
    """In place, for every i: ``grads[i] *= keep ? 1 : r`` (keep from ``keep_bits[i]``).

    The product is formed in fp32 and rounded once to the gradient's dtype: for fp32
    gradients exactly what a hook computing ``g * where(keep, 1, r)`` does.
    An empty list is a no-op.
    """
    grads = C.tensor_list(grads, "truncate_ grads")
    if grads:
        torch.ops.worm.truncate_(grads, C.tensor_list(keep_bits, "keep_bits"), float(r))
