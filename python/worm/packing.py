"""The packed layout of masks: one bit per entry, many tensors in one flat uint8 tensor.

Tensor ``i`` of a set (its entries in row-major order) owns ``ceil(n_i / 8)`` bytes
starting at byte ``sum_{j<i} ceil(n_j / 8)``; entry ``e`` is bit ``e % 8`` (least
significant first) of byte ``offset_i + e // 8``; a set bit means *keep*; padding bits
are 0. docs/ops.md ("Packed masks and the window") is the specification; the ops, the
search's mask window and the optimizers' truncation bits all use it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["packed_nbytes", "byte_offsets", "pack", "pack_flat", "unpack", "popcount",
           "bit_weights"]


def packed_nbytes(n: int) -> int:
    return (int(n) + 7) // 8


def byte_offsets(numels: Sequence[int]) -> list:
    """Start byte of each tensor's segment; the last entry is the total size B."""
    offs = [0]
    for n in numels:
        offs.append(offs[-1] + packed_nbytes(n))
    return offs


_BIT_WEIGHTS = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8)


def bit_weights(device) -> torch.Tensor:
    """uint8 [8]: the weight of each bit of a byte, least significant first."""
    return _BIT_WEIGHTS.to(device)


def pack_flat(keep: torch.Tensor) -> torch.Tensor:
    """One tensor's packed segment: its entries (bool or 0/1, row-major), LSB first."""
    flat = keep.reshape(-1).to(torch.uint8)
    n = flat.numel()
    pad = packed_nbytes(n) * 8 - n
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.reshape(-1, 8) * bit_weights(flat.device)).sum(dim=1, dtype=torch.uint8)


def pack(keep_masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pack bool masks into the flat layout described in the module docstring."""
    keep_masks = list(keep_masks)
    if not keep_masks:
        raise ValueError("nothing to pack: the list of masks is empty")
    for i, m in enumerate(keep_masks):
        if m.dtype != torch.bool:
            raise TypeError(f"mask {i} has dtype {m.dtype}; masks are bool (True = keep)")
    return torch.cat([pack_flat(m) for m in keep_masks])


def unpack(packed: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list:
    """Inverse of :func:`pack` for tensors of the given shapes."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"packed masks are 1-D uint8, got {packed.dtype} with shape {tuple(packed.shape)}")
    numels = [math.prod(s) for s in shapes]
    offs = byte_offsets(numels)
    if packed.numel() != offs[-1]:
        raise ValueError(f"packed mask has {packed.numel()} bytes; shapes {list(shapes)} need {offs[-1]}")
    w = bit_weights(packed.device)
    out = []
    for i, (shape, n) in enumerate(zip(shapes, numels)):
        seg = packed[offs[i]:offs[i + 1]]
        bits = (seg.reshape(-1, 1) & w) != 0
        out.append(bits.reshape(-1)[:n].reshape(tuple(shape)))
    return out


_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def popcount(packed: torch.Tensor) -> torch.Tensor:
    """Number of set bits of a uint8 tensor (int64 scalar tensor)."""
    return _POPCOUNT8.to(packed.device)[packed.long()].sum()
