"""The gradient a truncating gradient hook returns, for any gradient a step may meet.

The fused kernels cover dense fp32/bf16/fp16 gradients; everything else (float64,
complex, sparse COO, any layout, DTensor shards) is truncated here, with the same
rounding as :func:`worm.reference.truncate_` where the dtypes overlap.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference as _ref
from .ops import FLOAT_DTYPES
from .distributed import is_dtensor as _is_dtensor

__all__ = ["KERNEL_DTYPES", "truncated", "truncated_grad", "BackwardHook"]

KERNEL_DTYPES = FLOAT_DTYPES


def _scaled(v: torch.Tensor, keep: torch.Tensor, r: float) -> torch.Tensor:
    if v.dtype in KERNEL_DTYPES:
        # fp32 product rounded once: reference.truncate_'s rule
        scale = torch.where(keep, torch.ones((), device=v.device),
                            torch.full((), r, dtype=torch.float32, device=v.device))
        return (v.float() * scale).to(v.dtype)
    real = v.real.dtype if v.is_complex() else v.dtype
    scale = torch.where(keep, torch.ones((), dtype=real, device=v.device),
                        torch.full((), r, dtype=real, device=v.device))
    return v * scale


def truncated(grad: torch.Tensor, keep_bits: torch.Tensor, r: float,
              keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gradient a hook multiplying the pruned entries by ``r`` returns (a new tensor).

    Any dtype, layout (channels_last, transposed, ...) or sparse COO gradient;
    ``keep_bits`` is the packed mask in the parameter's logical (row-major) order
    (``keep``: the same mask already unpacked, when the caller keeps one).
    """
    if keep is None:
        keep = _ref.unpack(keep_bits, [grad.shape])[0]
    if grad.is_sparse:  # entry by entry, duplicates not summed first: as a hook sees them
        idx = grad._indices()
        vals = _scaled(grad._values(), keep[tuple(idx)], r)
        return torch.sparse_coo_tensor(idx, vals, grad.shape, is_coalesced=grad.is_coalesced(),
                                       check_invariants=False)
    return _scaled(grad, keep, r)


def truncated_grad(grad, bits, r):
    """:func:`truncated` for a parameter's gradient; a DTensor's bits cover its local shard."""
    if not _is_dtensor(grad):
        return truncated(grad, bits, r)
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(truncated(grad.to_local(), bits, r), grad.device_mesh, grad.placements,
                              run_check=False, shape=grad.shape, stride=grad.stride())


class BackwardHook:
    """The gradient hook (``p.register_hook``) of a truncation owner with
    ``at="backward"`` (worm.truncation): the owner's current mask and r, read at each
    backward, so the masks can change between steps without re-registering."""

    def __init__(self, owner, p: torch.Tensor):
        self.owner, self.p = owner, p

    def __call__(self, grad):
        o, p = self.owner, self.p
        bits = o.bits.get(p)
        if bits is None or o.r is None or o.r == 1.0:
            return None
        if grad.shape != p.shape or p.numel() != o.sizes.get(p):
            raise ValueError(f"{o.name}: a parameter of shape {tuple(p.shape)} no longer matches its "
                             "truncation mask (resized after the mask was set)")
        return truncated(grad, bits, o.r, o.keep_of(p, bits))
