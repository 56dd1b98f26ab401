"""The gradient a truncating gradient hook returns, for any gradient a step may meet.

The fused kernels cover dense fp32/bf16/fp16 gradients; everything else (float64,
complex, sparse COO, any layout, DTensor shards) is truncated here, with the same
rounding as :func:`worm.reference.truncate_` where the dtypes overlap.
"""
from __future__ import annotations

import torch

from . import reference as _ref
from .ops import FLOAT_DTYPES
from .distributed import is_dtensor as _is_dtensor

__all__ = ["KERNEL_DTYPES", "truncated", "truncated_grad"]

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


def truncated(grad: torch.Tensor, keep_bits: torch.Tensor, r: float) -> torch.Tensor:
    """The gradient a hook multiplying the pruned entries by ``r`` returns (a new tensor).

    Any dtype, layout (channels_last, transposed, ...) or sparse COO gradient;
    ``keep_bits`` is the packed mask in the parameter's logical (row-major) order.
    """
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
