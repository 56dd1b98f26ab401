"""``torch.ops.worm.mask_update_``: the packed keep-mask into a window row, XOR counts.

Schema, checks, fake kernel, wrapper and the reference, together. The keep rule
(:func:`keep`) is written here once for every Python user (the reference, masks).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..packing import pack, popcount
from . import _common as C

SCHEMA = "mask_update_(Tensor[] tensors, Tensor thr, Tensor(a!) window, int head) -> Tensor"


def keep(t: torch.Tensor, thr) -> torch.Tensor:
    """The keep rule: an entry is kept iff its fp32 ``|w|`` is above the threshold
    (ties at the threshold are pruned)."""
    return t.detach().float().abs() > thr


def check(tensors, thr, window, head):
    dev = tensors[0].device if tensors else None
    C.check_weights(tensors, "mask_update_ tensors", dev)
    T = len(tensors)
    C.type_(thr.dtype == torch.float32, lambda: f"thr has dtype {thr.dtype}; thresholds are float32")
    C.value(thr.dim() == 1 and thr.numel() == T,
            lambda: f"thr has shape {tuple(thr.shape)}; it holds one threshold per tensor: [{T}]")
    C.value(thr.device == dev, lambda: f"thr is on {thr.device}, the tensors on {dev}")
    C.check_window(tensors, window, head, dev)


def reference(tensors, thr, window, head):
    """New mask (:func:`keep` by ``thr[i]``) into ``window[head]``; int64 [l]: for
    every row j, popcount(new XOR row j's content before the write)."""
    new = pack([keep(t, thr[i]) for i, t in enumerate(tensors)]).to(window.device)
    counts = torch.stack([popcount(new ^ window[j]) for j in range(window.shape[0])])
    window[head].copy_(new)
    return counts


def _kernel(tensors, thr, window, head):
    check(tensors, thr, window, head)
    impl = C.choose(window.device)
    C.check_rows(impl, window)
    return impl.mask_update_(C.contig(tensors), thr.contiguous(), window, head)


def _fake(tensors, thr, window, head):
    check(tensors, thr, window, head)
    return window.new_empty((window.shape[0],), dtype=torch.int64)


C.register("mask_update_", SCHEMA, _kernel, _fake)


def mask_update_(tensors: Sequence[torch.Tensor], thr: torch.Tensor, window: torch.Tensor,
                 head: int) -> torch.Tensor:
    """Writes the packed mask ``|w| > thr[i]`` into ``window[head]``; int64 [l] counts.

    ``window`` is uint8 [l, B], a ring of packed masks (layout: docs/ops.md); the
    result holds, for every row j, popcount(new mask XOR row j's content before the
    write). Row ``head``'s own count is against the mask it overwrote.
    """
    tensors = C.nonempty(C.tensor_list(tensors, "mask_update_ tensors"), "mask_update_")
    return torch.ops.worm.mask_update_([t.detach() for t in tensors], thr, window, int(head))
